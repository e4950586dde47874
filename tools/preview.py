"""Pictures of the data: the augmentation grid of tools/preview_augmentations.py (source
images and their two views) and the class grid of tools/preview_classes.py."""

import dataclasses

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from co2_tf.config import flag
from co2_tf.data import AUGMENTS, pipelines
from co2_tf.data import augment as _augment
from co2_tf.data.sources import make_source
from co2_tf.errors import UserError
from co2_tf.evaluation import drawing


def preview_grid(spec, *, split="train", data_dir=None, image_size, augment,
                 num_images=8, seed=0):
    """uint8 preview grid (see `co2_tf.evaluation.drawing.view_pair_grid`) of view pairs.

    For indexed sources (builtin, folder), row j shows global example j of the
    pretraining stream with this `seed` (its source, and the very views
    `pipelines.pretrain_dataset_fn` makes for it). For streaming sources (tfds), the
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
        positions = [int(pipelines.source_index(tf.constant(j, tf.int64), n, seed))
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
    return drawing.view_pair_grid(np.stack(originals), np.stack(views1), np.stack(views2))


@dataclasses.dataclass
class PreviewConfig:
    dataset: str = flag("builtin", "builtin | tfds:NAME[/CONFIG] | folder:PATH")
    augment: str = flag("mocov2", "two-crop recipe", choices=AUGMENTS)
    image_size: int = flag(96, "side of the views, in pixels")
    out: str = flag("augmentations.png", "PNG file to write")
    num_images: int = flag(8, "rows: how many source images")
    seed: int = flag(0, "seed of the example order and views")
    data_dir: str = flag("", "TFDS data directory")
    split: str = flag("train", "dataset split")


def write_preview(config):
    """Writes the grid PNG of `config`; returns its (height, width)."""
    grid = preview_grid(config.dataset, split=config.split, data_dir=config.data_dir or None,
                        image_size=config.image_size, augment=config.augment,
                        num_images=config.num_images, seed=config.seed)
    drawing.write_png(config.out, Image.fromarray(grid))
    return grid.shape[:2]


# ------------------------------------------------------------------- classes
def class_grid(spec, *, split="train", data_dir=None, image_size=48, per_class=8, seed=0):
    """A PIL image: a row per class, its name then `per_class` of its examples.

    The examples are drawn at random (`seed`) from each class of `split`,
    shown resized and centre-cropped as for evaluation.
    """
    source = make_source(spec, data_dir)
    if per_class < 1 or image_size < 8:
        raise UserError("--per_class must be >= 1 and --image_size >= 8")
    source.validate(split)
    names = source.class_names(split)  # UserError for unlabelled data
    labels = np.asarray(source.labels(split))
    rng = np.random.default_rng(seed)
    chosen = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == c), min(per_class, int(np.sum(labels == c))),
                   replace=False) for c in range(len(names))]))
    rows = {c: [] for c in range(len(names))}
    for images, y in pipelines.labelled_dataset(source, split=split, image_size=image_size,
                                                batch_size=256, indices=chosen):
        for image, label in zip(images.numpy(), y.numpy()):
            rows[int(label)].append(image)
    pad, name_width = 4, 8 + max(len(n) for n in names) * 7
    width = name_width + per_class * (image_size + pad) + pad
    canvas = Image.new("RGB", (width, len(names) * (image_size + pad) + pad), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), drawing.font(12)
    for c, name in enumerate(names):
        y = pad + c * (image_size + pad)
        draw.text((pad, y + image_size // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
        for j, image in enumerate(rows[c]):
            pixels = drawing.as_uint8(image)
            canvas.paste(Image.fromarray(pixels), (name_width + j * (image_size + pad), y))
    return canvas


@dataclasses.dataclass
class ClassesConfig:
    dataset: str = flag("builtin", "builtin | tfds:NAME[/CONFIG] | folder:PATH")
    image_size: int = flag(48, "side of each example, in pixels")
    per_class: int = flag(8, "examples per class (columns)")
    out: str = flag("classes.png", "PNG file to write")
    seed: int = flag(0, "seed of the examples drawn")
    data_dir: str = flag("", "TFDS data directory")
    split: str = flag("train", "dataset split")


def write_class_grid(config):
    """Writes the class grid PNG of `config`; returns its (height, width)."""
    picture = class_grid(config.dataset, split=config.split, data_dir=config.data_dir or None,
                         image_size=config.image_size, per_class=config.per_class,
                         seed=config.seed)
    drawing.write_png(config.out, picture)
    return picture.size[::-1]
