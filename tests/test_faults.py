"""Faults a long run meets: broken checkpoints, unwritable run dirs, Ctrl-C, a second run,
skipped mixed-precision steps."""

import contextlib
import glob
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf
from test_train import (
    SMALL,
    TRAIN,
    assert_one_line_error,
    run_binary,
    run_train_main,
    small_flags,
)

from co2_tf import training
from co2_tf.config import TrainConfig
from co2_tf.errors import UserError
from co2_tf.run.preemption import PreemptionWatcher


def small_config(model_dir, **overrides):
    return TrainConfig(model_dir=str(model_dir), **dict(SMALL, **overrides))


def _values(path):
    reader = tf.train.load_checkpoint(path)
    values = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
              if "save_counter" not in k}
    return {k: v for k, v in values.items() if np.issubdtype(np.asarray(v).dtype, np.number)}


def _numbers(model_dir):
    return sorted(int(p.rsplit("-", 1)[1][:-len(".index")])
                  for p in glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-*.index")))


class CountSteps(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


# ------------------------------------------------------ checkpoint integrity
@pytest.fixture(scope="module")
def twelve_steps(tmp_path_factory):
    """A finished run of 12 steps, checkpoints 4, 8, 12, and ckpt-12's values."""
    model_dir = tmp_path_factory.mktemp("twelve") / "run"
    training.train(small_config(model_dir, train_steps=12, checkpoint_every=4), verbose=0)
    assert _numbers(str(model_dir)) == [4, 8, 12]
    return str(model_dir), _values(os.path.join(model_dir, "checkpoints", "ckpt-12"))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["truncated_data", "missing_index", "truncated_index"])
def test_a_broken_latest_checkpoint_is_named_and_the_previous_one_restored(
        tmp_path, twelve_steps, damage, caplog):
    source, ckpt12 = twelve_steps
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    base = os.path.join(model_dir, "checkpoints", "ckpt-12")
    if damage == "truncated_data":
        _truncate(base + ".data-00000-of-00001")
    elif damage == "missing_index":
        os.remove(base + ".index")
    else:
        _truncate(base + ".index")
    counter = CountSteps()
    with caplog.at_level(logging.WARNING):
        summary = training.train(small_config(model_dir, train_steps=12, checkpoint_every=4),
                                 callbacks=[counter], verbose=0)
    warnings = [r.getMessage() for r in caplog.records if "ckpt-12" in r.getMessage()]
    assert len(warnings) == 1 and "unreadable" in warnings[0], warnings
    # Resumed from ckpt-8: 4 steps, and ckpt-12 rewritten with the values it had.
    assert counter.batches == 4 and summary["steps"] == 12
    assert _numbers(model_dir) == [4, 8, 12]
    again = _values(base)
    assert again.keys() == ckpt12.keys()
    for key, value in ckpt12.items():
        np.testing.assert_allclose(again[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_an_unreadable_state_file_resumes_from_the_files_present(tmp_path, twelve_steps,
                                                                   caplog):
    source, _ = twelve_steps
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    with open(os.path.join(model_dir, "checkpoints", "checkpoint"), "w") as f:
        f.write("model_checkpoint_path: {{{ not a state file\n")
    counter = CountSteps()
    with caplog.at_level(logging.WARNING):
        summary = training.train(small_config(model_dir, train_steps=16, checkpoint_every=4),
                                 callbacks=[counter], verbose=0)
    assert counter.batches == 4 and summary["steps"] == 16  # from step 12, not 0
    assert any("state file" in r.getMessage() for r in caplog.records)
    # The recovered state file manages the old checkpoints again (keep 3: 4 went).
    assert _numbers(model_dir) == [8, 12, 16]
    state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
    assert [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths] == [8, 12, 16]


def test_no_readable_checkpoint_is_one_error_and_deletes_nothing(tmp_path, twelve_steps):
    source, _ = twelve_steps
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    for path in glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-*.data-*")):
        _truncate(path)
    before = sorted(glob.glob(os.path.join(model_dir, "**"), recursive=True))
    with pytest.raises(UserError, match="ckpt-12, ckpt-8, ckpt-4"):
        training.train(small_config(model_dir, train_steps=16, checkpoint_every=4), verbose=0)
    assert sorted(glob.glob(os.path.join(model_dir, "**"), recursive=True)) == before


# ------------------------------------------------------------- disk faults
def assert_one_line(result, code, *fragments):
    assert result.returncode == code, result.stdout + result.stderr
    return assert_one_line_error(result, *fragments)


@contextlib.contextmanager
def unprivileged():
    """Runs the block with user nobody's effective uid and gid when the process is root (CI
    runs as root, which writes through chmod 555); otherwise as is.

    In-process (a subprocess as another user would pay a TF import and need the checkout
    and the venv readable by that user): seteuid changes every thread of the process, and
    root's saved uid lets it come back.
    """
    if os.geteuid() != 0:
        yield
        return
    try:
        uid, gid = pwd.getpwnam("nobody")[2:4]
    except KeyError:
        uid = gid = 65534
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.mark.parametrize("kind", ["under_a_file", "unknown_scheme", "read_only"])
def test_an_unwritable_model_dir_is_one_line_before_anything_is_built(tmp_path, kind, capfd):
    user = contextlib.nullcontext()
    if kind == "under_a_file":
        (tmp_path / "file.txt").write_text("not a folder")
        model_dir = str(tmp_path / "file.txt" / "run")
    elif kind == "unknown_scheme":
        model_dir = "nosuchfs://bucket/run"
    else:
        # Not under tmp_path: pytest's /tmp/pytest-of-root is root's alone (0700), and
        # nobody must reach the read-only folder to be refused by it.
        parent = tempfile.mkdtemp()
        os.chmod(parent, 0o555)
        model_dir = os.path.join(parent, "run")
        user = unprivileged()
    try:
        if kind == "unknown_scheme":  # the binary's one line (its main, in-process)
            result = run_train_main([f"--model_dir={model_dir}"] + small_flags(train_steps=2),
                                    capfd)
            assert_one_line(result, 1, f"--model_dir={model_dir}")
        else:  # the same UserError, in-process
            with user, pytest.raises(UserError) as caught:
                training.train(small_config(model_dir, train_steps=2), verbose=0)
            message = str(caught.value)
            assert f"--model_dir={model_dir}" in message and "\n" not in message
            if kind == "read_only":
                assert "Permission denied" in message, message
                assert os.listdir(parent) == []
    finally:
        if kind == "read_only":
            os.chmod(parent, 0o755)
            shutil.rmtree(parent)
    assert not glob.glob(os.path.join(os.getcwd(), "nosuchfs*"))


def test_a_failed_save_is_one_error_naming_the_path_and_keeps_the_previous(
        tmp_path, monkeypatch):
    real_save = tf.train.CheckpointManager.save
    calls = []

    def failing_save(self, *args, **kwargs):
        calls.append(kwargs.get("checkpoint_number"))
        if len(calls) == 2:
            raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", failing_save)
    config = small_config(tmp_path / "run", train_steps=12, checkpoint_every=4)
    with pytest.raises(training.SaveFailed) as caught:
        training.train(config, verbose=0)
    message = str(caught.value)
    assert "\n" not in message and "No space left on device" in message
    assert os.path.join(config.model_dir, "checkpoints") in message and "step 8" in message
    monkeypatch.undo()
    latest = tf.train.latest_checkpoint(os.path.join(config.model_dir, "checkpoints"))
    assert latest.endswith("ckpt-4") and _values(latest)


# ------------------------------------------------------------------ Ctrl-C
def _wait_for_state_file(model_dir, proc, timeout=300):
    """The first checkpoint, once the state file lists it (its .index comes first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
        if state and state.model_checkpoint_path:
            return int(state.model_checkpoint_path.rsplit("-", 1)[1])
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_ctrl_c_writes_a_checkpoint_at_the_current_step_and_exits_130(tmp_path):
    model_dir = str(tmp_path / "run")
    flags = [f"--model_dir={model_dir}"] + small_flags(train_steps=3000, checkpoint_every=5)
    proc = subprocess.Popen([sys.executable, TRAIN] + flags, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = _wait_for_state_file(model_dir, proc)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGINT at step "), last
    step = int(last.split("at step ")[1].split(";")[0])
    assert first < step < 3000
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    assert latest.endswith(f"ckpt-{step}")
    # Rerun: resumes at that step (a shorter run that ends 3 steps later). In-process: the
    # binary's resume is tests/test_train.py's kill -9 test (a subprocess costs a TF import).
    counter = CountSteps()
    training.train(small_config(model_dir, train_steps=step + 3, checkpoint_every=5),
                   callbacks=[counter], verbose=0)
    assert counter.batches == 3
    assert json.load(open(os.path.join(model_dir, "summary.json")))["steps"] == step + 3


def test_after_one_ctrl_c_the_next_one_aborts_at_once():
    with PreemptionWatcher() as watcher:
        assert signal.getsignal(signal.SIGINT) == watcher._handle
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # Python runs the handler at the next bytecode
        assert watcher.requested and watcher.signum == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------- mixed_float16 steps
def _ckpt_counters(model_dir):
    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    return (int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")),
            int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")))


def test_mixed_float16_skipped_steps_count_for_data_checkpoints_and_train_steps(
        tmp_path, monkeypatch):
    """A loss scale of 2**32 overflows float16 gradients: the first steps are
    skipped (optimizer.iterations stays behind) while the run still takes
    exactly --train_steps steps, numbers checkpoints by them, and a resumed run
    continues at the right batch (it ends where the uninterrupted one does)."""
    import keras

    from co2_tf import precision
    monkeypatch.setattr(precision, "wrap_optimizer", lambda optimizer, _: (
        keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0 ** 32)))
    common = dict(precision="mixed_float16", checkpoint_every=8, keep_checkpoints=5,
                  deterministic=True)
    straight = str(tmp_path / "straight")
    counter = CountSteps()
    summary = training.train(small_config(straight, train_steps=24, **common),
                             callbacks=[counter], verbose=0)
    step, iterations = _ckpt_counters(straight)
    assert summary["steps"] == 24 and counter.batches == 24 and step == 24
    assert iterations < 20, "no step was skipped: the test proves nothing"
    assert _numbers(straight) == [8, 16, 24]

    resumed = str(tmp_path / "resumed")
    training.train(small_config(resumed, train_steps=12, **common), verbose=0)
    counter = CountSteps()
    training.train(small_config(resumed, train_steps=24, **common), callbacks=[counter],
                   verbose=0)
    assert counter.batches == 12 and _ckpt_counters(resumed) == (step, iterations)
    assert _numbers(resumed) == [8, 12, 16, 24]
    a = _values(os.path.join(straight, "checkpoints", "ckpt-24"))
    b = _values(os.path.join(resumed, "checkpoints", "ckpt-24"))
    for key, value in a.items():
        np.testing.assert_allclose(b[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


# ------------------------------------------------------ one run per run dir
def test_a_second_run_on_a_dir_in_use_is_refused_and_sigterm_stops_the_first_cleanly(
        tmp_path):
    """The first run goes on; then SIGTERM saves a checkpoint at its step (the only one:
    --checkpoint_every is beyond the run), exits 143 with one line and frees the lock."""
    model_dir = str(tmp_path / "run")
    # stdout is a pipe, not a terminal: progress lines every --log_every_secs.
    flags = [f"--model_dir={model_dir}"] + small_flags(train_steps=5000,
                                                       checkpoint_every=100000,
                                                       log_every_secs=0.5)
    first = subprocess.Popen([sys.executable, TRAIN] + flags, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    # Training has started (TensorBoard's first events): the lock is held.
    deadline = time.time() + 300
    while not glob.glob(os.path.join(model_dir, "logs", "train", "events*")):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1]
        time.sleep(0.2)
    second = run_binary(flags)
    last = assert_one_line(second, 1, "in use by another run", f"pid {first.pid}",
                           socket.gethostname())
    assert "since" in last
    assert first.poll() is None, "the first run was harmed"
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM at step"), last
    step = int(last.split("at step ")[1].split(";")[0])
    assert 0 < step < 5000
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    assert latest.endswith(f"-{step}")
    assert not os.path.exists(os.path.join(model_dir, ".lock")), "not released on SIGTERM"
    # The first run trained for seconds while the second was refused: progress lines, of
    # the whole run's 5000 steps, with the loss (tests/test_progress.py checks the arithmetic).
    lines = re.findall(r"^train: (\d+)/5000 steps \(\d+%\), [\d.]+ steps/s, \S+ elapsed, "
                       r"ETA \S+, loss [-\d.e+]+$", out, re.MULTILINE)
    assert lines and 0 < int(lines[-1]) <= step, out


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("holder,taken_over", [
    (dict(host="this", pid="dead", heartbeat=0), True),  # its process is gone
    (dict(host="other-host", pid=1, heartbeat=-3600), True),  # no heartbeat for an hour
    (dict(host="other-host", pid=1, heartbeat=-30), False),  # alive elsewhere
    (dict(host="this", pid="self", heartbeat=-30), False),  # alive here
])
def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path, holder, taken_over,
                                                            caplog):
    from co2_tf.run import runlock
    path = tmp_path / ".lock"
    now = time.time()
    lock = dict(host=socket.gethostname() if holder["host"] == "this" else holder["host"],
                pid={"dead": _dead_pid(), "self": os.getpid()}.get(holder["pid"], holder["pid"]),
                start=now - 7200, heartbeat=now + holder["heartbeat"], token="theirs")
    path.write_text(json.dumps(lock))
    if not taken_over:
        with pytest.raises(UserError, match=f"in use by another run .host {lock['host']}, "
                                            f"pid {lock['pid']}, since"):
            runlock.RunLock(str(tmp_path)).__enter__()
        assert json.loads(path.read_text()) == lock
        return
    with caplog.at_level(logging.WARNING):
        with runlock.RunLock(str(tmp_path), heartbeat_seconds=0.05) as held:
            mine = json.loads(path.read_text())
            assert mine["pid"] == os.getpid() and mine["token"] == held.token
            time.sleep(0.3)
            assert json.loads(path.read_text())["heartbeat"] > mine["heartbeat"]
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    assert not path.exists()


def test_the_lock_is_released_after_a_run_and_after_an_error(tmp_path, monkeypatch):
    config = small_config(tmp_path / "run", train_steps=2)
    training.train(config, verbose=0)
    assert not os.path.exists(os.path.join(config.model_dir, ".lock"))

    def failing_save(self, *args, **kwargs):
        assert os.path.exists(os.path.join(config.model_dir, ".lock"))  # held while running
        raise OSError("disk gone")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", failing_save)
    with pytest.raises(training.SaveFailed):
        training.train(small_config(tmp_path / "run", train_steps=4), verbose=0)
    assert not os.path.exists(os.path.join(config.model_dir, ".lock"))
