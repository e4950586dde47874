"""MoCo v1 / v2 image augmentations with stateless, seed-driven randomness.

Every random decision comes from an explicit seed tensor (shape [2], int32 or
int64) through `tf.random.stateless_*` ops, so a given (image, seed) always
yields the same views: runs are reproducible and resumable mid-epoch.

The semantics follow torchvision as used by facebookresearch/moco:

- RandomResizedCrop: area fraction ~ U[scale], aspect ratio log-uniform in
  [3/4, 4/3], up to 10 tries, then torchvision's centre-crop fallback.
- ColorJitter: brightness multiplies, contrast blends with the mean of the
  grayscale image, saturation blends with the grayscale image, hue shifts by
  U[-h, h] of the hue circle; the four applied in a random order per image,
  each clipped to [0, 1].
- RandomGrayscale: ITU-R 601 luma (0.299, 0.587, 0.114) copied to 3 channels.
- Gaussian blur (v2): sigma ~ U[0.1, 2.0], separable depthwise convolution with
  reflect padding, odd kernel of about 10% of the image side (at least 3).
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

import numpy as np
import tensorflow as tf

from co2_tf.data import AUGMENTS as RECIPES
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
# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# Number of independent sub-seeds one view uses (see sample_params).
_NUM_SUBSEEDS = 8


def check_recipe(recipe):
    """Raises UserError unless `recipe` is a known augmentation recipe."""
    if recipe not in RECIPES:
        raise UserError(f"unknown augmentation recipe {recipe!r}: use one of "
                        f"{', '.join(RECIPES)}")


def blur_kernel_size(image_size):
    """Odd Gaussian kernel size of about 10% of the image side, at least 3.

    224 -> 23 (as SimCLR / torchvision GaussianBlur(23)), 96 -> 9, 32 -> 3.
    """
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def gaussian_kernel_1d(sigma, size):
    """Normalised 1-D Gaussian weights, float32 [size], for scalar `sigma`."""
    radius = (size - 1) // 2
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigma = tf.cast(sigma, tf.float32)
    k = tf.exp(-0.5 * tf.square(x / sigma))
    return k / tf.reduce_sum(k)


def gaussian_blur(image, sigma, size):
    """Separable Gaussian blur of a float [h, w, c] image, reflect padding."""
    kernel = gaussian_kernel_1d(sigma, size)
    radius = (size - 1) // 2
    channels = image.shape[-1] or 3
    x = image[tf.newaxis]
    # Reflect padding, as torchvision's GaussianBlur; keeps edges unshaded.
    x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]],
               mode="REFLECT")
    kernel = tf.tile(tf.reshape(kernel, [size, 1, 1, 1]), [1, 1, channels, 1])
    x = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(x, tf.transpose(kernel, [1, 0, 2, 3]), [1, 1, 1, 1],
                                  "VALID")[0]


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


def to_gray(image):
    """torchvision rgb_to_grayscale, float [..., 3] -> [..., 1]."""
    # Three slices: ~3x cheaper than a multiply + reduce over the last axis.
    r, g, b = _GRAY_WEIGHTS
    return (image[..., 0:1] * r + image[..., 1:2] * g
            + image[..., 2:3] * b)


def adjust_brightness(image, factor):
    """Multiplies by `factor` >= 0 (blend with black), clipped to [0, 1]."""
    # image >= 0 and factor >= 0: only the upper bound can be crossed.
    return tf.minimum(image * factor, 1.0)


def adjust_contrast(image, factor):
    """Blends with the mean of the grayscale image, clipped to [0, 1]."""
    # mean(gray) = gray(per-channel means): no full grayscale image needed.
    mean = to_gray(tf.reduce_mean(image, axis=[0, 1]))[0]
    return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image, factor):
    """Blends with the grayscale image, clipped to [0, 1]."""
    gray = to_gray(image)
    return tf.clip_by_value(gray + factor * (image - gray), 0.0, 1.0)


def adjust_hue(image, shift):
    """Rotates hue by `shift` (fraction of the circle, in [-0.5, 0.5])."""
    # The HSV round trip stays in [0, 1] (up to rounding, which the final
    # clip of the view removes): no clip here.
    return tf.image.adjust_hue(image, shift)


def color_jitter(image, factors, order):
    """torchvision ColorJitter with given factors, in the given order.

    Args:
      image: float32 [h, w, 3] in [0, 1].
      factors: float32 [4]: brightness, contrast, saturation, hue shift.
      order: int32 [4], a permutation of 0..3 (op indices as in `factors`).
    """
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for step in range(4):
        idx = order[step]
        image = tf.switch_case(
            # switch_case calls the branches now, in this iteration.
            idx, [lambda op=op, k=k: op(image, factors[k])  # noqa: B023
                  for k, op in enumerate(ops)])
    return image


def _scale_after_resize(image, source_dtype):
    # tf.image.resize returns float32 in the source's value range.
    if source_dtype == tf.uint8:
        return image * (1.0 / 255.0)
    return image


def resized_crop(image, crop, image_size):
    """Crops (top, left, h, w) and resizes to [image_size, image_size].

    Bilinear without antialiasing (its cost: BUILD.md); MoCo's crops are mostly
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
    gray = lambda v: tf.tile(to_gray(v), [1, 1, 3])  # noqa: E731
    jitter = lambda v: color_jitter(  # noqa: E731
        v, params["jitter_factors"], params["jitter_order"])
    if recipe == "mocov1":
        view = tf.cond(params["gray"], lambda: gray(view), lambda: view)
        view = jitter(view)
    else:
        view = tf.cond(params["jitter"], lambda: jitter(view), lambda: view)
        view = tf.cond(params["gray"], lambda: gray(view), lambda: view)
        ksize = blur_kernel_size(image_size)
        view = tf.cond(params["blur"],
                       lambda: gaussian_blur(view, params["sigma"], ksize),
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


def view_pair_grid(images, views1, views2, pad=2):
    """A preview grid: one row per image: source, view 1, view 2.

    Args:
      images: [n, S, S, 3] sources (uint8 or float in [0, 1]), already resized
        to the views' size (e.g. with `eval_view`).
      views1, views2: [n, S, S, 3] float in [0, 1] (or uint8).
      pad: white pixels between tiles.

    Returns:
      uint8 numpy array [n * (S + pad) + pad, 3 * (S + pad) + pad, 3].
    """
    cols = [_as_uint8(np.asarray(x)) for x in (images, views1, views2)]
    n, s = cols[0].shape[0], cols[0].shape[1]
    grid = np.full((n * (s + pad) + pad, 3 * (s + pad) + pad, 3), 255,
                   np.uint8)
    for row in range(n):
        for col, arr in enumerate(cols):
            y = pad + row * (s + pad)
            x = pad + col * (s + pad)
            grid[y:y + s, x:x + s] = arr[row]
    return grid


def _as_uint8(arr):
    if arr.dtype == np.uint8:
        return arr
    return np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
