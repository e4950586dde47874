"""Pretraining: from a TrainConfig to a trained, checkpointed CO2Model.

`train(config)` is what `tools/train.py` calls. It checks everything it can
before it writes anything, then runs Keras's `fit` with co2_tf's callbacks:

- checkpoints (`tf.train.CheckpointManager`, in DIR/checkpoints): the whole
  model (key encoder, queue and pointer included) and the optimizer (whose
  `iterations` is the global step), every `checkpoint_every` steps, at each
  epoch end, and when SIGTERM arrives (preemption);
- resume: rerunning the same command restores the latest checkpoint and goes
  on from its step. The input pipeline of the built-in and folder datasets is
  a pure function of the step, so a resumed run sees exactly the batches an
  uninterrupted one would have seen;
- a non-finite loss stops the run before anything is saved at that step;
- TensorBoard in DIR/logs: per-step scalars, the augmented view pairs at the
  start, kNN accuracy per epoch.
"""

import contextlib
import json
import os
import signal
import sys
import threading

import keras
import numpy as np
import tensorflow as tf

from co2_tf import backbones, data, distribute, evaluation, fused_batchnorm, optimizers, precision
from co2_tf.config import TrainConfig, check_compatible, load_run_config, CONFIG_FILE
from co2_tf.errors import UserError
from co2_tf.model import CO2Model

CHECKPOINT_SUBDIR = "checkpoints"
LOG_SUBDIR = "logs"
SUMMARY_FILE = "summary.json"
CLASSES_FILE = "classes.txt"


class NonFiniteLoss(Exception):
    """The loss or the weights became NaN or Inf; the last good checkpoint is kept."""

    def __init__(self, step, last_checkpoint_step, what="the loss is"):
        self.step = step
        super().__init__(
            f"{what} not finite at step {step}; stopped without saving it. The last good "
            f"checkpoint (step {last_checkpoint_step}) is intact: lower --learning_rate or "
            "check the data, then rerun to resume from it")


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of the current step was written."""

    def __init__(self, step):
        self.step = step
        super().__init__(f"stopped by SIGTERM at step {step}; checkpoint written, rerun the "
                         "same command to resume")


# --------------------------------------------------------------------- building
def backbone_fn(config):
    """The builder the model calls for its query and key backbones."""
    bn = "sync" if config.bn == "sync" else "local"

    def build(model_name):
        with precision.policy_scope(config.precision):
            backbone = backbones.build_backbone(config.backbone, config.image_size, bn=bn,
                                                model_name=model_name, seed=config.seed)
        # Same BN semantics, one fused op per BN layer (the step's main cost otherwise).
        return fused_batchnorm.fuse_batch_norm(backbone)
    return build


def build_model(config, bn_groups):
    """A CO2Model for `config`; call under the strategy's scope.

    The encoders compute in `config.precision` (see co2_tf.precision); the
    queue, the losses and all variables stay float32.
    """
    with precision.policy_scope(config.precision):
        return CO2Model(
            backbone_fn(config), image_size=config.image_size, head=config.head, dim=config.dim,
            queue_size=config.queue_size, ema_momentum=config.ema_momentum,
            temperature=config.temperature,
            consistency_temperature=config.consistency_temperature,
            consistency_weight=config.consistency_weight, bn=config.bn, bn_groups=bn_groups,
            seed=config.seed, name="co2")


def build_optimizer(config, steps_per_epoch, total_steps):
    schedule = optimizers.make_lr_schedule(
        config.schedule, base_learning_rate=config.learning_rate, total_steps=total_steps,
        warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)))
    optimizer = optimizers.make_optimizer(config.optimizer, schedule, momentum=config.momentum,
                                          weight_decay=config.weight_decay)
    # mixed_float16: dynamic loss scaling (train_step calls optimizer.scale_loss).
    return precision.wrap_optimizer(optimizer, config.precision)


def compile_model(model, optimizer, config):
    """Compiles for our custom train_step and creates the optimizer's slots now.

    The optimizer is built on the query encoder only: the key encoder is
    trainable (for BN batch statistics) but never receives gradients.
    --jit_compile where XLA cannot work (several replicas on CPU devices)
    falls back to no XLA with a one-line warning (distribute.resolve_jit_compile).
    """
    jit_compile = distribute.resolve_jit_compile(config.jit_compile, model.distribute_strategy)
    model.compile(optimizer=optimizer, jit_compile=jit_compile,
                  steps_per_execution=config.steps_per_execution)
    optimizer.build(model.query_variables)


def epoch_segments(step, total_steps, steps_per_epoch):
    """Splits [step, total) into fit() calls of (initial_epoch, epochs, steps_per_epoch).

    Keras's fit counts whole epochs of a fixed length; a resume mid-epoch or a
    --train_steps that is not a multiple of the epoch needs a shorter call.
    """
    segments = []
    while step < total_steps:
        epoch = step // steps_per_epoch
        if step % steps_per_epoch == 0 and total_steps - step >= steps_per_epoch:
            full = (total_steps - step) // steps_per_epoch
            segments.append((epoch, epoch + full, steps_per_epoch))
            step += full * steps_per_epoch
        else:
            end = min((epoch + 1) * steps_per_epoch, total_steps)
            segments.append((epoch, epoch + 1, end - step))
            step = end
    return segments


# -------------------------------------------------------------------- callbacks
class PreemptionWatcher(contextlib.AbstractContextManager):
    """Turns SIGTERM into a flag that the checkpoint callback acts on at a step end."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class CheckpointCallback(keras.callbacks.Callback):
    """Saves every N steps, at epoch ends and on SIGTERM; refuses non-finite losses.

    Keras calls it once per execution: with --steps_per_execution=k the step
    advances by k between calls, so "every N steps" means at the first
    execution end at or past each multiple of N, and the loss checked is the
    one of the execution's last step.
    """

    def __init__(self, manager, every_steps, preemption):
        super().__init__()
        self.manager = manager
        self.every_steps = every_steps
        self.preemption = preemption
        self.last_saved_step = None
        self.preempted_at = None
        self._previous_step = 0

    def on_train_begin(self, logs=None):
        self._previous_step = self._step()

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def save(self, step):
        if step == self.last_saved_step:
            return
        # A finite loss does not prove finite weights: BN moving statistics
        # overflow a step before the loss does. Checked only when saving.
        if not all(bool(tf.reduce_all(tf.math.is_finite(w)))
                   for w in self.model.weights if keras.backend.is_float_dtype(w.dtype)):
            raise NonFiniteLoss(step, self.last_saved_step or 0, what="the weights are")
        self.manager.save(checkpoint_number=step)
        self.last_saved_step = step

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        previous, self._previous_step = self._previous_step, step
        loss = float(logs["loss"]) if logs and "loss" in logs else 0.0
        if not np.isfinite(loss):
            raise NonFiniteLoss(step, self.last_saved_step or 0)
        if self.preemption.requested:
            self.save(step)
            self.preempted_at = step
            self.model.stop_training = True
        elif step // self.every_steps > previous // self.every_steps:
            self.save(step)

    def on_epoch_end(self, epoch, logs=None):
        if self.preempted_at is None:
            self.save(self._step())


class TensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback, with batch summaries at the global step.

    Keras numbers batch summaries from 0 at every fit() call; a resumed run
    would then draw over its own curves.
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._global_train_batch = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        # One call runs steps_per_execution steps: label with the last of them.
        self._global_train_batch += self.model.steps_per_execution - 1
        super().on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if self.model.steps_per_execution > 1:  # a last, shorter execution
            self._global_train_batch = int(self.model.optimizer.iterations.numpy())
        super().on_train_batch_end(batch, logs)


class KnnMonitor(keras.callbacks.Callback):
    """Weighted kNN top-1 of the query backbone every N epochs, into the epoch logs."""

    def __init__(self, evaluate, every_epochs):
        super().__init__()
        self.evaluate = evaluate
        self.every_epochs = every_epochs

    def on_epoch_end(self, epoch, logs=None):
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0 and logs is not None:
            # Logs is the dict every callback sees: TensorBoard (later in the
            # list) writes it as epoch_knn_top1.
            logs["knn_top1"] = self.evaluate(self.model.query_backbone)


def write_view_pairs(log_dir, views1, views2, max_pairs=8):
    """An image summary of augmented view pairs: what the model is trained on."""
    pairs = tf.concat([views1[:max_pairs], views2[:max_pairs]], axis=2)  # side by side
    with tf.summary.create_file_writer(os.path.join(log_dir, "train")).as_default():
        tf.summary.image("augmented_view_pairs", pairs, step=0, max_outputs=max_pairs)


# ------------------------------------------------------------------------ train
def _eval_split(config, spec):
    """The labelled held-out split for kNN: the flag, else the built-in's test split."""
    if config.eval_split:
        return config.eval_split
    return "test" if spec.kind == "builtin" else None


def make_knn_evaluator(config, spec):
    """A function backbone -> kNN top-1 on the labelled eval split, or None."""
    eval_split = _eval_split(config, spec)
    if eval_split is None:
        return None
    common = dict(data_dir=config.data_dir or None, image_size=config.image_size,
                  batch_size=256, transform="eval")
    bank = data.labelled_dataset(spec, split=config.split, **common)
    queries = data.labelled_dataset(spec, split=eval_split, **common)
    classes = data.num_classes(spec, config.data_dir or None)

    local_copy = []

    def evaluate(backbone):
        if isinstance(backbone.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras's predict under MultiWorkerMirroredStrategy gathers every
            # worker's outputs (twice the features for the labels): evaluate a
            # copy made outside the strategy, on this worker's values.
            if not local_copy:
                local_copy.append(backbone_fn(config)("knn_backbone"))
            local_copy[0].set_weights(backbone.get_weights())
            backbone = local_copy[0]
        return evaluation.knn_eval(backbone, bank, queries, classes, k=config.knn_k,
                                   temperature=config.knn_temperature)
    return evaluate


class WorkerCheckpointManager:
    """What a non-chief worker of a multi-worker run saves with and restores from.

    Its saves are scratch (written to `scratch_dir`, deleted at once: the
    chief's copy of the same values is the checkpoint); `latest_checkpoint`
    is the chief's, so a restarted worker resumes from the same step as the
    chief. The model dir must be shared by all workers (gs://, NFS).
    """

    def __init__(self, checkpoint, chief_dir, scratch_dir):
        self.checkpoint = checkpoint
        self.chief_dir = chief_dir
        self.scratch_dir = scratch_dir

    @property
    def latest_checkpoint(self):
        return tf.train.latest_checkpoint(self.chief_dir)

    def save(self, checkpoint_number=None):
        path = tf.train.CheckpointManager(self.checkpoint, self.scratch_dir, max_to_keep=1).save(
            checkpoint_number=checkpoint_number)
        tf.io.gfile.rmtree(self.scratch_dir)
        return path


def execution_segments(segments, steps_per_execution):
    """fit() calls for --steps_per_execution=k > 1: one epoch (or part) per call.

    Keras runs whole executions of k steps, across epoch ends: a call of
    several epochs whose length is not a multiple of k would drift past its
    epoch boundaries. Each call's dataset is cut to its steps instead (see
    train), so its last execution ends early, exactly at the call's end.
    """
    if steps_per_execution == 1:
        return segments
    return [(epoch, epoch + 1, steps) for first, end, steps in segments
            for epoch in range(first, end)]


def _restore(checkpoint, manager, model_dir):
    latest = manager.latest_checkpoint
    if not latest:
        return
    try:
        checkpoint.restore(latest).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"the checkpoint in {model_dir} does not fit this model ({first}): "
                        "use a new --model_dir or the flags it was made with") from None


def _take_steps(dataset_fn, steps):
    """dataset_fn cut to `steps` global batches (each pipeline feeds its replicas in turn)."""
    def cut(input_context):
        local = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        return dataset_fn(input_context).take(steps * local)
    return cut


def train(config: TrainConfig, *, strategy=None, callbacks=(), verbose=None):
    """Pretrains (or resumes) the run in config.model_dir; returns the summary dict.

    Raises UserError for bad input before anything is written, NonFiniteLoss
    and Preempted as described above.
    """
    config.check()
    if verbose is None:  # a progress bar on a terminal, a line per epoch in logs
        verbose = 1 if sys.stdout.isatty() else 2
    spec = data.parse_dataset_spec(config.dataset)
    data_dir = config.data_dir or None
    data.validate(spec, data_dir=data_dir, split=config.split)
    saved = load_run_config(config.model_dir)
    if saved is not None:
        check_compatible(saved, config)
    strategy = strategy or distribute.make_strategy(config.strategy, config.tpu or None)
    bn_groups = config.check_replicas(strategy.num_replicas_in_sync)
    chief = distribute.is_chief(strategy)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    steps_per_epoch = data.steps_per_epoch(spec, split=config.split, data_dir=data_dir,
                                           global_batch_size=config.batch_size)
    if steps_per_epoch < 1:
        raise UserError(f"the training split has fewer examples than one batch of "
                        f"{config.batch_size}: lower --batch_size")
    total_steps = config.train_steps or config.epochs * steps_per_epoch
    knn = make_knn_evaluator(config, spec) if config.knn_every or spec.kind == "builtin" else None

    with strategy.scope():
        model = build_model(config, bn_groups)
        optimizer = build_optimizer(config, steps_per_epoch, total_steps)
        compile_model(model, optimizer, config)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    # Non-chief workers of a multi-worker run must take part in saving (the
    # variables are read collectively) but write to a scratch dir; every
    # worker restores the chief's checkpoints (see WorkerCheckpointManager).
    ckpt_dir = os.path.join(config.model_dir, CHECKPOINT_SUBDIR)
    if chief:
        manager = tf.train.CheckpointManager(checkpoint, ckpt_dir,
                                             max_to_keep=config.keep_checkpoints)
    else:
        manager = WorkerCheckpointManager(checkpoint, ckpt_dir, os.path.join(
            config.model_dir, f".worker_{strategy.cluster_resolver.task_id}"))
    _restore(checkpoint, manager, config.model_dir)

    # Everything is checked: from here on the run dir is written.
    os.makedirs(config.model_dir, exist_ok=True)
    if chief and saved is None:
        with open(os.path.join(config.model_dir, CONFIG_FILE), "w") as f:
            f.write(config.to_json())
        names = data.class_names(spec, data_dir)
        if names:
            with open(os.path.join(config.model_dir, CLASSES_FILE), "w", encoding="utf-8") as f:
                f.write("\n".join(names) + "\n")

    step = int(optimizer.iterations.numpy())
    log_dir = os.path.join(config.model_dir, LOG_SUBDIR)
    if step == 0 and chief:
        preview = data.pretrain_dataset_fn(
            spec, split=config.split, data_dir=data_dir, image_size=config.image_size,
            augment=config.augment, seed=config.seed, global_batch_size=config.batch_size,
        )(tf.distribute.InputContext())
        views1, views2 = next(iter(preview))
        write_view_pairs(log_dir, views1, views2)

    with PreemptionWatcher() as preemption:
        saver = CheckpointCallback(manager, config.checkpoint_every, preemption)
        saver.last_saved_step = step if manager.latest_checkpoint else None
        cbs = [saver]
        if knn is not None and config.knn_every:
            cbs.append(KnnMonitor(knn, config.knn_every))
        if chief:
            cbs.append(TensorBoard(log_dir, update_freq=config.log_every, write_graph=False))
        cbs.extend(callbacks)
        segments = execution_segments(epoch_segments(step, total_steps, steps_per_epoch),
                                      config.steps_per_execution)
        for initial_epoch, epochs, steps in segments:
            start = int(optimizer.iterations.numpy())
            dataset_fn = data.pretrain_dataset_fn(
                spec, split=config.split, data_dir=data_dir, image_size=config.image_size,
                augment=config.augment, seed=config.seed, global_batch_size=config.batch_size,
                start_step=start)
            if config.steps_per_execution > 1:
                dataset_fn = _take_steps(dataset_fn, steps)
            dataset = strategy.distribute_datasets_from_function(dataset_fn)
            model.fit(dataset, initial_epoch=initial_epoch, epochs=epochs,
                      steps_per_epoch=steps, callbacks=cbs, verbose=verbose)
            if saver.preempted_at is not None:
                raise Preempted(saver.preempted_at)
        step = int(optimizer.iterations.numpy())
        saver.save(step)

    summary = {"steps": step}
    if knn is not None:
        summary["knn_top1"] = knn(model.query_backbone)
        random_init = backbone_fn(config)("random_init_backbone")
        summary["knn_top1_random_init"] = knn(random_init)
    if chief:
        with open(os.path.join(config.model_dir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
