"""MoCo v1 / v2 image augmentations with stateless, seed-driven randomness.

Every random decision comes from an explicit seed tensor (shape [2], int32 or
int64) through `tf.random.stateless_*` ops, so a given (image, seed) always
yields the same views: runs are reproducible and resumable mid-epoch.

The semantics follow torchvision as used by facebookresearch/moco. Here: the
crop sampling and the recipes (which ops a view gets, with which factors);
the colour ops and the blur themselves are co2_tf.data.colour_ops.

- RandomResizedCrop: area fraction ~ U[scale], aspect ratio log-uniform in
  [3/4, 4/3], up to 10 tries, then torchvision's centre-crop fallback.
- ColorJitter: the four factors drawn, applied in a random order per image.
- Gaussian blur (v2): sigma ~ U[0.1, 2.0].
- Horizontal flip with p = 0.5.

The pipelines (recipe order as in MoCo's main_moco.py):

- "mocov1": crop(0.2-1) -> grayscale p=0.2 -> jitter(0.4, 0.4, 0.4, 0.4)
  always -> flip.
- "mocov2": crop(0.2-1) -> jitter(0.4, 0.4, 0.4, 0.1) p=0.8 -> grayscale
  p=0.2 -> blur p=0.5 -> flip.

The flip is applied right after the crop: it commutes with every later step
(pixel-wise ops, and a symmetric blur kernel with symmetric padding). Random
decisions are drawn by `sample_params` and applied by `apply_params`, so
tests (and curious users) can inspect them. co2_tf.data.augment_device runs the
same decisions with the steps after the crop on the accelerator.
"""
import math

import tensorflow as tf

from co2_tf.data import AUGMENTS as RECIPES
from co2_tf.data import colour_ops
from co2_tf.errors import UserError

# (brightness, contrast, saturation, hue) strengths and probabilities.
_RECIPE_SETTINGS = {
    "mocov1": dict(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4),
                   jitter_prob=1.0, gray_prob=0.2, blur_prob=0.0),
    "mocov2": dict(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                   jitter_prob=0.8, gray_prob=0.2, blur_prob=0.5),
    # Linear-probe training views: crop 0.08-1 + flip only.
    "linear": dict(scale=(0.08, 1.0), jitter=(0.0, 0.0, 0.0, 0.0),
                   jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0),
}
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_BLUR_SIGMA = (0.1, 2.0)
_CROP_TRIES = 10

# Number of independent sub-seeds one view uses (see sample_params).
_NUM_SUBSEEDS = 8


def check_recipe(recipe):
    """Raises UserError unless `recipe` is a known augmentation recipe."""
    if recipe not in RECIPES:
        raise UserError(f"unknown augmentation recipe {recipe!r}: use one of "
                        f"{', '.join(RECIPES)}")


def subseeds(seed, num):
    """`num` independent seeds [num, 2] from one (what a view, a step use)."""
    # int32 and int64 seeds give different streams: normalise to int64 so a
    # seed's value alone decides the result.
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.random.experimental.stateless_split(seed, num)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform(shape, seed, minval=minval,
                                       maxval=maxval, dtype=tf.float32)


def sample_crop(seed, height, width, scale, ratio=_RATIO):
    """torchvision RandomResizedCrop.get_params with stateless randomness.

    Args:
      seed: int tensor [2].
      height, width: image size (int or scalar tensor).
      scale: (min, max) fraction of the image area.
      ratio: (min, max) aspect ratio width / height.

    Returns:
      int32 tensor [4]: (top, left, crop_height, crop_width).
    """
    s_area, s_ratio, s_off = tf.unstack(subseeds(seed, 3))
    h_f = tf.cast(height, tf.float32)
    w_f = tf.cast(width, tf.float32)
    area = h_f * w_f
    # All tries drawn at once; the first valid one wins, as in the loop.
    target_area = area * _uniform(s_area, [_CROP_TRIES], scale[0], scale[1])
    log_ratio = _uniform(s_ratio, [_CROP_TRIES], math.log(ratio[0]),
                         math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    cw = tf.round(tf.sqrt(target_area * aspect))
    ch = tf.round(tf.sqrt(target_area / aspect))
    valid = (cw > 0) & (cw <= w_f) & (ch > 0) & (ch <= h_f)
    first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)
    any_valid = tf.reduce_any(valid)

    # Centre-crop fallback (torchvision): clamp the ratio into range.
    in_ratio = w_f / h_f
    fb_w = tf.where(in_ratio < ratio[0], w_f,
                    tf.where(in_ratio > ratio[1],
                             tf.round(h_f * ratio[1]), w_f))
    fb_h = tf.where(in_ratio < ratio[0], tf.round(w_f / ratio[0]), h_f)
    fb_w = tf.minimum(fb_w, w_f)
    fb_h = tf.minimum(fb_h, h_f)

    crop_h = tf.where(any_valid, ch[first], fb_h)
    crop_w = tf.where(any_valid, cw[first], fb_w)
    u = _uniform(s_off, [2])
    # randint(0, H - h + 1) as floor(u * (H - h + 1)); u < 1 keeps it in range.
    top_r = tf.floor(u[0] * (h_f - crop_h + 1.0))
    left_r = tf.floor(u[1] * (w_f - crop_w + 1.0))
    top_c = tf.floor((h_f - crop_h) / 2.0)
    left_c = tf.floor((w_f - crop_w) / 2.0)
    top = tf.where(any_valid, top_r, top_c)
    left = tf.where(any_valid, left_r, left_c)
    return tf.cast(tf.stack([top, left, crop_h, crop_w]), tf.int32)


def _settings(recipe):
    if recipe != "linear":
        check_recipe(recipe)
    return _RECIPE_SETTINGS[recipe]


def sample_params(seed, recipe, height, width):
    """Draws every random decision of one view.

    Args:
      seed: int tensor [2] for this view.
      recipe: "mocov1" | "mocov2" | "linear" (crop 0.08-1 + flip only).
      height, width: source image size.

    Returns:
      dict of tensors: crop int32 [4] (top, left, h, w) and what
      `sample_colour_params` draws (the crop from sub-seed 0 of `seed`, the
      rest from sub-seeds 1-4: the host and the device draw them apart).
    """
    crop = sample_crop(subseeds(seed, _NUM_SUBSEEDS)[0], height, width,
                       _settings(recipe)["scale"])
    return dict(crop=crop, **sample_colour_params(seed, recipe))


def sample_colour_params(seed, recipe):
    """The decisions of one view after its crop (what co2_tf.data.augment_device applies).

    Returns dict: flip, gray, jitter, blur bool scalars (whether each step is
    applied); jitter_factors float32 [4] (brightness, contrast, saturation
    factors and hue shift); jitter_order int32 [4] (permutation of
    0=brightness, 1=contrast, 2=saturation, 3=hue); sigma float32.
    """
    settings = _settings(recipe)
    seeds = tf.unstack(subseeds(seed, _NUM_SUBSEEDS))
    b, c, s, h = settings["jitter"]
    lo = tf.constant([max(0.0, 1.0 - b), max(0.0, 1.0 - c),
                      max(0.0, 1.0 - s), -h])
    hi = tf.constant([1.0 + b, 1.0 + c, 1.0 + s, h])
    coins = _uniform(seeds[1], [4])
    return {
        "flip": coins[0] < 0.5,
        "gray": coins[1] < settings["gray_prob"],
        "jitter": coins[2] < settings["jitter_prob"],
        "blur": coins[3] < settings["blur_prob"],
        "jitter_factors": lo + (hi - lo) * _uniform(seeds[2], [4]),
        # argsort of iid uniforms is a uniformly random permutation.
        "jitter_order": tf.cast(tf.argsort(_uniform(seeds[3], [4])),
                                tf.int32),
        "sigma": _uniform(seeds[4], (), _BLUR_SIGMA[0], _BLUR_SIGMA[1]),
    }


def _scale_after_resize(image, source_dtype):
    # tf.image.resize returns float32 in the source's value range.
    if source_dtype == tf.uint8:
        return image * (1.0 / 255.0)
    return image


def resized_crop(image, crop, image_size):
    """Crops (top, left, h, w) and resizes to [image_size, image_size].

    Bilinear without antialiasing (its cost: docs/performance.md); MoCo's crops are mostly
    upscaled or mildly downscaled. torchvision's PIL resize is antialiased.
    """
    image = tf.convert_to_tensor(image)
    dtype = image.dtype
    patch = tf.slice(image, [crop[0], crop[1], 0], [crop[2], crop[3], 3])
    out = tf.image.resize(patch, [image_size, image_size], method="bilinear", antialias=False)
    out = _scale_after_resize(tf.cast(out, tf.float32), dtype)
    return tf.clip_by_value(out, 0.0, 1.0)


def apply_params(image, params, recipe, image_size):
    """Applies the decisions from `sample_params` to one image.

    Returns float32 [image_size, image_size, 3] in [0, 1].
    """
    view = resized_crop(image, params["crop"], image_size)
    view = tf.cond(params["flip"], lambda: tf.reverse(view, axis=[1]),
                   lambda: view)
    if recipe == "linear":
        return view
    gray = lambda v: tf.tile(colour_ops.to_gray(v), [1, 1, 3])  # noqa: E731
    jitter = lambda v: colour_ops.color_jitter(  # noqa: E731
        v, params["jitter_factors"], params["jitter_order"])
    if recipe == "mocov1":
        view = tf.cond(params["gray"], lambda: gray(view), lambda: view)
        view = jitter(view)
    else:
        view = tf.cond(params["jitter"], lambda: jitter(view), lambda: view)
        view = tf.cond(params["gray"], lambda: gray(view), lambda: view)
        ksize = colour_ops.blur_kernel_size(image_size)
        view = tf.cond(params["blur"],
                       lambda: colour_ops.gaussian_blur(view, params["sigma"], ksize),
                       lambda: view)
    view = tf.clip_by_value(view, 0.0, 1.0)
    return tf.ensure_shape(view, [image_size, image_size, 3])


def one_view(image, seed, recipe, image_size):
    """One augmented view (float32 [S, S, 3] in [0, 1]) of one image."""
    image = tf.convert_to_tensor(image)
    params = sample_params(seed, recipe, *tf.unstack(tf.shape(image)[:2]))
    return apply_params(image, params, recipe, image_size)


def two_views(image, seed, recipe, image_size):
    """Two independently augmented views of one image.

    Args:
      image: uint8 [h, w, 3] (any h, w) or float32 in [0, 1].
      seed: int32/int64 tensor [2].
      recipe: "mocov1" | "mocov2".
      image_size: output side S.

    Returns:
      (view1, view2), each float32 [S, S, 3] in [0, 1].
    """
    check_recipe(recipe)
    image = tf.convert_to_tensor(image)
    s1, s2 = tf.unstack(subseeds(seed, 2))
    return (one_view(image, s1, recipe, image_size),
            one_view(image, s2, recipe, image_size))


def classifier_train_view(image, seed, image_size):
    """Linear-probe training view: RandomResizedCrop(0.08-1) + hflip."""
    return one_view(image, seed, "linear", image_size)


def eval_view(image, image_size):
    """Resize the shorter side to round(S * 256 / 224), centre crop S.

    Antialiased here (unlike the training crops): it is one resize per image,
    and evaluation images are often downscaled a lot, where aliasing hurts.
    """
    image = tf.convert_to_tensor(image)
    dtype = image.dtype
    h, w = tf.unstack(tf.shape(image)[:2])
    target = int(round(image_size * 256 / 224))
    h_f = tf.cast(h, tf.float32)
    w_f = tf.cast(w, tf.float32)
    short = tf.minimum(h_f, w_f)
    new_h = tf.maximum(tf.cast(tf.round(h_f * target / short), tf.int32),
                       image_size)
    new_w = tf.maximum(tf.cast(tf.round(w_f * target / short), tf.int32),
                       image_size)
    out = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear",
                          antialias=True)
    top = (new_h - image_size) // 2
    left = (new_w - image_size) // 2
    out = tf.slice(out, [top, left, 0], [image_size, image_size, 3])
    out = _scale_after_resize(tf.cast(out, tf.float32), dtype)
    return tf.ensure_shape(tf.clip_by_value(out, 0.0, 1.0),
                           [image_size, image_size, 3])
