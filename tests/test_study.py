"""co2_tf.study: the grid's parsing, a 2-cell run, the reuse of finished cells."""

import dataclasses

import numpy as np
import pytest
import study_runs as study
import tensorflow as tf

from co2_tf import io, training
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


def _cell(knn_top1, linear_top1, pos_sim, neg_sim, detected, at_end, ms):
    return {"knn_top1": knn_top1, "linear_top1": linear_top1, "pos_sim": pos_sim,
            "neg_sim": neg_sim, "collapse": {"detected": detected, "collapsed_at_end": at_end},
            "ms_per_step": ms}


def test_the_table_is_the_mean_and_sample_std_over_seeds():
    """docs/study.md's "beyond the seed spread" reads these columns: mean ± sample std (n - 1)
    of each seed's value, recomputed here in NumPy from known numbers (seeds whose value is
    missing left out), the collapse counts, and the median ms/step."""
    three = [_cell(0.5, 0.9, 0.40, 0.02, None, False, 10.0),
             _cell(0.6, 0.7, 0.46, -0.04, {"step": 30}, False, 40.0),
             _cell(0.85, 0.8, 0.61, 0.10, {"step": 50}, True, None)]
    one = [_cell(0.255, 0.5, None, None, None, False, None)]
    rows = study.table([("three", three), ("one", one)]).splitlines()

    def mean_std(values, scale=100.0, digits=1):
        values = np.array([v for v in values if v is not None], np.float64)
        return f"{scale * values.mean():.{digits}f} ± {scale * values.std(ddof=1):.{digits}f}"

    columns = [mean_std([c[k] for c in three]) for k in ("knn_top1", "linear_top1")]
    columns += [mean_std([c[k] for c in three], 1, 2) for k in ("pos_sim", "neg_sim")]
    assert columns == ["65.0 ± 18.0", "80.0 ± 10.0", "0.49 ± 0.11", "0.03 ± 0.07"]  # by hand
    assert rows[2] == (f"| three | 3 | {' | '.join(columns)} | 2 / 1 of 3 | "
                       f"{np.median([10.0, 40.0]):.0f} |")
    assert rows[3] == "| one | 1 | 25.5 | 50.0 | - | - | 0 / 0 of 1 | - |"  # one seed: no ±


def test_the_binary_reuses_finished_cells_and_prints_the_table(tmp_path, capsys):
    """research/study.py's main (in-process): flags -> StudyConfig -> the table on stdout; its
    one-line errors. The cells are already finished (no training)."""
    from helpers.tool_main import run_main  # noqa: PLC0415

    study_dir = str(tmp_path / "study")
    common = ["--dataset=builtin", "--train_steps=2", "--image_size=16", "--linear_epochs=3",
              f"--study_dir={study_dir}"]
    values = [(0.5, 0.75), (0.625, 0.875)]
    for seed, (knn_top1, linear_top1) in zip((3, 4), values):
        config = TrainConfig(dataset="builtin", train_steps=2, image_size=16,
                             consistency_weight=0.0, seed=seed,
                             model_dir=io.join(study_dir, "alpha=0", f"seed{seed}"))
        io.makedirs(config.model_dir)
        io.write_json_atomic(io.join(config.model_dir, study.CELL_FILE), {
            **_cell(knn_top1, linear_top1, 0.5, 0.0, None, False, 8.0), "steps": 2,
            "config": study._comparable(config)})
    code = run_main("study", common + ["--cell=consistency_weight=0", "--seeds=3,4"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[:2] == ["reused alpha=0 seed 3: kNN 50.0%, linear 75.0%",
                       "reused alpha=0 seed 4: kNN 62.5%, linear 87.5%"]
    assert out[-1] == "| alpha=0 | 2 | 56.2 ± 8.8 | 81.2 ± 8.8 | 0.50 ± 0.00 | 0.00 ± 0.00 | " \
                      "0 / 0 of 2 | 8 |"
    assert io.read_text(io.join(study_dir, study.TABLE_FILE)).splitlines()[-1] == out[-1]
    for args, fragment in (([f"--study_dir={study_dir}", "--seeds=a"], "--seeds=a"),
                           (["--study_dir="], "--study_dir is required"),
                           ([f"--study_dir={study_dir}", "--cell=alpha=1"], "alpha")):
        assert run_main("study", args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and fragment in err[-1], err
