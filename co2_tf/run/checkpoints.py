"""The trainer's checkpoints: finding the newest intact one, saving with one-line failures.

A checkpoint of RUN_DIR/checkpoints is ``ckpt-N.index`` + ``ckpt-N.data-*``
(N = the step), listed by the ``checkpoint`` state file of
`tf.train.CheckpointManager`. A long run meets broken ones: a truncated or
missing file of the latest (a full disk, a preempted copy), an unparsable
state file. TF then either fails with a misleading error or, for the state
file, silently starts again at step 0 and overwrites ``ckpt-N``. Here:

- the candidates are the union of the state file's list and the
  ``ckpt-N.index`` files present (so an unreadable state file loses nothing),
  tried newest first;
- a candidate that cannot be read (truncated, missing data, a corrupt index)
  is skipped with one warning naming it; one that reads but does not fit the
  model (other flags) is a UserError, as before;
- if candidates exist and none restores: a UserError naming them, nothing
  deleted (never a silent restart at step 0 over a run);
- after a recovery the state file is rewritten to list the intact
  checkpoints up to the restored one, with their file times, so that the
  manager's `max_to_keep` manages them again (and a broken newer one is
  simply overwritten when the run reaches its step).
"""

import logging
import os
import re

import tensorflow as tf

from co2_tf import compat, io
from co2_tf.errors import UserError, first_line

log = logging.getLogger(__name__)

STATE_FILE = "checkpoint"
# The trainer's step counter (CO2Model.step_counter) at the checkpoint's root.
STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"
_NAME = re.compile(r"ckpt-(\d+)$")


class SaveFailed(Exception):
    """Writing a checkpoint failed (disk full, permissions, bucket gone); the previous is intact."""

    exit_code = 4

    def __init__(self, directory, step, cause):
        self.step = step
        super().__init__(f"could not write the checkpoint of step {step} to {directory} "
                         f"({first_line(cause)}); the previous checkpoint is intact: free "
                         "space or fix the permissions, then rerun to resume")


def training_checkpoint(model, optimizer, with_step=True):
    """What the trainer saves: the CO2Model, its optimizer and its step counter."""
    if with_step:
        return tf.train.Checkpoint(model=model, optimizer=optimizer, step=model.step_counter)
    return tf.train.Checkpoint(model=model, optimizer=optimizer)  # before the step counter


def _number(path):
    match = _NAME.search(path)
    return int(match.group(1)) if match else -1


def candidates(ckpt_dir):
    """(checkpoint paths newest first, the state file's CheckpointState or None)."""
    state = None
    if io.exists(io.join(ckpt_dir, STATE_FILE)):
        try:
            state = tf.train.get_checkpoint_state(ckpt_dir)
        except (ValueError, tf.errors.OpError):  # TF logs the parse error itself
            state = None
    paths = {os.path.basename(p) for p in (state.all_model_checkpoint_paths if state else [])}
    if state and state.model_checkpoint_path:
        paths.add(os.path.basename(state.model_checkpoint_path))
    if io.isdir(ckpt_dir):
        paths.update(name[:-len(".index")] for name in io.listdir(ckpt_dir)
                     if _NAME.search(name[:-len(".index")]) and name.endswith(".index"))
    ordered = sorted((p for p in paths if _number(p) >= 0), key=_number, reverse=True)
    return [io.join(ckpt_dir, p) for p in ordered], state


def _reader(path):
    # Not tf.train.load_checkpoint: it takes `path` for a folder when gfile.isdir says so,
    # which TF's ram:// file system does for any prefix of a file name (ckpt-4 of ckpt-4.index).
    return tf.compat.v1.train.NewCheckpointReader(path)


def step_of(path):
    """The training step a checkpoint was written at (its step counter, else its optimizer's)."""
    reader = _reader(path)
    for key in (STEP_KEY, compat.OPTIMIZER_ITERATIONS_KEY):
        if reader.has_tensor(key):
            return int(reader.get_tensor(key))
    return _number(path) if _number(path) >= 0 else None


def _unreadable(path):
    """Why the checkpoint cannot be read (one line), or None if its index reads."""
    if not io.exists(path + ".index"):
        return "its .index file is missing"
    try:
        _reader(path)
    except Exception as e:  # noqa: BLE001 - any failure to open the index means unreadable
        return first_line(e)
    return None


def restore_newest(make_checkpoint, ckpt_dir, model_dir, step_counter=None, iterations=None):
    """Restores the newest intact checkpoint of ckpt_dir.

    Returns (its path or None, the checkpoints the state file should list
    after a recovery, oldest first, or None if the state file is right).

    make_checkpoint(with_step) -> a fresh tf.train.Checkpoint of the trainer
    (a fresh one per attempt: a failed restore leaves nothing pending). A
    checkpoint written before the step counter existed restores without it,
    and the counter is set from the optimizer's step (`iterations`).
    """
    paths, state = candidates(ckpt_dir)
    if not paths:
        return None, None
    skipped = []
    for path in paths:
        problem = _unreadable(path)
        if problem is None:
            has_step = _reader(path).has_tensor(STEP_KEY)
            try:
                make_checkpoint(has_step).restore(path).assert_existing_objects_matched()
            except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
                # Read, but other shapes or objects: made with other flags.
                raise UserError(f"the checkpoint in {model_dir} does not fit this model "
                                f"({first_line(e)}): use a new --model_dir or the flags it "
                                "was made with") from None
            except Exception as e:  # noqa: BLE001 - truncated data: IndexError, OpError, ...
                problem = first_line(e)
            else:
                if not has_step and step_counter is not None:
                    step_counter.assign(iterations)
        if problem is None:
            break
        log.warning("checkpoint %s is unreadable (%s): skipped, trying an older one",
                    path, problem)
        skipped.append(os.path.basename(path))
    else:
        raise UserError(f"no checkpoint in {ckpt_dir} can be read ({', '.join(skipped)}); "
                        "nothing was deleted: restore the files, or use a new --model_dir")
    latest = state.model_checkpoint_path if state else None
    if state is None or os.path.basename(latest or "") != os.path.basename(path):
        if state is None:
            log.warning("the checkpoint state file in %s is unreadable: recovered from the "
                        "ckpt-N files present", ckpt_dir)
        return path, [p for p in paths if _number(p) <= _number(path) and
                      os.path.basename(p) not in skipped and io.exists(p + ".index")][::-1]
    return path, None


def rewrite_state(ckpt_dir, kept):
    """After a recovery: the state file lists `kept` (the intact checkpoints up to the
    restored one), with their file times so that the manager's max_to_keep manages them."""
    times = [tf.io.gfile.stat(p + ".index").mtime_nsec / 1e9 for p in kept]
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # its deprecation note: the manager has no public way to do this
    try:
        tf.compat.v1.train.update_checkpoint_state(
            ckpt_dir, kept[-1], all_model_checkpoint_paths=kept,
            all_model_checkpoint_timestamps=times, last_preserved_timestamp=min(times) - 1)
    finally:
        logger.setLevel(level)
