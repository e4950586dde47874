"""Pretraining: from a TrainConfig to a trained, checkpointed CO2Model.

`train(config)` is what `tools/train.py` calls. It checks everything it can
before it writes anything, then runs Keras's `fit` with co2_tf's callbacks:

- checkpoints (`tf.train.CheckpointManager`, in DIR/checkpoints): the whole
  model (key encoder, queue and pointer included), the optimizer and the step
  counter (`CO2Model.step_counter`: every step, including those mixed_float16's
  loss scaling skips, which `optimizer.iterations` does not count; it is the
  data position, the checkpoint number and what --train_steps counts), every
  `checkpoint_every` steps, at each
  epoch end, and when SIGTERM or SIGINT (Ctrl-C) arrives (co2_tf.run.preemption);
- resume: rerunning the same command restores the latest checkpoint and goes
  on from its step. The input pipeline of the built-in and folder datasets is
  a pure function of the step, so a resumed run sees exactly the batches an
  uninterrupted one would have seen;
- a non-finite loss stops the run before anything is saved at that step
  (co2_tf.run.nonfinite);
- a collapsed embedding (co2_tf.run.collapse) is reported in one line and in
  summary.json, and training goes on;
- TensorBoard in DIR/logs: per-step scalars, the augmented view pairs at the
  start, kNN accuracy per epoch;
- at the end (`end_of_run_knn`), the kNN top-1 of the trained backbone and of a
  random-init one, in summary.json.

What it builds comes from co2_tf.build, the callbacks from co2_tf.run.callbacks
(the kNN monitor from co2_tf.evaluation.knn_monitor), the run dir's file names
from co2_tf.run.rundir.
"""

import contextlib
import dataclasses
import functools
import os
import signal
import sys

import tensorflow as tf

from co2_tf import distribute, progress
from co2_tf.build import augment_placement, backbone_fn, build_model, build_optimizer, compile_model
from co2_tf.config import TrainConfig, check_compatible
from co2_tf.data import pipelines
from co2_tf.data.sources import make_source
from co2_tf.errors import UserError
from co2_tf.evaluation.knn_monitor import KnnMonitor, knn_evaluator
from co2_tf.run import checkpoints, rundir, runlock
from co2_tf.run.callbacks import (
    CheckpointCallback,
    CollapseMonitor,
    GlobalStepTensorBoard,
    progress_callbacks,
)
from co2_tf.run.checkpoints import SaveFailed
from co2_tf.run.nonfinite import NonFiniteLoss
from co2_tf.run.preemption import Preempted, PreemptionWatcher, any_worker
from co2_tf.run.worker_checkpoints import WorkerCheckpointManager

# What tools/train.py catches (defined with what raises them).
__all__ = ["NonFiniteLoss", "Preempted", "SaveFailed", "train", "epoch_segments",
           "execution_segments"]


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


def write_view_pairs(log_dir, views1, views2, max_pairs=8):
    """An image summary of augmented view pairs: what the model is trained on."""
    pairs = tf.concat([views1[:max_pairs], views2[:max_pairs]], axis=2)  # side by side
    with tf.summary.create_file_writer(os.path.join(log_dir, "train")).as_default():
        tf.summary.image("augmented_view_pairs", pairs, step=0, max_outputs=max_pairs)


def execution_segments(segments, steps_per_execution):
    """fit() calls for --steps_per_execution=k > 1: one epoch (or part) per call.

    Keras runs whole executions of k steps, across epoch ends: a call of
    several epochs whose length is not a multiple of k would drift past its
    epoch boundaries. Each call's dataset is cut to its steps instead (see
    _fit), so its last execution ends early, exactly at the call's end.
    """
    if steps_per_execution == 1:
        return segments
    return [(epoch, epoch + 1, steps) for first, end, steps in segments
            for epoch in range(first, end)]


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
    # Off a terminal, also a line every --log_every_secs (steps, rate, ETA, loss), during the
    # folder scan and the kNN feature extraction too.
    reporter = progress.Reporter.for_stdout(config.log_every_secs)
    source, saved = _check_inputs(config, reporter)
    strategy, bn_groups, chief = _strategy(config, strategy)
    steps_per_epoch, total_steps = _length(config, source)
    if saved is None:  # a new run dir: writable? (before minutes of building)
        rundir.check_writable(config.model_dir)
    pipeline = _pipeline(config, source)
    knn = _knn(config, source, reporter)
    model, optimizer = _model(config, strategy, bn_groups, steps_per_epoch, total_steps)
    checkpoint, restored, recovered = _restore(config, model, optimizer)
    # One run per run dir (co2_tf.run.runlock); for an existing run dir, taking
    # the lock is also the first write, the test that the dir is writable.
    with runlock.RunLock(config.model_dir) if chief else contextlib.nullcontext():
        manager = _checkpoint_manager(config, checkpoint, chief, recovered)
        step = int(model.step_counter.numpy())
        if chief:  # everything is checked: from here on the run dir is written
            _write_run_start(config, source, saved, step, pipeline)
        with PreemptionWatcher() as preemption:
            cbs = _callbacks(config, manager, preemption, strategy, chief, knn, reporter,
                             step if restored else None, total_steps, callbacks)
            step = _fit(config, model, strategy, pipeline, cbs, preemption, verbose,
                        execution_segments(epoch_segments(step, total_steps, steps_per_epoch),
                                           config.steps_per_execution))
        summary = {"steps": step, "collapse": cbs.collapse.report()}
        if config.end_of_run_knn and knn is not None:
            summary.update(_end_of_run_knn(config, knn, cbs.knn, model, step))
        if chief:
            rundir.write_summary(config.model_dir, summary)
        return summary


# ------------------------------------------------------------ train()'s steps
def _check_inputs(config, reporter):
    """(the data source, checked; the run dir's saved config or None, checked against config)."""
    source = make_source(config.dataset, config.data_dir or None, config.max_image_pixels,
                         reporter, options=config)
    source.validate(config.split)
    pipelines.pretraining_data_warnings(source, config.split, config.queue_size)
    saved = rundir.load_run_config(config.model_dir)
    if saved is not None:
        check_compatible(saved, config)
    return source, saved


def _strategy(config, strategy):
    """(the tf.distribute strategy, shuffle-BN groups per replica, whether this is the chief)."""
    strategy = strategy or distribute.make_strategy(config.strategy, config.tpu or None)
    bn_groups = config.check_replicas(strategy.num_replicas_in_sync)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    return strategy, bn_groups, distribute.is_chief(strategy)


def _length(config, source):
    """(steps per epoch, the run's last step)."""
    steps_per_epoch = pipelines.steps_per_epoch(source, split=config.split,
                                                global_batch_size=config.batch_size)
    if steps_per_epoch < 1:
        raise UserError(f"the training split has fewer examples than one batch of "
                        f"{config.batch_size}: lower --batch_size")
    return steps_per_epoch, config.train_steps or config.epochs * steps_per_epoch


def _pipeline(config, source):
    """The run's input pipeline, (start_step=, augment_on=) -> dataset_fn (the index contract:
    the batches are a pure function of the step)."""
    return functools.partial(
        pipelines.pretrain_dataset_fn, source, split=config.split, image_size=config.image_size,
        augment=config.augment, seed=config.seed, global_batch_size=config.batch_size)


def _knn(config, source, reporter):
    """The kNN evaluation of the monitor (--knn_every) and of the run's end, or None.

    The end-of-run kNN costs seconds on in-memory data: there it runs even
    with --knn_every=0 (unless end_of_run_knn is off).
    """
    if config.knn_every or (config.end_of_run_knn and source.in_memory):
        return knn_evaluator(config, source, reporter)
    return None


def _model(config, strategy, bn_groups, steps_per_epoch, total_steps):
    """(the compiled CO2Model, its optimizer), built under the strategy."""
    with strategy.scope():
        model = build_model(config, bn_groups, steps_per_epoch,
                            conv_filter_grad=config.conv_filter_grad)
        optimizer = build_optimizer(config, steps_per_epoch, total_steps)
        compile_model(model, optimizer, config)
    return model, optimizer


def _restore(config, model, optimizer):
    """(the trainer's checkpoint, the path restored or None, the checkpoints the state file
    should list after a recovery or None): see co2_tf.run.checkpoints."""
    checkpoint = checkpoints.training_checkpoint(model, optimizer)
    restored, recovered = checkpoints.restore_newest(
        lambda with_step: checkpoints.training_checkpoint(model, optimizer, with_step),
        rundir.checkpoint_dir(config.model_dir), config.model_dir, model.step_counter,
        optimizer.iterations)
    return checkpoint, restored, recovered


def _checkpoint_manager(config, checkpoint, chief, recovered):
    """The chief's tf.train.CheckpointManager, or a non-chief worker's scratch one.

    Non-chief workers of a multi-worker run must take part in saving (the
    variables are read collectively) but write to a scratch dir on local
    disk; every worker restores the chief's checkpoints (WorkerCheckpointManager).
    """
    ckpt_dir = rundir.checkpoint_dir(config.model_dir)
    if not chief:
        return WorkerCheckpointManager(checkpoint, ckpt_dir)
    if recovered:
        checkpoints.rewrite_state(ckpt_dir, recovered)
    return tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=config.keep_checkpoints)


def _write_run_start(config, source, saved, step, pipeline):
    """A new run dir's config.json and classes.txt; at step 0, the view pairs' picture."""
    if saved is None:
        rundir.write_run_config(config.model_dir, config)
        names = source.class_names(config.split)
        if names:
            rundir.write_class_names(config.model_dir, names)
    if step == 0:  # the views as the host augments them, whatever --augment_on
        views1, views2 = next(iter(pipeline()(tf.distribute.InputContext())))
        write_view_pairs(rundir.log_dir(config.model_dir), views1, views2)


@dataclasses.dataclass
class _Callbacks:
    """What train() passes to fit, and the callbacks it reads afterwards."""
    all: list
    saver: CheckpointCallback
    collapse: CollapseMonitor
    knn: KnnMonitor | None


def _callbacks(config, manager, preemption, strategy, chief, knn, reporter, saved_step,
               total_steps, extra):
    saver = CheckpointCallback(manager, config.checkpoint_every, preemption,
                               any_worker(strategy))
    saver.last_saved_step = saved_step
    collapse = CollapseMonitor(config.queue_size)
    monitor = KnnMonitor(knn, config.knn_every) if knn is not None and config.knn_every else None
    cbs = [saver, collapse] + ([monitor] if monitor is not None else [])
    if chief:
        cbs.append(GlobalStepTensorBoard(rundir.log_dir(config.model_dir),
                                         update_freq=config.log_every, write_graph=False))
    cbs += progress_callbacks(reporter, "train", total_steps) + list(extra)
    return _Callbacks(cbs, saver, collapse, monitor)


def _fit(config, model, strategy, pipeline, cbs, preemption, verbose, segments):
    """Keras's fit over `segments` ((initial_epoch, epochs, steps) each), then the last save;
    returns the step reached. Preempted if a SIGTERM/SIGINT stopped it."""
    augment_on = augment_placement(config, strategy)
    for initial_epoch, epochs, steps in segments:
        dataset_fn = pipeline(start_step=int(model.step_counter.numpy()), augment_on=augment_on)
        if config.steps_per_execution > 1:
            dataset_fn = _take_steps(dataset_fn, steps)
        # shuffle=False: the order is the index contract's (Keras warns on every
        # fit call that it ignores shuffle=True for a tf.data.Dataset).
        model.fit(strategy.distribute_datasets_from_function(dataset_fn),
                  initial_epoch=initial_epoch, epochs=epochs, steps_per_epoch=steps,
                  callbacks=cbs.all, verbose=verbose, shuffle=False)
        if cbs.saver.preempted_at is not None:
            raise Preempted(cbs.saver.preempted_at, preemption.signum or signal.SIGTERM,
                            by_another_worker=preemption.signum is None)
    step = int(model.step_counter.numpy())
    cbs.saver.save(step)
    return step


def _end_of_run_knn(config, knn, monitor, model, step):
    """summary.json's kNN top-1 of the trained backbone and of a random-init one."""
    # The monitor's evaluation at the last epoch end is of these weights.
    last = monitor.last if monitor is not None else None
    trained = last[1] if last and last[0] == step else knn(model.query_backbone)
    return {"knn_top1": trained,
            "knn_top1_random_init": knn(backbone_fn(config)("random_init_backbone"))}
