"""Tests for co2_tf.data.augment_device: the host/device split makes today's views.

The decisions are checked against the host pipeline's own (whose rates and
ranges tests/test_augment.py checks against MoCo's numbers) and against the
rates themselves; the batched ops against NumPy; the model's routing of
example indices by training with the split and without it.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from co2_tf.data import augment, augment_device
from co2_tf.errors import UserError

SEED = 11


def _host_decisions(recipe, ids, view):
    """The host pipeline's decisions for view `view` of examples `ids`."""
    out = []
    for i in ids:
        s = augment.subseeds(tf.constant([SEED, int(i)], tf.int64), 2)[view]
        params = augment.sample_params(s, recipe, 100, 120)
        out.append({k: v.numpy() for k, v in params.items()})
    return {k: np.stack([o[k] for o in out]) for k in out[0]}


@pytest.mark.parametrize("recipe", ["mocov1", "mocov2"])
def test_device_draws_the_host_pipelines_decisions(recipe):
    ids = np.array([0, 1, 7, 12345, 2**40 + 3])
    for view in (0, 1):
        device = augment_device.colour_params(SEED, tf.constant(ids), view, recipe)
        host = _host_decisions(recipe, ids, view)
        for key, value in device.items():
            np.testing.assert_array_equal(value.numpy(), host[key], err_msg=key)
    # The two views draw apart.
    v0 = augment_device.colour_params(SEED, tf.constant(ids), 0, recipe)
    v1 = augment_device.colour_params(SEED, tf.constant(ids), 1, recipe)
    assert not np.array_equal(v0["jitter_factors"].numpy(), v1["jitter_factors"].numpy())


def _assert_rate(flags, p, what):
    flags = np.asarray(flags, bool)
    tol = 5.0 * math.sqrt(p * (1.0 - p) / flags.size)  # 5 sigma: cannot flake
    assert abs(flags.mean() - p) <= tol, (what, flags.mean(), p, tol)


def test_device_decision_rates():
    """MoCo v2's rates and ranges over 3000 examples, as the device draws them."""
    draw = tf.function(lambda ids: augment_device.colour_params(SEED, ids, 1, "mocov2"))
    d = draw(tf.range(3000, dtype=tf.int64))
    d = {k: v.numpy() for k, v in d.items()}
    for key, p in (("gray", 0.2), ("blur", 0.5), ("jitter", 0.8), ("flip", 0.5)):
        _assert_rate(d[key], p, key)
    f = d["jitter_factors"]
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4
    assert f[:, 3].min() >= -0.1 and f[:, 3].max() <= 0.1
    assert d["sigma"].min() >= 0.1 and d["sigma"].max() <= 2.0
    # Each op first in about a quarter of the orders.
    firsts = np.bincount(d["jitter_order"][:, 0], minlength=4) / 3000
    assert np.abs(firsts - 0.25).max() < 0.04


def _np_gray(x):
    return x[..., 0:1] * 0.2989 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114


def test_batched_jitter_follows_each_examples_order():
    rng = np.random.RandomState(0)
    x = rng.rand(3, 5, 6, 3).astype(np.float32)
    factors = np.array([[1.3, 0.7, 1.2, 0.0], [0.8, 1.3, 0.6, 0.0], [1.0, 1.0, 1.0, 0.0]],
                       np.float32)
    orders = np.array([[0, 1, 2, 3], [2, 1, 0, 3], [3, 2, 1, 0]], np.int32)
    got = augment_device.color_jitter(tf.constant(x), tf.constant(factors),
                                      tf.constant(orders)).numpy()
    for n in range(3):
        y = x[n]
        for op in orders[n]:
            f = factors[n, op]
            if op == 0:
                y = np.minimum(y * f, 1.0)
            elif op == 1:
                y = np.clip(f * y + (1 - f) * _np_gray(y).mean(), 0, 1)
            elif op == 2:
                g = _np_gray(y)
                y = np.clip(g + f * (y - g), 0, 1)
        np.testing.assert_allclose(got[n], y, atol=2e-6)


def test_batched_hue_and_blur_match_numpy():
    rng = np.random.RandomState(1)
    x = rng.rand(2, 9, 9, 3).astype(np.float32)
    # Hue: a +1/3 turn is a cyclic channel shift (r, g, b) -> (b, r, g).
    hue = augment_device.adjust_hue(tf.constant(x), tf.constant([1 / 3, 0.0])).numpy()
    np.testing.assert_allclose(hue[0], x[0][..., [2, 0, 1]], atol=2e-5)
    np.testing.assert_allclose(hue[1], x[1], atol=2e-5)
    sigmas = np.array([0.5, 1.7], np.float32)
    got = augment_device.gaussian_blur(tf.constant(x), tf.constant(sigmas), 5).numpy()
    for n, sigma in enumerate(sigmas):
        t = np.arange(-2, 3)
        k = np.exp(-0.5 * (t / sigma) ** 2)
        k /= k.sum()
        p = np.pad(x[n], [(2, 2), (2, 2), (0, 0)], mode="reflect")
        rows = sum(k[j] * p[j:j + 9] for j in range(5))
        ref = sum(k[j] * rows[:, j:j + 9] for j in range(5))
        np.testing.assert_allclose(got[n], ref, atol=2e-6)


@pytest.mark.parametrize("recipe", ["mocov1", "mocov2"])
def test_host_plus_device_views_are_the_host_views(recipe):
    """two_crops then the ViewTransform = augment.two_views, up to the uint8 rounding."""
    rng = np.random.RandomState(2)
    images = [rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
              for h, w in ((60, 80), (70, 50), (64, 64), (90, 40))]
    ids = np.arange(4, dtype=np.int64) + 96
    size = 32
    host = [[], []]
    crops = [[], []]
    for image, i in zip(images, ids, strict=True):
        seed = tf.constant([SEED, i], tf.int64)
        for v, view in enumerate(augment.two_views(image, seed, recipe, size)):
            host[v].append(view.numpy())
        for v, crop in enumerate(augment_device.two_crops(image, seed, recipe, size)):
            assert crop.dtype == tf.uint8
            crops[v].append(crop.numpy())
    transform = augment_device.ViewTransform(recipe, SEED)
    for v in (0, 1):
        got = transform.for_view(v)(tf.constant(np.stack(crops[v])), tf.constant(ids),
                                    tf.constant(0, tf.int64)).numpy()
        diff = np.abs(got - np.stack(host[v]))
        # Rounding the crop to uint8 (<= 0.5/255), then jitter factors up to 1.4 at most
        # twice and hue's piecewise map.
        assert diff.max() < 0.02, diff.max()
        assert diff.mean() < 0.003, diff.mean()


def test_placement_resolution():
    assert augment_device.resolve_placement("auto", accelerated=True) == "device"
    assert augment_device.resolve_placement("auto", accelerated=False) in ("host", "device")
    assert augment_device.resolve_placement("host", accelerated=True) == "host"
    with pytest.raises(UserError, match="augment_on"):
        augment_device.resolve_placement("gpu", accelerated=True)


def test_train_step_routes_each_views_indices(two_replicas):
    """Training on uint8 crops with the split = training on the views made beforehand.

    The reference applies each view's transform to the whole global batch with
    ids step * B + position; the model must hand the same ids to the query
    view, and to the key view through the shuffle-BN permutation and replicas.
    """
    from helpers.models import build, run_steps, state
    batch, size, first_step = 16, 16, 5
    rng = np.random.RandomState(5)
    crops = [rng.randint(0, 256, (batch, size, size, 3)).astype(np.uint8) for _ in "qk"]
    transform = augment_device.ViewTransform("mocov2", seed=3)  # helpers' MODEL seed
    ids = tf.range(batch, dtype=tf.int64) + first_step * batch
    views = [transform.for_view(v)(tf.constant(c), ids).numpy() for v, c in enumerate(crops)]
    split, strategy = build(two_replicas, augment_on="device", augment="mocov2")
    whole, _ = build(strategy, augment_on="host", augment="mocov2")
    assert split.view_transform is not None and whole.view_transform is None
    for model in (split, whole):
        model.step_counter.assign(first_step)
    got = run_steps(split, strategy, tuple(crops), batch)
    want = run_steps(whole, strategy, tuple(views), batch)
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-6)
    s_split, s_whole = state(split), state(whole)
    for key, value in s_whole.items():
        np.testing.assert_allclose(s_split[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_pipeline_hands_over_the_crops_of_its_views():
    """pretrain_dataset_fn(augment_on="device"): example i's crops, seeded [seed, i]."""
    from co2_tf.data import pipelines
    from co2_tf.data.sources import make_source
    b, step, size = 4, 3, 16
    fn = pipelines.pretrain_dataset_fn("builtin", image_size=size, augment="mocov2", seed=SEED,
                                       global_batch_size=b, start_step=step, augment_on="device")
    crops = [v.numpy() for v in next(iter(fn(tf.distribute.InputContext())))]
    images, _ = make_source("builtin").arrays("train", size)
    for j in range(b):
        i = step * b + j  # the index contract
        image = images[int(pipelines.source_index(tf.constant(i, tf.int64), len(images), SEED))]
        want = augment_device.two_crops(image, tf.constant([SEED, i], tf.int64), "mocov2", size)
        for v in (0, 1):
            assert crops[v].dtype == np.uint8
            np.testing.assert_array_equal(crops[v][j], want[v].numpy())
    with pytest.raises(UserError, match="augment_on"):
        pipelines.pretrain_dataset_fn("builtin", image_size=size, augment="mocov2", seed=SEED,
                                      global_batch_size=b, augment_on="auto")


def test_one_device_keys_get_their_own_ids_through_the_shuffle():
    """encode_keys on one device: the shuffled key images get their own examples' ids."""
    from helpers.models import build
    model, _ = build(None, augment_on="device", augment="mocov2")
    b, step = 16, tf.constant(2, tf.int64)
    crops = np.random.RandomState(6).randint(0, 256, (b, 16, 16, 3)).astype(np.uint8)
    key_view = model.view_transform.for_view(1)
    views = key_view(tf.constant(crops), tf.range(b, dtype=tf.int64) + 2 * b)
    got, got_all = model.encode_keys(tf.constant(crops), step, transform=key_view)
    want, want_all = model.encode_keys(views, step)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_all.numpy(), want_all.numpy(), atol=1e-5)


def test_device_part_lowers_to_xla():
    """What TPUs need: the transform compiles with XLA at static shapes (lowered, not run)."""
    transform = augment_device.ViewTransform("mocov2", SEED).for_view(1)
    fn = tf.function(lambda x, ids: transform(x, ids, None), jit_compile=True)
    hlo = fn.experimental_get_compiler_ir(
        tf.zeros([4, 16, 16, 3], tf.uint8), tf.range(4, dtype=tf.int64))(stage="hlo")
    assert "u8[4,16,16,3]" in hlo and "f32[4,16,16,3]" in hlo


def test_xla_cluster_gives_the_same_views():
    """jit_compile=True (GPUs) computes the views the plain ops compute."""
    crops = tf.constant(np.random.RandomState(7).randint(0, 256, (6, 16, 16, 3)), tf.uint8)
    ids = tf.range(6, dtype=tf.int64) + 40
    plain = augment_device.ViewTransform("mocov2", SEED).for_view(1)
    fused = augment_device.ViewTransform("mocov2", SEED, jit_compile=True).for_view(1)
    assert fused.jit_compile
    np.testing.assert_allclose(fused(crops, ids).numpy(), plain(crops, ids).numpy(), atol=1e-4)
