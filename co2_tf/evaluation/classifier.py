"""Training a classifier on a backbone: what the linear probe and fine-tuning share.

`train_classifier` is the supervised loop: Keras `fit`, one epoch per call
with a fresh dataset per epoch, top-1 / top-5 on the held-out split,
TensorBoard. Also the SGD step schedule and its flags, and MoCo's linear layer.
"""

import os

import keras
import tensorflow as tf

from co2_tf import optimizers
from co2_tf import progress as progress_lib
from co2_tf.callbacks import progress_callbacks
from co2_tf.errors import UserError


def classification_metrics(num_classes):
    """Top-1 and top-5 accuracy (top-k with k = min(5, classes))."""
    return [keras.metrics.SparseCategoricalAccuracy(name="top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5")]


def parse_boundaries(text, flag="--lr_boundaries"):
    """'0.6,0.8' -> (0.6, 0.8): where the learning rate steps, as fractions of training."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = None
    if values is None or any(not 0 < v < 1 for v in values) or list(values) != sorted(values):
        raise UserError(f"{flag}={text!r} must be increasing fractions of the epochs in (0, 1), "
                        "comma-separated, e.g. 0.6,0.8 (empty = constant)")
    return values


SGD_SCHEDULE_HELP = {
    "momentum": "SGD momentum",
    "weight_decay": "weight decay (coupled L2, as PyTorch)",
    "lr_decay": "lr factor at each boundary",
    "eval_every": "epochs between held-out evaluations (0 = only at the end)",
}


def check_sgd_schedule(config):
    """Checks the SGD schedule fields a classifier-training config shares.

    `config` has epochs, momentum, weight_decay, lr_boundaries, lr_decay and
    eval_every (LinearEvalConfig, SemiSupervisedConfig); raises UserError.
    """
    if config.epochs <= 0:
        raise UserError(f"--epochs={config.epochs} must be > 0")
    if config.momentum < 0 or config.weight_decay < 0 or config.lr_decay <= 0:
        raise UserError("--momentum and --weight_decay must be >= 0, --lr_decay > 0")
    if config.eval_every < 0:
        raise UserError(f"--eval_every={config.eval_every} must be >= 0 (0 = at the end only)")
    parse_boundaries(config.lr_boundaries)


def step_optimizer(learning_rate, *, boundaries, decay, total_steps, momentum, weight_decay):
    """PyTorch's SGD (co2_tf.optimizers) with lr x decay at each boundary fraction."""
    schedule = optimizers.make_lr_schedule(
        "step", base_learning_rate=learning_rate, total_steps=total_steps,
        boundaries=boundaries, decay=decay)
    return optimizers.make_optimizer("sgd", schedule, momentum=momentum,
                                     weight_decay=weight_decay)


def linear_layer(num_classes, seed, name="classifier"):
    """MoCo's linear classifier: weights N(0, 0.01), zero bias."""
    return keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01, seed=seed),
        bias_initializer="zeros", name=name)


def train_classifier(model, train_data, eval_data, *, epochs, log_dir, eval_every=1, verbose=1,
                     progress=None):
    """Fits a compiled classifier for `epochs`; returns the final held-out metrics.

    train_data(epoch) -> the dataset of that epoch (a fresh order and
    augmentation each epoch); eval_data is evaluated every `eval_every`
    epochs and after the last. `model` must be compiled with the metrics of
    `classification_metrics`. Epoch scalars go to TensorBoard in log_dir
    (train/ and validation/, as Keras's TensorBoard callback names them).
    Returns {"top1", "top5", "loss"} of the last evaluation. `progress` (a
    co2_tf.progress.Reporter): progress lines named after the model.
    """
    callbacks = [EpochScalars(log_dir), _StopAfterOneEpoch()] + progress_callbacks(
        progress_lib.reporter(progress), model.name)
    for epoch in range(epochs):
        last = epoch == epochs - 1
        validate = last or (eval_every > 0 and (epoch + 1) % eval_every == 0)
        # One epoch per fit() call (a fresh dataset each), numbered out of all epochs.
        history = model.fit(train_data(epoch), initial_epoch=epoch, epochs=epochs,
                            validation_data=eval_data if validate else None,
                            callbacks=callbacks, verbose=verbose)
        logs = {k: v[-1] for k, v in history.history.items()}
    return {name: float(logs[f"val_{name}"]) for name in ("top1", "top5", "loss")}


class EpochScalars(keras.callbacks.Callback):
    """Epoch logs to TensorBoard, one writer per subdir across fit() calls.

    (Keras's TensorBoard callback opens new event files at every fit().)
    """

    def __init__(self, log_dir):
        super().__init__()
        self.writers = {name: tf.summary.create_file_writer(os.path.join(log_dir, name))
                        for name in ("train", "validation")}

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            name, writer = ((key[4:], self.writers["validation"]) if key.startswith("val_")
                            else (key, self.writers["train"]))
            with writer.as_default():
                tf.summary.scalar(f"epoch_{name}", float(value), step=epoch)
        for writer in self.writers.values():
            writer.flush()


class _StopAfterOneEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True
