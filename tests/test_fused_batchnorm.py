"""Tests for co2_tf.nets.fused_batchnorm: the fused op is Keras's BatchNormalization."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers.models import batches


# ------------------------------------------------------------------ fused BN
@pytest.mark.parametrize("precision_name", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_is_keras_batch_norm(precision_name, tmp_path):
    """The fused training-mode BN (what the trainer's backbones use) gives Keras
    BN's outputs, gradients and moving statistics, and saves as built-in BN."""
    from co2_tf import precision
    from co2_tf.nets import backbones, fused_batchnorm
    with precision.policy_scope(precision_name):
        keras_bn = backbones.build_backbone("tiny", 16, seed=1)
        fused = fused_batchnorm.fuse_batch_norm(backbones.build_backbone("tiny", 16, seed=1))
    graph = tf.function(lambda x: fused(x, training=True)).get_concrete_function(
        tf.TensorSpec([8, 16, 16, 3])).graph
    assert sum(op.type == "FusedBatchNormV3" for op in graph.get_operations()) == 4
    x = tf.constant(batches(1, batch=8)[0])
    results = []
    for model in (keras_bn, fused):
        with tf.GradientTape() as tape:
            y = tf.cast(model(x, training=True), tf.float32)
            loss = tf.reduce_sum(y * y)
        grads = tape.gradient(loss, model.trainable_variables)
        results.append((y.numpy(), [g.numpy() for g in grads],
                        [v.numpy() for v in model.non_trainable_variables]))
    (y0, g0, m0), (y1, g1, m1) = results
    rtol = 1e-4 if precision_name == "float32" else 1e-2  # bfloat16: 8-bit mantissa
    # bfloat16 outputs: a few units in the last place of the largest output (2^-8 relative),
    # as the two ops round in another order; the last place of values near 1 is 2^-7, above
    # any tolerance of 1e-3 (with one intra-op thread 5% of the outputs differ by 1-4 ulps).
    atol = rtol / 10 if precision_name == "float32" else 4 * 2.0**-8 * np.abs(y0).max()
    np.testing.assert_allclose(y1, y0, rtol=rtol, atol=atol)
    # Gradients sum bfloat16 products over the batch and the map: with one intra-op thread
    # they differed by up to 1.7% of the largest (2 threads: within 1%); 4% bounds that.
    grad_atol = 1e-4 if precision_name == "float32" else 4e-2
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(b, a, rtol=10 * rtol, atol=grad_atol * np.abs(a).max())
    assert len(m0) == 8 and all(np.abs(m - np.round(m)).max() > 1e-4 for m in m0)  # updated
    for a, b in zip(m0, m1, strict=True):  # moving mean / variance after one update
        # bfloat16: the batch statistics of bfloat16 inputs, summed in another order (one
        # intra-op thread: a variance 1.2% off, means within 1.2e-4 of the largest); a wrong
        # momentum or batch statistic is off by far more. float32: as exact as before.
        if precision_name == "float32":
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(b, a, rtol=3e-2, atol=1e-3 * np.abs(a).max())
    # Inference (moving statistics) is Keras's own code; saving keeps built-in layers.
    # (bfloat16: their moving statistics differ by the rounding above, so the outputs' bound.)
    np.testing.assert_allclose(np.float32(fused(x)), np.float32(keras_bn(x)),
                               **(dict(rtol=1e-5, atol=1e-6) if precision_name == "float32"
                                  else dict(rtol=rtol, atol=atol)))
    fused.save(tmp_path / "fused.keras")
    loaded = keras.models.load_model(tmp_path / "fused.keras")
    assert {type(l) for l in loaded.layers} <= {type(l) for l in keras_bn.layers}
    np.testing.assert_allclose(np.float32(loaded(x)), np.float32(fused(x)), rtol=1e-6)
