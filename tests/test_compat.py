"""Every private TF and Keras API co2_tf uses (co2_tf.compat) still exists and works.

If one of these fails after a TF or Keras upgrade, fix co2_tf/compat.py: it is
the only place that touches TF or Keras internals (the last test greps for others).
"""
import inspect
import logging
import os
import pathlib
import platform
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from co2_tf import compat
from co2_tf.run import checkpoints

ROOT = pathlib.Path(__file__).resolve().parent.parent


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


# ------------------------------------------ distribution, checkpoints, train functions
def test_in_multi_worker_mode_exists_on_both_multi_replica_strategies(two_replicas):
    """False on one worker; the multi-worker class keeps its own (True across workers: the
    two-worker run of tests/test_training_scale.py needs it)."""
    from tensorflow.python.distribute import collective_all_reduce_strategy  # noqa: PLC0415

    assert compat.in_multi_worker_mode(two_replicas) is False
    assert callable(getattr(collective_all_reduce_strategy.CollectiveAllReduceExtended,
                            "_in_multi_worker_mode", None)), (
        "MultiWorkerMirroredStrategy's extended has no _in_multi_worker_mode: see compat")


def test_maybe_merge_call_updates_each_replica_copy_once(two_replicas):
    """Called in a replica context (where extended.update is refused), the merge function
    runs once, cross-replica, with each replica's value."""
    with two_replicas.scope():
        variable = tf.Variable(1.0)

    def replica_fn():
        def merge_fn(strategy, value):
            strategy.extended.update(variable, lambda v, x: v.assign_add(x), args=(value,),
                                     group=False)
        compat.maybe_merge_call(merge_fn, tf.distribute.get_strategy(), tf.constant(2.0))

    tf.function(lambda: two_replicas.run(replica_fn))()
    assert [float(v) for v in two_replicas.experimental_local_results(variable)] == [3.0, 3.0]


def test_optimizer_iterations_key_is_where_a_checkpoint_keeps_the_optimizer_step(tmp_path):
    optimizer = keras.optimizers.SGD()
    optimizer.build([keras.Variable(1.0)])
    optimizer.iterations.assign(5)
    path = tf.train.Checkpoint(optimizer=optimizer).save(str(tmp_path / "ckpt"))
    assert tf.train.load_checkpoint(path).get_tensor(compat.OPTIMIZER_ITERATIONS_KEY) == 5
    assert checkpoints.step_of(path) == 5  # a checkpoint without the step counter


def test_keras_train_function_runs_a_step_steps_per_execution_times_per_call():
    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    calls = tf.Variable(0)

    def step(data):
        calls.assign_add(1)
        return {"last": tf.reduce_sum(data)}

    function = compat.keras_train_function(model, step)
    iterator = iter(tf.data.Dataset.range(4).map(lambda i: tf.cast(i, tf.float32)[None])
                    .batch(1))
    assert float(function(iterator)["last"]) == 1.0 and int(calls.numpy()) == 2
    assert float(function(iterator)["last"]) == 3.0 and int(calls.numpy()) == 4


# ------------------------------------------------------- the benchmark's measurements
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN: x86 only")
def test_onednn_enabled_is_what_the_environment_asked_for():
    # tests/conftest.py sets TF_ENABLE_ONEDNN_OPTS=1 (unless exported) before TF starts.
    assert compat.onednn_enabled() is (os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1")


def test_registered_flops_of_a_matmul_and_of_an_op_without_statistics():
    graph = tf.function(lambda a, b: tf.matmul(a, b)).get_concrete_function(
        tf.TensorSpec([2, 3]), tf.TensorSpec([3, 4])).graph
    (matmul,) = [op for op in graph.get_operations() if op.type == "MatMul"]
    assert compat.registered_flops(graph, matmul.node_def) == 2 * 2 * 3 * 4
    (placeholder, _) = [op for op in graph.get_operations() if op.type == "Placeholder"]
    assert compat.registered_flops(graph, placeholder.node_def) is None


def test_silenced_deprecation_keeps_tf_deprecation_warnings_out_of_the_log():
    from tensorflow.python.util import deprecation  # noqa: PLC0415

    @deprecation.deprecated(None, "use nothing")
    def old():
        return 1

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        with compat.silenced_deprecation():
            old()
        assert not records
        old()  # TF warns once per function: this is its first warning
        assert any("deprecated" in r.getMessage() for r in records)
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------ nowhere else
# Private TF and Keras APIs: TF's internal modules and namespace, Keras's sources, the
# private names co2_tf.compat wraps, and Keras methods replaced on an instance. tf.compat.v1
# is public (documented) and not listed.
PRIVATE = re.compile(
    r"tensorflow\.python|keras\.src|__internal__|\b(?:tf|keras)\._[a-z]"
    r"|(?<!\w)_(?:in_multi_worker_mode|make_function|iterations|flatten_layers"
    r"|global_train_batch|maybe_symbolic_build|pywrap\w*)\b"
    r"|\.(?:call|convolution_op)\s*=(?!=)")


def test_no_private_tf_or_keras_api_outside_compat():
    found = []
    for folder in ("co2_tf", "tools", "research", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "co2_tf" / "compat.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if PRIVATE.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "private TF/Keras API outside co2_tf/compat.py (move it there, with a " \
        "test here):\n" + "\n".join(found)


def test_the_private_api_pattern_sees_what_it_names():
    for line in ("from tensorflow.python.util import x", "import keras.src.ops",
                 "tf.__internal__.distribute", "getattr(e, '_in_multi_worker_mode')",
                 "model._make_function(f)", '"optimizer/_iterations/.A"', "tf._api.v2",
                 "m._flatten_layers()", "cb._global_train_batch", "_pywrap_util_port",
                 "layer.convolution_op = f", "layer.call=f"):
        assert PRIVATE.search(line), line
    for line in ("tf.compat.v1.train.NewCheckpointReader", "keras.__version__",
                 "num_iterations", "self._make_functions_cache", "optimizer.iterations",
                 "layer.convolution_op(x, k)", "if layer.call == f"):
        assert not PRIVATE.search(line), line
