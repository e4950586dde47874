"""What runs beside Keras's fit during pretraining.

- checkpoints every N steps, at epoch ends and on SIGTERM or SIGINT (preemption),
  refusing a non-finite loss or non-finite weights;
- the checkpoint manager of a non-chief worker of a multi-worker run;
- Keras's TensorBoard callback with batch summaries at the global step;
- progress lines off a terminal (co2_tf.progress), also for the evaluation tools' fits;
- the weighted kNN monitor of the query backbone;
- the collapse monitor (co2_tf.run.collapse): one line when the embedding collapses.
"""

import contextlib
import logging
import signal
import tempfile
import threading

import keras
import numpy as np
import tensorflow as tf

from co2_tf import build
from co2_tf import compat as compat
from co2_tf.data import pipelines as data
from co2_tf.errors import UserError
from co2_tf.evaluation import knn as knn_lib
from co2_tf.run import checkpoints, collapse

log = logging.getLogger(__name__)


class NonFiniteLoss(Exception):
    """The loss or the weights became NaN or Inf; the last good checkpoint is kept."""

    exit_code = 3

    def __init__(self, step, last_checkpoint_step, what="the loss is"):
        self.step = step
        super().__init__(
            f"{what} not finite at step {step}; stopped without saving it. The last good "
            f"checkpoint (step {last_checkpoint_step}) is intact: lower --learning_rate or "
            "check the data, then rerun to resume from it")


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint of the current step was written.

    `exit_code` is the shell's code for the signal: 143 (SIGTERM), 130 (SIGINT).
    """

    def __init__(self, step, signum=signal.SIGTERM, by_another_worker=False):
        self.step = step
        self.exit_code = 128 + int(signum)
        cause = ("another worker was stopped" if by_another_worker
                 else f"stopped by {signal.Signals(signum).name}")
        super().__init__(f"{cause} at step {step}; checkpoint written, rerun the same command "
                         "to resume")


class PreemptionWatcher(contextlib.AbstractContextManager):
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the checkpoint callback acts on at a
    step end. After the first Ctrl-C, a second one aborts at once (the default handler)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            # After a Ctrl-C, the user wants out: a second one still aborts at once.
            if not (signum == signal.SIGINT == self.signum):
                signal.signal(signum, previous)
        return False


def read_step(model):
    """The model's global step, read from the device: its `step_counter`
    (co2_tf.method.model.CO2Model) or its optimizer's `iterations`."""
    counter = getattr(model, "step_counter", None)
    if counter is None:
        counter = model.optimizer.iterations
    return int(counter.numpy())


class HostStep:
    """The global step, counted on the host: no device read per step.

    Read from the model once per fit() call (`start`, in on_train_begin),
    then advanced from what Keras tells the callbacks: the epoch's first step
    (`epoch`, in on_epoch_begin) and each execution's step indices within
    the epoch. With --steps_per_execution=k Keras announces executions of k
    steps; the last one of an epoch may run fewer (its data ends), so the
    count is capped at the epoch's steps.
    """

    def __init__(self):
        self.value = None
        self._epoch_start = None

    def start(self, model):
        self.value = self._epoch_start = read_step(model)
        return self.value

    def epoch(self):
        self._epoch_start = self.value

    def _at(self, steps_done, params):
        steps = (params or {}).get("steps")
        return self._epoch_start + (min(steps_done, steps) if steps else steps_done)

    def execution_end(self, begin, steps_per_execution, params):
        """The step the execution starting at epoch index `begin` will end at."""
        return self._at(begin + steps_per_execution, params)

    def ended(self, end, params):
        """Call in on_train_batch_end(end): the step now (also kept as `value`)."""
        self.value = self._at(end + 1, params)
        return self.value


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
        # Multi-worker runs: flag -> whether any worker's flag is set (see any_worker).
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
        # A finite loss does not prove finite weights: BN moving statistics
        # overflow a step before the loss does. Checked only when saving.
        if not all(bool(tf.reduce_all(tf.math.is_finite(w)))
                   for w in self.model.weights if keras.backend.is_float_dtype(w.dtype)):
            raise NonFiniteLoss(step, self.last_saved_step or 0, what="the weights are")
        try:
            self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as e:
            # TF writes to temporary names and renames: the previous one is intact.
            raise checkpoints.SaveFailed(self.manager.directory, step, e) from None
        self.last_saved_step = step

    def on_train_batch_end(self, batch, logs=None):
        previous = self.step.value
        step = self.step.ended(batch, self.params)
        loss = float(logs["loss"]) if logs and "loss" in logs else 0.0
        if not np.isfinite(loss):
            raise NonFiniteLoss(step, self.last_saved_step or 0)
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


def any_worker(strategy):
    """For a multi-worker run, flag -> whether any worker's flag is set; else None.

    One all-reduce of one float across the workers, run by every worker at
    the same execution end (CheckpointCallback calls it once per host call:
    every --steps_per_execution steps): a SIGTERM on one host then stops
    every host at the same step, each taking part in the save (a worker
    saving alone would wait forever for the others in the variables'
    collective reads). Its cost is one small collective's latency per
    execution: 3-8 ms measured between two localhost workers on a busy
    2-core machine, about a network round trip between hosts.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if (not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None
            or len(resolver.cluster_spec().as_dict().get("worker", [])) +
            len(resolver.cluster_spec().as_dict().get("chief", [])) < 2):
        return None

    def replica_fn(flag):
        # identity: a value of this replica (the bare argument has no replica device).
        return tf.distribute.get_replica_context().all_reduce("sum", tf.identity(flag))

    @tf.function
    def total(flag):
        return strategy.run(replica_fn, args=(flag,))

    def any_set(flag):
        reduced = total(tf.constant(1.0 if flag else 0.0))
        return float(strategy.experimental_local_results(reduced)[0]) > 0
    return any_set


class WorkerCheckpointManager:
    """What a non-chief worker of a multi-worker run saves with and restores from.

    Its saves are scratch: the variables are read collectively, so every
    worker takes part in a save, but only the chief's copy is the
    checkpoint. A worker writes its copy to a fresh temporary directory on
    its local disk (`scratch_root`, default the system's temp dir) and
    deletes it at once: nothing goes to the shared model dir, where on gs://
    every worker would upload a whole checkpoint per save.
    `latest_checkpoint` is the chief's, so a restarted worker resumes from
    the same step as the chief. The model dir must be shared by all workers
    (gs://, NFS).
    """

    def __init__(self, checkpoint, chief_dir, scratch_root=None):
        self.checkpoint = checkpoint
        self.chief_dir = chief_dir
        self.scratch_root = scratch_root
        self.directory = chief_dir  # where its checkpoints are (errors name it)

    @property
    def latest_checkpoint(self):
        return tf.train.latest_checkpoint(self.chief_dir)

    def save(self, checkpoint_number=None):
        scratch = tempfile.mkdtemp(prefix="co2_tf_worker_", dir=self.scratch_root)
        try:
            return tf.train.CheckpointManager(self.checkpoint, scratch, max_to_keep=1).save(
                checkpoint_number=checkpoint_number)
        finally:
            tf.io.gfile.rmtree(scratch)


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


class KnnMonitor(keras.callbacks.Callback):
    """Weighted kNN top-1 of the query backbone every N epochs, into the epoch logs."""

    def __init__(self, evaluate, every_epochs):
        super().__init__()
        self.evaluate = evaluate
        self.every_epochs = every_epochs
        self.last = None  # (step, top-1) of the latest evaluation

    def on_epoch_end(self, epoch, logs=None):
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0 and logs is not None:
            # Logs is the dict every callback sees: TensorBoard (later in the
            # list) writes it as epoch_knn_top1.
            logs["knn_top1"] = self.evaluate(self.model.query_backbone)
            self.last = (read_step(self.model), logs["knn_top1"])  # once per evaluation


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


def knn_evaluator(config, source, reporter=None):
    """A function backbone -> kNN top-1 on the held-out split, or None if there is none.

    The held-out split is --eval_split, else the dataset's usual one
    (`Source.default_eval_split`); without one the monitor is off (one log line).
    `reporter` (co2_tf.progress.Reporter): progress lines of the feature extraction.
    """
    try:
        eval_split = config.eval_split or source.default_eval_split()
    except UserError as e:
        log.warning("kNN monitor off: %s", e)
        return None
    batch_size = 256
    common = dict(image_size=config.image_size, batch_size=batch_size, transform="eval")
    bank = data.labelled_dataset(source, split=config.split, **common)
    queries = data.labelled_dataset(source, split=eval_split, **common)
    if source.in_memory:
        # Small data (the demo's 10k images: 123 MB at 32 px): the eval views are
        # computed once, not at every evaluation (half of each one's time).
        bank, queries = bank.cache(), queries.cache()
    classes = len(source.class_names(config.split))
    local_copy = []
    extractors = {}  # backbone -> its extractor: one trace per backbone and run

    def evaluate(backbone):
        if isinstance(backbone.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Under MultiWorkerMirroredStrategy each worker would see only its
            # shard of the data: evaluate a copy made outside the strategy, on
            # this worker's values.
            if not local_copy:
                local_copy.append(build.backbone_fn(config)("knn_backbone"))
            local_copy[0].set_weights(backbone.get_weights())
            backbone = local_copy[0]
        if backbone not in extractors:
            # Over the replicas of the strategy the backbone was built under.
            extractors[backbone] = knn_lib.FeatureExtractor(backbone)
        return knn_lib.knn_top1(extractors[backbone], bank, queries, classes, k=config.knn_k,
                                temperature=config.knn_temperature, progress=reporter,
                                batch_size=batch_size)
    return evaluate
