"""The run dir: every file name in it, and reading and writing its files.

A run dir (`--model_dir`) holds:

- ``config.json``: the run's `TrainConfig` (written once, when the run starts);
- ``classes.txt``: the class names of a labelled dataset, one per line, line = label;
- ``checkpoints/``: a `tf.train.CheckpointManager` of
  `tf.train.Checkpoint(model=CO2Model, optimizer=...)`;
- ``logs/``: TensorBoard (per-step scalars, view pairs, kNN per epoch);
- ``summary.json``: the final step and kNN accuracies;
- ``.lock``: while a run trains there (co2_tf.run.runlock);
- evaluation tools' output dirs (``knn_eval/``, ``linear_eval_<protocol>/``, ...).

An export dir (tools/export.py) holds ``export.json`` beside ``backbone.keras``.
Every path goes through co2_tf.io (tf.io.gfile): run dirs may be gs:// URIs.
Rebuilding a run's model from these files is co2_tf.run.trained's.
"""

import os
import uuid

import tensorflow as tf

from co2_tf import io
from co2_tf.config import TrainConfig
from co2_tf.errors import UserError, first_line
from co2_tf.run import checkpoints

CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.txt"
SUMMARY_FILE = "summary.json"
CHECKPOINT_SUBDIR = "checkpoints"
LOG_SUBDIR = "logs"
EXPORT_FILE = "export.json"


# ------------------------------------------------------------- small files
def load_run_config(model_dir):
    """The config a run dir was started with, or None for a new dir."""
    path = io.join(model_dir, CONFIG_FILE)
    try:
        if not io.exists(path):
            return None
    except tf.errors.OpError as e:  # an unknown URI scheme, a bucket without access, ...
        raise UserError(f"cannot access --model_dir={model_dir} ({first_line(e)}): check "
                        "the path and its permissions, or choose another --model_dir") from None
    try:
        return TrainConfig.from_dict(io.read_json(path))
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON, not an object, ...
        raise UserError(f"{path} is not a co2_tf config ({e}): use a new --model_dir") from None


def write_run_config(model_dir, config):
    io.write_text_atomic(io.join(model_dir, CONFIG_FILE), config.to_json())


def write_class_names(model_dir, names):
    """classes.txt: one class name per line (UTF-8), line index = label."""
    io.write_text_atomic(io.join(model_dir, CLASSES_FILE), "".join(f"{n}\n" for n in names))


def read_class_names(model_dir):
    """The class names of classes.txt, or None if the run has none."""
    path = io.join(model_dir, CLASSES_FILE)
    return io.read_text(path).splitlines() if io.exists(path) else None


def write_summary(model_dir, summary):
    io.write_json_atomic(io.join(model_dir, SUMMARY_FILE), summary)


def check_writable(model_dir):
    """UserError unless files can be written in model_dir (made if missing).

    Called before anything is built: an unwritable --model_dir (a read-only
    mount, a bucket without write access, an unknown URI scheme) is one line
    at once, not a traceback after minutes of setup.
    """
    probe = io.join(model_dir, f".write_probe-{uuid.uuid4().hex[:8]}")
    try:
        io.makedirs(model_dir)
        io.write_text_atomic(probe, "co2_tf checks that it can write here\n")
        io.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        raise cannot_write(model_dir, e) from None


def cannot_write(model_dir, error):
    """The UserError for a --model_dir that refuses a write."""
    return UserError(f"cannot write to --model_dir={model_dir} ({first_line(error)}): check "
                     "the path and its permissions, or choose another --model_dir")


def checkpoint_dir(model_dir):
    return io.join(model_dir, CHECKPOINT_SUBDIR)


def log_dir(model_dir):
    return io.join(model_dir, LOG_SUBDIR)


def read_scalars(model_dir, tag, subdir="train"):
    """[(step, value)] of a scalar in the TensorBoard logs DIR/logs/<subdir> ("" = logs), by step.

    Keras writes scalars as tensors, tf.compat.v1 as simple values: both are
    read. A step written twice (a run resumed before its last checkpoint
    redoes steps) keeps the value of the newest event file.
    """
    folder = io.join(log_dir(model_dir), subdir)
    if not io.isdir(folder):
        return []
    by_step = {}
    for name in sorted(n for n in io.listdir(folder) if "tfevents" in n):  # by start time
        for event in tf.compat.v1.train.summary_iterator(io.join(folder, name)):
            for value in event.summary.value:
                if value.tag == tag:
                    by_step[event.step] = float(
                        tf.make_ndarray(value.tensor) if value.HasField("tensor")
                        else value.simple_value)
    return sorted(by_step.items())


# ---------------------------------------------------------------- run dirs
def run_config(run_dir):
    """The config of an existing run dir; UserError if it is not one."""
    if not io.isdir(run_dir):
        raise UserError(f"run dir {run_dir} does not exist: pass the --model_dir of a "
                        "pretraining run")
    config = load_run_config(run_dir)
    if config is None:
        raise UserError(f"{run_dir} is not a co2_tf run dir (no {CONFIG_FILE}): pass the "
                        "--model_dir that tools/train.py wrote")
    return config


def run_dir_of(model_dir="", checkpoint=""):
    """model_dir, or the run dir that holds the checkpoint path."""
    if model_dir or not checkpoint:
        return model_dir
    folder = io.parent(io.absolute(checkpoint))
    run_dir = io.parent(folder) if os.path.basename(folder) == CHECKPOINT_SUBDIR else folder
    if not io.exists(io.join(run_dir, CONFIG_FILE)):
        raise UserError(f"cannot find the run dir of checkpoint {checkpoint} (no "
                        f"{CONFIG_FILE} in {run_dir}): pass --model_dir=RUN_DIR too")
    return run_dir


def resolve_checkpoint(model_dir="", checkpoint=""):
    """(run_dir, checkpoint path) from a run dir and/or a checkpoint; UserError if missing.

    `checkpoint` is a path (RUN_DIR/checkpoints/ckpt-N, the run dir then found
    from it) or a bare name (ckpt-N) inside model_dir's checkpoints/; empty
    means the latest checkpoint of model_dir.
    """
    if checkpoint and "/" not in checkpoint and model_dir:
        checkpoint = io.join(checkpoint_dir(model_dir), checkpoint)
    model_dir = run_dir_of(model_dir, checkpoint)
    run_config(model_dir)
    ckpt_dir = checkpoint_dir(model_dir)
    if not checkpoint:
        checkpoint = tf.train.latest_checkpoint(ckpt_dir)
        if not checkpoint:
            raise UserError(f"{model_dir} has no checkpoint ({ckpt_dir} is empty or missing): "
                            f"pretrain first (tools/train.py --model_dir={model_dir})")
    elif not io.exists(checkpoint + ".index"):
        state = tf.train.get_checkpoint_state(ckpt_dir)
        names = [os.path.basename(p) for p in (state.all_model_checkpoint_paths if state else [])]
        hint = (f"use one of {', '.join(names)} in {ckpt_dir}" if names
                else f"{ckpt_dir} has none")
        raise UserError(f"checkpoint {checkpoint} not found: {hint}, or omit --checkpoint "
                        "for the latest")
    return model_dir, checkpoint


def checkpoint_step(path):
    """The training step a checkpoint was written at (its step counter)."""
    return checkpoints.step_of(path)


def read_export_info(keras_path):
    """export.json beside an exported .keras file, or None."""
    path = io.join(io.parent(io.absolute(keras_path)), EXPORT_FILE)
    return io.read_json(path) if io.exists(path) else None
