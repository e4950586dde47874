"""What every evaluation tool shares: the representation, the data, where results go.

`EvalConfig` holds the common flags: where the representation comes from (a
run dir's latest checkpoint, a named checkpoint, or an exported
backbone.keras, see co2_tf.run.trained and co2_tf.interop.export) and which labelled data
to evaluate it on, and where it runs (--strategy / --tpu, through the
strategy selection training uses, co2_tf.distribute). `prepare` turns it into
a strategy, a backbone built under its scope and a checked dataset
description; `output_dir` and `write_results` place the results.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from co2_tf import build, distribute, io, progress
from co2_tf.choices import STRATEGIES
from co2_tf.config import TrainConfig, check_choices, flag, help_of
from co2_tf.data import pipelines
from co2_tf.data.sources import make_source
from co2_tf.errors import UserError
from co2_tf.run import rundir, trained

LOG_SUBDIR = "logs"  # TensorBoard, in a tool's output dir


@dataclasses.dataclass
class EvalConfig:
    """What every evaluation tool shares: the representation and the data."""
    # the representation: a run dir (latest checkpoint), a checkpoint, or an export
    model_dir: str = flag("", "pretraining run dir: evaluates its latest checkpoint")
    checkpoint: str = flag("", "a checkpoint of a run: RUN_DIR/checkpoints/ckpt-N, or ckpt-N "
                           "with --model_dir")
    keras_model: str = flag("", "an exported backbone (EXPORT_DIR/backbone.keras) instead of a "
                            "run")
    random_init: bool = flag(False, "evaluate the same architecture with fresh random weights "
                             "(a baseline)")
    # the data ("" = what the run was pretrained on)
    dataset: str = flag("", "builtin | tfds:NAME[/CONFIG] | folder:PATH | tfrecord:GLOB ('' = "
                        "the run's dataset)")
    data_dir: str = flag("", "TFDS data_dir ('' = the run's)")
    split: str = flag("", "labelled training split ('' = the run's, else train)")
    eval_split: str = flag("", "labelled held-out split ('' = the run's, else test / "
                           "validation)")
    image_size: int = flag(0, "input side in pixels (0 = the run's pretraining size)")
    batch_size: int = flag(256, "global batch size (split across the replicas)")
    output_dir: str = flag("", "where results go ('' = a subdirectory of the run dir; required "
                           "with --keras_model)")
    seed: int = flag(0, "seed of classifier init, data order and augmentation")
    # where it runs (as tools/train.py)
    strategy: str = flag("auto", help_of(TrainConfig, "strategy") + " (as tools/train.py; "
                         "evaluation runs on one host)", choices=STRATEGIES)
    tpu: str = flag("", help_of(TrainConfig, "tpu"))
    cpu_devices: int = flag(0, "split the CPU into this many logical devices (e.g. 2 for "
                            "--strategy=mirrored without GPUs); 0 = leave it as one")
    log_every_secs: float = flag(60.0, progress.HELP)

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
        check_choices(self)
        if self.strategy == "multi_worker":
            raise UserError("evaluation runs on one host: use --strategy=mirrored (GPUs), "
                            "tpu or one_device")
        if self.cpu_devices < 0:
            raise UserError(f"--cpu_devices={self.cpu_devices} must be >= 0 (0 = one device)")
        if not (self.log_every_secs >= 0 and math.isfinite(self.log_every_secs)):
            raise UserError(f"--log_every_secs={self.log_every_secs} must be >= 0 (0 = off)")
        return self

    def reporter(self):
        """Progress lines every log_every_secs when stdout is not a terminal."""
        return progress.Reporter.for_stdout(self.log_every_secs)


# ------------------------------------------------------------------ strategy
def make_strategy(config: EvalConfig):
    """The strategy `config` asks for; --batch_size (global) must divide by its replicas.

    Call it first: splitting the CPU and connecting to a TPU precede any
    other use of TF's devices.
    """
    distribute.split_cpu(config.cpu_devices)
    strategy = distribute.make_strategy(config.strategy, config.tpu or None)
    check_replicas(config, strategy)
    return strategy


def check_replicas(config: EvalConfig, strategy):
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise UserError(f"--batch_size={config.batch_size} (global) is not a multiple of the "
                        f"{replicas} replicas: use a multiple of {replicas}")


def prepare(config: EvalConfig, strategy=None):
    """(strategy, LoadedBackbone, EvalData): what every evaluation starts with.

    `strategy` None: the one `config` asks for. The backbone is built under
    its scope, so that its variables live on every replica.
    """
    config.check()
    if strategy is None:
        strategy = make_strategy(config)
    else:
        check_replicas(config, strategy)
    with strategy.scope():
        loaded = load_backbone(config)
    return strategy, loaded, resolve_data(config, loaded)


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


# ----------------------------------------------------------- exported models
def load_keras_backbone(path):
    """A backbone saved as .keras (e.g. by tools/export.py); UserError if unusable."""
    if not path.endswith(".keras"):
        raise UserError(f"--keras_model={path} is not a .keras file: pass "
                        "EXPORT_DIR/backbone.keras (tools/export.py writes it)")
    if not io.exists(path):
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
        info = rundir.read_export_info(config.keras_model) or {}
        if config.random_init:
            # Same layers and initializer seeds, fresh weights.
            model = keras.models.clone_model(model)
        image_size = (config.image_size or info.get("image_size")
                      or model.inputs[0].shape[1])
        if not image_size:
            raise UserError(f"{config.keras_model} accepts any image size and has no "
                            f"{rundir.EXPORT_FILE} beside it: pass --image_size")
        return LoadedBackbone(
            backbone=model, architecture=info.get("backbone", model.name),
            image_size=int(image_size), source=io.absolute(config.keras_model),
            step=info.get("step"), random_init=config.random_init, export_info=info)
    run = trained.load_run(config.model_dir, config.checkpoint,
                           restore_weights=not config.random_init)
    backbone = run.model.query_backbone
    if config.random_init:
        # What training's summary calls knn_top1_random_init: the same builder.
        backbone = build.backbone_fn(build.in_float32(run.config))("random_init_backbone")
    if config.image_size and config.image_size != run.config.image_size:
        backbone = build.any_size_copy(run.config, backbone)  # the run's takes its size only
    return LoadedBackbone(
        backbone=backbone, architecture=run.config.backbone,
        image_size=config.image_size or run.config.image_size,
        source=io.absolute(run.checkpoint or run.run_dir), step=run.step,
        run_dir=run.run_dir, run_config=run.config, head=run.model.query_head,
        random_init=config.random_init)


# -------------------------------------------------------------------- the data
@dataclasses.dataclass
class EvalData:
    """A checked, labelled dataset to evaluate on."""
    source: object  # co2_tf.data.sources.base.Source
    split: str
    eval_split: str
    image_size: int
    class_names: list
    batch_size: int

    @property
    def num_classes(self):
        return len(self.class_names)

    def labelled(self, split, transform="eval", seed=0, indices=None, skip_batches=0):
        """(images, labels) global batches of `split` (see pipelines.labelled_dataset)."""
        return pipelines.labelled_dataset(
            self.source, split=split, image_size=self.image_size,
            batch_size=self.batch_size, transform=transform, seed=seed, indices=indices,
            skip_batches=skip_batches)

    def as_dict(self):
        return {"dataset": str(self.source), "split": self.split, "eval_split": self.eval_split,
                "num_classes": self.num_classes}


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
        raise UserError("which dataset? pass --dataset=builtin|tfds:NAME|folder:PATH|tfrecord:GLOB")
    inherited = pretrained if dataset == pretrained.get("dataset") else {}
    source = make_source(dataset, config.data_dir or inherited.get("data_dir") or None,
                         getattr(loaded.run_config, "max_image_pixels", None), config.reporter(),
                         options=loaded.run_config)
    split = config.split or inherited.get("split") or "train"
    source.validate(split)  # first: names an unprepared dataset
    eval_split = (config.eval_split or inherited.get("eval_split")
                  or source.default_eval_split())
    source.validate(eval_split)
    names = source.class_names(split)  # UserError for unlabelled data
    return EvalData(source=source, split=split, eval_split=eval_split,
                    image_size=config.image_size or loaded.image_size, class_names=names,
                    batch_size=config.batch_size)


def output_dir(config: EvalConfig, default_name):
    """config.output_dir, or RUN_DIR/default_name[_random_init] for a run."""
    if config.output_dir:
        return config.output_dir
    if config.keras_model:  # an export is an artifact: results do not go into it
        raise UserError("--output_dir is required with --keras_model: where to write results")
    return io.join(rundir.run_dir_of(config.model_dir, config.checkpoint),
                        default_name + ("_random_init" if config.random_init else ""))


def batch_size_of(dataset):
    """The size of a batched dataset's batches: static if known, else its first batch's."""
    static = tf.nest.flatten(dataset.element_spec)[0].shape[0]
    if static is not None:
        return int(static)
    for batch in dataset.take(1):
        return int(tf.shape(tf.nest.flatten(batch)[0])[0])
    return 1  # empty


def write_results(output_dir, filename, results):
    """Writes results as JSON (output_dir/filename) and returns its path."""
    path = io.join(output_dir, filename)
    io.write_json_atomic(path, results)
    return path


def save_model(model, path, name):
    """Writes a trained model as .keras, atomically (a temporary name, then a rename).

    Saved as a plain functional copy, uncompiled: built-in layers only, so it
    loads without co2_tf (its optimizer and custom training step stay here).
    """
    io.write_atomic(path, keras.Model(model.inputs, model.outputs, name=name).save)
    return path
