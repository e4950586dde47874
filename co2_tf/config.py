"""The typed configuration of a pretraining run, and its checks.

Binaries parse flags into a `TrainConfig`; the library only ever sees the
dataclass. The defaults are the built-in demo (tiny convnet, 32 px built-in
data, a few minutes on a 2-core CPU); flags/*.cfg hold the real recipes.
"""

import dataclasses
import functools
import json
import math

from co2_tf import progress
from co2_tf.choices import OPTIMIZERS, PRECISIONS, SCHEDULES, STRATEGIES
from co2_tf.data import AUGMENT_PLACEMENTS, AUGMENTS
from co2_tf.errors import UserError
from co2_tf.method import BN_MODES, CONSISTENCY_KL, CONSISTENCY_OVER, HEADS
from co2_tf.nets import BACKBONES, CONV_FILTER_GRADS

# What a checkpoint's shapes and layers depend on: a run dir written with
# other values cannot be resumed with these.
ARCHITECTURE_FIELDS = ("backbone", "head", "dim", "queue_size", "bn")
# The groups of TrainConfig's fields, in the order --helpfull and docs/flags.md list them.
GROUPS = ("data", "model", "CO2", "optimisation", "run")


def flag(default, help, choices=None, group=None):
    """A config field that binaries offer as a flag: its help text, its choices (checked by the
    config's check, listed by --help) and its group (docs/flags.md), all on the field."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if group is not None:
        metadata["group"] = group
    return dataclasses.field(default=default, metadata=metadata)


def help_of(config_cls, name):
    """The help text of a config class's field (for a field that means the same elsewhere)."""
    return config_cls.__dataclass_fields__[name].metadata["help"]


def check_choices(config):
    """UserError unless every field with choices holds one of them."""
    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        value = getattr(config, field.name)
        if choices is not None and value not in choices:
            raise UserError(f"unknown --{field.name}={value!r}: use one of {', '.join(choices)}")


# TrainConfig's fields, by group.
_data = functools.partial(flag, group="data")
_model = functools.partial(flag, group="model")
_co2 = functools.partial(flag, group="CO2")
_optim = functools.partial(flag, group="optimisation")
_run = functools.partial(flag, group="run")


@dataclasses.dataclass
class TrainConfig:
    # Flat (saved run dirs' config.json holds these names); `group` only orders the docs.
    model_dir: str = _run("", "run directory: checkpoints, TensorBoard logs, config.json, "
                              "summary.json")
    dataset: str = _data("builtin", "builtin | tfds:NAME[/CONFIG] | folder:PATH (one subfolder "
                         "per class) | tfrecord:GLOB (shards of the training split, e.g. "
                         "/data/train-*; other splits replace 'train' in the file name)")
    data_dir: str = _data("", "TFDS data_dir (local or gs://)")
    split: str = _data("train", "training split")
    eval_split: str = _data("", "labelled held-out split for kNN ('' = the dataset's usual one)")
    # MoCo v1's recipe (linear head below), as moco's main_moco.py defaults: on the built-in
    # data it beat v2's for MoCo and CO2 alike, and there CO2 beats MoCo (docs/study.md, 2e).
    augment: str = _data("mocov1", "two-crop recipe", choices=AUGMENTS)
    augment_on: str = _data("auto", "where flip, colour jitter, grayscale and blur run: auto "
                            "(the device on GPUs and TPUs, the host on CPUs) | host (tf.data) | "
                            "device (in the train step; the host decodes, crops and resizes to "
                            "uint8)", choices=AUGMENT_PLACEMENTS)
    image_size: int = _data(32, "side of the square crops")
    max_image_pixels: int = _data(40_000_000, "folder datasets: JPEGs with more pixels are "
                                  "decoded at 1/2, 1/4 or 1/8 scale, other image files are "
                                  "skipped (0 = no limit)")
    # How sources read (co2_tf.data.sources.ReadOptions has the same fields).
    index_dir: str = _data("", "where dataset indexes are kept (a folder's scan, TFRecord "
                           "record counts), reused by every later process; '' = beside the "
                           "data (set it when the data is read-only)")
    check_image_files: bool = _data(True, "folder datasets: check each file's end marker at the "
                                    "first scan (two reads a file; --nocheck_image_files on "
                                    "object stores: damaged files are then handled at decode "
                                    "time)")
    tfrecord_image_key: str = _data("image/encoded", "tfrecord datasets: the bytes feature "
                                    "holding the encoded image")
    tfrecord_label_key: str = _data("image/class/label", "tfrecord datasets: the int64 feature "
                                    "holding the label")
    tfrecord_label_offset: int = _data(1, "tfrecord datasets: class index = stored label - "
                                       "offset (1 for the TPU ImageNet records' labels 1..1000 "
                                       "and make_tfrecords.py)")
    input_threads: int = _data(0, "parallel calls of the input pipeline's maps (0 = the usable "
                               "cores; tf.data autotune stays off)")
    backbone: str = _model("tiny", "encoder network", choices=BACKBONES)
    head: str = _model("linear", "projection head: linear (MoCo v1) | mlp (MoCo v2)",
                       choices=HEADS)
    dim: int = _model(128, "projection dimension")
    queue_size: int = _model(4096, "K, number of negative keys (a multiple of --batch_size)")
    ema_momentum: float = _model(0.99, "m, key encoder EMA momentum, in [0, 1)")
    temperature: float = _model(0.1, "tau of InfoNCE")
    # alpha = 1 @ tau_con 0.2: of the settings measured (docs/study.md, 3 seeds), the only one
    # never below MoCo beyond the seed spread on the built-in data and the best on the digits;
    # alpha = 1 @ 0.04 collapses (the term's gradient, as large as InfoNCE's, turns against it).
    consistency_temperature: float = _co2(0.2, "tau_con of the consistency term")
    consistency_weight: float = _co2(1.0, "alpha, weight of the consistency term (0 = MoCo)")
    consistency_over: str = _co2("negatives", "what P and Q range over: negatives (the K queue "
                                 "keys, the paper's) | positive_and_negatives (1 + K, q.k at "
                                 "index 0 in both, lightly's)", choices=CONSISTENCY_OVER)
    consistency_kl: str = _co2("symmetric", "symmetric (1/2 KL(P||Q) + 1/2 KL(Q||P), the "
                               "paper's) | one_sided (KL(P||Q), P the pseudo label)",
                               choices=CONSISTENCY_KL)
    consistency_warmup_epochs: float = _co2(0.0, "epochs over which alpha ramps up from ~0 "
                                            "(sigmoid-shaped exp(-5(1-t)^2), as in Mean "
                                            "Teacher); 0 = off")
    consistency_temperature_scaling: bool = _co2(False, "multiply alpha by (tau_con / tau)^2, "
                                                 "as knowledge distillation multiplies its KL "
                                                 "by T^2: alpha = 1 at tau_con 0.04 then "
                                                 "trained without collapse in the demo study "
                                                 "(docs/study.md)")
    bn: str = _model("shuffle", "key encoder BN: shuffle (MoCo shuffle-BN) | sync | local",
                     choices=BN_MODES)
    bn_groups: int = _model(0, "shuffle-BN groups per replica (0 = 1 per replica, 4 on one "
                            "replica)")
    batch_size: int = _optim(128, "global batch size")
    epochs: int = _optim(18, "training epochs")
    train_steps: int = _optim(0, "training steps; > 0 overrides --epochs")
    # lr 0.06 made the demo unstable (negative similarity spiking, collapsed at the end of a
    # cosine decay); 0.03 climbs steadily, and constant beat cosine in the short demo.
    learning_rate: float = _optim(0.03, "base learning rate")
    momentum: float = _optim(0.9, "SGD / LARS momentum")
    weight_decay: float = _optim(5e-4, "weight decay (coupled L2 for sgd, as PyTorch)")
    optimizer: str = _optim("sgd", "update rule", choices=OPTIMIZERS)
    schedule: str = _optim("constant", "learning rate schedule: step (x0.1 at 60% and 80%) | "
                           "cosine | constant", choices=SCHEDULES)
    warmup_epochs: float = _optim(0.0, "linear warmup length in epochs")
    strategy: str = _run("auto", "tf.distribute strategy (auto: tpu with --tpu, mirrored on "
                         "several GPUs, else one_device)", choices=STRATEGIES)
    tpu: str = _run("", "TPU name or address (local on a TPU VM); with --strategy=auto selects "
                        "TPU")
    precision: str = _run("float32", "Keras dtype policy (mixed_*: float32 weights, "
                         "16-bit compute)", choices=PRECISIONS)
    jit_compile: bool = _run(False, "XLA-compile the train step (one replica, e.g. one GPU; "
                             "ignored with one warning line on several replicas; TPUs compile "
                             "every step anyway; on x86 CPUs slower than the default oneDNN "
                             "kernels, see docs/performance.md)")
    steps_per_execution: int = _run(1, "train steps per host call (helps small steps on TPU)")
    seed: int = _run(0, "seed of weights, data order, augmentation and queue")
    deterministic: bool = _run(False, "enable TF op determinism (bitwise reproducible on CPU)")
    checkpoint_every: int = _run(200, "steps between checkpoints (also at epoch ends and on "
                                      "SIGTERM)")
    keep_checkpoints: int = _run(3, "checkpoints kept")
    log_every: int = _run(10, "steps between TensorBoard scalars")
    log_every_secs: float = _run(60.0, progress.HELP)
    knn_every: int = _run(6, "epochs between kNN evaluations (0 = off)")
    knn_k: int = _run(200, "k of the weighted kNN monitor")
    knn_temperature: float = _run(0.1, "temperature of the weighted kNN monitor")
    end_of_run_knn: bool = _run(True, "kNN top-1 of the trained and the randomly initialised "
                                "backbone at the end of training, as the demo prints (with "
                                "--knn_every > 0, or on in-memory data such as builtin)")
    conv_filter_grad: str = _run("auto", "the CPU kernel for conv filter gradients in training: "
                                 "auto = the matmul one where it pays off on this CPU, tf = "
                                 "TF's kernel, matmul = always the matmul one",
                                 choices=CONV_FILTER_GRADS)

    def check(self):
        """Static checks (no TF, no files): raises UserError on the first problem."""
        def need(ok, message):
            if not ok:
                raise UserError(message)

        need(self.model_dir, "--model_dir is required: the directory for checkpoints, "
                             "TensorBoard logs and summary.json")
        check_choices(self)
        for name in ("image_size", "batch_size", "dim", "queue_size", "steps_per_execution",
                     "checkpoint_every", "keep_checkpoints", "log_every", "knn_k"):
            value = getattr(self, name)
            need(value > 0, f"--{name}={value} must be > 0")
        for name in ("temperature", "consistency_temperature", "learning_rate",
                     "knn_temperature"):
            value = getattr(self, name)
            need(value > 0 and math.isfinite(value), f"--{name}={value} must be > 0")
        need(self.consistency_weight >= 0 and math.isfinite(self.consistency_weight),
             f"--consistency_weight={self.consistency_weight} must be >= 0 (0 is plain MoCo)")
        need(0 <= self.ema_momentum < 1,
             f"--ema_momentum={self.ema_momentum} must be in [0, 1) (MoCo uses 0.999)")
        need(self.momentum >= 0 and self.weight_decay >= 0,
             "--momentum and --weight_decay must be >= 0")
        need(self.max_image_pixels >= 0,
             f"--max_image_pixels={self.max_image_pixels} must be >= 0 (0 = no limit)")
        need(self.input_threads >= 0,
             f"--input_threads={self.input_threads} must be >= 0 (0 = the usable cores)")
        need(self.tfrecord_image_key and self.tfrecord_label_key,
             "--tfrecord_image_key and --tfrecord_label_key must name features")
        need(self.bn_groups >= 0, f"--bn_groups={self.bn_groups} must be >= 0 (0 = automatic)")
        need(self.train_steps > 0 or self.epochs > 0,
             "set --epochs or --train_steps to a positive number")
        need(self.train_steps >= 0 and self.epochs >= 0 and self.warmup_epochs >= 0,
             "--epochs, --train_steps and --warmup_epochs must be >= 0")
        need(self.consistency_warmup_epochs >= 0
             and math.isfinite(self.consistency_warmup_epochs),
             f"--consistency_warmup_epochs={self.consistency_warmup_epochs} must be >= 0 "
             "(0 = the full alpha from the first step)")
        need(self.queue_size % self.batch_size == 0,
             f"--queue_size={self.queue_size} is not a multiple of --batch_size="
             f"{self.batch_size}: the queue takes whole global batches; use e.g. --queue_size="
             f"{max(1, round(self.queue_size / self.batch_size)) * self.batch_size}")
        need(self.knn_every >= 0, "--knn_every must be >= 0")
        need(self.log_every_secs >= 0 and math.isfinite(self.log_every_secs),
             f"--log_every_secs={self.log_every_secs} must be >= 0 (0 = no progress lines)")
        return self

    def check_replicas(self, num_replicas):
        """Checks that depend on the strategy; returns the BN groups per replica."""
        if self.batch_size % num_replicas:
            raise UserError(f"--batch_size={self.batch_size} (global) is not a multiple of the "
                            f"{num_replicas} replicas: use a multiple of {num_replicas}")
        per_replica = self.batch_size // num_replicas
        groups = self.bn_groups or (1 if num_replicas > 1 else 4)
        if self.bn == "shuffle" and per_replica % groups:
            raise UserError(f"--bn_groups={groups} does not divide the per-replica batch "
                            f"{per_replica}: choose a divisor of it")
        return groups

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def check_compatible(saved, config):
    """Resuming: the architecture must match the one the checkpoint was made with."""
    diffs = [f"--{name}={getattr(saved, name)!r} there, {getattr(config, name)!r} now"
             for name in ARCHITECTURE_FIELDS if getattr(saved, name) != getattr(config, name)]
    if diffs:
        raise UserError(f"{config.model_dir} holds a checkpoint of another model "
                        f"({'; '.join(diffs)}): use a new --model_dir or the same flags")
