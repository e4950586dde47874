"""Tests for co2_tf.evaluation.common: loading backbones, resolving data, one-line errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers.references import SMALL

from co2_tf.config import TrainConfig
from co2_tf.errors import UserError
from co2_tf.evaluation import common, knn, linear_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluating_at_another_image_size(run_dir, reference):
    backbone, _ = reference
    loaded = common.load_backbone(common.EvalConfig(model_dir=run_dir, image_size=24))
    assert loaded.image_size == 24
    x = np.random.default_rng(0).random((2, 24, 24, 3), np.float32)
    assert loaded.backbone(x).shape == (2, 256)
    for a, b in zip(loaded.backbone.get_weights(), backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_user_errors(run_dir, tmp_path):
    with pytest.raises(UserError, match="nothing to evaluate"):
        knn.knn_eval(knn.KnnConfig())
    with pytest.raises(UserError, match="either --keras_model"):
        knn.knn_eval(knn.KnnConfig(model_dir=run_dir, keras_model="x.keras"))
    with pytest.raises(UserError, match="--output_dir is required"):
        knn.knn_eval(knn.KnnConfig(keras_model=str(tmp_path / "backbone.keras")))
    with pytest.raises(UserError, match="does not exist"):
        knn.knn_eval(knn.KnnConfig(keras_model=str(tmp_path / "missing.keras"),
                                   output_dir=str(tmp_path)))
    empty = tmp_path / "untrained"
    empty.mkdir()
    (empty / "config.json").write_text(TrainConfig(model_dir=str(empty), **SMALL).to_json())
    with pytest.raises(UserError, match="has no checkpoint"):
        linear_probe.linear_eval(linear_probe.LinearEvalConfig(model_dir=str(empty)))

    import tensorflow_datasets as tfds  # noqa: PLC0415
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(UserError, match="no 'label'"):
            knn.knn_eval(knn.KnnConfig(model_dir=run_dir, dataset="tfds:celeb_a"))


@pytest.mark.parametrize("tool,flags,fragment", [
    ("linear_eval.py", ["--model_dir={empty}"], "has no checkpoint"),
    ("semi_supervised.py", ["--model_dir={run}", "--label_fraction=0"], "--label_fraction"),
])
def test_tools_print_one_line_errors(run_dir, tmp_path, tool, flags, fragment):
    empty = tmp_path / "untrained"
    empty.mkdir()
    (empty / "config.json").write_text(TrainConfig(model_dir=str(empty), **SMALL).to_json())
    args = [f.format(empty=empty, run=run_dir) for f in flags]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool)] + args,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, result.stderr
