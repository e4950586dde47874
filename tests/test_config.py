"""TrainConfig: its checks, and its choices against the library's own lists."""

import dataclasses
import re

import pytest

from co2_tf import config, optimizers
from co2_tf.data import augment
from co2_tf.errors import UserError
from co2_tf.nets import backbones


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


# Each bad value, and the start of the message only the check of that field gives:
# the test fails if that check is removed or another one fires instead.
BAD_VALUES = [
    (dict(model_dir=""), "--model_dir is required"),
    (dict(backbone="vgg"), "unknown --backbone='vgg'"),
    (dict(bn="batch"), "unknown --bn='batch'"),
    (dict(image_size=0), "--image_size=0 must be > 0"),
    (dict(batch_size=-128), "--batch_size=-128 must be > 0"),
    (dict(dim=0), "--dim=0 must be > 0"),
    (dict(queue_size=0), "--queue_size=0 must be > 0"),
    (dict(steps_per_execution=0), "--steps_per_execution=0 must be > 0"),
    (dict(checkpoint_every=0), "--checkpoint_every=0 must be > 0"),
    (dict(keep_checkpoints=0), "--keep_checkpoints=0 must be > 0"),
    (dict(log_every=0), "--log_every=0 must be > 0"),
    (dict(knn_k=0), "--knn_k=0 must be > 0"),
    (dict(temperature=0.0), "--temperature=0.0 must be > 0"),
    (dict(consistency_temperature=float("nan")), "--consistency_temperature=nan must be > 0"),
    (dict(learning_rate=float("inf")), "--learning_rate=inf must be > 0"),
    (dict(knn_temperature=-1.0), "--knn_temperature=-1.0 must be > 0"),
    (dict(consistency_weight=-1.0), "--consistency_weight=-1.0 must be >= 0"),
    (dict(ema_momentum=1.0), "--ema_momentum=1.0 must be in [0, 1)"),
    (dict(ema_momentum=-0.5), "--ema_momentum=-0.5 must be in [0, 1)"),
    (dict(momentum=-0.1), "--momentum and --weight_decay must be >= 0"),
    (dict(weight_decay=-1.0), "--momentum and --weight_decay must be >= 0"),
    (dict(bn_groups=-1), "--bn_groups=-1 must be >= 0"),
    (dict(epochs=0), "set --epochs or --train_steps to a positive number"),
    (dict(train_steps=-5), "--epochs, --train_steps and --warmup_epochs must be >= 0"),
    (dict(warmup_epochs=-1.0), "--epochs, --train_steps and --warmup_epochs must be >= 0"),
    (dict(batch_size=96, queue_size=4100),
     "--queue_size=4100 is not a multiple of --batch_size=96"),
    (dict(knn_every=-1), "--knn_every must be >= 0"),
    (dict(consistency_over="all"), "unknown --consistency_over='all'"),
    (dict(consistency_kl="reverse"), "unknown --consistency_kl='reverse'"),
    (dict(consistency_warmup_epochs=-1.0), "--consistency_warmup_epochs=-1.0 must be >= 0"),
]


@pytest.mark.parametrize("bad,message", BAD_VALUES, ids=lambda v: str(v) if isinstance(v, dict)
                         else None)
def test_bad_values(bad, message):
    cfg = config.TrainConfig(**{"model_dir": "/tmp/x", **bad})
    with pytest.raises(UserError, match="^" + re.escape(message)):
        cfg.check()


@pytest.mark.parametrize("bad,replicas,message", [
    # The static checks pass: only the replica count shows the problem.
    (dict(bn_groups=3), 1, "--bn_groups=3 does not divide the per-replica batch 128"),
    (dict(batch_size=100, queue_size=400, bn_groups=1), 3,
     "--batch_size=100 (global) is not a multiple of the 3 replicas"),
])
def test_bad_values_for_the_replicas(bad, replicas, message):
    cfg = config.TrainConfig(**{"model_dir": "/tmp/x", **bad}).check()
    with pytest.raises(UserError, match="^" + re.escape(message)):
        cfg.check_replicas(replicas)


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
