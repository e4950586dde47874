"""co2_tf.run.collapse: the detector's logic on synthetic metric sequences (no training)."""

import math

import pytest

from co2_tf.run import collapse

K = 4096
LN = math.log(1 + K)


def feed(detector, rows, first_step=1):
    """rows of (pos_sim, neg_sim, loss_ins) -> the messages update returned, by step."""
    out = {}
    for step, row in enumerate(rows, first_step):
        message = detector.update(step, *row)
        if message:
            out[step] = message
    return out


def test_healthy_and_early_moco_phases_are_not_collapse():
    # MoCo's own first steps (measured): similar positives, a queue of early,
    # alike keys (neg_sim up to 0.46) and InfoNCE near 7 of ln(4097) = 8.3.
    early = [(0.88, 0.26, 6.7), (0.84, 0.46, 7.0), (0.62, 0.39, 6.7)] * 10
    healthy = [(0.45, 0.01, 6.0)] * 30
    detector = collapse.CollapseDetector(K, patience=5)
    assert feed(detector, early + healthy) == {}
    report = detector.report()
    assert report["detected"] is None and report["collapsed_at_end"] is False
    assert report["final"] == {"step": 60, "pos_sim": 0.45, "neg_sim": 0.01, "loss_ins": 6.0}


def test_fires_once_after_patience_with_the_step_and_the_advice():
    detector = collapse.CollapseDetector(K, patience=5)
    spike = [(0.95, 0.93, 8.0)] * 4  # shorter than the patience: not a collapse
    rows = [(0.5, 0.0, 6.0)] * 3 + spike + [(0.5, 0.0, 6.0)] + [(0.97, 0.96, 8.3)] * 20
    messages = feed(detector, rows)
    assert list(messages) == [13]  # steps 9..13 are the first 5 collapsed in a row
    line = messages[13]
    assert "\n" not in line and "step 13" in line
    for flag in ("--consistency_weight", "--consistency_temperature",
                 "--consistency_warmup_epochs", "--consistency_temperature_scaling"):
        assert flag in line
    report = detector.report()
    assert report["detected"]["step"] == 13 and report["collapsed_at_end"] is True
    assert report["detected"]["ln_1_plus_k"] == pytest.approx(LN)


@pytest.mark.parametrize("pos,neg,loss,expected", [
    (0.97, 0.96, 8.3, True),           # both similarities near 1
    (0.88, 0.79, 7.6, True),           # alpha = 1 at tau_con 0.04 (measured): partial
    (0.99, 0.65, 0.95 * LN, True),     # alike negatives, InfoNCE at ln(1 + K)
    (0.99, 0.65, 0.85 * LN, False),    # the positive still stands out
    (0.84, 0.46, 7.0, False),          # MoCo's first steps (measured)
    (0.99, 0.10, 1.0, False),          # a good embedding
])
def test_the_condition(pos, neg, loss, expected):
    assert collapse.looks_collapsed(pos, neg, loss, K) is expected


def test_recovery_is_reported():
    detector = collapse.CollapseDetector(K, patience=2)
    feed(detector, [(0.97, 0.96, 8.3)] * 3 + [(0.5, 0.0, 6.0)])
    report = detector.report()
    assert report["detected"]["step"] == 2 and report["collapsed_at_end"] is False


def test_moco_early_transient_on_digits_does_not_fire_at_the_default_patience():
    """Plain MoCo on the digits study (measured, every 10 steps): alike keys from step ~10
    to ~80, recovered by step 100. 80 steps of it are below the default patience."""
    transient = [(0.76, 0.71, 6.56), (0.86, 0.81, 6.53), (0.90, 0.86, 6.65),
                 (0.90, 0.87, 6.73), (0.87, 0.85, 6.73), (0.82, 0.79, 6.66),
                 (0.75, 0.72, 6.61), (0.67, 0.62, 6.51)]
    rows = [row for row in transient for _ in range(10)] + [(0.50, 0.43, 6.33)] * 50
    detector = collapse.CollapseDetector(1024)
    assert feed(detector, rows) == {} and detector.report()["collapsed_at_end"] is False
    # The same state held on (what a large alpha does) is reported once.
    detector = collapse.CollapseDetector(1024)
    assert list(feed(detector, [(0.88, 0.79, 6.6)] * 250)) == [200]


def test_patience_counts_steps_when_logs_come_once_per_execution():
    """--steps_per_execution=4: logs at steps 4, 8, 12, ...; each call stands for 4 steps.
    Patience 10 is reached at step 12 (3 executions), a healthy call resets the count."""
    detector = collapse.CollapseDetector(K, patience=10)
    collapsed, healthy = (0.97, 0.96, 8.3), (0.5, 0.0, 6.0)
    calls = [(4, collapsed), (8, healthy), (12, collapsed), (16, collapsed), (20, collapsed)]
    fired = [step for step, row in calls if detector.update(step, *row, steps=4)]
    assert fired == [20]  # 12, 16, 20: 12 collapsed steps in a row after the reset at 8
    assert detector.report()["detected"]["step"] == 20
