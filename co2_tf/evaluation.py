"""Evaluating representations: features, weighted kNN, linear classifiers, projector.

The kNN classifier is InstDisc's (Wu et al. 2018), the usual monitor of
MoCo-style pretraining: cosine similarity to a memory bank of training
features, the k nearest neighbours vote for their class with weight
exp(similarity / t).

`train_classifier` is the supervised loop the linear probe and the
semi-supervised fine-tuning share: Keras `fit`, one epoch per call with a
fresh dataset per epoch, top-1 / top-5 on the held-out split, TensorBoard.
`write_projector` writes embeddings for TensorBoard's projector.
"""

import json
import os

import keras
import numpy as np
import tensorflow as tf

from co2_tf import optimizers
from co2_tf.errors import UserError

LOG_SUBDIR = "logs"  # TensorBoard, in a tool's output dir


def extract_features(backbone, dataset, normalize=True, verbose=0):
    """Features (L2-normalised unless normalize=False) and labels of a finite dataset.

    `dataset` yields (images, labels) batches; verbose=1 shows a progress bar.
    """
    features, labels = [], []
    steps = int(dataset.cardinality())
    progress = keras.utils.Progbar(steps if steps >= 0 else None, verbose=verbose,
                                   unit_name="batch")
    for images, y in dataset:
        progress.add(1)
        # Keras's own compiled predict function, traced once per model.
        f = tf.cast(backbone.predict_on_batch(images), tf.float32)
        features.append(tf.math.l2_normalize(f, -1) if normalize else f)
        labels.append(tf.cast(y, tf.int32))
    return tf.concat(features, 0), tf.concat(labels, 0)


def knn_predict_scores(train_features, train_labels, test_features, num_classes, k=200,
                       temperature=0.1, chunk=512):
    """Class scores [N_test, C] of the weighted kNN vote.

    Features must be L2-normalised. Test examples are processed in chunks so
    that the [chunk, N_train] similarity matrix stays small.
    """
    k = min(k, int(train_features.shape[0]))
    scores = []
    for start in range(0, int(test_features.shape[0]), chunk):
        sims = tf.matmul(test_features[start:start + chunk], train_features, transpose_b=True)
        top_sims, top_idx = tf.math.top_k(sims, k=k)
        weights = tf.exp(top_sims / temperature)
        votes = tf.one_hot(tf.gather(train_labels, top_idx), num_classes) * weights[..., None]
        scores.append(tf.reduce_sum(votes, axis=1))
    return tf.concat(scores, 0)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=200,
                 temperature=0.1):
    """Top-1 accuracy (a fraction) of the weighted kNN classifier."""
    scores = knn_predict_scores(train_features, train_labels, test_features, num_classes, k,
                                temperature)
    predicted = np.argmax(scores.numpy(), axis=-1)
    return float(np.mean(predicted == np.asarray(test_labels)))


def knn_eval(backbone, train_dataset, test_dataset, num_classes, k=200, temperature=0.1):
    """kNN top-1 of `backbone` features: memory bank from train, queries from test."""
    train_f, train_y = extract_features(backbone, train_dataset)
    test_f, test_y = extract_features(backbone, test_dataset)
    return knn_accuracy(train_f, train_y, test_f, test_y, num_classes, k, temperature)


# ------------------------------------------------------------- classifiers
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


def train_classifier(model, train_data, eval_data, *, epochs, log_dir, eval_every=1, verbose=1):
    """Fits a compiled classifier for `epochs`; returns the final held-out metrics.

    train_data(epoch) -> the dataset of that epoch (a fresh order and
    augmentation each epoch); eval_data is evaluated every `eval_every`
    epochs and after the last. `model` must be compiled with the metrics of
    `classification_metrics`. Epoch scalars go to TensorBoard in log_dir
    (train/ and validation/, as Keras's TensorBoard callback names them).
    Returns {"top1", "top5", "loss"} of the last evaluation.
    """
    callbacks = [EpochScalars(log_dir), _StopAfterOneEpoch()]
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


def write_results(output_dir, filename, results):
    """Writes results as JSON (output_dir/filename) and returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, filename)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path


# ---------------------------------------------------------------- projector
# The projector shows sprites up to 8192 x 8192 pixels.
_SPRITE_MAX = 8192


def write_projector(log_dir, features, labels=None, class_names=None, images=None):
    """Writes embeddings for TensorBoard's projector (`tensorboard --logdir=log_dir`).

    features [N, F]; labels [N] (ints, with class_names if known) become
    metadata.tsv; images [N, h, w, 3] (uint8, or float in [0, 1]) become the
    sprite of thumbnails. Files: embeddings.ckpt-1.* (+ checkpoint),
    metadata.tsv, sprite.png, projector_config.pbtxt.
    """
    from tensorboard.plugins import projector  # noqa: PLC0415 (heavy, only needed here)

    os.makedirs(log_dir, exist_ok=True)
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = "embeddings/.ATTRIBUTES/VARIABLE_VALUE"
    if labels is not None:
        with open(os.path.join(log_dir, "metadata.tsv"), "w", encoding="utf-8") as f:
            f.write("label\tclass\n")
            for y in np.asarray(labels):
                f.write(f"{int(y)}\t{class_names[y] if class_names is not None else y}\n")
        embedding.metadata_path = "metadata.tsv"
    if images is not None:
        sprite, side = _sprite(images)
        tf.io.write_file(os.path.join(log_dir, "sprite.png"), tf.io.encode_png(sprite))
        embedding.sprite.image_path = "sprite.png"
        embedding.sprite.single_image_dim.extend([side, side])
    tf.train.Checkpoint(embeddings=tf.Variable(np.asarray(features, np.float32))).save(
        os.path.join(log_dir, "embeddings.ckpt"))
    projector.visualize_embeddings(log_dir, config)


def _sprite(images):
    """Square thumbnails tiled row-major into a sprite of at most 8192 px a side."""
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        images = tf.cast(images, tf.float32) / 255.0
    per_row = int(np.ceil(np.sqrt(int(images.shape[0]))))
    side = max(1, min(int(images.shape[1]), _SPRITE_MAX // per_row))
    thumbs = tf.image.resize(images, [side, side], antialias=True).numpy()
    sprite = np.zeros((per_row * side, per_row * side, 3), np.float32)
    for i, thumb in enumerate(thumbs):
        r, c = divmod(i, per_row)
        sprite[r * side:(r + 1) * side, c * side:(c + 1) * side] = thumb
    return np.clip(np.round(sprite * 255.0), 0, 255).astype(np.uint8), side
