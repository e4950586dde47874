"""Loading what pretraining produced: a run dir, one of its checkpoints, or an exported backbone.

Every evaluation and export tool starts here. A run dir (see `co2_tf.training`)
holds config.json (the run's `TrainConfig`) and checkpoints/ (a
`tf.train.CheckpointManager` of `tf.train.Checkpoint(model=CO2Model,
optimizer=...)`). The model is rebuilt from config.json and restored without
its optimizer, which evaluation does not need. An exported `backbone.keras`
(see `co2_tf.export`) is a plain Keras model; its export.json, when beside
it, supplies the input size and the pretraining dataset.

`EvalConfig` holds what all evaluation tools share (where the representation
comes from, which data to evaluate it on); `load_backbone` and `resolve_data`
turn it into a backbone and a checked dataset description.
"""

import dataclasses
import gc
import json
import os

import keras
import tensorflow as tf

from co2_tf import backbones, data, training
from co2_tf.config import CONFIG_FILE, load_run_config
from co2_tf.errors import UserError

EXPORT_FILE = "export.json"
# The optimizer's step counter in a training checkpoint.
_STEP_KEY = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"


@dataclasses.dataclass
class EvalConfig:
    """What every evaluation tool shares: the representation and the data."""
    # the representation: a run dir (latest checkpoint), a checkpoint, or an export
    model_dir: str = ""
    checkpoint: str = ""
    keras_model: str = ""
    random_init: bool = False
    # the data ("" = what the run was pretrained on)
    dataset: str = ""
    data_dir: str = ""
    split: str = ""
    eval_split: str = ""
    image_size: int = 0
    batch_size: int = 256
    output_dir: str = ""
    seed: int = 0

    def check(self):
        """Static checks (no TF, no files): raises UserError on the first problem."""
        if self.keras_model and (self.model_dir or self.checkpoint):
            raise UserError("pass either --keras_model or --model_dir/--checkpoint, not both")
        if not (self.keras_model or self.model_dir or self.checkpoint):
            raise UserError("nothing to evaluate: pass --model_dir=RUN_DIR (its latest "
                            "checkpoint), --checkpoint=RUN_DIR/checkpoints/ckpt-N or "
                            "--keras_model=EXPORT_DIR/backbone.keras")
        if self.image_size < 0:
            raise UserError(f"--image_size={self.image_size} must be > 0 (0 = the run's)")
        if self.batch_size <= 0:
            raise UserError(f"--batch_size={self.batch_size} must be > 0")
        return self


EVAL_HELP = {
    "model_dir": "pretraining run dir: evaluates its latest checkpoint",
    "checkpoint": "a checkpoint of a run: RUN_DIR/checkpoints/ckpt-N, or ckpt-N with --model_dir",
    "keras_model": "an exported backbone (EXPORT_DIR/backbone.keras) instead of a run",
    "random_init": "evaluate the same architecture with fresh random weights (a baseline)",
    "dataset": "builtin | tfds:NAME[/CONFIG] | folder:PATH ('' = the run's dataset)",
    "data_dir": "TFDS data_dir ('' = the run's)",
    "split": "labelled training split ('' = the run's, else train)",
    "eval_split": "labelled held-out split ('' = the run's, else test / validation)",
    "image_size": "input side in pixels (0 = the run's pretraining size)",
    "batch_size": "batch size",
    "output_dir": "where results go ('' = a subdirectory of the run dir; required with "
                  "--keras_model)",
    "seed": "seed of classifier init, data order and augmentation",
}


@dataclasses.dataclass
class LoadedBackbone:
    """A backbone to evaluate: images in [0, 1] -> pooled features, and where it came from."""
    backbone: keras.Model
    architecture: str
    image_size: int
    source: str  # the checkpoint or .keras file
    step: int | None = None
    run_dir: str | None = None
    run_config: object = None  # the run's TrainConfig
    head: keras.Model | None = None  # the query projection head (runs only)
    random_init: bool = False
    export_info: dict | None = None  # export.json beside a .keras file

    def as_dict(self):
        return {"source": self.source, "step": self.step, "architecture": self.architecture,
                "random_init": self.random_init, "image_size": self.image_size}


# ---------------------------------------------------------------- run dirs
def _run_config(run_dir):
    if not tf.io.gfile.isdir(run_dir):
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
    parent = os.path.dirname(os.path.abspath(checkpoint))
    run_dir = (os.path.dirname(parent)
               if os.path.basename(parent) == training.CHECKPOINT_SUBDIR else parent)
    if not tf.io.gfile.exists(os.path.join(run_dir, CONFIG_FILE)):
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
        checkpoint = os.path.join(model_dir, training.CHECKPOINT_SUBDIR, checkpoint)
    model_dir = run_dir_of(model_dir, checkpoint)
    _run_config(model_dir)
    ckpt_dir = os.path.join(model_dir, training.CHECKPOINT_SUBDIR)
    if not checkpoint:
        checkpoint = tf.train.latest_checkpoint(ckpt_dir)
        if not checkpoint:
            raise UserError(f"{model_dir} has no checkpoint ({ckpt_dir} is empty or missing): "
                            f"pretrain first (tools/train.py --model_dir={model_dir})")
    elif not tf.io.gfile.exists(checkpoint + ".index"):
        state = tf.train.get_checkpoint_state(ckpt_dir)
        names = [os.path.basename(p) for p in (state.all_model_checkpoint_paths if state else [])]
        hint = (f"use one of {', '.join(names)} in {ckpt_dir}" if names
                else f"{ckpt_dir} has none")
        raise UserError(f"checkpoint {checkpoint} not found: {hint}, or omit --checkpoint "
                        "for the latest")
    return model_dir, checkpoint


def checkpoint_step(path):
    """The training step a checkpoint was written at (its optimizer's counter)."""
    reader = tf.train.load_checkpoint(path)
    if reader.has_tensor(_STEP_KEY):
        return int(reader.get_tensor(_STEP_KEY))
    suffix = path.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


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
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


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


def any_size_copy(run_config, backbone):
    """A float32 copy of a run's backbone with local BN that takes any image size.

    Rebuilt rather than reused: the copy depends neither on the training's
    strategy, BN mode or precision nor on its input size, and is named after
    its architecture.
    """
    copy = backbones.build_backbone(run_config.backbone, None, bn="local",
                                    model_name=run_config.backbone)
    copy.set_weights(backbone.get_weights())
    return copy


def float32(config):
    """The run's config computing in float32."""
    return dataclasses.replace(config, precision="float32")


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
    config = _run_config(model_dir)
    # bn_groups only shapes the key encoder's forward pass, not any variable.
    model = training.build_model(float32(config), bn_groups=1)
    if not restore_weights:
        return Run(config, model, model_dir, None, None)
    problem = restore(model, checkpoint)
    if problem:
        del model
        _collect_quietly()
        raise UserError(f"checkpoint {checkpoint} does not fit the model described by "
                        f"{os.path.join(model_dir, CONFIG_FILE)} ({problem}): pass a "
                        "checkpoint of this run")
    return Run(config, model, model_dir, checkpoint, checkpoint_step(checkpoint))


# ----------------------------------------------------------- exported models
def read_export_info(keras_path):
    """export.json beside an exported .keras file, or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(keras_path)), EXPORT_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def load_keras_backbone(path):
    """A backbone saved as .keras (e.g. by tools/export.py); UserError if unusable."""
    if not path.endswith(".keras"):
        raise UserError(f"--keras_model={path} is not a .keras file: pass "
                        "EXPORT_DIR/backbone.keras (tools/export.py writes it)")
    if not tf.io.gfile.exists(path):
        raise UserError(f"--keras_model={path} does not exist: run tools/export.py first")
    try:
        model = keras.models.load_model(path)
    except Exception as e:  # noqa: BLE001 (Keras raises many types for bad files)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {path} ({first}): pass a backbone written by "
                        "tools/export.py") from None
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        raise UserError(f"{path} does not map images to pooled features [N, F]: pass a "
                        "backbone written by tools/export.py")
    return model


# -------------------------------------------------------------- the backbone
def load_backbone(config: EvalConfig):
    """The backbone `config` names, restored (or freshly initialised with random_init)."""
    config.check()
    if config.keras_model:
        model = load_keras_backbone(config.keras_model)
        info = read_export_info(config.keras_model) or {}
        if config.random_init:
            # Same layers and initializer seeds, fresh weights.
            model = keras.models.clone_model(model)
        image_size = (config.image_size or info.get("image_size")
                      or model.inputs[0].shape[1])
        if not image_size:
            raise UserError(f"{config.keras_model} accepts any image size and has no "
                            f"{EXPORT_FILE} beside it: pass --image_size")
        return LoadedBackbone(
            backbone=model, architecture=info.get("backbone", model.name),
            image_size=int(image_size), source=os.path.abspath(config.keras_model),
            step=info.get("step"), random_init=config.random_init, export_info=info)
    run = load_run(config.model_dir, config.checkpoint, restore_weights=not config.random_init)
    backbone = run.model.query_backbone
    if config.random_init:
        # What training's summary calls knn_top1_random_init: the same builder.
        backbone = training.backbone_fn(float32(run.config))("random_init_backbone")
    if config.image_size and config.image_size != run.config.image_size:
        backbone = any_size_copy(run.config, backbone)  # the run's takes its size only
    return LoadedBackbone(
        backbone=backbone, architecture=run.config.backbone,
        image_size=config.image_size or run.config.image_size,
        source=os.path.abspath(run.checkpoint or run.run_dir), step=run.step,
        run_dir=run.run_dir, run_config=run.config, head=run.model.query_head,
        random_init=config.random_init)


# -------------------------------------------------------------------- the data
@dataclasses.dataclass
class EvalData:
    """A checked, labelled dataset to evaluate on."""
    spec: data.DatasetSpec
    data_dir: str | None
    split: str
    eval_split: str
    image_size: int
    class_names: list
    batch_size: int

    @property
    def num_classes(self):
        return len(self.class_names)

    def labelled(self, split, transform="eval", seed=0, indices=None):
        """(images, labels) batches of `split` (see data.labelled_dataset)."""
        return data.labelled_dataset(
            self.spec, split=split, data_dir=self.data_dir, image_size=self.image_size,
            batch_size=self.batch_size, transform=transform, seed=seed, indices=indices)

    def as_dict(self):
        return {"dataset": str(self.spec), "split": self.split, "eval_split": self.eval_split,
                "num_classes": self.num_classes}


def _default_eval_split(spec, data_dir):
    if spec.kind == "builtin":
        return "test"
    if spec.kind == "folder" and "{split}" not in spec.path:
        raise UserError(f"--dataset={spec} has a single folder (no {{split}} in the path): "
                        "use folder:ROOT/{split} with ROOT/train and ROOT/val, or pass "
                        "--eval_split to evaluate on the same images")
    candidates = ("validation", "test") if spec.kind == "tfds" else ("val", "validation", "test")
    for name in candidates:
        try:
            data.validate(spec, data_dir=data_dir, split=name)
            return name
        except UserError:
            continue
    raise UserError(f"--dataset={spec} has no {', '.join(candidates)} split: pass --eval_split")


def pretraining_data(loaded):
    """dataset / data_dir / split / eval_split the representation was pretrained with."""
    if loaded.run_config is not None:
        return {name: getattr(loaded.run_config, name)
                for name in ("dataset", "data_dir", "split", "eval_split")}
    return dict((loaded.export_info or {}).get("pretraining", {}))


def resolve_data(config: EvalConfig, loaded: LoadedBackbone):
    """The labelled train / eval splits to use, checked; UserError without labels.

    Flags left empty inherit the pretraining run's values when the dataset is
    the run's own.
    """
    pretrained = pretraining_data(loaded)
    dataset = config.dataset or pretrained.get("dataset", "")
    if not dataset:
        raise UserError("which dataset? pass --dataset=builtin|tfds:NAME|folder:PATH")
    inherited = pretrained if dataset == pretrained.get("dataset") else {}
    data_dir = config.data_dir or inherited.get("data_dir") or None
    spec = data.parse_dataset_spec(dataset)
    split = config.split or inherited.get("split") or "train"
    data.validate(spec, data_dir=data_dir, split=split)  # first: names an unprepared dataset
    eval_split = (config.eval_split or inherited.get("eval_split")
                  or _default_eval_split(spec, data_dir))
    data.validate(spec, data_dir=data_dir, split=eval_split)
    names = data.class_names(spec, data_dir, split)  # UserError for unlabelled data
    return EvalData(spec=spec, data_dir=data_dir, split=split, eval_split=eval_split,
                    image_size=config.image_size or loaded.image_size, class_names=names,
                    batch_size=config.batch_size)


def output_dir(config: EvalConfig, default_name):
    """config.output_dir, or RUN_DIR/default_name[_random_init] for a run."""
    if config.output_dir:
        return config.output_dir
    if config.keras_model:  # an export is an artifact: results do not go into it
        raise UserError("--output_dir is required with --keras_model: where to write results")
    return os.path.join(run_dir_of(config.model_dir, config.checkpoint),
                        default_name + ("_random_init" if config.random_init else ""))
