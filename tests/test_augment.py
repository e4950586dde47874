"""Tests for co2_tf.data.augment and colour_ops: decision rates, crops, colour ops, blur."""
import colorsys
import math

import numpy as np
import pytest
import tensorflow as tf

from co2_tf.data import augment, colour_ops
from co2_tf.errors import UserError

N_DRAWS = 4000


def _draw(recipe, n=N_DRAWS, height=200, width=160, seed=7):
    """n independent parameter draws, vectorised through tf.data."""
    ds = tf.data.Dataset.range(n).map(
        lambda i: augment.sample_params(
            tf.stack([tf.constant(seed, tf.int64), i]), recipe, height,
            width),
        num_parallel_calls=2).batch(n)
    return {k: v.numpy() for k, v in next(iter(ds)).items()}


def _assert_rate(flags, p, what):
    flags = np.asarray(flags, bool)
    n = flags.size
    tol = 5.0 * math.sqrt(p * (1.0 - p) / n)  # 5 sigma: cannot flake
    assert abs(flags.mean() - p) <= tol, (what, flags.mean(), p, tol)


@pytest.fixture(scope="module")
def v2_draws():
    return _draw("mocov2")


@pytest.fixture(scope="module")
def v1_draws():
    return _draw("mocov1")


def test_mocov2_rates(v2_draws):
    _assert_rate(v2_draws["gray"], 0.2, "grayscale")
    _assert_rate(v2_draws["blur"], 0.5, "blur")
    _assert_rate(v2_draws["jitter"], 0.8, "jitter")
    _assert_rate(v2_draws["flip"], 0.5, "flip")
    sigma = v2_draws["sigma"]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    # Spread over the whole range, not stuck at one value.
    assert np.histogram(sigma, bins=4, range=(0.1, 2.0))[0].min() > 0.2 * (
        N_DRAWS / 4)


def test_mocov1_rates(v1_draws):
    _assert_rate(v1_draws["gray"], 0.2, "grayscale")
    _assert_rate(v1_draws["flip"], 0.5, "flip")
    assert v1_draws["jitter"].all(), "mocov1 jitter is always applied"
    assert not v1_draws["blur"].any(), "mocov1 has no blur"


def _torchvision_crops(height, width, scale, n, seed=0):
    """(area fractions, w/h ratios) of torchvision RandomResizedCrop."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        for _ in range(10):
            target = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                out.append((h * w / (height * width), w / h))
                break
        else:
            # Centre-crop fallback: the image's ratio is in range here.
            out.append((1.0, width / height))
    return np.array(out).T


def _assert_same_histogram(x, ref, value_range, bins=4):
    p = np.histogram(x, bins=bins, range=value_range)[0] / len(x)
    q = np.histogram(ref, bins=bins, range=value_range)[0] / len(ref)
    # Two independent samples: 5 sigma of the difference of proportions.
    sd = np.sqrt(q * (1 - q) * (1 / len(x) + 1 / len(ref)))
    np.testing.assert_array_less(np.abs(p - q), 5 * sd + 1e-9)


@pytest.mark.parametrize("recipe", ["mocov1", "mocov2"])
def test_crop_area_and_aspect(recipe, v1_draws, v2_draws):
    draws = v1_draws if recipe == "mocov1" else v2_draws
    top, left, h, w = draws["crop"].T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 200).all() and (left + w <= 160).all()
    area = h * w / (200.0 * 160.0)
    # Rounding of h and w moves the area a little off the drawn fraction.
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0
    counts = np.histogram(area, bins=4, range=(0.2, 1.0))[0]
    assert counts.min() > 0.05 * N_DRAWS, counts
    # Same distribution as torchvision's loop (large crops with extreme
    # ratios are rejected on a 200 x 160 image, so it is not uniform).
    ref_area, ref_ratio = _torchvision_crops(200, 160, (0.2, 1.0), N_DRAWS)
    _assert_same_histogram(area, ref_area, (0.2, 1.0))
    ratio = w / h
    assert ratio.min() >= 0.75 - 0.02 and ratio.max() <= 4.0 / 3.0 + 0.02
    _assert_same_histogram(np.log(ratio), np.log(ref_ratio),
                           (math.log(0.75), math.log(4 / 3)))
    # Offsets spread: the crop is not always at the same place.
    assert len(np.unique(top)) > 20 and len(np.unique(left)) > 20


def test_jitter_factor_ranges_and_order(v1_draws, v2_draws):
    for draws, hue in ((v1_draws, 0.4), (v2_draws, 0.1)):
        f = draws["jitter_factors"]
        assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4
        assert f[:, 3].min() >= -hue and f[:, 3].max() <= hue
        assert f[:, 3].min() < -0.8 * hue and f[:, 3].max() > 0.8 * hue
        order = draws["jitter_order"]
        assert (np.sort(order, axis=1) == np.arange(4)).all()
        # Each op comes first about a quarter of the time.
        firsts = np.bincount(order[:, 0], minlength=4) / len(order)
        assert np.abs(firsts - 0.25).max() < 5 * math.sqrt(
            0.25 * 0.75 / len(order))


def test_linear_crop_scale():
    draws = _draw("linear", n=2000)
    _, _, h, w = draws["crop"].T
    area = h * w / (200.0 * 160.0)
    assert area.min() >= 0.08 - 0.01 and area.min() < 0.15
    _assert_rate(draws["flip"], 0.5, "flip")


def test_crop_fallback_is_torchvision_centre_crop():
    # A 10 x 300 strip: no try can fit 20% of the area at ratio <= 4/3.
    crop = augment.sample_crop(tf.constant([1, 2]), 10, 300, (0.2, 1.0))
    assert crop.numpy().tolist() == [0, (300 - 13) // 2, 10, 13]
    crop = augment.sample_crop(tf.constant([1, 2]), 300, 10, (0.2, 1.0))
    assert crop.numpy().tolist() == [(300 - 13) // 2, 0, 13, 10]


@pytest.mark.parametrize("recipe", ["mocov1", "mocov2"])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_two_views_shape_range_determinism(recipe, dtype):
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (37, 53, 3)).astype(np.uint8)
    if dtype == "float32":
        image = image.astype(np.float32) / 255.0
    seed = tf.constant([3, 4], tf.int64)
    v1, v2 = augment.two_views(image, seed, recipe, 24)
    for v in (v1, v2):
        assert v.shape == (24, 24, 3) and v.dtype == tf.float32
        assert float(tf.reduce_min(v)) >= 0.0
        assert float(tf.reduce_max(v)) <= 1.0
    assert not np.allclose(v1, v2), "the two views must differ"
    w1, w2 = augment.two_views(image, tf.constant([3, 4], tf.int32), recipe,
                               24)
    np.testing.assert_array_equal(v1, w1)
    np.testing.assert_array_equal(v2, w2)
    u1, _ = augment.two_views(image, tf.constant([3, 5], tf.int64), recipe,
                              24)
    assert not np.allclose(v1, u1), "a different seed must change the views"


def test_unknown_recipe_is_user_error():
    with pytest.raises(UserError, match="mocov2"):
        augment.two_views(np.zeros((8, 8, 3), np.uint8), [0, 0], "simclr", 8)


def test_flip_only_mirrors():
    image = np.random.RandomState(1).randint(0, 256, (40, 30, 3)).astype(
        np.uint8)
    params = augment.sample_params(tf.constant([5, 6]), "mocov2", 40, 30)
    a = dict(params, flip=tf.constant(False))
    b = dict(params, flip=tf.constant(True))
    va = augment.apply_params(image, a, "mocov2", 16).numpy()
    vb = augment.apply_params(image, b, "mocov2", 16).numpy()
    np.testing.assert_allclose(va[:, ::-1], vb, atol=1e-5)


def test_resized_crop_of_constant_region():
    image = np.zeros((20, 20, 3), np.uint8)
    image[5:15, 5:15] = 200
    out = augment.resized_crop(image, tf.constant([5, 5, 10, 10]), 8)
    np.testing.assert_allclose(out.numpy(), 200 / 255.0, atol=1e-6)


# ColorJitter against NumPy references (torchvision semantics). ------------

def _np_gray(x):
    return (x @ np.array([0.2989, 0.587, 0.114], np.float32))[..., None]


@pytest.fixture(scope="module")
def float_image():
    return np.random.RandomState(2).uniform(0, 1, (6, 7, 3)).astype(
        np.float32)


IDENTITY_ORDER = tf.constant([0, 1, 2, 3])


@pytest.mark.parametrize("f", [0.6, 0.9, 1.3])
def test_brightness_is_multiplicative(float_image, f):
    out = colour_ops.color_jitter(float_image, tf.constant([f, 1.0, 1.0, 0.0]),
                               IDENTITY_ORDER).numpy()
    np.testing.assert_allclose(out, np.clip(float_image * f, 0, 1),
                               atol=2e-5)


@pytest.mark.parametrize("f", [0.6, 1.4])
def test_contrast_blends_with_mean_gray(float_image, f):
    out = colour_ops.color_jitter(float_image, tf.constant([1.0, f, 1.0, 0.0]),
                               IDENTITY_ORDER).numpy()
    mean = _np_gray(float_image).mean()
    ref = np.clip(f * float_image + (1 - f) * mean, 0, 1)
    np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("f", [0.6, 1.4])
def test_saturation_blends_with_gray(float_image, f):
    out = colour_ops.color_jitter(float_image, tf.constant([1.0, 1.0, f, 0.0]),
                               IDENTITY_ORDER).numpy()
    ref = np.clip(f * float_image + (1 - f) * _np_gray(float_image), 0, 1)
    np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("h", [-0.1, 0.05, 0.4])
def test_hue_rotates_hue_circle(float_image, h):
    out = colour_ops.color_jitter(float_image, tf.constant([1.0, 1.0, 1.0, h]),
                               IDENTITY_ORDER).numpy()
    ref = np.empty_like(float_image)
    for idx in np.ndindex(float_image.shape[:2]):
        hh, s, v = colorsys.rgb_to_hsv(*float_image[idx])
        ref[idx] = colorsys.hsv_to_rgb((hh + h) % 1.0, s, v)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_jitter_order_matters_and_is_followed(float_image):
    factors = tf.constant([1.4, 0.6, 1.0, 0.0])
    bc = colour_ops.color_jitter(float_image, factors,
                              tf.constant([0, 1, 2, 3])).numpy()
    cb = colour_ops.color_jitter(float_image, factors,
                              tf.constant([1, 0, 2, 3])).numpy()
    b = np.clip(float_image * 1.4, 0, 1)
    ref_bc = np.clip(0.6 * b + 0.4 * _np_gray(b).mean(), 0, 1)
    c = np.clip(0.6 * float_image + 0.4 * _np_gray(float_image).mean(), 0, 1)
    ref_cb = np.clip(c * 1.4, 0, 1)
    np.testing.assert_allclose(bc, ref_bc, atol=2e-5)
    np.testing.assert_allclose(cb, ref_cb, atol=2e-5)


# Gaussian blur against a NumPy reference. ---------------------------------

def test_blur_kernel_size():
    assert colour_ops.blur_kernel_size(224) == 23
    assert colour_ops.blur_kernel_size(96) == 9
    assert colour_ops.blur_kernel_size(32) == 3
    assert colour_ops.blur_kernel_size(8) == 3


@pytest.mark.parametrize("sigma,size", [(0.5, 3), (1.3, 9), (2.0, 23)])
def test_gaussian_blur_matches_numpy(sigma, size):
    image = np.random.RandomState(3).uniform(0, 1, (30, 26, 3)).astype(
        np.float32)
    r = (size - 1) // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-x ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    np.testing.assert_allclose(
        colour_ops.gaussian_kernel_1d(sigma, size).numpy(), k, atol=1e-6)
    padded = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)),
                    mode="reflect")
    rows = sum(k[i] * padded[i:i + 30] for i in range(size))
    ref = sum(k[i] * rows[:, i:i + 26] for i in range(size))
    out = colour_ops.gaussian_blur(image, sigma, size).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


# Eval / linear views and the preview grid. ---------------------------------

def test_eval_view_resizes_then_centre_crops():
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, 40:56] = 255  # a vertical bar in the middle
    out = augment.eval_view(image, 32).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    # 64 -> 37 rows, 96 -> 56 cols, centre 32 columns start at 12: the bar
    # (cols 40..56 -> 23.1..32.4 scaled) is centred near output col 16.
    profile = out[16, :, 0]
    assert profile[14:18].min() > 0.9 and profile[:5].max() < 0.05
    assert profile[-5:].max() < 0.05
    np.testing.assert_array_equal(out, augment.eval_view(image, 32).numpy())


def test_classifier_train_view():
    image = np.random.RandomState(4).randint(0, 256, (50, 40, 3)).astype(
        np.uint8)
    v = augment.classifier_train_view(image, tf.constant([1, 1]), 20)
    assert v.shape == (20, 20, 3) and v.dtype == tf.float32
    np.testing.assert_array_equal(
        v, augment.classifier_train_view(image, tf.constant([1, 1]), 20))
