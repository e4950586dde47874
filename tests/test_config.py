"""TrainConfig: its checks, its fields' help and choices, and the one list of each choice."""

import dataclasses
import json
import re

import pytest

from co2_tf import config, optimizers
from co2_tf.data import augment
from co2_tf.errors import UserError
from co2_tf.nets import backbones


def test_each_list_of_choices_is_defined_once():
    # The library checks against the very tuples the flags offer (no copy to drift): the
    # packages' TF-free __init__.py and co2_tf/choices.py define them, the TF modules import
    # them.
    from co2_tf import choices, data, distribute, method, nets, precision  # noqa: PLC0415

    assert backbones.BACKBONES is nets.BACKBONES
    assert optimizers.SCHEDULES is choices.SCHEDULES and optimizers.OPTIMIZERS is choices.OPTIMIZERS
    assert precision.PRECISIONS is choices.PRECISIONS
    assert distribute.STRATEGIES is choices.STRATEGIES
    assert augment.RECIPES is data.AUGMENTS
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(config.TrainConfig)}
    assert choices["backbone"] == nets.BACKBONES and choices["bn"] == method.BN_MODES
    assert choices["head"] == method.HEADS and choices["augment"] == data.AUGMENTS
    assert choices["conv_filter_grad"] == ("auto", "tf", "matmul")


def test_defaults_pass_and_every_field_has_help_and_a_group():
    config.TrainConfig(model_dir="/tmp/x").check()
    for field in dataclasses.fields(config.TrainConfig):
        assert field.metadata["help"] and field.metadata["group"] in config.GROUPS, field.name


def test_every_tool_config_field_has_help():
    # What --help and docs/flags.md print; a field without help would be no flag at all.
    from co2_tf.evaluation import drawing, knn, linear_probe, retrieval, semi_supervised
    from co2_tf.interop import convert, export

    for cls in (knn.KnnConfig, linear_probe.LinearEvalConfig, retrieval.RetrievalConfig,
                semi_supervised.SemiSupervisedConfig, drawing.CurveConfig, export.ExportConfig,
                convert.ConvertConfig):
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help"), (cls.__name__, field.name)
    assert linear_probe.LinearEvalConfig(model_dir="x", protocol="fast").check()
    with pytest.raises(UserError, match="^unknown --strategy='warp'"):
        knn.KnnConfig(model_dir="x", strategy="warp").check()


def test_new_fields_load_from_old_run_dirs():
    # A config.json written before end_of_run_knn and conv_filter_grad existed: their defaults.
    old = json.loads(config.TrainConfig(model_dir="/tmp/x").to_json())
    del old["end_of_run_knn"], old["conv_filter_grad"]
    loaded = config.TrainConfig.from_dict(old)
    assert loaded.end_of_run_knn is True and loaded.conv_filter_grad == "auto"
    # ... and neither decides a checkpoint's shapes: a run dir resumes with other values.
    assert not {"end_of_run_knn", "conv_filter_grad"} & set(config.ARCHITECTURE_FIELDS)
    config.check_compatible(loaded, dataclasses.replace(loaded, end_of_run_knn=False,
                                                        conv_filter_grad="tf"))


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
    (dict(conv_filter_grad="fast"), "unknown --conv_filter_grad='fast'"),
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
