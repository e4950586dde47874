"""The built-in dataset: procedurally generated textures, no download.

`load(split, image_size, seed)` makes the images in TensorFlow (vectorised,
deterministic by seed). Ten classes, defined by SHAPE / TEXTURE / LAYOUT.
The images are gray (three equal channels): with a random colour pair per
sample, colour was the easiest cue that tells one image from another through
MoCo's augmentations, and MoCo learned it instead of the textures (measured:
kNN of the learned features fell below random init); gray levels leave
texture as the cue that survives. Each pattern fills the whole image, so a MoCo crop of 20% of
the area (then upscaled up to ~2.2x) still shows it:

====  =================  ===================================================
 id    name               pattern (angles: 0 = horizontal stripes)
====  =================  ===================================================
 0     hstripes           straight stripes at 0 deg (+-10 deg)
 1     vstripes           straight stripes at 90 deg (+-10 deg)
 2     diagonal           straight stripes at +45 or -45 deg (+-10 deg)
 3     checkerboard       axis-aligned checkerboard (+-10 deg)
 4     diamonds           checkerboard turned 45 deg (+-10 deg)
 5     rings              concentric rings around a centre inside the image
 6     dots               lattice of round dots (any lattice angle)
 7     grid               thin grid lines on a plain background (+-10 deg)
 8     blobs              smooth random blobs (thresholded low-pass noise)
 9     waves              wavy horizontal stripes (+-10 deg)
====  =================  ===================================================

Every class is closed under a horizontal flip (MoCo's flip turns +45 deg
into -45 deg, which is why "diagonal" holds both); none is closed under a
90-degree rotation, which MoCo does not apply. Per sample: random period
(0.12-0.22 of the image side), phase, small rotation, edge sharpness (from
sine-like to square-wave), two random gray levels that differ by at
least 0.3 (so the pattern survives the grayscale augmentation), and Gaussian
pixel noise. Geometry is in image-size fractions, so the dataset looks the
same at any `image_size` (32 px is the intended size; 64-96 px is fine).

Splits: "train" has 8000 images (800 per class), "test" 2000 (200 per class),
drawn from independent random streams (no shared samples). Both are ordered
by a fixed permutation so that any prefix is roughly class-balanced.
"""
import functools
import math

import numpy as np
import tensorflow as tf

from co2_tf.data.sources import base
from co2_tf.errors import UserError

CLASS_NAMES = ("hstripes", "vstripes", "diagonal", "checkerboard",
               "diamonds", "rings", "dots", "grid", "blobs", "waves")
NUM_CLASSES = len(CLASS_NAMES)
_PER_CLASS = {"train": 800, "test": 200}
_SPLIT_IDS = {"train": 1, "test": 2}
# Images generated per vectorised call: bounds float32 memory at large sizes.
_CHUNK_PIXELS = 50_000_000


def num_examples(split):
    """Number of examples in `split` ("train" or "test")."""
    _check_split(split)
    return _PER_CLASS[split] * NUM_CLASSES


def _check_split(split):
    if split not in _PER_CLASS:
        raise UserError(
            f"unknown split {split!r} for the builtin dataset: use 'train' or "
            "'test'")


def load(split, image_size, seed=0):
    """Generates the builtin dataset.

    Args:
      split: "train" or "test".
      image_size: side S of the square images.
      seed: integer; the same (split, image_size, seed) gives the same data.

    Returns:
      (images uint8 numpy [N, S, S, 3], labels int32 numpy [N]). Cached per
      (split, image_size, seed) within the process; treat as read-only.
    """
    _check_split(split)
    if int(image_size) < 8:
        raise UserError(f"builtin image_size {image_size} is too small: use "
                        "at least 8 (32 is the intended size)")
    return _load_cached(split, int(image_size), int(seed))


@functools.lru_cache(maxsize=8)
def _load_cached(split, image_size, seed):
    per_class = _PER_CLASS[split]
    chunk = max(1, min(per_class, _CHUNK_PIXELS // (image_size ** 2 * 3)))
    images, labels = [], []
    for cls in range(NUM_CLASSES):
        for start in range(0, per_class, chunk):
            n = min(chunk, per_class - start)
            # Distinct stateless seed per (seed, split, class, chunk).
            s = tf.constant([seed, ((_SPLIT_IDS[split] * 1000 + cls) << 20)
                             + start], tf.int64)
            images.append(_generate(cls, n, image_size, s).numpy())
            labels.append(np.full([n], cls, np.int32))
    images = np.concatenate(images)
    labels = np.concatenate(labels)
    order = np.random.RandomState(seed + 7919 * _SPLIT_IDS[split]).permutation(
        len(labels))
    images, labels = images[order], labels[order]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _u(seed, n, lo, hi):
    """n iid uniforms in [lo, hi), shaped [n, 1, 1] (broadcast on pixels)."""
    return tf.random.stateless_uniform([n, 1, 1], seed, lo, hi)


def _generate(cls, n, size, seed):
    """uint8 [n, size, size, 3] images of class `cls` (Python int)."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 16))
    # Pixel-centre coordinates in [0, 1], y downwards.
    c = (tf.range(size, dtype=tf.float32) + 0.5) / size
    y, x = tf.meshgrid(c, c, indexing="ij")
    x, y = x[tf.newaxis], y[tf.newaxis]

    period = _u(seeds[0], n, 0.12, 0.22)
    phase = _u(seeds[1], n, 0.0, 1.0)
    phase2 = _u(seeds[2], n, 0.0, 1.0)
    jitter_deg = _u(seeds[3], n, -10.0, 10.0)
    sharp = _u(seeds[4], n, 1.5, 12.0)  # sine-like .. square-wave edges
    two_pi = 2.0 * math.pi

    def rotate(deg):
        t = deg * (math.pi / 180.0)
        # Coordinates across (v) and along (u) stripes running at angle t.
        v = -(x - 0.5) * tf.sin(t) + (y - 0.5) * tf.cos(t)
        u = (x - 0.5) * tf.cos(t) + (y - 0.5) * tf.sin(t)
        return u, v

    def stripes(v):
        return tf.sigmoid(sharp * tf.sin(two_pi * (v / period + phase)))

    if cls in (0, 1, 2):
        base = {0: 0.0, 1: 90.0}.get(cls)
        if base is None:
            sign = tf.where(_u(seeds[5], n, 0.0, 1.0) < 0.5, -1.0, 1.0)
            base = 45.0 * sign
        _, v = rotate(base + jitter_deg)
        mask = stripes(v)
    elif cls in (3, 4):
        u, v = rotate((0.0 if cls == 3 else 45.0) + jitter_deg)
        prod = (tf.sin(two_pi * (u / period + phase))
                * tf.sin(two_pi * (v / period + phase2)))
        mask = tf.sigmoid(2.0 * sharp * prod)
    elif cls == 5:
        cx = _u(seeds[5], n, 0.2, 0.8)
        cy = _u(seeds[6], n, 0.2, 0.8)
        r = tf.sqrt(tf.square(x - cx) + tf.square(y - cy))
        mask = stripes(r)
    elif cls == 6:
        u, v = rotate(_u(seeds[5], n, 0.0, 90.0))
        fu = tf.math.floormod(u / period + phase, 1.0) - 0.5
        fv = tf.math.floormod(v / period + phase2, 1.0) - 0.5
        dist = tf.sqrt(tf.square(fu) + tf.square(fv))
        radius = _u(seeds[6], n, 0.2, 0.32)
        mask = tf.sigmoid(8.0 * sharp * (radius - dist))
    elif cls == 7:
        u, v = rotate(jitter_deg)
        fu = tf.math.floormod(u / period + phase, 1.0)
        fv = tf.math.floormod(v / period + phase2, 1.0)
        du = tf.minimum(fu, 1.0 - fu)
        dv = tf.minimum(fv, 1.0 - fv)
        width = _u(seeds[6], n, 0.08, 0.14)
        mask = tf.sigmoid(8.0 * sharp * (width - tf.minimum(du, dv)))
    elif cls == 8:
        grid = 6
        noise = tf.random.stateless_normal([n, grid, grid, 1], seeds[5])
        smooth = tf.image.resize(noise, [size, size], method="bicubic")[..., 0]
        mean = tf.reduce_mean(smooth, axis=[1, 2], keepdims=True)
        std = tf.math.reduce_std(smooth, axis=[1, 2], keepdims=True) + 1e-6
        mask = tf.sigmoid(2.0 * sharp * (smooth - mean) / std)
    elif cls == 9:
        u, v = rotate(jitter_deg)
        amp = _u(seeds[5], n, 0.035, 0.06)
        wavelength = _u(seeds[6], n, 0.25, 0.4)
        v = v + amp * tf.sin(two_pi * (u / wavelength + phase2))
        mask = stripes(v)
    else:
        raise ValueError(f"no class {cls}")

    fg, bg = _colour_pair(seeds[8], seeds[9], seeds[10], n)
    mask = mask[..., tf.newaxis]
    image = bg + (fg - bg) * mask
    noise_std = _u(seeds[11], n, 0.0, 0.06)[..., tf.newaxis]
    # One noise value for the three channels: the images stay exactly gray.
    noise_shape = tf.concat([tf.shape(image)[:-1], [1]], 0)
    image += noise_std * tf.random.stateless_normal(noise_shape, seeds[12])
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.cast(tf.round(image * 255.0), tf.uint8)


def _colour_pair(s_lum, s_chroma, s_swap, n):
    """Two random gray levels [n, 1, 1, 3] with a gap >= 0.3 (no chroma: see above)."""
    lum_lo = tf.random.stateless_uniform([n, 1, 1, 1], s_lum, 0.05, 0.4)
    gap = tf.random.stateless_uniform([n, 1, 1, 1], s_swap, 0.3, 0.55)
    lum_hi = tf.minimum(lum_lo + gap, 0.97)
    del s_chroma  # kept in the signature: the other streams stay as they were
    c_lo = tf.tile(lum_lo, [1, 1, 1, 3])
    c_hi = tf.tile(lum_hi, [1, 1, 1, 3])
    # Which of the two is the pattern: random, so polarity is no class cue.
    s_polarity = tf.random.experimental.stateless_fold_in(s_swap, 1)
    swap = tf.random.stateless_uniform([n, 1, 1, 1], s_polarity) < 0.5
    return tf.where(swap, c_lo, c_hi), tf.where(swap, c_hi, c_lo)


# --------------------------------------------------------------------------
# The source.

# Largest side at which builtin images are generated; larger image sizes
# upscale them (keeps memory and generation time small at 224 px).
MAX_SOURCE_SIZE = 128


class BuiltinSource(base.Source):
    """The generated textures: in memory, indexed, held-out split "test"."""

    in_memory = True

    def validate(self, split="train"):
        _check_split(split)

    def num_examples(self, split="train"):
        return num_examples(split)

    def class_names(self, split="train"):
        return list(CLASS_NAMES)

    def labels(self, split):
        return base.as_int32(load(split, 8)[1])

    def default_eval_split(self):
        return "test"

    def arrays(self, split, image_size):
        """(images uint8 [N, s, s, 3], labels) at the generation size for `image_size`."""
        return load(split, min(image_size, MAX_SOURCE_SIZE), seed=0)

    def example_fn(self, split, image_size):
        images_np, labels_np = self.arrays(split, image_size)
        images = tf.constant(images_np)
        labels = tf.constant(labels_np, tf.int32)
        return lambda i: (tf.gather(images, i), tf.gather(labels, i))
