"""Tests for co2_tf.evaluation.knn: weighted kNN against NumPy, the tool, the projector."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from helpers.references import SMALL, numpy_knn, topk, unit

from co2_tf.data.sources import builtin
from co2_tf.evaluation import knn
from co2_tf.interop import export
from co2_tf.run import rundir


def test_knn_scores_match_numpy():
    rng = np.random.default_rng(0)
    bank, query = rng.normal(size=(300, 8)), rng.normal(size=(50, 8))
    bank_y, query_y = rng.integers(0, 4, 300), rng.integers(0, 4, 50)
    scores = knn.knn_predict_scores(
        tf.constant(unit(bank), tf.float32), tf.constant(bank_y, tf.int32),
        tf.constant(unit(query), tf.float32), 4, k=20, temperature=0.1, chunk=16).numpy()
    np.testing.assert_allclose(scores, numpy_knn(bank, bank_y, query, 4, 20, 0.1), rtol=1e-4)
    accuracy = knn.knn_accuracy(
        tf.constant(unit(bank), tf.float32), tf.constant(bank_y, tf.int32),
        tf.constant(unit(query), tf.float32), query_y, 4, k=20, temperature=0.1)
    assert accuracy == topk(numpy_knn(bank, bank_y, query, 4, 20, 0.1), query_y, 1)


def test_knn_tool_matches_numpy_the_monitor_and_the_export(run_dir, reference, tmp_path):
    _, ref = reference
    results = knn.knn_eval(knn.KnnConfig(model_dir=run_dir, output_dir=str(tmp_path / "knn"),
                                         projector_dir=str(tmp_path / "projector"),
                                         projector_points=50), verbose=0)
    _, train_y, train_f = ref["train"]
    test_images, test_y, test_f = ref["test"]
    scores = numpy_knn(train_f, train_y, test_f, 10, 200, 0.1)
    top1, top5 = topk(scores, test_y, 1), topk(scores, test_y, 5)
    assert top1 < top5  # else top-5 could stand in for top-1 unnoticed
    assert results["top1"] == pytest.approx(top1, abs=1e-3)
    assert results["top5"] == pytest.approx(top5, abs=1e-3)
    with open(os.path.join(run_dir, "summary.json")) as f:  # the pretraining monitor's value
        assert results["top1"] == json.load(f)["knn_top1"]
    # What the file says, against NumPy and the data, not against the returned dict.
    with open(tmp_path / "knn" / "knn_eval.json") as f:
        on_disk = json.load(f)
    assert on_disk["top1"] == pytest.approx(top1, abs=1e-3)
    assert on_disk["top5"] == pytest.approx(top5, abs=1e-3)
    assert on_disk["k"] == 200 and on_disk["temperature"] == 0.1
    assert on_disk["data"]["bank_examples"] == len(train_y) == 8000
    assert on_disk["data"]["query_examples"] == len(test_y) == 2000
    assert on_disk["backbone"]["step"] == SMALL["train_steps"]
    assert not on_disk["backbone"]["random_init"]
    # TensorBoard: both scalars at the checkpoint's step (read as rundir reads a run's logs).
    for name, expected in (("top1", top1), ("top5", top5)):
        (step, value), = rundir.read_scalars(str(tmp_path / "knn"), f"knn_{name}", "")
        assert step == SMALL["train_steps"] and value == pytest.approx(expected, abs=1e-3)

    # Projector: the first 50 held-out embeddings, their classes, thumbnails.
    projector = tmp_path / "projector"
    reader = tf.train.load_checkpoint(str(projector))
    np.testing.assert_allclose(reader.get_tensor("embeddings/.ATTRIBUTES/VARIABLE_VALUE"),
                               unit(test_f[:50]), atol=1e-5)
    lines = (projector / "metadata.tsv").read_text().splitlines()
    assert lines[0] == "label\tclass" and len(lines) == 51
    assert lines[1:] == [f"{y}\t{builtin.CLASS_NAMES[y]}" for y in test_y[:50]]
    config = (projector / "projector_config.pbtxt").read_text()
    assert "metadata.tsv" in config and "sprite.png" in config
    sprite = tf.io.decode_png(tf.io.read_file(str(projector / "sprite.png"))).numpy()
    assert sprite.shape == (8 * 16, 8 * 16, 3)  # ceil(sqrt(50)) = 8 thumbnails a side
    np.testing.assert_allclose(sprite[16:32, :16] / 255.0, test_images[8], atol=1 / 255 + 1e-6)

    # The same numbers from the exported backbone.keras.
    out = str(tmp_path / "export")
    export.export(export.ExportConfig(model_dir=run_dir, export_dir=out))
    from_export = knn.knn_eval(knn.KnnConfig(keras_model=os.path.join(out, "backbone.keras"),
                                             output_dir=str(tmp_path / "knn2")), verbose=0)
    assert from_export["top1"] == results["top1"] and from_export["top5"] == results["top5"]
    assert from_export["data"]["dataset"] == "builtin"  # from export.json
