"""Tests for co2_tf.builtin: determinism, shapes, balance, difficulty."""
import numpy as np
import pytest

from co2_tf.data.sources import builtin
from co2_tf.errors import UserError

SIZE = 16


@pytest.fixture(scope="module")
def train():
    return builtin.load("train", SIZE)


@pytest.fixture(scope="module")
def test():
    return builtin.load("test", SIZE)


def test_shapes_dtypes_and_sizes(train, test):
    for (images, labels), split in ((train, "train"), (test, "test")):
        n = builtin.num_examples(split)
        assert images.shape == (n, SIZE, SIZE, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
    assert 5000 <= builtin.num_examples("train") <= 10000
    assert 1000 <= builtin.num_examples("test") <= 2000
    assert len(builtin.CLASS_NAMES) == builtin.NUM_CLASSES == 10


def test_class_balance_and_mixed_order(train, test):
    for _, labels in (train, test):
        counts = np.bincount(labels, minlength=builtin.NUM_CLASSES)
        assert (counts == counts[0]).all()
        # Shuffled: any prefix holds many classes.
        assert len(np.unique(labels[:100])) == builtin.NUM_CLASSES


def test_deterministic_by_seed(train):
    # Bypass the in-process cache: regenerate from scratch.
    again = builtin._load_cached.__wrapped__("train", SIZE, 0)
    np.testing.assert_array_equal(train[0], again[0])
    np.testing.assert_array_equal(train[1], again[1])
    other = builtin.load("test", SIZE, seed=1)[0]
    assert not np.array_equal(other, builtin.load("test", SIZE)[0])


def test_labels_do_not_depend_on_image_size(test):
    # BuiltinSource.labels relies on this (it loads tiny images for labels).
    np.testing.assert_array_equal(builtin.load("test", 8)[1], test[1])


def test_samples_are_distinct_and_splits_disjoint(train, test):
    flat = lambda x: {bytes(r) for r in x.reshape(len(x), -1)}  # noqa: E731
    train_set, test_set = flat(train[0]), flat(test[0])
    assert len(train_set) == len(train[0])
    assert len(test_set) == len(test[0])
    assert not train_set & test_set


def test_colour_is_not_the_class(train):
    images, labels = train
    mean_rgb = images.reshape(len(images), -1, 3).mean(1)
    per_class = np.stack([mean_rgb[labels == c].mean(0)
                          for c in range(builtin.NUM_CLASSES)])
    # Class mean colours are all near the same gray.
    assert np.ptp(per_class, axis=0).max() < 20


def test_images_carry_no_colour(train):
    """Per-sample colour was MoCo's shortcut instance cue (class-free by design)."""
    images = train[0]
    np.testing.assert_array_equal(images[..., 0], images[..., 1])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_pixel_knn_above_chance_far_from_perfect(train, test):
    x = train[0].reshape(len(train[0]), -1).astype(np.float32) / 255.0
    q = test[0].reshape(len(test[0]), -1).astype(np.float32) / 255.0
    dist = (q ** 2).sum(1)[:, None] - 2 * q @ x.T + (x ** 2).sum(1)[None]
    nearest = np.argmin(dist, axis=1)
    acc = (train[1][nearest] == test[1]).mean()
    assert 0.2 < acc < 0.8, acc


def test_bad_arguments():
    with pytest.raises(UserError, match="split"):
        builtin.load("validation", 32)
    with pytest.raises(UserError, match="split"):
        builtin.num_examples("val")
    with pytest.raises(UserError, match="image_size"):
        builtin.load("train", 4)
