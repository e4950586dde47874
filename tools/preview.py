"""The preview grid of tools/preview_augmentations.py: source images and their two views."""

import dataclasses
import io as stdio

import numpy as np
import tensorflow as tf
from PIL import Image

from co2_tf import augment as _augment
from co2_tf import data, io
from co2_tf.config import AUGMENTS
from co2_tf.errors import UserError
from co2_tf.sources import make_source


def preview_grid(spec, *, split="train", data_dir=None, image_size, augment,
                 num_images=8, seed=0):
    """uint8 preview grid (see `co2_tf.augment.view_pair_grid`) of view pairs.

    For indexed sources (builtin, folder), row j shows global example j of the
    pretraining stream with this `seed` (its source, and the very views
    `data.pretrain_dataset_fn` makes for it). For streaming sources (tfds), the
    first examples of the split, augmented with seeds [seed, j].
    """
    source = make_source(spec, data_dir)
    _augment.check_recipe(augment)
    if num_images < 1:
        raise UserError(f"num_images must be at least 1, got {num_images}")
    if image_size < 8:
        raise UserError(f"image_size must be at least 8, got {image_size}")
    source.validate(split)
    if source.indexed:
        n = source.num_examples(split)
        positions = [int(data.source_index(tf.constant(j, tf.int64), n, seed))
                     for j in range(num_images)]
    else:
        positions = range(num_images)
    sources = source.images(split, positions, image_size)
    originals, views1, views2 = [], [], []
    for j, image in enumerate(sources):
        v1, v2 = _augment.two_views(image, tf.constant([seed, j], tf.int64), augment,
                                    image_size)
        originals.append(_augment.eval_view(image, image_size).numpy())
        views1.append(v1.numpy())
        views2.append(v2.numpy())
    return _augment.view_pair_grid(np.stack(originals), np.stack(views1), np.stack(views2))


@dataclasses.dataclass
class PreviewConfig:
    dataset: str = "builtin"
    augment: str = "mocov2"
    image_size: int = 96
    out: str = "augmentations.png"
    num_images: int = 8
    seed: int = 0
    data_dir: str = ""
    split: str = "train"


HELP = {
    "dataset": "builtin | tfds:NAME[/CONFIG] | folder:PATH",
    "augment": "two-crop recipe",
    "image_size": "side of the views, in pixels",
    "out": "PNG file to write",
    "num_images": "rows: how many source images",
    "seed": "seed of the example order and views",
    "data_dir": "TFDS data directory",
    "split": "dataset split",
}
CHOICES = {"augment": AUGMENTS}


def write_preview(config):
    """Writes the grid PNG of `config`; returns its (height, width)."""
    grid = preview_grid(config.dataset, split=config.split, data_dir=config.data_dir or None,
                        image_size=config.image_size, augment=config.augment,
                        num_images=config.num_images, seed=config.seed)
    buffer = stdio.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    try:
        io.write_bytes_atomic(config.out, buffer.getvalue())
    except (OSError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot write {config.out}: {first}: pass a writable --out path "
                        "ending in .png") from None
    return grid.shape[:2]
