"""The augmentation's ops after the crop, on float images in [0, 1], as torchvision's.

- ColorJitter (`color_jitter`): brightness multiplies, contrast blends with
  the mean of the grayscale image, saturation blends with the grayscale
  image, hue shifts by U[-h, h] of the hue circle; the four applied in a
  given order, each clipped to [0, 1].
- RandomGrayscale (`to_gray`): ITU-R 601 luma (0.299, 0.587, 0.114), the
  caller copies it to 3 channels.
- Gaussian blur (`gaussian_blur`): separable depthwise convolution with
  reflect padding, odd kernel of about 10% of the image side (at least 3).

Which ops a view gets, with which factors, co2_tf.data.augment draws;
co2_tf.data.augment_device runs the same ops batched on the accelerator.
"""
import tensorflow as tf

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


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


def to_gray(image):
    """torchvision rgb_to_grayscale, float [..., 3] -> [..., 1]."""
    # Three slices: cheaper than a multiply + reduce over the last axis (docs/performance.md).
    r, g, b = GRAY_WEIGHTS
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
