"""The Keras callbacks of pretraining (and of the evaluation tools' fits), one job each.

- CheckpointCallback: a checkpoint every N steps, at epoch ends and on SIGTERM or
  SIGINT (co2_tf.run.preemption), refusing non-finite losses and weights
  (co2_tf.run.nonfinite);
- GlobalStepTensorBoard: Keras's TensorBoard callback with batch summaries at the
  global step;
- ProgressCallback: progress lines off a terminal (co2_tf.progress);
- CollapseMonitor: one line when the embedding collapses (co2_tf.run.collapse).

Each counts the global step on the host (co2_tf.run.global_step). The kNN
monitor is evaluation's (co2_tf.evaluation.knn_monitor).
"""

import logging

import keras
import tensorflow as tf

from co2_tf import compat
from co2_tf.run import checkpoints, collapse, nonfinite
from co2_tf.run.global_step import HostStep

log = logging.getLogger(__name__)


class CheckpointCallback(keras.callbacks.Callback):
    """Saves every N steps, at epoch ends and on SIGTERM/SIGINT; refuses non-finite losses.

    Keras calls it once per execution: with --steps_per_execution=k the step
    advances by k between calls, so "every N steps" means at the first
    execution end at or past each multiple of N, the loss checked is the one
    of the execution's last step, and a SIGTERM/SIGINT is acted on at the
    end of the execution it arrives in. The step is counted on the host
    (HostStep).
    """

    def __init__(self, manager, every_steps, preemption, any_worker=None):
        super().__init__()
        self.manager = manager
        self.every_steps = every_steps
        self.preemption = preemption
        # Multi-worker runs: flag -> whether any worker's flag is set
        # (co2_tf.run.preemption.any_worker).
        self.any_worker = any_worker
        self.last_saved_step = None
        self.preempted_at = None
        self.step = HostStep()

    def on_train_begin(self, logs=None):
        self.step.start(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self.step.epoch()

    def save(self, step):
        if step == self.last_saved_step:
            return
        nonfinite.check_weights(self.model, step, self.last_saved_step or 0)
        try:
            self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as e:
            # TF writes to temporary names and renames: the previous one is intact.
            raise checkpoints.SaveFailed(self.manager.directory, step, e) from None
        self.last_saved_step = step

    def on_train_batch_end(self, batch, logs=None):
        previous = self.step.value
        step = self.step.ended(batch, self.params)
        nonfinite.check_loss(logs, step, self.last_saved_step or 0)
        requested = self.preemption.requested
        if self.any_worker is not None:  # every worker at this same step, in lockstep
            requested = self.any_worker(requested)
        if requested:  # checked once per execution: a signal waits for its end
            self.save(step)
            self.preempted_at = step
            self.model.stop_training = True
        elif step // self.every_steps > previous // self.every_steps:
            self.save(step)

    def on_epoch_end(self, epoch, logs=None):
        if self.preempted_at is None:
            self.save(self.step.value)


class GlobalStepTensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback, with batch summaries at the global step.

    Keras numbers batch summaries from 0 at every fit() call; a resumed run
    would then draw over its own curves. The step is counted on the host
    (HostStep): one call runs steps_per_execution steps (fewer at an epoch's
    end) and is labelled with the last of them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step = HostStep()

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        compat.set_tensorboard_batch_step(self, self.step.start(self.model))

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self.step.epoch()

    def on_train_batch_begin(self, batch, logs=None):
        # Keras adds 1 to the counter here: it lands on the execution's last step.
        compat.set_tensorboard_batch_step(
            self, self.step.execution_end(batch, self.model.steps_per_execution,
                                          self.params) - 1)
        super().on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.step.ended(batch, self.params)
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        # Keras leaves its batch-level record_if(step % update_freq == 0) on at
        # epoch end: the epoch scalars (epoch_knn_top1 among them) were written
        # only when an epoch ended on a multiple of --log_every.
        with tf.summary.record_if(True):
            super().on_epoch_end(epoch, logs)


class ProgressCallback(keras.callbacks.Callback):
    """Progress lines during Keras's fit: step, steps/s, ETA of the whole run, loss.

    The step is the model's `step_counter` (co2_tf.method.model.CO2Model) or its
    optimizer's `iterations`, read once per fit() call and counted on the host
    (HostStep): it survives resumes and successive fit() calls (one callback
    serves them all; its clock starts at the first). With
    --steps_per_execution=k a line can only come at an execution's end, at
    its last step. `total`: the run's last step; None = epochs x steps of
    the first fit() call.
    """

    def __init__(self, reporter, what="train", total=None):
        super().__init__()
        self.reporter, self.what, self.total = reporter, what, total
        self.progress = None
        self.step = HostStep()

    def on_train_begin(self, logs=None):
        start = self.step.start(self.model)
        if self.progress is None:
            total = self.total
            if total is None and self.params.get("steps"):
                total = self.params["epochs"] * self.params["steps"]
            self.progress = self.reporter.task(self.what, total, "steps", start=start)

    def on_epoch_begin(self, epoch, logs=None):
        self.step.epoch()

    def on_train_batch_end(self, batch, logs=None):
        step = self.step.ended(batch, self.params)
        if self.progress.due():  # reads nothing from the device otherwise
            loss = (logs or {}).get("loss")
            scalars = {} if loss is None else {"loss": float(loss)}
            self.progress.update(step, **scalars)


def progress_callbacks(reporter, what="train", total=None):
    """[ProgressCallback] for Keras's fit when `reporter` is on, else [] (no per-step cost)."""
    return [ProgressCallback(reporter, what, total)] if reporter.on else []


class CollapseMonitor(keras.callbacks.Callback):
    """Warns once (one log line) when the step's similarities say the embedding collapsed.

    Training goes on: the detector cannot tell a lasting collapse from one the
    run recovers from, an interrupted run would leave the study's cells of
    unequal length, and the user can stop it (Ctrl-C checkpoints). `report()`
    goes into summary.json.
    """

    def __init__(self, queue_size, patience=collapse.CollapseDetector.patience):
        super().__init__()
        self.detector = collapse.CollapseDetector(queue_size, patience)
        self.step = HostStep()

    def on_train_begin(self, logs=None):
        self.step.start(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self.step.epoch()

    def on_train_batch_end(self, batch, logs=None):
        # Once per execution (--steps_per_execution), on its last step's logs.
        previous = self.step.value
        step = self.step.ended(batch, self.params)
        if not logs or not all(name in logs for name in ("pos_sim", "neg_sim", "loss_ins")):
            return
        message = self.detector.update(step, float(logs["pos_sim"]), float(logs["neg_sim"]),
                                       float(logs["loss_ins"]), steps=step - previous)
        if message:
            log.warning("%s", message)

    def report(self):
        return self.detector.report()
