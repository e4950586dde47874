"""MoCo's augmentation split between the host and the accelerator (--augment_on).

With the "device" placement, the host does only what needs the whole source
image: decode, RandomResizedCrop and the resize to S x S, handing over uint8
pixels (`two_crops`, in tf.data). Everything after the crop (flip, colour
jitter, grayscale, blur) runs batched inside the train step (`ViewTransform`);
normalisation is already the backbone's first layer. The "host" placement is
co2_tf.data.augment's whole pipeline in tf.data, float32 views.

The two placements make the same random decisions: view v of the example with
global index i (co2_tf.data.pipelines's index contract, i = step * B + position in the
global batch) has the seed ``augment.subseeds([seed, i], 2)[v]``, and both
draw the crop from its sub-seed 0 and the rest from its sub-seeds 1-4
(`augment.sample_params`, `augment.sample_colour_params`). The device knows i
from the step and the example's position, so a resumed run draws the same
views, and the distributions are co2_tf.data.augment's (tests/test_augment.py).
(Compiled by XLA, as on TPUs or with --jit_compile, the stateless ops draw
other numbers than TF's own kernels (seen with XLA on a CPU): the decisions
after the crop are then other draws of the same distributions than the
"host" placement's; resume stays exact. `ViewTransform(jit_compile=True)`
keeps the draws out of its XLA cluster.)
MoCo's order is kept: crop, then (v2) jitter p=0.8 -> grayscale p=0.2 ->
blur p=0.5, or (v1) grayscale p=0.2 -> jitter; the flip commutes with all of
them and comes first.

Where ours differs from torchvision's pipeline (PIL images, as MoCo's
main_moco.py), on both placements unless said:
- torchvision quantises to uint8 after every PIL operation (the resize, each
  of the four jitter ops, grayscale, blur). Ours quantises once, after the
  resize, on the "device" placement (the host hands over uint8), and never on
  the "host" one; jitter, grayscale and blur compute in float32.
- The crop's resize is bilinear without antialiasing (PIL's is antialiased
  when it downscales).
- Contrast blends with the exact mean gray (PIL: rounded to an integer);
  grayscale uses float weights (0.2989, 0.587, 0.114) (PIL: integer
  arithmetic, 299/587/114 per mille).
- Blur is an exact Gaussian, kernel ~10% of the side, reflect padding (MoCo's
  PIL ImageFilter.GaussianBlur(sigma) approximates it with box filters).
- Hue rotates the float HSV hue (PIL: an 8-bit hue channel).
"""
import functools

import tensorflow as tf

# CPU_PLACEMENT and resolve_placement: the one rule, TF-free in data/__init__.py, named here too.
from co2_tf.data import CPU_PLACEMENT, augment, colour_ops, resolve_placement  # noqa: F401


def crop_view(image, view_seed, recipe, image_size):
    """The host's part of one view: crop + bilinear resize, uint8 [S, S, 3]."""
    image = tf.convert_to_tensor(image)
    crop_seed = augment.subseeds(view_seed, 8)[0]  # sample_params' crop sub-seed
    h, w = tf.unstack(tf.shape(image)[:2])
    crop = augment.sample_crop(crop_seed, h, w, augment._settings(recipe)["scale"])
    patch = tf.slice(image, [crop[0], crop[1], 0], [crop[2], crop[3], 3])
    out = tf.image.resize(patch, [image_size, image_size], method="bilinear", antialias=False)
    if image.dtype != tf.uint8:  # float sources in [0, 1]
        out = out * 255.0
    return tf.ensure_shape(tf.saturate_cast(tf.round(out), tf.uint8),
                           [image_size, image_size, 3])


def two_crops(image, seed, recipe, image_size):
    """The host's part of `augment.two_views`: (view1, view2), uint8 [S, S, 3] each."""
    augment.check_recipe(recipe)
    s1, s2 = tf.unstack(augment.subseeds(seed, 2))
    return (crop_view(image, s1, recipe, image_size),
            crop_view(image, s2, recipe, image_size))


# ------------------------------------------------------- batched colour ops
def _per_example(v):
    return tf.reshape(v, [-1, 1, 1, 1])


def adjust_brightness(x, f):
    return tf.minimum(x * _per_example(f), 1.0)


def adjust_contrast(x, f):
    mean = colour_ops.to_gray(tf.reduce_mean(x, axis=[1, 2], keepdims=True))
    f = _per_example(f)
    return tf.clip_by_value(f * x + (1.0 - f) * mean, 0.0, 1.0)


def adjust_saturation(x, f):
    gray = colour_ops.to_gray(x)
    return tf.clip_by_value(gray + _per_example(f) * (x - gray), 0.0, 1.0)


def adjust_hue(x, shift):
    """Per-example hue rotation (as tf.image.adjust_hue, a fraction of the circle)."""
    h, s, v = tf.unstack(tf.image.rgb_to_hsv(x), axis=-1)
    h = tf.math.floormod(h + tf.reshape(shift, [-1, 1, 1]), 1.0)
    return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def color_jitter(x, factors, order):
    """ColorJitter per example: factors float32 [b, 4], order int32 [b, 4].

    Brightness, contrast and saturation are one blend clip(f x + (1 - f) t),
    t = 0, the mean gray or the gray image: each of the four slots computes
    that blend with each example's own f and t, and the hue rotation, for the
    whole batch, and keeps each example's op. Batched, no per-example control flow.
    """
    for slot in range(4):
        op = order[:, slot]
        f = tf.gather(factors, tf.minimum(op, 2), batch_dims=1)
        gray = colour_ops.to_gray(x)
        mean = tf.reduce_mean(gray, axis=[1, 2], keepdims=True)
        target = tf.where(_per_example(op == 1), mean, _per_example(tf.cast(op == 2, x.dtype))
                          * gray)
        # x >= 0 and f >= 0: brightness's clip to 1 is this clip too.
        blend = tf.clip_by_value(_per_example(f) * x + (1.0 - _per_example(f)) * target,
                                 0.0, 1.0)
        x = tf.where(_per_example(op == 3), adjust_hue(x, factors[:, 3]), blend)
    return x


def gaussian_blur(x, sigma, size):
    """Separable Gaussian blur per example (sigma float32 [b]), reflect padding.

    The batch is folded into the channels: one depthwise convolution per axis.
    """
    radius = (size - 1) // 2
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps[None] / sigma[:, None]))
    kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)  # [b, size]
    b, h, w = tf.unstack(tf.shape(x)[:3])
    x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    x = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, h + 2 * radius, w + 2 * radius, b * 3])
    per_channel = tf.reshape(tf.repeat(kernel, 3, axis=0), [-1, size])  # [b * 3, size]
    k_h = tf.transpose(per_channel)[:, None, :, None]  # [size, 1, b * 3, 1]
    x = tf.nn.depthwise_conv2d(x, k_h, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, tf.transpose(k_h, [1, 0, 2, 3]), [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(x, [h, w, b, 3]), [2, 0, 1, 3])


def _where(cond, a, b):
    return tf.where(_per_example(cond), a, b)


def apply_colour_params(x, params, recipe):
    """The steps after the crop, batched: x uint8 (or float in [0, 1]) [b, S, S, 3].

    `params`: `augment.sample_colour_params` stacked over the batch. Returns
    float32 in [0, 1].
    """
    augment.check_recipe(recipe)
    if x.dtype == tf.uint8:
        x = tf.cast(x, tf.float32) * (1.0 / 255.0)
    x = tf.cast(x, tf.float32)
    x = _where(params["flip"], tf.reverse(x, axis=[2]), x)
    gray = lambda v: tf.tile(colour_ops.to_gray(v), [1, 1, 1, 3])  # noqa: E731
    jitter = lambda v: color_jitter(  # noqa: E731
        v, params["jitter_factors"], params["jitter_order"])
    if recipe == "mocov1":
        x = _where(params["gray"], gray(x), x)
        x = jitter(x)
    else:
        x = _where(params["jitter"], jitter(x), x)
        x = _where(params["gray"], gray(x), x)
        size = colour_ops.blur_kernel_size(x.shape[1])
        x = _where(params["blur"], gaussian_blur(x, params["sigma"], size), x)
    return tf.clip_by_value(x, 0.0, 1.0)


_PARAM_SIGNATURE = {"flip": tf.bool, "gray": tf.bool, "jitter": tf.bool, "blur": tf.bool,
                    "jitter_factors": tf.float32, "jitter_order": tf.int32, "sigma": tf.float32}


def colour_params(seed, example_ids, view, recipe):
    """`augment.sample_colour_params` of view `view` (0 or 1) of each example, stacked."""
    def draw(i):
        example_seed = tf.stack([tf.constant(seed, tf.int64), i])
        return augment.sample_colour_params(augment.subseeds(example_seed, 2)[view], recipe)
    # No batched stateless draw with one seed per row exists (and vectorized_map
    # cannot convert these ops): a loop over the batch, of a few scalar ops each.
    return tf.map_fn(draw, tf.cast(example_ids, tf.int64),
                     fn_output_signature=_PARAM_SIGNATURE)


class ViewTransform:
    """The device part of one view, for CO2Model: transform(images, example_ids, step).

    images: uint8 [b, S, S, 3] crops from `two_crops`; example_ids int64 [b],
    the examples' global indices. `step` is not needed beyond them (the index
    holds it) and kept for the model's calling convention. `view` 0 is the
    query view (the pipeline's first), 1 the key view: `for_view` gives each.
    jit_compile: run it as one XLA cluster even when the step is not compiled
    (for GPUs: its dozens of element-wise ops over the batch fuse into a few
    kernels instead of streaming the batch through memory each; on a CPU XLA
    made it slower; measured: docs/performance.md). TPUs compile the whole step anyway.
    """

    def __init__(self, recipe, seed, view=0, jit_compile=False):
        augment.check_recipe(recipe)
        self.recipe, self.seed, self.view = recipe, int(seed), int(view)
        self.jit_compile = bool(jit_compile)
        apply = functools.partial(apply_colour_params, recipe=recipe)
        # Only the pixels: the draws stay outside the cluster, where they are the host's.
        self._apply = tf.function(apply, jit_compile=True) if jit_compile else apply

    # Plain TF ops and tf.where: AutoGraph has nothing to convert (and trips on the class).
    @tf.autograph.experimental.do_not_convert
    def for_view(self, view):
        return ViewTransform(self.recipe, self.seed, view, self.jit_compile)

    @tf.autograph.experimental.do_not_convert
    def __call__(self, images, example_ids, step=None):
        del step  # example_ids = step * B + position already holds it
        if images.dtype != tf.uint8:  # e.g. views the host augmented already
            raise ValueError(f"the device augmentation takes the uint8 crops of "
                             f"augment_on='device', got {images.dtype.name} images")
        params = colour_params(self.seed, example_ids, self.view, self.recipe)
        return self._apply(images, params)
