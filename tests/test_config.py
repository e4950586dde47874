"""TrainConfig: its checks, and its choices against the library's own lists."""

import dataclasses

import pytest

from co2_tf import augment, backbones, config, optimizers
from co2_tf.errors import UserError


def test_flag_choices_match_the_library():
    # config.py keeps its own copies so that tools/train.py rejects a bad flag
    # before importing TF; they must not drift from what the library builds.
    assert config.BACKBONES == backbones.BACKBONES
    assert config.SCHEDULES == optimizers.SCHEDULES
    assert config.OPTIMIZERS == optimizers.OPTIMIZERS
    assert set(config.AUGMENTS) <= set(augment.RECIPES)


def test_defaults_pass_and_every_field_has_help():
    config.TrainConfig(model_dir="/tmp/x").check()
    assert {f.name for f in dataclasses.fields(config.TrainConfig)} == set(config.HELP)


@pytest.mark.parametrize("bad", [dict(batch_size=96, queue_size=4100),
                                 dict(bn_groups=3), dict(ema_momentum=1.0)])
def test_bad_values(bad):
    cfg = config.TrainConfig(model_dir="/tmp/x", **bad)
    with pytest.raises(UserError):
        cfg.check()
        cfg.check_replicas(1)


def test_replica_checks():
    cfg = config.TrainConfig(model_dir="/tmp/x", batch_size=128)
    assert cfg.check_replicas(1) == 4 and cfg.check_replicas(2) == 1
    with pytest.raises(UserError, match="multiple of the 3 replicas"):
        cfg.check_replicas(3)


def test_compatibility_names_the_mismatch():
    saved = config.TrainConfig(model_dir="/tmp/x")
    now = dataclasses.replace(saved, dim=64, backbone="resnet18", learning_rate=1.0)
    with pytest.raises(UserError) as caught:
        config.check_compatible(saved, now)
    assert "--dim" in str(caught.value) and "--backbone" in str(caught.value)
    assert "--learning_rate" not in str(caught.value)
