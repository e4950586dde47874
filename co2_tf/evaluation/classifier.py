"""Training a classifier on a backbone: what the linear probe and fine-tuning share.

`train_classifier` is the supervised loop: Keras `fit`, one epoch per call
with a fresh dataset per epoch, top-1 / top-5 on the held-out split,
TensorBoard, checkpoints and resume (co2_tf.evaluation.resume). Also the
SGD step schedule and its flags, and MoCo's linear layer.
"""

import dataclasses
import os

import keras
import tensorflow as tf

from co2_tf import distribute, optimizers
from co2_tf import progress as progress_lib
from co2_tf.config import flag
from co2_tf.errors import UserError
from co2_tf.evaluation import common
from co2_tf.run.callbacks import progress_callbacks


def classification_metrics(num_classes):
    """Top-1 and top-5 accuracy (top-k with k = min(5, classes)), and the cross-entropy."""
    return [keras.metrics.SparseCategoricalAccuracy(name="top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent")]


def compile_classifier(model, optimizer, num_classes):
    """Cross-entropy on logits and top-1 / top-5, all weighted by the batches' weights.

    Weights are 0 for the padding of a last batch smaller than the replicas
    (distribute.pad_batch) and of every held-out batch to a full one
    (distribute.pad_to_size), and Keras applies them only to
    `weighted_metrics`: top-1 / top-5 and `xent`, the mean cross-entropy over
    the real examples, stay exact. The "loss" Keras reports is its mean of
    the replicas' batch means, where a padded batch weighs as a full one.
    """
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True, reduction="mean_with_sample_weight"),
                  weighted_metrics=classification_metrics(num_classes))


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


@dataclasses.dataclass
class SgdSchedule:
    """The SGD schedule fields of a classifier-training config (LinearEvalConfig,
    SemiSupervisedConfig); checked by check_sgd_schedule."""
    momentum: float = flag(0.9, "SGD momentum")
    weight_decay: float = flag(0.0, "weight decay (coupled L2, as PyTorch)")
    lr_boundaries: str = flag("0.6,0.8", "fractions of the epochs where the learning rate is "
                              "multiplied by --lr_decay")
    lr_decay: float = flag(0.1, "lr factor at each boundary")
    eval_every: int = flag(1, "epochs between held-out evaluations (0 = only at the end)")
    checkpoint_every: int = flag(500, "steps between checkpoints in OUTPUT_DIR/checkpoints "
                                 "(also at epoch ends and on SIGTERM); rerunning the same "
                                 "command resumes")


def check_sgd_schedule(config):
    """Checks the SGD schedule fields a classifier-training config shares.

    `config`: an SgdSchedule with `epochs`; raises UserError.
    """
    if config.epochs <= 0:
        raise UserError(f"--epochs={config.epochs} must be > 0")
    if config.momentum < 0 or config.weight_decay < 0 or config.lr_decay <= 0:
        raise UserError("--momentum and --weight_decay must be >= 0, --lr_decay > 0")
    if config.eval_every < 0:
        raise UserError(f"--eval_every={config.eval_every} must be >= 0 (0 = at the end only)")
    if config.checkpoint_every <= 0:
        raise UserError(f"--checkpoint_every={config.checkpoint_every} must be > 0")
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
                     resumable=None, callbacks=(), progress=None, eval_batch_size=None):
    """Fits a compiled classifier for `epochs`; returns the final held-out metrics.

    train_data(epoch, skip_batches) -> the dataset of that epoch from that
    batch on (a fresh order and augmentation each epoch); eval_data is
    evaluated every `eval_every` epochs and after the last. `model` must be
    compiled by `compile_classifier`. Epoch scalars go
    to TensorBoard in log_dir (train/ and validation/, as Keras's TensorBoard
    callback names them). `resumable` (co2_tf.evaluation.resume.Resumable,
    entered): training goes on from its position, with its checkpoints.
    `progress` (a co2_tf.progress.Reporter): progress lines named after the model.
    `eval_batch_size`: eval_data's batch size (None: its first batch's).
    Returns {"top1", "top5", "loss"} of the final evaluation (loss: the mean
    cross-entropy over the held-out examples).
    """
    replicas = model.distribute_strategy.num_replicas_in_sync
    if replicas > 1:  # a last batch smaller than the replicas: padded, with weight 0
        train_data = _padded(train_data, replicas)
    # Every held-out batch at one static shape (one trace; one compilation on TPU): the
    # last one padded to a full batch with weight 0, which the weighted metrics ignore.
    eval_batch = eval_batch_size or common.batch_size_of(eval_data)
    eval_data = eval_data.map(distribute.pad_to_size(-(-eval_batch // replicas) * replicas))
    scalars = EpochScalars(log_dir)
    saver = resumable.callback if resumable is not None else None
    callbacks = [scalars, _StopAfterOneEpoch(), *([saver] if saver else []), *callbacks]
    fit_callbacks = callbacks + progress_callbacks(progress_lib.reporter(progress), model.name)
    first, skip = (resumable.epoch, resumable.skip) if resumable is not None else (0, 0)
    for epoch in range(first, epochs):
        # The last epoch's evaluation comes after the loop (also for a resumed, finished run).
        validate = epoch < epochs - 1 and eval_every > 0 and (epoch + 1) % eval_every == 0
        if saver:
            saver.start_epoch(epoch, skip)
        # One epoch per fit() call (a fresh dataset each), numbered out of all epochs.
        model.fit(train_data(epoch, skip), initial_epoch=epoch, epochs=epochs,
                  validation_data=eval_data if validate else None, callbacks=fit_callbacks,
                  verbose=verbose)
        skip = 0
    logs = model.evaluate(eval_data, callbacks=callbacks[2:], return_dict=True, verbose=0)
    scalars.write("validation", epochs - 1, logs)
    # The loss over the held-out examples, exact (Keras's "loss" counts the padding).
    return {"top1": float(logs["top1"]), "top5": float(logs["top5"]),
            "loss": float(logs["xent"])}


def _padded(train_data, replicas):
    return lambda *args: train_data(*args).map(distribute.pad_batch(replicas))


class EpochScalars(keras.callbacks.Callback):
    """Epoch logs to TensorBoard, one writer per subdir across fit() calls.

    (Keras's TensorBoard callback opens new event files at every fit().)
    """

    def __init__(self, log_dir):
        super().__init__()
        self.writers = {name: tf.summary.create_file_writer(os.path.join(log_dir, name))
                        for name in ("train", "validation")}

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.write("train", epoch, {k: v for k, v in logs.items() if not k.startswith("val_")})
        self.write("validation", epoch, {k[4:]: v for k, v in logs.items()
                                         if k.startswith("val_")})

    def write(self, subdir, epoch, logs):
        with self.writers[subdir].as_default():
            for name, value in logs.items():
                tf.summary.scalar(f"epoch_{name}", float(value), step=epoch)
        self.writers[subdir].flush()


class _StopAfterOneEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True
