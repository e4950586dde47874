"""Every private TensorFlow and Keras API co2_tf relies on, in one place (checked with
TF 2.21 and Keras 3.15).

Each use has a test in tests/test_compat.py that fails by name when a TF or
Keras upgrade removes or changes it; fix it here, nowhere else (a test there
greps co2_tf/, tools/, research/ and benchmarks/ for private APIs elsewhere).
"""

import types


def replace_convolution_op(layer, function):
    """Makes Keras conv `layer` convolve as `function(layer, inputs, kernel)`, this instance only.

    Keras's BaseConv.call computes `self.convolution_op(inputs, self.kernel)`, then adds the
    bias: rebinding that method per instance keeps the layer a built-in one (saved `.keras`
    files need no custom objects). `function` may call `type(layer).convolution_op` for
    Keras's own convolution.
    """
    layer.convolution_op = types.MethodType(function, layer)


class SkipSymbolicBuildWhenBuilt:
    """keras.Model mixin: skips fit()'s build-from-a-batch once model and optimizer exist.

    Keras's `Model._maybe_symbolic_build` would pull a batch from a fresh
    iterator at every fit() and mean-reduce it across replicas, which fails
    under MultiWorkerMirroredStrategy (PerReplica "to a Tensor"). A model
    whose variables all exist from __init__ (and whose optimizer is built
    before fit) has nothing to build.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self.optimizer is not None and self.optimizer.built:
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


def nested_layers(model):
    """Every layer inside `model`, at any depth (Keras has no public recursive listing)."""
    return list(model._flatten_layers(include_self=False))


def rebind_call(layer, function):
    """Makes `layer(...)` run `function(layer, ...)`: Layer.__call__ dispatches to self.call."""
    layer.call = types.MethodType(function, layer)


def tensorboard_batch_step(callback):
    """The step keras.callbacks.TensorBoard writes its next batch summaries at."""
    return callback._global_train_batch


def set_tensorboard_batch_step(callback, step):
    """Moves keras.callbacks.TensorBoard's batch summary counter (e.g. to the global step)."""
    callback._global_train_batch = int(step)


# ------------------------------------------ distribution, checkpoints, train functions
def in_multi_worker_mode(strategy):
    """Whether a MultiWorkerMirroredStrategy spans several workers (Keras then reduces a
    step's logs with strategy.reduce("MEAN", v, axis=0))."""
    return bool(strategy.extended._in_multi_worker_mode())


def maybe_merge_call(fn, strategy, *args):
    """fn(strategy, *args) in cross-replica context: through the replica context's
    merge_call under MirroredStrategy, called directly where TF needs no merge."""
    import tensorflow as tf  # noqa: PLC0415 (this module is imported before TF is needed)

    return tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args)


# Where a Keras optimizer's step (its `_iterations` variable) is in a tf.train.Checkpoint
# holding it as `optimizer`.
OPTIMIZER_ITERATIONS_KEY = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"


def keras_train_function(model, step_fn):
    """Keras's train-function harness (fit's: strategy.run per step, steps_per_execution steps
    per call, the logs reduced) around step_fn(data) -> logs; called with an iterator."""
    return model._make_function(step_fn)


# ------------------------------------------------------- the benchmark's measurements
def onednn_enabled():
    """Whether TF runs oneDNN's custom ops (decided when TF was imported)."""
    from tensorflow.python.util import _pywrap_util_port  # noqa: PLC0415

    return bool(_pywrap_util_port.IsMklEnabled())


def registered_flops(graph, node_def):
    """TF's registered FLOP statistic of a graph op, or None (none registered, unknown shapes)."""
    from tensorflow.python.framework import ops  # noqa: PLC0415

    try:
        return ops.get_stats_for_node_def(graph, node_def, "flops").value
    except (ValueError, TypeError):
        return None


def silenced_deprecation():
    """A context manager in which TF logs no deprecation warnings."""
    from tensorflow.python.util import deprecation  # noqa: PLC0415

    return deprecation.silence()
