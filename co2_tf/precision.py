"""Compute precision of the encoders: float32, mixed_bfloat16, mixed_float16.

Mixed precision follows Keras's dtype policies: the backbone and projection
head layers compute in bfloat16 / float16 while their variables stay float32.
What must not lose digits stays float32 whatever the policy:

- the losses (co2_tf.method.losses casts q, k and the queue to float32 and works
  from log-softmax),
- the L2-normalised embeddings (CO2Model casts the head output to float32
  before normalising),
- the queue (a float32 weight) and the EMA of the key encoder (its variables
  are float32),
- BatchNormalization statistics (Keras computes them in float32).

float16 has a narrow exponent range, so `mixed_float16` wraps the optimizer
in `keras.optimizers.LossScaleOptimizer` (dynamic loss scaling);
`CO2Model.train_step` already calls `optimizer.scale_loss`. bfloat16 has
float32's range and needs no loss scaling (the usual choice on TPU).
With several replicas `agree_on_overflow` makes every replica's loss scaling
skip the same steps (Keras's alone does not, see there).

The backbone builders take no dtype argument, so the policy is applied while
the layers are created through `policy_scope`, which sets Keras's global
policy and always restores the previous one.
"""

import contextlib

import keras
import tensorflow as tf

from co2_tf.choices import PRECISIONS
from co2_tf.errors import UserError


def check(precision):
    """Raises UserError unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def compute_dtype(precision):
    """The dtype the encoder layers compute in: float32, bfloat16 or float16."""
    return {"float32": "float32", "mixed_bfloat16": "bfloat16",
            "mixed_float16": "float16"}[check(precision)]


@contextlib.contextmanager
def policy_scope(precision):
    """Layers created inside use `precision`'s dtype policy; restored on exit.

    Keras keeps the global policy per thread, so this does not leak into
    other threads, and nesting is fine.
    """
    check(precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def wrap_optimizer(optimizer, precision):
    """Adds dynamic loss scaling for mixed_float16; other precisions unchanged."""
    if check(precision) == "mixed_float16" and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def agree_on_overflow(grads, ctx):
    """`grads` with the first made NaN on every replica if any replica's are not all finite.

    Keras 3.15's LossScaleOptimizer, under MirroredStrategy, decides whether to apply or
    skip a step from replica 0's local gradients, before they are all-reduced: an overflow
    on another replica alone was applied (the weights became NaN) and the scale kept. After
    this, every replica judges alike: all skip the step and halve the scale, or all apply.
    One all-reduce of a float32 scalar (the replicas that overflowed); on finite steps the
    gradients are multiplied by exactly 1.0, so unchanged. `ctx`: the replica context.
    """
    present = [i for i, g in enumerate(grads) if g is not None]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(grads[i])) for i in present])
    overflowed = ctx.all_reduce("sum", 1.0 - tf.cast(finite, tf.float32))
    first = present[0]
    factor = tf.cast(tf.where(overflowed > 0, float("nan"), 1.0), grads[first].dtype)
    return [g * factor if i == first else g for i, g in enumerate(grads)]
