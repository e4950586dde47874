"""Refusing NaN and Inf: the loss at every execution end, the weights before every save.

Either stops the run with NonFiniteLoss (exit 3) before anything of that step
is saved, so the last checkpoint written is the last good one.
"""

import keras
import numpy as np
import tensorflow as tf


class NonFiniteLoss(Exception):
    """The loss or the weights became NaN or Inf; the last good checkpoint is kept."""

    exit_code = 3

    def __init__(self, step, last_checkpoint_step, what="the loss is"):
        self.step = step
        super().__init__(
            f"{what} not finite at step {step}; stopped without saving it. The last good "
            f"checkpoint (step {last_checkpoint_step}) is intact: lower --learning_rate or "
            "check the data, then rerun to resume from it")


def check_loss(logs, step, last_checkpoint_step):
    """NonFiniteLoss unless the step's logged loss (if any) is finite."""
    loss = float(logs["loss"]) if logs and "loss" in logs else 0.0
    if not np.isfinite(loss):
        raise NonFiniteLoss(step, last_checkpoint_step)


def check_weights(model, step, last_checkpoint_step):
    """NonFiniteLoss unless every float weight of `model` is finite.

    A finite loss does not prove finite weights: BN moving statistics overflow
    a step before the loss does.
    """
    if not all(bool(tf.reduce_all(tf.math.is_finite(w)))
               for w in model.weights if keras.backend.is_float_dtype(w.dtype)):
        raise NonFiniteLoss(step, last_checkpoint_step, what="the weights are")
