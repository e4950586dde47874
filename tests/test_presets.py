"""The accelerator presets (flags/imagenet_*_{tpu,gpu}.cfg, the batch-4096 LARS one): parsed,
checked for their replicas, the recipe they derive from kept, and built (not trained).

(tests/test_train.py parses every preset with the tool's own flags; tests/test_lowering.py
lowers the TPU MoCo v2 preset's step. Here: what makes each an accelerator recipe.)
"""
import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
import throughput_model as throughput
from helpers.presets import preset_config

from co2_tf import build, optimizers

EXECUTION = {"precision", "steps_per_execution", "strategy"}
ACCELERATOR = {  # preset -> (its recipe, precision, strategy, replicas it must split over)
    "imagenet_mocov1_co2_tpu.cfg": ("imagenet_mocov1_co2.cfg", "mixed_bfloat16", "tpu", (8, 16)),
    "imagenet_mocov2_co2_tpu.cfg": ("imagenet_mocov2_co2.cfg", "mixed_bfloat16", "tpu", (8, 16)),
    "imagenet_mocov1_co2_gpu.cfg": ("imagenet_mocov1_co2.cfg", "mixed_float16", "mirrored",
                                    (2, 4, 8)),
    "imagenet_mocov2_co2_gpu.cfg": ("imagenet_mocov2_co2.cfg", "mixed_float16", "mirrored",
                                    (2, 4, 8)),
}
LARGE = "imagenet_mocov2_co2_lars4096_tpu.cfg"


@pytest.mark.parametrize("name", sorted(ACCELERATOR))
def test_accelerator_preset_is_its_recipe_on_the_accelerator(name):
    recipe, precision, strategy, replicas = ACCELERATOR[name]
    config, base = preset_config(name), preset_config(recipe)
    changed = {f.name for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(base, f.name)}
    assert changed == EXECUTION
    assert (config.precision, config.strategy) == (precision, strategy)
    assert config.steps_per_execution > 1
    for n in replicas:
        assert config.check_replicas(n) == 1  # one shuffle-BN group per replica


def test_large_batch_preset():
    """Batch 4096, LARS, lr scaled linearly with the batch from 0.3 per 256 (SimCLR's
    rule), a warmup, and a queue of whole batches."""
    config = preset_config(LARGE)
    assert config.batch_size == 4096 and config.optimizer == "lars"
    assert config.learning_rate == pytest.approx(0.3 * 4096 / 256)
    assert config.warmup_epochs > 0 and config.schedule == "cosine"
    assert config.queue_size % config.batch_size == 0
    assert (config.precision, config.strategy) == ("mixed_bfloat16", "tpu")
    assert config.steps_per_execution > 1
    for n in (16, 32, 64):
        assert config.check_replicas(n) == 1


def _build(config):
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = build.build_model(config, bn_groups=1)
        steps = 1_281_167 // config.batch_size  # ImageNet's train split
        optimizer = build.build_optimizer(config, steps_per_epoch=steps,
                                          total_steps=steps * config.epochs)
        build.compile_model(model, optimizer, config)
    return model, optimizer, steps


@pytest.mark.parametrize("name", sorted(set(ACCELERATOR) - {"imagenet_mocov2_co2_tpu.cfg"})
                         + [LARGE])
def test_preset_builds(name):
    """Model, optimizer and compile as training builds them (the TPU MoCo v2 preset is built
    and lowered by tests/test_lowering.py)."""
    config = preset_config(name)
    model, optimizer, steps = _build(config)
    compute = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}[config.precision]
    convs = [layer for layer in model.query_backbone.layers
             if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 53 and all(c.compute_dtype == compute for c in convs)
    assert all(w.dtype == "float32" for w in model.query_variables)
    assert model.queue.dtype == "float32"
    assert model.steps_per_execution == config.steps_per_execution
    # The throughput model's arithmetic counts the same parameters (benchmarks/throughput.py).
    params = sum(int(np.prod(w.shape)) for w in model.query_variables)
    assert params == throughput.encoder(config).params
    if config.precision == "mixed_float16":
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        optimizer = optimizer.inner_optimizer
    assert isinstance(optimizer, optimizers.LARS if config.optimizer == "lars"
                      else optimizers.PyTorchSGD)
    warmup = int(round(config.warmup_epochs * steps))

    def lr_at(step):  # the schedule at an optimizer step
        optimizer.iterations.assign(step)
        return float(optimizer.learning_rate)
    assert lr_at(warmup) == pytest.approx(config.learning_rate, rel=1e-3)
    if warmup:  # linear from 0
        assert lr_at(warmup // 2) == pytest.approx(config.learning_rate / 2, rel=1e-2)
