"""co2_tf.progress and where it reports: the line format, rate and ETA arithmetic on a fake
clock, Keras's fit, feature extraction and the folder scan (the end-to-end check, a non-tty
tools/train.py run, is test_train.py's SIGTERM test)."""

import io as stdio
import re

import keras
import numpy as np
import tensorflow as tf

from co2_tf import progress
from co2_tf.data import image_files
from co2_tf.evaluation import knn
from co2_tf.run.callbacks import ProgressCallback, progress_callbacks

# What every progress line looks like (with a total: count/total, percent, ETA).
LINE = re.compile(r"^(?P<what>[^:]+): (?P<count>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+%\), "
                  r"(?P<rate>[\d.]+) (?P=unit)/s, \S+ elapsed, ETA (?P<eta>[^,]+)(?P<rest>.*)$")


class FakeClock:
    """Time stands still unless a test moves it (`now`), or moves by `tick` at each read."""

    def __init__(self, tick=0.0):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


def test_line_rate_and_eta_arithmetic():
    clock, lines = FakeClock(), []
    task = progress.Reporter(10, clock, lines.append).task("train", total=1000, start=100)
    clock.now = 9.9
    assert task.update(130, loss=6.14712) is None  # not yet due
    clock.now = 10.0
    # 40 steps in 10 s since the start (step 100): 4 steps/s, 860 left: 215 s.
    assert task.update(140, loss=6.14712) == (
        "train: 140/1000 steps (14%), 4 steps/s, 10s elapsed, ETA 3m35s, loss 6.147")
    clock.now = 30.0
    # The rate since the previous line: 360 steps in 20 s = 18/s; 500 left: 27.8 s.
    assert task.update(500) == "train: 500/1000 steps (50%), 18 steps/s, 30s elapsed, ETA 28s"
    clock.now = 7230.0
    line = task.add(10, loss=0.01234)  # 510: 10 steps in 7200 s, 490 left at that rate
    assert line == ("train: 510/1000 steps (51%), 0.00139 steps/s, 2h00m elapsed, "
                    "ETA 4d02h, loss 0.01234")  # 352800 s = 98 h
    assert task.done(1000) == "train: done, 1000 steps in 2h00m (0.124 steps/s)"
    assert lines == [l for l in lines if l] and len(lines) == 4
    # No total: no percent, no ETA.
    task = progress.Reporter(1, clock, lines.append).task("listing /data", unit="files")
    clock.now += 2
    assert task.add(3000) == "listing /data: 3000 files, 1500 files/s, 2s elapsed"
    assert [progress.format_duration(s) for s in (0, 59.4, 60, 3599, 3600, 86399, 90000)] == [
        "0s", "59s", "1m00s", "59m59s", "1h00m", "23h59m", "1d01h"]


def test_off_prints_nothing_and_a_terminal_keeps_the_progress_bar(monkeypatch):
    clock, lines = FakeClock(tick=100), []
    task = progress.Reporter(0, clock, lines.append).task("x", 10)
    assert task.update(5) is None and task.done(10) is None and lines == []
    assert progress.reporter(None) == progress.OFF == progress.Reporter(0)

    class Terminal(stdio.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr("sys.stdout", Terminal())
    assert not progress.Reporter.for_stdout(60).on
    monkeypatch.setattr("sys.stdout", stdio.StringIO())
    assert progress.Reporter.for_stdout(60) == progress.Reporter(60)
    assert not progress.Reporter.for_stdout(0).on
    assert progress_callbacks(progress.OFF) == []


class _Tick(keras.callbacks.Callback):
    """Moves the fake clock 2 s per step (before the progress callback reads it); stops
    fit() after one epoch, as train_classifier does."""

    def __init__(self, clock):
        super().__init__()
        self.clock, self.losses = clock, []

    def on_train_batch_end(self, batch, logs=None):
        self.clock.now += 2
        self.losses.append(float(logs["loss"]))

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True  # one epoch per fit() call, as train_classifier


def test_fit_callback_reports_step_total_and_loss():
    clock, lines = FakeClock(), []
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 2, 40)
    tick = _Tick(clock)
    callback = ProgressCallback(progress.Reporter(5, clock, lines.append), "classifier")
    # Two fit() calls (as the evaluation's one-epoch-per-call loop): one run of 2 x 10 steps.
    for epoch in (0, 1):
        model.fit(x, y, batch_size=4, initial_epoch=epoch, epochs=2,
                  callbacks=[tick, callback], verbose=0)
    # Steps 1..20 end at 2, 4, ... 40 s: a line at each step end >= 5 s after the last.
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m["count"]) for m in parsed] == [3, 6, 9, 12, 15, 18]
    assert {(m["total"], m["what"]) for m in parsed} == {("20", "classifier")}
    assert parsed[0]["rate"] == "0.5" and parsed[1]["rate"] == "0.5"  # 3 steps / 6 s
    assert parsed[1]["eta"] == "28s"  # 14 steps left at 0.5/s
    for m in parsed:  # the loss Keras reported at that step
        assert m["rest"] == f", loss {tick.losses[int(m['count']) - 1]:.4g}"


def test_feature_extraction_and_folder_scan_report(image_folder):
    clock, lines = FakeClock(tick=1), []  # every read of the clock: 1 s later
    reporter = progress.Reporter(2, clock, lines.append)
    backbone = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.GlobalAveragePooling2D()])
    images = np.zeros((30, 4, 4, 3), np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(30, np.int32))).batch(4)
    knn.extract_features(backbone, dataset, progress=reporter, what="kNN features (train)")
    counts = [LINE.match(line) for line in lines[:-1]]
    assert all(counts) and {m["unit"] for m in counts} == {"images"}, lines
    assert [int(m["count"]) for m in counts] == [8, 16, 24, 30] and counts[0]["total"] == "32"
    assert lines[-1].startswith("kNN features (train): done, 30 images in ")

    lines.clear()
    listing = image_files.list_folder(str(image_folder), progress=reporter)
    assert listing.files == image_files.list_folder(str(image_folder)).files  # same listing
    checks = [LINE.match(line) for line in lines[:-1] if line.startswith("checking")]
    n = len(listing.files) + len(listing.skipped) + len(listing.too_large)
    assert checks and all(checks) and {m["total"] for m in checks} == {str(n)}, lines
    assert any(re.match(r"^listing \S+: \d+ files, [\d.]+ files/s, \S+ elapsed$", line)
               for line in lines), lines
    assert lines[-1].startswith(f"checking {image_folder}: done, {n} files in ")
