"""Tests for co2_tf.evaluation.retrieval: the neighbours the picture shows."""

import json

import numpy as np
import pytest
from helpers.references import unit

from co2_tf.evaluation import retrieval


def test_retrieval_picture_shows_the_nearest_neighbours(run_dir, reference, tmp_path):
    _, ref = reference
    result = retrieval.retrieval_picture(retrieval.RetrievalConfig(
        model_dir=run_dir, out=str(tmp_path / "grid.png"), num_queries=3, k=4, thumb_size=32,
        seed=2), verbose=0)
    _, _, train_f = ref["train"]
    _, _, test_f = ref["test"]
    sims = unit(test_f[result["queries"]]) @ unit(train_f).T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :4]
    assert result["neighbours"] == expected.tolist()
    np.testing.assert_allclose(result["similarities"], np.take_along_axis(sims, expected, 1),
                               atol=1e-5)
    # The JSON beside the picture holds the same neighbours and their labels.
    with open(tmp_path / "grid.json") as f:
        on_disk = json.load(f)
    assert on_disk["neighbours"] == expected.tolist() and on_disk["picture"].endswith("grid.png")
    train_y, test_y = ref["train"][1], ref["test"][1]
    assert on_disk["query_labels"] == test_y[result["queries"]].tolist()
    assert on_disk["neighbour_labels"] == train_y[expected].tolist()
    assert on_disk["precision_at_k"] == pytest.approx(
        np.mean(train_y[expected] == test_y[result["queries"]][:, None]))
    from PIL import Image  # noqa: PLC0415
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.format == "PNG"
        width, height = picture.size
    assert width > 5 * 32 and height > 3 * 32
