"""Tests for co2_tf.run.rundir: the run dir's small files, on local paths and ram:// alike."""
import dataclasses

import pytest

from co2_tf import io
from co2_tf.config import TrainConfig
from co2_tf.errors import UserError
from co2_tf.run import rundir


def test_write_class_names(tmp_path):
    rundir.write_class_names(str(tmp_path), ["a", "ünï"])
    path = tmp_path / rundir.CLASSES_FILE
    assert path.read_text(encoding="utf-8") == "a\nünï\n"
    assert rundir.read_class_names(str(tmp_path)) == ["a", "ünï"]


@pytest.mark.parametrize("scheme", ["local", "ram"])
def test_run_config_round_trip(tmp_path, scheme):
    model_dir = str(tmp_path / "run") if scheme == "local" else f"ram://rundir_{id(tmp_path)}/run"
    assert rundir.load_run_config(model_dir) is None
    config = TrainConfig(model_dir=model_dir, dim=64, seed=3)
    rundir.write_run_config(model_dir, config)
    assert rundir.load_run_config(model_dir) == config
    assert rundir.run_config(model_dir) == config
    rundir.write_summary(model_dir, {"steps": 3})
    assert io.read_json(io.join(model_dir, rundir.SUMMARY_FILE)) == {"steps": 3}


def test_not_a_run_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        rundir.run_config(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not a co2_tf run dir"):
        rundir.run_config(str(tmp_path))
    (tmp_path / rundir.CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(UserError, match="is not a co2_tf config"):
        rundir.load_run_config(str(tmp_path))


def test_run_dir_of_a_checkpoint_path(tmp_path):
    config = dataclasses.replace(TrainConfig(), model_dir=str(tmp_path))
    rundir.write_run_config(str(tmp_path), config)
    ckpt = str(tmp_path / rundir.CHECKPOINT_SUBDIR / "ckpt-5")
    assert rundir.run_dir_of("", ckpt) == str(tmp_path)
    assert rundir.run_dir_of("/given", ckpt) == "/given"
    with pytest.raises(UserError, match="cannot find the run dir"):
        rundir.run_dir_of("", str(tmp_path / "elsewhere" / "x" / "ckpt-1"))
