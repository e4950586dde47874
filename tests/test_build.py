"""co2_tf.build: the config's method options reach the model and change what trains.

A run's model is built from a TrainConfig whose EMA momentum, consistency variant and
warmup all differ from the defaults of CO2Model and CO2Objective; each is then checked in
what the train steps did, against NumPy (tests/helpers/step_reference.py: encoders called
by hand, float64 losses), not only as an attribute.
"""
import inspect

import numpy as np
import pytest
import tensorflow as tf
from helpers import models
from helpers.references import ref_consistency_variant, ref_info_nce
from helpers.step_reference import recorded_steps

from co2_tf import build
from co2_tf.config import TrainConfig
from co2_tf.method.model import CO2Model
from co2_tf.method.objective import CO2Objective

BATCH, STEPS, STEPS_PER_EPOCH = 16, 3, 2
# Every option differs from CO2Model's or CO2Objective's default (asserted below): a value
# dropped on the way from the config to the model shows. The warmup is 2 epochs of 2 steps:
# alpha ramps over 4.
# lr 0.02 (not MODEL's 0.1): at 0.1 the consistency term falls to 0.003 by step 2 and the
# variants become hard to tell apart.
OPTIONS = dict(ema_momentum=0.9, consistency_over="positive_and_negatives",
               consistency_kl="one_sided", consistency_warmup_epochs=2.0,
               consistency_weight=2.0, bn_groups=1, learning_rate=0.02)


@pytest.fixture(scope="module")
def trained():
    """The model exactly as training.train builds it from the config, 3 recorded steps."""
    config = TrainConfig(model_dir="unused", train_steps=100, **dict(models.MODEL, **OPTIONS))
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = build.build_model(config, config.check_replicas(1),
                                  steps_per_epoch=STEPS_PER_EPOCH)
        optimizer = build.build_optimizer(config, STEPS_PER_EPOCH, total_steps=100)
        build.compile_model(model, optimizer, config)
    data = models.batches(STEPS, batch=BATCH, seed=8)
    return config, model, recorded_steps(model, strategy, data, BATCH)


def _ramp(step, warmup):
    """alpha's factor at `step`, the sigmoid-shaped ramp-up: exp(-5 (1 - t)^2), t = step/warmup."""
    t = min(step / warmup, 1.0)
    return np.exp(-5.0 * (1.0 - t) ** 2)


def test_the_model_carries_the_config_options(trained):
    config, model, _ = trained
    assert config.ema_momentum != inspect.signature(CO2Model).parameters["ema_momentum"].default
    assert model.ema_momentum == config.ema_momentum
    objective, default = model.objective, CO2Objective()
    for field, name in (("over", "consistency_over"), ("kl", "consistency_kl")):
        assert getattr(config, name) != getattr(default, field), f"{name}: no test of the wiring"
        assert getattr(objective, field) == getattr(config, name), name
    assert objective.warmup_steps == 4 != default.warmup_steps
    assert objective.weight == config.consistency_weight


def test_the_config_ema_momentum_moves_the_key_encoder(trained):
    """After each step, every key weight is m k + (1 - m) q (NumPy) with the config's m = 0.9,
    q the query weights after the step's update.

    Measured (AVX-512): agreement within 1.9e-7 of the largest weight of each variable; the
    EMA with CO2Model's default m = 0.999 would differ by 0.099 |k - q|: 0.062 or more of the
    largest weight of some variable at every step. atol is 5e-6 of the largest weight, 26x the
    agreement; the effect is asserted above 1e-3 (200x atol).
    """
    config, model, steps = trained
    m = config.ema_momentum
    for i, step in enumerate(steps):
        effect = 0.0
        for k0, q1, k1 in zip(step["key_vars"], step["query_vars_after"], step["key_vars_after"],
                              strict=True):
            scale = np.abs(k0).max() or 1.0
            np.testing.assert_allclose(k1, m * k0 + (1 - m) * q1.astype(np.float64), rtol=0,
                                       atol=5e-6 * scale, err_msg=f"EMA at step {i}")
            effect = max(effect, (0.999 - m) * np.abs(k0 - q1).max() / scale)
        assert effect > 1e-3, f"step {i}: the momentum makes no measurable difference"


def test_the_config_consistency_variant_and_warmup_are_what_trains(trained):
    """Each step's logged loss_con is the config's variant (1 + K entries with the positive,
    one-sided KL) in NumPy; the logged alpha is consistency_weight times the ramp at that step
    (warmup 2 epochs x 2 steps); the logged loss is L_ins + alpha L_con with both.

    Measured (AVX-512): loss_con and loss within 2.4e-7 relative, alpha within 3e-8. rtol 1e-5
    is 40x that. The paper's variant (the model's default), and the config's with either of
    its two options at the default, give a loss_con 1.5% to 8% away from the config's (asserted
    above 1e-3). Without the ramp, alpha would be 2.0 instead of 0.013, 0.12, 0.57 (steps 0-2),
    which moves the loss by 0.084 to 1.4, 3% or more of it (asserted above 1e-3).
    """
    config, model, steps = trained
    over, kl = config.consistency_over, config.consistency_kl
    for i, step in enumerate(steps):
        q, k, queue = step["q"], step["k"], step["queue"]
        logs = step["logs"]
        alpha = config.consistency_weight * _ramp(i, 4)
        np.testing.assert_allclose(logs["alpha"], alpha, rtol=1e-5, err_msg=f"alpha at step {i}")
        con = ref_consistency_variant(q, k, queue, config.consistency_temperature, over, kl)
        np.testing.assert_allclose(logs["loss_con"], con.mean(), rtol=1e-5,
                                   err_msg=f"loss_con at step {i}")
        ins = ref_info_nce(q, k, queue, config.temperature).mean()
        np.testing.assert_allclose(logs["loss"], ins + alpha * con.mean(),
                                   rtol=1e-5, err_msg=f"loss at step {i}")
        for other in (("negatives", kl), (over, "symmetric"), ("negatives", "symmetric")):
            differs = ref_consistency_variant(q, k, queue, config.consistency_temperature,
                                              *other).mean()
            assert abs(differs - con.mean()) > 1e-3 * con.mean(), f"{other} gives the same"
        assert abs(config.consistency_weight - alpha) * con.mean() > 1e-3 * logs["loss"]
