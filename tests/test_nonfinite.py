"""Tests for co2_tf.run.nonfinite: NaN and Inf in the loss or the weights stop the run."""
import math

import keras
import numpy as np
import pytest

from co2_tf.run import nonfinite


def test_a_non_finite_loss_is_refused_naming_the_last_good_checkpoint():
    nonfinite.check_loss({"loss": 1.5}, 7, 6)
    nonfinite.check_loss(None, 7, 6)  # an execution without logs checks nothing
    for bad in (math.inf, math.nan):
        with pytest.raises(nonfinite.NonFiniteLoss, match=r"loss is not finite at step 7.*"
                           r"checkpoint \(step 6\) is intact") as caught:
            nonfinite.check_loss({"loss": np.float32(bad)}, 7, 6)
        assert caught.value.step == 7 and caught.value.exit_code == 3


def test_non_finite_weights_are_refused_and_integer_variables_ignored():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False)
    nonfinite.check_weights(model, 5, 4)
    model.layers[0].bias.assign([np.inf])
    with pytest.raises(nonfinite.NonFiniteLoss, match=r"weights are not finite at step 5"):
        nonfinite.check_weights(model, 5, 4)
