"""Tests for tools/preview.py: the preview grid shows the pipeline's very views."""
import os
import sys

import numpy as np
import tensorflow as tf

from co2_tf.data import pipelines
from co2_tf.evaluation import drawing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import preview  # noqa: E402

SIZE = 16
SEED = 5


def _views(dataset, n):
    return [(a.numpy(), b.numpy()) for a, b in dataset.take(n)]


def _builtin_fn():
    return pipelines.pretrain_dataset_fn(
        "builtin", split="train", data_dir=None, image_size=SIZE,
        augment="mocov2", seed=SEED, global_batch_size=8)


def test_preview_grid(image_folder):
    grid = preview.preview_grid(f"folder:{image_folder}", image_size=SIZE,
                             augment="mocov2", num_images=3, seed=0)
    assert grid.shape == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)
    grid = preview.preview_grid("builtin", image_size=SIZE, augment="mocov2",
                             num_images=2, seed=SEED)
    # Row 0's views are the pipeline's global example 0.
    first = _views(_builtin_fn()(tf.distribute.InputContext()), 1)[0]
    view1 = grid[2:2 + SIZE, 4 + SIZE:4 + 2 * SIZE]
    np.testing.assert_array_equal(
        view1, np.round(first[0][0] * 255).astype(np.uint8))


def test_view_pair_grid():
    imgs = np.zeros((2, 4, 4, 3), np.uint8)
    v1 = np.ones((2, 4, 4, 3), np.float32)
    v2 = np.full((2, 4, 4, 3), 0.5, np.float32)
    grid = drawing.view_pair_grid(imgs, v1, v2, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 6, 0] == 255
    assert grid[1, 11, 0] == 128 and grid[0, 0, 0] == 255
