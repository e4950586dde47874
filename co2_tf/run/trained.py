"""A pretraining run, rebuilt from its run dir: its config, its CO2Model, its weights.

`load_run` is how evaluation, export and conversion get a trained model: the
file names and the reading of config.json and the checkpoints are
co2_tf.run.rundir's, the building co2_tf.build's.
"""

import dataclasses
import gc

import keras
import tensorflow as tf

from co2_tf import build, io
from co2_tf.errors import UserError, first_line
from co2_tf.run.rundir import (
    CONFIG_FILE,
    checkpoint_step,
    resolve_checkpoint,
    run_config,
    run_dir_of,
)


def restore(model, path):
    """Restores a CO2Model from a training checkpoint, optimizer state ignored.

    Returns None, or what does not fit (one line) if the checkpoint is not of
    this model.
    """
    try:
        status = tf.train.Checkpoint(model=model).restore(path)
        status.expect_partial()  # the optimizer's state is not wanted here
        status.assert_existing_objects_matched()
        return None
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        return first_line(e)


def _collect_quietly():
    """Garbage-collects with TF's warnings off.

    A model that failed to restore holds pending checkpoint values that log
    a warning each when collected: at exit, after the one-line error,
    unless collected here.
    """
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        gc.collect()
    finally:
        logger.setLevel(level)


@dataclasses.dataclass
class Run:
    """A pretraining run, rebuilt: its config, its CO2Model and where the weights came from."""
    config: object  # TrainConfig
    model: keras.Model  # CO2Model
    run_dir: str
    checkpoint: str | None
    step: int | None


def load_run(model_dir="", checkpoint="", *, restore_weights=True):
    """Rebuilds a run's CO2Model from its config.json and restores a checkpoint.

    Builds under the current tf.distribute strategy scope (if any), in
    float32 whatever the run's --precision (the variables are float32
    anyway): evaluation and export compute exactly. With
    restore_weights=False the model keeps its fresh initial weights and no
    checkpoint is needed (model_dir is).
    """
    if restore_weights:
        model_dir, checkpoint = resolve_checkpoint(model_dir, checkpoint)
    model_dir = run_dir_of(model_dir, checkpoint)
    config = run_config(model_dir)
    # bn_groups only shapes the key encoder's forward pass, not any variable.
    model = build.build_model(build.in_float32(config), bn_groups=1)
    if not restore_weights:
        return Run(config, model, model_dir, None, None)
    problem = restore(model, checkpoint)
    if problem:
        del model
        _collect_quietly()
        raise UserError(f"checkpoint {checkpoint} does not fit the model described by "
                        f"{io.join(model_dir, CONFIG_FILE)} ({problem}): pass a "
                        "checkpoint of this run")
    return Run(config, model, model_dir, checkpoint, checkpoint_step(checkpoint))
