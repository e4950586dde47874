"""Models, inputs and weight dumps the scale tests (XLA, precision, fused BN, workers) share."""
import keras
import numpy as np
import tensorflow as tf

from co2_tf import build as builders
from co2_tf.config import TrainConfig

# Small enough for tests: tiny convnet with BN, 16 px, 4 shuffle-BN groups; the MLP head
# (not the default linear one) so that two dense layers per encoder are compared too.
MODEL = dict(backbone="tiny", image_size=16, batch_size=16, queue_size=64, dim=16, seed=3,
             learning_rate=0.1, schedule="constant", weight_decay=1e-4, head="mlp")


def build(strategy=None, **overrides):
    """Model and optimizer exactly as training.train builds them."""
    config = TrainConfig(model_dir="unused", train_steps=100, **dict(MODEL, **overrides))
    strategy = strategy or tf.distribute.OneDeviceStrategy("/cpu:0")
    groups = config.check_replicas(strategy.num_replicas_in_sync)
    with strategy.scope():
        model = builders.build_model(config, groups)
        optimizer = builders.build_optimizer(config, steps_per_epoch=10, total_steps=100)
        builders.compile_model(model, optimizer, config)
    return model, strategy


def batches(steps, batch=16, size=16, seed=0):
    rng = np.random.RandomState(seed)
    shape = (steps * batch, size, size, 3)
    return rng.rand(*shape).astype("float32"), rng.rand(*shape).astype("float32")


def run_steps(model, strategy, data, batch=16):
    """Keras's own train function (what fit runs), one call per step; returns the logs."""
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(batch)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    model.make_train_function()
    history = []
    for _ in range(len(data[0]) // batch):
        logs = model.train_function(iterator)
        history.append({k: float(v) for k, v in logs.items()})
    return history


def state(model):
    """Every weight of the model (both encoders, BN statistics, queue, pointer).

    Keys are "index path": the two encoders have the same layer names.
    """
    return {f"{i:03d} {w.path}": np.asarray(w.numpy()) for i, w in enumerate(model.weights)}


def find(values, path):
    (key,) = [k for k in values if k.endswith(" " + path)]
    return values[key]


class DumpWeights(keras.callbacks.Callback):
    """Writes every weight (and the step) to an .npz at the end of training."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_end(self, logs=None):
        values = state(self.model)
        # Every local replica's copy of the queue (a tf.distribute MirroredVariable).
        for i, copy in enumerate(getattr(self.model.queue.value, "values", ())):
            values[f"queue_replica_{i}"] = copy.numpy()
        values["step"] = np.asarray(self.model.optimizer.iterations.numpy())
        np.savez(self.path, **values)
