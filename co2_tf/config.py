"""The typed configuration of a pretraining run, and its checks.

Binaries parse flags into a `TrainConfig`; the library only ever sees the
dataclass. The defaults are the built-in demo (tiny convnet, 32 px built-in
data, a few minutes on a 2-core CPU); flags/*.cfg hold the real recipes.
"""

import dataclasses
import json
import math

from co2_tf import progress
from co2_tf.errors import UserError

AUGMENTS = ("mocov1", "mocov2")
# Where the augmentation's steps after the crop run (co2_tf.data.augment_device).
AUGMENT_PLACEMENTS = ("auto", "host", "device")
# --augment_on=auto on CPUs: the placement measured faster there (BUILD.md, input pipeline).
CPU_PLACEMENT = "host"
SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "lars")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet18_cifar", "tiny")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
# How the KEY encoder's BN sees the batch (backbones.LAYER_BN_MODES is per layer).
BN_MODES = ("shuffle", "sync", "local")
HEADS = ("linear", "mlp")
# The consistency term's variants (co2_tf.method.losses).
CONSISTENCY_OVER = ("negatives", "positive_and_negatives")
CONSISTENCY_KL = ("symmetric", "one_sided")

# What a checkpoint's shapes and layers depend on: a run dir written with
# other values cannot be resumed with these.
ARCHITECTURE_FIELDS = ("backbone", "head", "dim", "queue_size", "bn")
# The fields that take one of a list of values: checked by TrainConfig.check,
# and listed by the tools' --help (absl enum flags).
CHOICES = {"backbone": BACKBONES, "head": HEADS, "bn": BN_MODES, "strategy": STRATEGIES,
           "augment": AUGMENTS, "augment_on": AUGMENT_PLACEMENTS, "schedule": SCHEDULES,
           "optimizer": OPTIMIZERS,
           "precision": PRECISIONS, "consistency_over": CONSISTENCY_OVER,
           "consistency_kl": CONSISTENCY_KL}



def resolve_placement(augment_on, accelerated):
    """"host" or "device" for --augment_on; `accelerated`: the step runs on GPUs or TPUs."""
    if augment_on not in AUGMENT_PLACEMENTS:
        raise UserError(f"unknown --augment_on={augment_on!r}: use one of "
                        f"{', '.join(AUGMENT_PLACEMENTS)}")
    if augment_on != "auto":
        return augment_on
    return "device" if accelerated else CPU_PLACEMENT


@dataclasses.dataclass
class TrainConfig:
    model_dir: str = ""
    # data
    dataset: str = "builtin"
    data_dir: str = ""
    split: str = "train"
    eval_split: str = ""  # "" = the dataset's usual held-out split
    # MoCo v1's recipe (linear head below), as moco's main_moco.py defaults: on the built-in
    # data it beat v2's for MoCo and CO2 alike, and there CO2 beats MoCo (docs/study.md, 2e).
    augment: str = "mocov1"
    augment_on: str = "auto"  # auto: the device on GPUs and TPUs, the host on CPUs (BUILD.md)
    image_size: int = 32
    max_image_pixels: int = 40_000_000  # image files: larger JPEGs decoded smaller, others skipped
    # How sources read (co2_tf.data.sources.ReadOptions has the same fields).
    index_dir: str = ""  # dataset indexes (folder scans, record counts); "" = beside the data
    check_image_files: bool = True  # folder: check each file once, at the first scan
    tfrecord_image_key: str = "image/encoded"
    tfrecord_label_key: str = "image/class/label"
    tfrecord_label_offset: int = 1  # TPU ImageNet records: labels 1..1000
    input_threads: int = 0  # 0 = the usable cores (autotune is off: co2_tf.data.pipelines)
    # model
    backbone: str = "tiny"
    head: str = "linear"
    dim: int = 128
    queue_size: int = 4096
    ema_momentum: float = 0.99
    temperature: float = 0.1
    # alpha = 1 @ tau_con 0.2: of the settings measured (docs/study.md, 3 seeds), the only one
    # never below MoCo beyond the seed spread on the built-in data (2 and 7.5 epochs) and the
    # best on the digits. The former 0.1 @ 0.04 was below MoCo at 7.5 epochs in every seed,
    # and alpha = 1 @ 0.04 collapses (the term's gradient, as large as InfoNCE's, turns
    # against it).
    consistency_temperature: float = 0.2
    consistency_weight: float = 1.0
    consistency_over: str = "negatives"  # the paper's P and Q: the K negatives only
    consistency_kl: str = "symmetric"  # the paper's 1/2 KL(P||Q) + 1/2 KL(Q||P)
    consistency_warmup_epochs: float = 0.0  # alpha ramped up from ~0 over these epochs
    # alpha x (tau_con / tau)^2 (co2_tf.method.losses.consistency_scale); off: the paper's alpha.
    consistency_temperature_scaling: bool = False
    bn: str = "shuffle"
    bn_groups: int = 0  # 0 = 1 group per replica, or 4 on a single replica
    # optimisation
    batch_size: int = 128
    epochs: int = 18
    train_steps: int = 0  # > 0 overrides epochs
    learning_rate: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    # lr 0.06 made the demo unstable (negative similarity spiking, kNN below
    # random init for ~600 steps, collapsed at the end of a cosine decay);
    # 0.03 climbs steadily. Constant beat cosine in the short demo (95% vs 91%).
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    # execution
    strategy: str = "auto"
    tpu: str = ""
    precision: str = "float32"
    jit_compile: bool = False
    conv_filter_grad: str = "auto"
    steps_per_execution: int = 1
    seed: int = 0
    deterministic: bool = False
    # checkpoints and monitoring
    checkpoint_every: int = 200  # steps; also at every epoch end and on SIGTERM
    keep_checkpoints: int = 3
    log_every: int = 10  # steps between TensorBoard scalars
    log_every_secs: float = 60.0  # progress lines off a terminal (co2_tf.progress); 0 = off
    knn_every: int = 6  # epochs between kNN evaluations; 0 = off
    end_of_run_knn: bool = True
    knn_k: int = 200
    knn_temperature: float = 0.1

    def check(self):
        """Static checks (no TF, no files): raises UserError on the first problem."""
        def need(ok, message):
            if not ok:
                raise UserError(message)

        def choice(name, choices):
            value = getattr(self, name)
            need(value in choices, f"unknown --{name}={value!r}: use one of {', '.join(choices)}")

        need(self.model_dir, "--model_dir is required: the directory for checkpoints, "
                             "TensorBoard logs and summary.json")
        for name, choices in CHOICES.items():
            choice(name, choices)
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


HELP = {
    "model_dir": "run directory: checkpoints, TensorBoard logs, config.json, summary.json",
    "dataset": "builtin | tfds:NAME[/CONFIG] | folder:PATH (one subfolder per class) | "
               "tfrecord:GLOB (shards of the training split, e.g. /data/train-*; other splits "
               "replace 'train' in the file name)",
    "data_dir": "TFDS data_dir (local or gs://)",
    "split": "training split",
    "eval_split": "labelled held-out split for kNN ('' = the dataset's usual one)",
    "augment": "two-crop recipe: mocov1 | mocov2",
    "augment_on": "where flip, colour jitter, grayscale and blur run: auto (the device on "
                  "GPUs and TPUs, the host on CPUs) | host (tf.data) | device (in the train "
                  "step; the host decodes, crops and resizes to uint8)",
    "image_size": "side of the square crops",
    "max_image_pixels": "folder datasets: JPEGs with more pixels are decoded at 1/2, 1/4 or "
                        "1/8 scale, other image files are skipped (0 = no limit)",
    "index_dir": "where dataset indexes are kept (a folder's scan, TFRecord record counts), "
                 "reused by every later process; '' = beside the data (set it when the data "
                 "is read-only)",
    "check_image_files": "folder datasets: check each file's end marker at the first scan "
                         "(two reads a file; --nocheck_image_files on object stores: damaged "
                         "files are then handled at decode time)",
    "tfrecord_image_key": "tfrecord datasets: the bytes feature holding the encoded image",
    "tfrecord_label_key": "tfrecord datasets: the int64 feature holding the label",
    "tfrecord_label_offset": "tfrecord datasets: class index = stored label - offset (1 for "
                             "the TPU ImageNet records' labels 1..1000 and make_tfrecords.py)",
    "input_threads": "parallel calls of the input pipeline's maps (0 = the usable cores; "
                     "tf.data autotune stays off)",
    "backbone": "resnet18 | resnet34 | resnet50 | resnet18_cifar | tiny",
    "head": "projection head: linear (MoCo v1) | mlp (MoCo v2)",
    "dim": "projection dimension",
    "queue_size": "K, number of negative keys (a multiple of --batch_size)",
    "ema_momentum": "m, key encoder EMA momentum, in [0, 1)",
    "temperature": "tau of InfoNCE",
    "consistency_temperature": "tau_con of the consistency term",
    "consistency_weight": "alpha, weight of the consistency term (0 = MoCo)",
    "consistency_over": "what P and Q range over: negatives (the K queue keys, the paper's) | "
                        "positive_and_negatives (1 + K, q.k at index 0 in both, lightly's)",
    "consistency_kl": "symmetric (1/2 KL(P||Q) + 1/2 KL(Q||P), the paper's) | one_sided "
                      "(KL(P||Q), P the pseudo label)",
    "consistency_warmup_epochs": "epochs over which alpha ramps up from ~0 (sigmoid-shaped "
                                 "exp(-5(1-t)^2), as in Mean Teacher); 0 = off",
    "consistency_temperature_scaling": "multiply alpha by (tau_con / tau)^2, as knowledge "
                                       "distillation multiplies its KL by T^2: alpha = 1 at "
                                       "tau_con 0.04 then trained without collapse in the "
                                       "demo study (docs/study.md)",
    "bn": "key encoder BN: shuffle (MoCo shuffle-BN) | sync | local",
    "bn_groups": "shuffle-BN groups per replica (0 = 1 per replica, 4 on one replica)",
    "batch_size": "global batch size",
    "epochs": "training epochs",
    "train_steps": "training steps; > 0 overrides --epochs",
    "learning_rate": "base learning rate",
    "momentum": "SGD / LARS momentum",
    "weight_decay": "weight decay (coupled L2 for sgd, as PyTorch)",
    "optimizer": "sgd | lars",
    "schedule": "step (x0.1 at 60% and 80%) | cosine | constant",
    "warmup_epochs": "linear warmup length in epochs",
    "strategy": "auto | one_device | mirrored | multi_worker | tpu",
    "tpu": "TPU name or address (local on a TPU VM); with --strategy=auto selects TPU",
    "precision": "float32 | mixed_bfloat16 | mixed_float16",
    "jit_compile": "XLA-compile the train step (one replica, e.g. one GPU; ignored with one "
                   "warning line on several replicas; TPUs compile every step anyway; on x86 "
                   "CPUs slower than the default oneDNN kernels, see BUILD.md)",
    "steps_per_execution": "train steps per host call (helps small steps on TPU)",
    "seed": "seed of weights, data order, augmentation and queue",
    "deterministic": "enable TF op determinism (bitwise reproducible on CPU)",
    "checkpoint_every": "steps between checkpoints (also at epoch ends and on SIGTERM)",
    "keep_checkpoints": "checkpoints kept",
    "log_every": "steps between TensorBoard scalars",
    "log_every_secs": progress.HELP,
    "knn_every": "epochs between kNN evaluations (0 = off)",
    "end_of_run_knn": "at the end, kNN top-1 of the trained and of a random-init backbone in "
                      "summary.json (on in-memory data, or with --knn_every > 0)",
    "knn_k": "k of the weighted kNN monitor",
    "knn_temperature": "temperature of the weighted kNN monitor",
}


def check_compatible(saved, config):
    """Resuming: the architecture must match the one the checkpoint was made with."""
    diffs = [f"--{name}={getattr(saved, name)!r} there, {getattr(config, name)!r} now"
             for name in ARCHITECTURE_FIELDS if getattr(saved, name) != getattr(config, name)]
    if diffs:
        raise UserError(f"{config.model_dir} holds a checkpoint of another model "
                        f"({'; '.join(diffs)}): use a new --model_dir or the same flags")
