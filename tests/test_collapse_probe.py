"""research/collapse_probe.py (docs/study.md reads its JSON lines): in-process, a few steps of
the tiny model."""
import json

from helpers.tool_main import run_main

TINY = "backbone=tiny image_size=16 batch_size=16 queue_size=64 dim=16 seed=1"


def test_probe_lines_per_run_and_measurement(capsys):
    """One run of 3 steps, measured every 2 (and at the last step): the lines docs/study.md
    reads, one JSON object each, with the run's alpha, gradient norms of both terms, their
    cosine, and similarities that are cosines. (One run: each costs two graph traces.)"""
    assert run_main("collapse_probe", ["--steps=3", "--every=2",
                                       f"--runs=consistency_weight=0.5 {TINY}"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and lines[0]["run"]["consistency_weight"] == 0.5
    assert lines[-1]["run_done"] == lines[0]["run"] and lines[-1]["seconds"] > 0
    assert [m["step"] for m in lines[1:3]] == [0, 2]
    for m in lines[1:3]:
        assert m["alpha"] == 0.5  # the weight the step trained with
        assert m["grad_ins"] > 0 and m["grad_con"] > 0
        assert -1 <= m["cos"] <= 1 and m["loss_ins"] > 0 and m["loss_con"] > 0
        assert -1 <= m["neg_sim"] <= 1 and -1 <= m["pos_sim"] <= 1
        assert 0 < m["neg_sim_std"] < 1


def test_an_unknown_field_is_one_line(capsys):
    assert run_main("collapse_probe", ["--steps=1", "--runs=alpha=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: unknown TrainConfig field 'alpha' in --runs"
