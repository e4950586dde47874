"""Embeddings for TensorBoard's projector (tools/knn_eval.py --projector_dir)."""

import numpy as np
import tensorflow as tf

from co2_tf import io

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

    io.makedirs(log_dir)
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = "embeddings/.ATTRIBUTES/VARIABLE_VALUE"
    if labels is not None:
        rows = [f"{int(y)}\t{class_names[y] if class_names is not None else y}\n"
                for y in np.asarray(labels)]
        io.write_text_atomic(io.join(log_dir, "metadata.tsv"), "label\tclass\n" + "".join(rows))
        embedding.metadata_path = "metadata.tsv"
    if images is not None:
        sprite, side = _sprite(images)
        tf.io.write_file(io.join(log_dir, "sprite.png"), tf.io.encode_png(sprite))
        embedding.sprite.image_path = "sprite.png"
        embedding.sprite.single_image_dim.extend([side, side])
    tf.train.Checkpoint(embeddings=tf.Variable(np.asarray(features, np.float32))).save(
        io.join(log_dir, "embeddings.ckpt"))
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
