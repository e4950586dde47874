"""co2_tf.method.losses and .objective against an independent float64 NumPy reference."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from helpers.references import (
    log_softmax,
    ref_consistency,
    ref_consistency_variant,
    ref_info_nce,
)

from co2_tf import config
from co2_tf.method import losses, objective
from co2_tf.method.objective import CO2Objective


# ------------------------------------------------------------ NumPy reference
# (ref_info_nce, ref_consistency and ref_consistency_variant: tests/helpers/references.py)
def ref_info_nce_grad_q(q, k, queue, t):
    """d L_ins / d q per example: (sum_j softmax_j v_j - k) / t, with v = [k, queue]."""
    logits = np.concatenate([(q * k).sum(-1, keepdims=True), q @ queue.T], -1) / t
    p = np.exp(log_softmax(logits))
    expected = p[:, :1] * k + p[:, 1:] @ queue
    return (expected - k) / t


def ref_consistency_grad_q(q, k, queue, t):
    """Analytic d L_con / d q, P held fixed (it depends on k only).

    L = 1/2 sum_i (P_i log P_i - P_i log Q_i - Q_i log P_i + Q_i log Q_i)
    dL/dQ_i = 1/2 (-P_i/Q_i - log P_i + log Q_i + 1); Q = softmax(s), s = q.queue^T/t.
    """
    log_q = log_softmax(q @ queue.T / t)
    log_p = log_softmax(k @ queue.T / t)
    Q, P = np.exp(log_q), np.exp(log_p)
    g = 0.5 * (-P / Q - log_p + log_q + 1.0)
    ds = Q * (g - (Q * g).sum(-1, keepdims=True))
    return ds @ queue / t


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(batch, dim, size, seed=0):
    """Unit vectors with structure: q and k are noisy copies, some negatives are close to q."""
    rng = np.random.RandomState(seed)
    base = rng.randn(batch, dim)
    q = _unit(base + 0.8 * rng.randn(batch, dim))
    k = _unit(base + 0.8 * rng.randn(batch, dim))
    queue = rng.randn(size, dim)
    hard = min(size, 4 * batch)
    queue[:hard] = np.repeat(base, 4, axis=0)[:hard] + 0.7 * rng.randn(hard, dim)
    return q, k, _unit(queue)


# --------------------------------------------------------------------- tests
def test_reference_gradients_match_finite_differences():
    """The analytic references above are themselves right (central differences)."""
    q, k, queue = make_inputs(3, 8, 32, seed=1)
    eps = 1e-6
    for f, grad, t in ((ref_info_nce, ref_info_nce_grad_q, 0.2),
                       (ref_consistency, ref_consistency_grad_q, 0.04)):
        g = grad(q, k, queue, t)
        fd = np.zeros_like(q)
        for i in range(q.shape[0]):
            for j in range(q.shape[1]):
                dq = np.zeros_like(q)
                dq[i, j] = eps
                fd[i, j] = (f(q + dq, k, queue, t)[i] - f(q - dq, k, queue, t)[i]) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("size", [256, 4096, 65536])
@pytest.mark.parametrize("t_con", [0.04, 0.1])
def test_values_and_gradients_match_reference(size, t_con):
    q, k, queue = make_inputs(8, 128, size, seed=size)
    tq, tk, tqueue = (tf.constant(a, tf.float32) for a in (q, k, queue))
    # The reference sees the float32-rounded inputs the losses see.
    q32, k32, queue32 = (a.astype(np.float32).astype(np.float64) for a in (q, k, queue))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(tq)
        ins = losses.info_nce_loss(tq, tk, tqueue, 0.2)
        con = losses.consistency_loss(tq, tk, tqueue, t_con)
        total_ins, total_con = tf.reduce_sum(ins), tf.reduce_sum(con)
    np.testing.assert_allclose(ins.numpy(), ref_info_nce(q32, k32, queue32, 0.2), rtol=1e-4)
    np.testing.assert_allclose(con.numpy(), ref_consistency(q32, k32, queue32, t_con),
                               rtol=1e-4, atol=1e-6)
    g_ins = tape.gradient(total_ins, tq).numpy()
    g_con = tape.gradient(total_con, tq).numpy()
    ref_g_ins = ref_info_nce_grad_q(q32, k32, queue32, 0.2)
    ref_g_con = ref_consistency_grad_q(q32, k32, queue32, t_con)
    np.testing.assert_allclose(g_ins, ref_g_ins, rtol=1e-3, atol=1e-3 * np.abs(ref_g_ins).max())
    np.testing.assert_allclose(g_con, ref_g_con, rtol=1e-3, atol=1e-3 * np.abs(ref_g_con).max())
    # The consistency term is not trivially small here: the test has teeth.
    assert ref_consistency(q32, k32, queue32, t_con).mean() > 1e-2


def test_consistency_sends_no_gradient_into_k():
    q, k, queue = (tf.constant(a, tf.float32) for a in make_inputs(4, 16, 64))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([q, k])
        con = tf.reduce_sum(losses.consistency_loss(q, k, queue, 0.04))
        ins = tf.reduce_sum(losses.info_nce_loss(q, k, queue, 0.2))
    assert tape.gradient(con, k) is None
    assert tape.gradient(ins, k) is None
    assert np.abs(tape.gradient(con, q).numpy()).max() > 1e-3


def test_consistency_is_symmetric_zero_at_equality_and_positive():
    q, k, queue = (tf.constant(a, tf.float32) for a in make_inputs(4, 16, 64))
    np.testing.assert_allclose(losses.consistency_loss(q, k, queue, 0.1).numpy(),
                               losses.consistency_loss(k, q, queue, 0.1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(losses.consistency_loss(q, q, queue, 0.1).numpy(), 0.0, atol=1e-6)
    assert np.all(losses.consistency_loss(q, k, queue, 0.1).numpy() > 0)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    """K = 65536 at tau_con = 0.04: logits up to 25, exp would overflow float16."""
    q, k, queue = make_inputs(8, 128, 65536, seed=7)
    low = [tf.constant(a, tf.float32) for a in (q, k, queue)]
    low = [tf.cast(a, dtype) for a in low]
    rounded = [tf.cast(a, tf.float64).numpy() for a in low]
    ins = losses.info_nce_loss(*low, 0.2)
    con = losses.consistency_loss(*low, 0.04)
    assert ins.dtype == tf.float32 and con.dtype == tf.float32
    np.testing.assert_allclose(ins.numpy(), ref_info_nce(*rounded, 0.2), rtol=1e-4)
    np.testing.assert_allclose(con.numpy(), ref_consistency(*rounded, 0.04), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- objective
@pytest.mark.parametrize("moco", [
    CO2Objective(temperature=0.2, consistency_temperature=0.04, weight=0.0),
    # alpha = 0 stays MoCo with the temperature scaling and a warmup around it.
    objective.co2_objective(config.TrainConfig(
        temperature=0.2, consistency_temperature=0.04, consistency_weight=0.0,
        consistency_temperature_scaling=True, consistency_warmup_epochs=2.0), 10)])
def test_alpha_zero_is_exactly_moco(moco):
    q, k, queue = (tf.constant(a, tf.float32) for a in make_inputs(8, 32, 256))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(q)
        loss, terms = moco(q, k, queue, tf.constant(3, tf.int64))
        ref = losses.info_nce_loss(q, k, queue, 0.2)
        total, ref_total = tf.reduce_sum(loss), tf.reduce_sum(ref)
        con = tf.reduce_sum(terms["loss_con"])
    np.testing.assert_array_equal(loss.numpy(), ref.numpy())
    np.testing.assert_array_equal(terms["loss"].numpy(), ref.numpy())
    np.testing.assert_array_equal(tape.gradient(total, q).numpy(),
                                  tape.gradient(ref_total, q).numpy())
    assert float(terms["alpha"]) == 0.0
    # Still measured for monitoring, with no gradient path.
    assert np.all(terms["loss_con"].numpy() > 0) and tape.gradient(con, q) is None


def test_the_objective_combines_the_terms():
    q, k, queue = (tf.constant(a, tf.float32) for a in make_inputs(8, 32, 256))
    loss, terms = CO2Objective(temperature=0.2, consistency_temperature=0.05,
                               weight=2.5)(q, k, queue, 0)
    np.testing.assert_array_equal(loss.numpy(), terms["loss"].numpy())
    assert float(terms["alpha"]) == 2.5
    np.testing.assert_allclose(terms["loss_ins"].numpy(),
                               losses.info_nce_loss(q, k, queue, 0.2).numpy(), rtol=1e-6)
    np.testing.assert_allclose(terms["loss_con"].numpy(),
                               losses.consistency_loss(q, k, queue, 0.05).numpy(), rtol=1e-6)
    np.testing.assert_allclose(terms["loss"].numpy(),
                               (terms["loss_ins"] + 2.5 * terms["loss_con"]).numpy(), rtol=1e-6)
    np.testing.assert_allclose(terms["pos_sim"].numpy(), np.sum(q.numpy() * k.numpy(), -1),
                               rtol=1e-5)


# ------------------------------------------------------------------ variants
@pytest.mark.parametrize("over,kl", [("negatives", "one_sided"),
                                     ("positive_and_negatives", "symmetric"),
                                     ("positive_and_negatives", "one_sided")])
def test_variants_match_reference_values_and_finite_differences(over, kl):
    """Values against the NumPy reference; the gradient in q against its central
    differences (with the positive in P, P depends on q: lightly keeps that gradient)."""
    q, k, queue = make_inputs(3, 8, 32, seed=3)
    q32, k32, queue32 = (a.astype(np.float32).astype(np.float64) for a in (q, k, queue))
    tq, tk, tqueue = (tf.constant(a, tf.float32) for a in (q, k, queue))
    with tf.GradientTape() as tape:
        tape.watch(tq)
        con = losses.consistency_loss(tq, tk, tqueue, 0.1, over=over, kl=kl)
        total = tf.reduce_sum(con)
    ref = ref_consistency_variant(q32, k32, queue32, 0.1, over, kl)
    np.testing.assert_allclose(con.numpy(), ref, rtol=1e-4, atol=1e-6)
    assert ref.mean() > 1e-2  # not trivially small
    eps, fd = 1e-6, np.zeros_like(q32)
    for i, j in np.ndindex(*q32.shape):
        dq = np.zeros_like(q32)
        dq[i, j] = eps
        fd[i, j] = (ref_consistency_variant(q32 + dq, k32, queue32, 0.1, over, kl).sum()
                    - ref_consistency_variant(q32 - dq, k32, queue32, 0.1, over, kl).sum()) / (
                        2 * eps)
    g = tape.gradient(total, tq).numpy()
    np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-3 * np.abs(fd).max())
    # The objective passes the variant through, with a tensor alpha (the warmup ramp,
    # exactly 1 from its last step on).
    ramped = CO2Objective(temperature=0.2, consistency_temperature=0.1, weight=0.5, over=over,
                          kl=kl, warmup_steps=2)
    loss, terms = ramped(tq, tk, tqueue, tf.constant(5, tf.int64))
    assert isinstance(ramped.alpha(0), tf.Tensor) and float(terms["alpha"]) == 0.5
    np.testing.assert_allclose(loss.numpy(),
                               ref_info_nce(q32, k32, queue32, 0.2) + 0.5 * ref, rtol=1e-4)


def test_the_positive_variant_differs_and_defaults_are_the_paper():
    q, k, queue = (tf.constant(a, tf.float32) for a in make_inputs(4, 16, 64))
    paper = losses.consistency_loss(q, k, queue, 0.1)
    np.testing.assert_array_equal(
        paper.numpy(), losses.consistency_loss(q, k, queue, 0.1, "negatives", "symmetric"))
    lightly = losses.consistency_loss(q, k, queue, 0.1, "positive_and_negatives")
    assert np.abs((paper - lightly).numpy()).max() > 1e-3
    with pytest.raises(ValueError, match="over must be one of"):
        losses.consistency_loss(q, k, queue, 0.1, over="all")


def test_consistency_ramp_is_the_sigmoid_shaped_rampup():
    steps = np.array([0, 25, 50, 99, 100, 150])
    ramp = np.array([float(objective.consistency_ramp(s, 100)) for s in steps])
    t = np.minimum(steps / 100, 1.0)
    np.testing.assert_allclose(ramp, np.exp(-5 * (1 - t) ** 2), rtol=1e-6)
    assert ramp[0] == pytest.approx(np.exp(-5)) and ramp[-1] == 1.0


# ------------------------------------------------------- temperature-scaled alpha
def test_temperature_scaling_weights_the_term_by_tau_con_over_tau_squared():
    """NumPy: L_ins + alpha (tau_con / tau)^2 L_con, values and gradient in q; off, the
    objective gets the paper's alpha itself, and MoCo's 0 stays 0."""
    assert objective.consistency_scale(0.04, 0.1) == pytest.approx(0.16, rel=1e-12)
    assert objective.consistency_scale(0.2, 0.1) == pytest.approx(4.0, rel=1e-12)
    base = config.TrainConfig(consistency_weight=1.0, consistency_temperature=0.04,
                              temperature=0.1)
    scaled = dataclasses.replace(base, consistency_temperature_scaling=True)
    assert objective.co2_objective(base).weight is base.consistency_weight  # bit-unchanged
    assert objective.co2_objective(scaled).weight == pytest.approx(0.16, rel=1e-12)
    moco = dataclasses.replace(scaled, consistency_weight=0.0)
    assert objective.co2_objective(moco).weight == 0  # the objective's exact-MoCo path

    q, k, queue = make_inputs(8, 32, 256, seed=4)
    q32, k32, queue32 = (a.astype(np.float32).astype(np.float64) for a in (q, k, queue))
    tq, tk, tqueue = (tf.constant(a, tf.float32) for a in (q, k, queue))
    with tf.GradientTape() as tape:
        tape.watch(tq)
        total = tf.reduce_sum(objective.co2_objective(scaled)(tq, tk, tqueue, 0)[0])
    weight = 1.0 * (0.04 / 0.1) ** 2
    ref = (ref_info_nce(q32, k32, queue32, 0.1)
           + weight * ref_consistency(q32, k32, queue32, 0.04)).sum()
    ref_g = (ref_info_nce_grad_q(q32, k32, queue32, 0.1)
             + weight * ref_consistency_grad_q(q32, k32, queue32, 0.04))
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(total, tq).numpy(), ref_g, rtol=1e-3,
                               atol=1e-3 * np.abs(ref_g).max())
