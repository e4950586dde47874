"""Tests for co2_tf.precision: mixed bfloat16 / float16 compute, float32 where it matters."""
import keras
import numpy as np
import tensorflow as tf
from helpers.models import batches, build, run_steps


# ----------------------------------------------------------- mixed precision
def test_mixed_bfloat16_computes_in_bfloat16_and_keeps_float32_where_it_matters():
    data = batches(3, seed=1)
    f32, strategy = build()
    bf16, _ = build(precision="mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32", "the global policy leaked"
    convs = [l for l in bf16.query_backbone.layers if isinstance(l, keras.layers.Conv2D)]
    assert convs and all(l.compute_dtype == "bfloat16" for l in convs)
    assert all(v.dtype == "float32" for v in bf16.weights if v.path != "co2/queue_ptr")
    assert bf16.query_backbone(data[0][:4], training=False).dtype == "bfloat16"
    assert bf16.encode_query(data[0][:4]).dtype == tf.float32
    assert f32.query_backbone(data[0][:4], training=False).dtype == "float32"

    initial_queue = bf16.queue.numpy()
    np.testing.assert_array_equal(f32.queue.numpy(), initial_queue)  # same seed, same start
    h32 = run_steps(f32, strategy, data)
    h16 = run_steps(bf16, strategy, data)
    for a, b in zip(h32, h16, strict=True):
        assert np.isfinite(b["loss"]) and b["loss"] > 0
        # Same weights and data: bfloat16's 8-bit mantissa moved the loss by 0.1-0.6%
        # over 3 data seeds x 3 steps (float32 loss math, bfloat16 features).
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-2)
    assert bf16.queue.dtype == "float32"
    queue, queue32 = bf16.queue.numpy(), f32.queue.numpy()
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-5)
    assert int(bf16.queue_ptr.numpy()) == 48
    # The 3 batches of keys replaced rows 0-47 and left the rest as they were.
    np.testing.assert_array_equal(queue[48:], initial_queue[48:])
    # Each enqueued key is float32's key of the same image (cosine >= 0.9987 measured,
    # max abs difference <= 0.03), and far from the row it replaced (cosine <= 0.57).
    cos32 = np.sum(queue[:48] * queue32[:48], axis=1)
    cos_before = np.sum(queue[:48] * initial_queue[:48], axis=1)
    assert cos32.min() > 0.995, cos32.min()
    assert cos_before.max() < 0.9, cos_before.max()
    np.testing.assert_allclose(queue[:48], queue32[:48], atol=0.05)


def test_mixed_float16_trains_with_loss_scaling():
    model, strategy = build(precision="mixed_float16")
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.query_backbone.layers[-2].compute_dtype == "float16"
    initial_scale = float(optimizer.dynamic_scale.numpy())
    weights0 = [v.numpy().copy() for v in model.query_variables]
    history = run_steps(model, strategy, batches(4, seed=2))
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
    # Dynamic loss scaling: a step whose float16 gradients overflow is skipped
    # and halves the scale (Keras starts at 2^15: the first steps overflow).
    scale = float(optimizer.dynamic_scale.numpy())
    skipped = int(round(np.log2(initial_scale / scale)))
    applied = int(optimizer.iterations.numpy())
    assert applied >= 1 and applied + skipped == 4, (applied, skipped)
    assert any(np.abs(v.numpy() - w).max() > 1e-4 for v, w in zip(model.query_variables, weights0))
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
    assert model.queue.dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(model.queue.numpy(), axis=1), 1.0, rtol=1e-5)


def test_an_overflow_on_one_replica_skips_the_step_on_every_replica(two_replicas):
    """Keras 3.15's LossScaleOptimizer, under MirroredStrategy, judges the gradients finite
    from replica 0's local ones: replica 1's overflow alone reached the weights (NaN) and
    left the scale. train_step makes the replicas agree: every copy skips the step."""
    model, strategy = build(two_replicas, precision="mixed_float16")
    optimizer = model.optimizer
    optimizer.dynamic_scale.assign(1.0)  # replica 0's float16 gradients stay finite
    x_q, x_k = batches(2, seed=4)
    x_q[8:16] = 1e6  # replica 1's query images of step 1: inf in float16
    weights0 = [v.numpy().copy() for v in model.query_variables]

    def copies(v):
        values = [t.numpy() for t in strategy.experimental_local_results(v.value)]
        assert len(values) == 2, v.path
        return values

    run_steps(model, strategy, (x_q[:16], x_k[:16]))
    for v, w in zip(model.query_variables, weights0, strict=True):
        for copy in copies(v):
            np.testing.assert_array_equal(copy, w, err_msg=v.path)
    assert [float(s) for s in copies(optimizer.dynamic_scale)] == [0.5, 0.5]
    assert int(optimizer.iterations.numpy()) == 0  # skipped: the inner optimizer did not step
    assert [int(c) for c in strategy.experimental_local_results(model.step_counter)] == [1, 1]

    # The next step, finite on both replicas, is applied, identically on both.
    run_steps(model, strategy, (x_q[16:], x_k[16:]))
    assert int(optimizer.iterations.numpy()) == 1
    assert [float(s) for s in copies(optimizer.dynamic_scale)] == [0.5, 0.5]
    for v, w in zip(model.query_variables, weights0, strict=True):
        first, second = copies(v)
        np.testing.assert_array_equal(second, first, err_msg=v.path)
        assert np.isfinite(first).all() and np.abs(first - w).max() > 0, v.path
