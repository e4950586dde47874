"""Every private Keras API co2_tf relies on, in one place (checked with Keras 3.15).

Each use has a test in tests/test_compat.py that fails by name when a
Keras upgrade removes or changes it; fix it here, nowhere else.
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

