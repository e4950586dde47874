"""Every private Keras API co2_tf uses (co2_tf.compat) still exists and works.

If one of these fails after a Keras upgrade, fix co2_tf/compat.py: it is
the only place that touches Keras internals.
"""
import inspect

import keras
import numpy as np
import tensorflow as tf

from co2_tf import compat


def test_model_still_has_maybe_symbolic_build_with_our_signature():
    hook = getattr(keras.Model, "_maybe_symbolic_build", None)
    assert hook is not None, "keras.Model._maybe_symbolic_build is gone: see compat"
    assert {"iterator", "data_batch"} <= set(inspect.signature(hook).parameters)


def test_fit_goes_through_the_symbolic_build_hook_and_the_mixin_skips_it():
    """The first fit() (optimizer not built yet) reaches Keras's own build; the second (built
    optimizer) stops in the mixin. What reaches Keras is recorded by a layer of the class
    hierarchy below the mixin (Recording -> mixin -> ReachesKeras -> keras.Model), so the test
    fails if the mixin stops returning early."""
    calls, reached_keras = [], []

    class ReachesKeras(keras.Model):
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            reached_keras.append(self.optimizer.built)
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    class Recording(compat.SkipSymbolicBuildWhenBuilt, ReachesKeras):
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            calls.append(self.optimizer.built)
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    inputs = keras.Input((3,))
    model = Recording(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((4, 3), np.float32), np.ones((4, 1), np.float32)
    model.fit(x, y, epochs=1, verbose=0)
    model.fit(x, y, epochs=1, verbose=0)
    assert calls == [False, True], (
        f"fit() calls _maybe_symbolic_build with optimizer.built {calls}, not once per fit "
        "before and after the optimizer is built: the mixin cannot work as written")
    assert reached_keras == [False], (
        f"Keras's build ran with optimizer.built {reached_keras}: the mixin must pass the "
        "first call on and return early from the second")


def test_nested_layers_finds_layers_at_any_depth():
    inner_inputs = keras.Input((4, 4, 3))
    inner = keras.Model(inner_inputs, keras.layers.BatchNormalization(name="deep_bn")(
        keras.layers.Conv2D(2, 1)(inner_inputs)), name="inner")
    outer_inputs = keras.Input((4, 4, 3))
    outer = keras.Model(outer_inputs, inner(outer_inputs))
    names = [layer.name for layer in compat.nested_layers(outer)]
    assert "inner" in names and "deep_bn" in names


def test_rebind_call_changes_what_calling_the_layer_runs():
    layer = keras.layers.Dense(2)
    layer.build((None, 3))

    def doubled(self, inputs, **kwargs):
        return 2.0 * keras.layers.Dense.call(self, inputs)
    x = np.ones((1, 3), np.float32)
    plain = layer(x).numpy()
    compat.rebind_call(layer, doubled)
    np.testing.assert_allclose(layer(x).numpy(), 2.0 * plain, rtol=1e-6)


def test_tensorboard_batch_step_is_where_batch_summaries_go(tmp_path):
    callback = keras.callbacks.TensorBoard(str(tmp_path), update_freq=1, write_graph=False)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")

    class MoveTo100(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            compat.set_tensorboard_batch_step(callback, 100)

    x, y = np.ones((4, 3), np.float32), np.ones((4, 1), np.float32)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[callback, MoveTo100()])
    assert compat.tensorboard_batch_step(callback) == 102
    steps = []
    for path in (tmp_path / "train").glob("events*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            steps += [event.step for v in event.summary.value if v.tag == "batch_loss"]
    assert sorted(steps) == [101, 102]


def test_conv_layers_convolve_through_a_replaceable_convolution_op():
    """Keras's conv call goes through `self.convolution_op` then adds the bias: replacing it on
    one instance changes that layer only, which stays a built-in Conv2D."""
    calls = []

    def doubled(layer, inputs, kernel):
        calls.append(layer.name)
        return 2 * type(layer).convolution_op(layer, inputs, kernel)

    layer = keras.layers.Conv2D(3, 3, padding="same", bias_initializer="ones", name="changed")
    other = keras.layers.Conv2D(3, 3, padding="same", bias_initializer="ones", name="other")
    x = np.random.default_rng(0).random((2, 5, 5, 2), np.float32)
    layer.build(x.shape)
    other.build(x.shape)
    other.set_weights(layer.get_weights())
    compat.replace_convolution_op(layer, doubled)
    assert type(layer) is keras.layers.Conv2D
    plain = other(x).numpy()
    np.testing.assert_allclose(layer(x).numpy(), 2 * (plain - 1) + 1, rtol=1e-5, atol=1e-5)
    assert calls == ["changed"]
