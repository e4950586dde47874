"""co2_tf.study: the grid's parsing, a 2-cell run, the reuse of finished cells."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from co2_tf import io, study, training
from co2_tf.config import TrainConfig
from co2_tf.errors import UserError


def test_cells_expand_to_settings_and_bad_cells_are_one_line_errors():
    got = study.settings(["consistency_weight=0",
                          "consistency_weight=0.1,1 consistency_temperature=0.04,0.2",
                          "consistency_weight=0 ", "deterministic=true"])
    assert got == [{"consistency_weight": 0.0},
                   {"consistency_weight": 0.1, "consistency_temperature": 0.04},
                   {"consistency_weight": 0.1, "consistency_temperature": 0.2},
                   {"consistency_weight": 1.0, "consistency_temperature": 0.04},
                   {"consistency_weight": 1.0, "consistency_temperature": 0.2},
                   {"deterministic": True}]
    assert study.setting_name(got[2]) == "alpha=0.1_tau_con=0.2"
    for cell, match in (("alpha=1", "not a training flag"), ("seed=1", "--seeds"),
                        ("consistency_weight", "field=value"),
                        ("consistency_weight=x", "not a float")):
        with pytest.raises(UserError, match=match):
            study.settings([cell])


def _tiny_folder(root):
    """3 classes of flat-colour 8x8 PNGs: 12 train and 4 test images each (fast to evaluate)."""
    rng = np.random.RandomState(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in range(3):
            io.makedirs(io.join(root, split, f"c{c}"))
            for i in range(n):
                pixels = np.clip(rng.normal(80 * c + 40, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
                io.write_bytes_atomic(io.join(root, split, f"c{c}", f"{i}.png"),
                                      tf.io.encode_png(pixels).numpy())
    return f"folder:{root}/{{split}}"


def test_a_two_cell_study_runs_one_cell_reuses_the_other(tmp_path, monkeypatch):
    """One cell is already finished (its file written here): reused; the other trains."""
    base = TrainConfig(dataset=_tiny_folder(str(tmp_path / "data")), eval_split="test",
                       image_size=16, batch_size=12, queue_size=24, dim=16, train_steps=2,
                       knn_every=0, knn_k=5)
    config = study.StudyConfig(
        study_dir=str(tmp_path / "study"), seeds=(0,), linear_epochs=1, base=base,
        cells=("consistency_weight=0",
               "consistency_weight=1 consistency_warmup_epochs=1 "
               "consistency_over=positive_and_negatives consistency_kl=one_sided"))
    finished = dataclasses.replace(base, consistency_weight=0.0, seed=0,
                                   model_dir=io.join(config.study_dir, "alpha=0", "seed0"))
    io.makedirs(finished.model_dir)
    io.write_json_atomic(io.join(finished.model_dir, study.CELL_FILE), {
        "knn_top1": 0.5, "linear_top1": 0.625, "pos_sim": 0.5, "neg_sim": 0.125,
        "collapse": {"detected": None, "collapsed_at_end": False}, "ms_per_step": 12.0,
        "steps": 2, "config": study._comparable(finished)})
    lines = []
    text = study.run_study(config, log=lines.append)
    name = "alpha=1_warmup=1_over=positive_and_negatives_kl=one_sided"
    assert [line.split(":")[0] for line in lines] == ["reused alpha=0 seed 0",
                                                      f"ran {name} seed 0"]
    rows = text.splitlines()
    assert len(rows) == 4
    assert rows[2] == "| alpha=0 | 1 | 50.0 | 62.5 | 0.50 | 0.12 | 0 / 0 of 1 | 12 |"
    assert rows[3].startswith(f"| {name} | 1 | ")
    assert io.read_text(io.join(config.study_dir, study.TABLE_FILE)) == text + "\n"
    cell = io.read_json(io.join(config.study_dir, name, "seed0", study.CELL_FILE))
    assert cell["steps"] == 2 and 0 <= cell["knn_top1"] <= 1 and 0 <= cell["linear_top1"] <= 1
    assert cell["collapse"]["detected"] is None and cell["ms_per_step"] is None  # 2 steps
    assert cell["config"]["consistency_over"] == "positive_and_negatives"
    assert "model_dir" not in cell["config"]

    # Rerun: nothing trains, the same table.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")
    monkeypatch.setattr(training, "train", no_training)
    lines.clear()
    assert study.run_study(config, log=lines.append) == text
    assert all(line.startswith("reused") for line in lines)
    # A finished cell made with other flags is not silently mixed in.
    other = dataclasses.replace(config, base=dataclasses.replace(base, train_steps=3))
    with pytest.raises(UserError, match="train_steps=2 there, 3 now"):
        study.run_study(other, log=lines.append)


def test_a_cell_saved_before_a_flag_existed_is_that_flag_at_its_default():
    config = TrainConfig(consistency_weight=1.0)
    saved = study._comparable(config)
    assert study.config_diffs(saved, config) == []
    del saved["consistency_temperature_scaling"]  # a cell run before the flag existed
    assert study.config_diffs(saved, config) == []
    assert study.config_diffs(saved, dataclasses.replace(
        config, consistency_temperature_scaling=True)) == [
        "--consistency_temperature_scaling=False there, True now"]
    saved["consistency_weight"] = 0.1
    assert study.config_diffs(saved, config) == ["--consistency_weight=0.1 there, 1.0 now"]
    # MoCo (alpha = 0) trains the same at any tau_con: a MoCo cell stays reusable when the
    # base flagfile's tau_con changes, and not when a flag that matters does.
    moco = study._comparable(TrainConfig(consistency_weight=0.0, consistency_temperature=0.04))
    now = TrainConfig(consistency_weight=0.0, consistency_temperature=0.2)
    assert study.config_diffs(moco, now) == []
    assert study.config_diffs(moco, dataclasses.replace(now, temperature=0.2)) == [
        "--temperature=0.1 there, 0.2 now"]
    assert study.config_diffs(moco, dataclasses.replace(now, consistency_weight=1.0)) == [
        "--consistency_temperature=0.04 there, 0.2 now",
        "--consistency_weight=0.0 there, 1.0 now"]
