"""Compute precision of the encoders: float32, mixed_bfloat16, mixed_float16.

Mixed precision follows Keras's dtype policies: the backbone and projection
head layers compute in bfloat16 / float16 while their variables stay float32.
What must not lose digits stays float32 whatever the policy:

- the losses (co2_tf.losses casts q, k and the queue to float32 and works
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

The backbone builders take no dtype argument, so the policy is applied while
the layers are created through `policy_scope`, which sets Keras's global
policy and always restores the previous one.
"""

import contextlib

import keras

from co2_tf.config import PRECISIONS
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
