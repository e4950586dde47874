"""Weights in and out of PyTorch: torchvision ResNets and MoCo checkpoints <-> run dirs.

The name mapping and .pth I/O are in co2_tf.interop.torch_weights.

Into co2_tf (`import_checkpoint`): a MoCo v1/v2 checkpoint (`main_moco.py`'s
{'state_dict': ..., 'epoch', 'arch', ...}) or a plain torchvision ResNet
state_dict becomes a run dir: config.json, train.cfg (the same config as
flags for tools/train.py) and checkpoints/ckpt-0, written as training writes
them (`tf.train.Checkpoint(model=CO2Model, optimizer=...)` through a
`tf.train.CheckpointManager`). Step 0 on purpose: the converted weights,
heads and queue start a new run (fresh optimizer state, the learning-rate
schedule from its start): MoCo's optimizer state is not converted and its
epoch counts another dataset and batch size. MoCo's epoch and arch are kept
in convert.json. `tools/train.py --flagfile=RUN/train.cfg --model_dir=RUN`
continues training from them with the queue intact.

Out of co2_tf (`export_checkpoint`): a run's checkpoint becomes a torchvision
state_dict (the query backbone: torchvision's keys minus `fc.*`) or MoCo's
layout ({'state_dict': {'module.encoder_q.*', 'module.encoder_k.*',
'module.queue', 'module.queue_ptr'}, 'arch': ...}), which MoCo's
main_lincls.py --pretrained and detectron2's MoCo converter read.
"""

import collections
import dataclasses
import math

import keras
import tensorflow as tf

from co2_tf import io
from co2_tf.build import build_model, build_optimizer, compile_model
from co2_tf.config import TrainConfig, flag
from co2_tf.errors import UserError
from co2_tf.interop.torch_weights import (  # noqa: F401 (re-exported: the tool and tests use them)
    HEAD_MODULES,
    TORCH_REQUIREMENTS,
    assign_parameters,
    backbone_parameters,
    backbone_state,
    check_keys,
    expected_shapes,
    export_parameters,
    from_torch,
    head_parameters,
    import_torch,
    load_backbone_state,
    queue_from_moco,
    queue_to_moco,
    read_torch_file,
    state_dict_of,
    to_torch,
    write_torch_file,
)
from co2_tf.run import rundir, trained

LAYOUTS = ("torchvision", "moco")
# What convert writes beside config.json.
TRAIN_FLAGS_FILE = "train.cfg"
PROVENANCE_FILE = "convert.json"
# The ResNets that have a torchvision / MoCo counterpart (tiny is co2_tf's own).
CONVERTIBLE = ("resnet18", "resnet34", "resnet50", "resnet18_cifar")
# (block type, blocks per stage, conv1 kernel side) -> backbone.
_SIGNATURES = {
    ("basic", (2, 2, 2, 2), 7): "resnet18",
    ("basic", (3, 4, 6, 3), 7): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 7): "resnet50",
    ("basic", (2, 2, 2, 2), 3): "resnet18_cifar",
}
# MoCo's published recipes (facebookresearch/moco), for config.json / train.cfg.
_MOCO_COMMON = dict(ema_momentum=0.999, batch_size=256, epochs=200, learning_rate=0.03,
                    momentum=0.9, weight_decay=1e-4, optimizer="sgd", bn="shuffle")
_MOCO_VERSIONS = {
    "linear": dict(augment="mocov1", temperature=0.07, schedule="step"),  # v1
    "mlp": dict(augment="mocov2", temperature=0.2, schedule="cosine"),  # v2
}


# ------------------------------------------------------------- what a file holds
@dataclasses.dataclass
class TorchCheckpoint:
    """What a .pth holds, as far as converting it goes."""
    file_format: str  # "moco" or "torchvision"
    backbone: str
    state: dict  # numpy, the file's keys
    root: str = ""  # "module." when saved from DataParallel / DistributedDataParallel
    head: str | None = None  # moco: "linear" (v1) or "mlp" (v2)
    dim: int | None = None
    queue_size: int | None = None
    epoch: int | None = None
    arch: str | None = None


def infer_backbone(state, prefix=""):
    """The ResNet a torchvision-layout state_dict is of (by its shapes), or None."""
    conv1 = state.get(prefix + "conv1.weight")
    if conv1 is None or len(conv1.shape) != 4:
        return None
    block = "bottleneck" if prefix + "layer1.0.conv3.weight" in state else "basic"
    blocks = []
    for stage in range(1, 5):
        head = f"{prefix}layer{stage}."
        ids = {key[len(head):].split(".")[0] for key in state if key.startswith(head)}
        blocks.append(len(ids))
    return _SIGNATURES.get((block, tuple(blocks), conv1.shape[-1]))


def _resolve_backbone(state, prefix, flag, source):
    inferred = infer_backbone(state, prefix)
    if flag:
        if flag not in CONVERTIBLE:
            raise UserError(f"--backbone={flag} has no PyTorch counterpart: use one of "
                            f"{', '.join(CONVERTIBLE)}")
        if inferred and inferred != flag:
            raise UserError(f"{source} holds a {inferred}, not a {flag}: drop --backbone or "
                            f"pass --backbone={inferred}")
        return flag
    if not inferred:
        raise UserError(f"cannot tell the architecture of {source} from its tensors: pass "
                        f"--backbone (one of {', '.join(CONVERTIBLE)})")
    return inferred


def describe(obj, source, backbone=""):
    """A TorchCheckpoint from what torch.load returned."""
    state = state_dict_of(obj, source)
    root = "module." if all(k.startswith("module.") for k in state) else ""
    meta = obj if isinstance(obj, dict) and "state_dict" in obj else {}
    # Kept for the record (convert.json) when they are plain values.
    epoch = meta.get("epoch") if isinstance(meta.get("epoch"), int) else None
    arch = meta.get("arch") if isinstance(meta.get("arch"), str) else None
    if not any(k.startswith(root + "encoder_q.") for k in state):
        return TorchCheckpoint("torchvision", _resolve_backbone(state, root, backbone, source),
                               state, root=root, epoch=epoch, arch=arch)
    q = root + "encoder_q."
    name = _resolve_backbone(state, q, backbone, source)
    if q + "fc.0.weight" in state:
        head, projection = "mlp", q + "fc.2.weight"
    elif q + "fc.weight" in state:
        head, projection = "linear", q + "fc.weight"
    else:
        raise UserError(f"{source} has no projection head: expected {q}fc.weight (MoCo v1) or "
                        f"{q}fc.0.weight and {q}fc.2.weight (MoCo v2)")
    if projection not in state:
        raise UserError(f"{source} has no tensor {projection}: MoCo v2's head is fc.0 and fc.2")
    if root + "queue" not in state:
        raise UserError(f"{source} has no tensor {root}queue: pass a checkpoint saved by "
                        "MoCo's main_moco.py")
    queue = state[root + "queue"]
    dim = int(state[projection].shape[0])
    if len(queue.shape) != 2 or queue.shape[0] != dim:
        raise UserError(f"{source}: tensor {root}queue has shape {list(queue.shape)}, expected "
                        f"[{dim}, K] (the projection dimension {dim} by the queue size)")
    return TorchCheckpoint("moco", name, state, root=root, head=head, dim=dim,
                           queue_size=int(queue.shape[1]), epoch=epoch, arch=arch)


# ------------------------------------------------------------------ run dirs
def _moco_expected(model, head, root):
    """(params, expected shapes) of a whole CO2Model in MoCo's layout."""
    params = collections.OrderedDict()
    for encoder, backbone, proj in (("encoder_q", model.query_backbone, model.query_head),
                                    ("encoder_k", model.key_backbone, model.key_head)):
        for key, value in backbone_parameters(backbone).items():
            params[f"{root}{encoder}.{key}"] = value
        for key, value in head_parameters(proj, head).items():
            params[f"{root}{encoder}.{key}"] = value
    expected = expected_shapes(params)
    expected[root + "queue"] = (model.dim, model.queue_size)
    expected[root + "queue_ptr"] = (1,)
    return params, expected


def moco_state(model, head):
    """A CO2Model as MoCo's `state_dict` (numpy): queue and pointer, encoders, heads.

    In MoCo's order: torch lists a module's own buffers (MoCo's queue, queue_ptr)
    before its submodules' tensors (encoder_q, encoder_k).
    """
    params, _ = _moco_expected(model, head, "module.")
    queue, ptr = queue_to_moco(keras.ops.convert_to_numpy(model.queue),
                               int(keras.ops.convert_to_numpy(model.queue_ptr)))
    state = collections.OrderedDict([("module.queue", queue), ("module.queue_ptr", ptr)])
    state.update(export_parameters(params))
    return state


def load_moco_state(model, ckpt, source):
    """Loads a MoCo checkpoint's encoders, heads, queue and pointer into a CO2Model."""
    params, expected = _moco_expected(model, ckpt.head, ckpt.root)
    check_keys(ckpt.state, expected, source)
    assign_parameters(params, ckpt.state)
    queue, ptr = queue_from_moco(ckpt.state[ckpt.root + "queue"],
                                 ckpt.state[ckpt.root + "queue_ptr"])
    model.queue.assign(queue)
    model.queue_ptr.assign(ptr)


def _classifier(ckpt):
    # torchvision's ImageNet classifier is not a projection head: dropped.
    return [ckpt.root + k for k in ("fc.weight", "fc.bias") if ckpt.root + k in ckpt.state]


def load_torchvision_state(model, ckpt, source):
    """A torchvision backbone into both encoders; heads and queue stay freshly initialised."""
    load_backbone_state(model.query_backbone, ckpt.state, source, prefix=ckpt.root,
                        ignored=_classifier(ckpt))
    # The key encoder starts as a copy of the query encoder, as MoCo's does
    # (BN statistics included); so does its head.
    model.key_backbone.set_weights(model.query_backbone.get_weights())
    model.key_head.set_weights(model.query_head.get_weights())


@dataclasses.dataclass
class ConvertConfig:
    """tools/convert.py: a .pth into a run dir, or a run dir out to a .pth."""
    # in: --torch_checkpoint=FILE --model_dir=NEW_RUN_DIR
    torch_checkpoint: str = flag("", "a MoCo v1/v2 checkpoint or a torchvision ResNet state_dict "
                                     "(.pth, .pth.tar) to convert into a new run dir --model_dir")
    model_dir: str = flag("", "the run dir to write (with --torch_checkpoint) or to read (with "
                              "--torch_out)")
    backbone: str = flag("", "architecture of --torch_checkpoint when its tensors do not tell: "
                             + " | ".join(CONVERTIBLE))
    head: str = flag("", "projection head for a torchvision state_dict: linear | mlp (default mlp; "
                         "MoCo files have their own)")
    dim: int = flag(0, "projection dimension for a torchvision state_dict (default 128)")
    queue_size: int = flag(0, "queue size K for a torchvision state_dict (default 65536)")
    image_size: int = flag(0, "the run's image size (default 224, 32 for resnet18_cifar)")
    dataset: str = flag("", "the run's dataset (default tfds:imagenet2012, tfds:cifar10 for "
                            "resnet18_cifar)")
    seed: int = flag(0, "seed of the fresh head and queue of a torchvision state_dict")
    # out: --model_dir=RUN_DIR --torch_out=FILE
    checkpoint: str = flag("", "with --torch_out: this checkpoint (ckpt-N or a path) instead of the"
                               " latest")
    torch_out: str = flag("", "write the run's weights to this .pth")
    torch_layout: str = flag("torchvision", "torchvision (query backbone, torchvision's keys "
                             "minus fc) | moco (MoCo's main_moco.py layout: both encoders, heads, "
                             "queue)", choices=LAYOUTS)

    @property
    def into_co2_tf(self):
        return bool(self.torch_checkpoint)

    def check(self):
        if bool(self.torch_checkpoint) == bool(self.torch_out):
            raise UserError("pass --torch_checkpoint=FILE.pth (into a new --model_dir) or "
                            "--torch_out=FILE.pth (out of --model_dir), exactly one of them")
        if not self.model_dir and not (self.torch_out and self.checkpoint):
            raise UserError("--model_dir is required: the run dir to write (with "
                            "--torch_checkpoint) or to read (with --torch_out)")
        if self.into_co2_tf:
            if self.checkpoint:
                raise UserError("--checkpoint names a checkpoint to export: use it with "
                                "--torch_out")
            if self.head and self.head not in HEAD_MODULES:
                raise UserError(f"unknown --head={self.head!r}: use linear or mlp")
            for name in ("dim", "queue_size", "image_size"):
                if getattr(self, name) < 0:
                    raise UserError(f"--{name}={getattr(self, name)} must be > 0 (0 = default)")
        else:
            if self.torch_layout not in LAYOUTS:
                raise UserError(f"unknown --torch_layout={self.torch_layout!r}: use one of "
                                f"{', '.join(LAYOUTS)}")
            for name in ("backbone", "head", "dim", "queue_size", "image_size", "dataset"):
                if getattr(self, name):
                    raise UserError(f"--{name} describes a --torch_checkpoint to convert; "
                                    "with --torch_out the run dir says it")
        return self


def _train_config(config, ckpt):
    """The TrainConfig of the converted run: MoCo's recipe and the file's architecture."""
    cifar = ckpt.backbone.endswith("_cifar")
    if ckpt.file_format == "moco":
        for name, theirs in (("head", ckpt.head), ("dim", ckpt.dim),
                             ("queue_size", ckpt.queue_size)):
            ours = getattr(config, name)
            if ours and ours != theirs:
                raise UserError(f"--{name}={ours} but {config.torch_checkpoint} has {theirs}: "
                                f"drop --{name}")
        head, dim, queue_size = ckpt.head, ckpt.dim, ckpt.queue_size
    else:
        head, dim, queue_size = config.head or "mlp", config.dim or 128, config.queue_size or 65536
    values = dict(_MOCO_COMMON, **_MOCO_VERSIONS[head])
    values.update(
        model_dir=io.absolute(config.model_dir), backbone=ckpt.backbone, head=head, dim=dim,
        queue_size=queue_size, image_size=config.image_size or (32 if cifar else 224),
        dataset=config.dataset or ("tfds:cifar10" if cifar else "tfds:imagenet2012"),
        split="train", eval_split="", seed=config.seed,
        knn_every=0)
    # The queue takes whole batches: MoCo's 256, or the largest divisor of K below it.
    values["batch_size"] = math.gcd(queue_size, values["batch_size"])
    return TrainConfig(**values).check()


def train_flags(train_config):
    """The config as a tools/train.py flagfile (--model_dir left to the command line)."""
    lines = ["# tools/train.py flags of this converted run:",
             f"#   python tools/train.py --flagfile={TRAIN_FLAGS_FILE} --model_dir=THIS_DIR"]
    for name, value in dataclasses.asdict(train_config).items():
        if name != "model_dir":
            lines.append(f"--{name}={str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


def _check_new_run_dir(model_dir):
    if io.exists(model_dir) and (not io.isdir(model_dir) or io.listdir(model_dir)):
        raise UserError(f"--model_dir={model_dir} exists and is not empty: converting writes a "
                        "new run dir, pass another --model_dir")


def import_checkpoint(config: ConvertConfig):
    """--torch_checkpoint into a new run dir; returns convert.json's dict."""
    config.check()
    model_dir = io.absolute(config.model_dir)
    _check_new_run_dir(model_dir)
    source = config.torch_checkpoint
    ckpt = describe(read_torch_file(source), source, config.backbone)
    train_config = _train_config(config, ckpt)

    # Built as training builds it, so that tools/train.py restores it.
    model = build_model(train_config, bn_groups=1)
    optimizer = build_optimizer(train_config, steps_per_epoch=1,
                                total_steps=max(1, train_config.epochs))
    compile_model(model, optimizer, train_config)
    if ckpt.file_format == "moco":
        load_moco_state(model, ckpt, source)
    else:
        load_torchvision_state(model, ckpt, source)

    # Everything is checked: from here on the run dir is written.
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=optimizer),
        rundir.checkpoint_dir(model_dir), max_to_keep=train_config.keep_checkpoints)
    path = manager.save(checkpoint_number=0)
    info = {
        "source": io.absolute(source), "format": ckpt.file_format,
        "moco_version": {"linear": 1, "mlp": 2}.get(ckpt.head), "backbone": ckpt.backbone,
        "head": train_config.head, "dim": train_config.dim,
        "queue_size": train_config.queue_size, "epoch": ckpt.epoch, "arch": ckpt.arch,
        "checkpoint": path, "step": 0,
        "fresh": [] if ckpt.file_format == "moco" else ["query_head", "key_head", "queue"],
        "dropped": [] if ckpt.file_format == "moco" else _classifier(ckpt),
    }
    io.write_text_atomic(io.join(model_dir, TRAIN_FLAGS_FILE), train_flags(train_config))
    io.write_json_atomic(io.join(model_dir, PROVENANCE_FILE), info)
    # Last: a run dir is one once config.json is there.
    rundir.write_run_config(model_dir, train_config)
    return info


def export_checkpoint(config: ConvertConfig):
    """A run's checkpoint out to --torch_out; returns what was written (a summary dict)."""
    config.check()
    import_torch()  # before the model is loaded: fail fast without torch
    run = trained.load_run(config.model_dir, config.checkpoint)
    name = run.config.backbone
    if name not in CONVERTIBLE:
        raise UserError(f"{run.run_dir} is a {name} run, which has no PyTorch counterpart: "
                        f"convert a run of {', '.join(CONVERTIBLE)}")
    if config.torch_layout == "torchvision":
        state = backbone_state(run.model.query_backbone)
        obj = state
    else:
        state = moco_state(run.model, run.config.head)
        obj = {"state_dict": state, "arch": name, "step": run.step}
    write_torch_file(config.torch_out, obj)
    return {"backbone": name, "layout": config.torch_layout, "tensors": len(state),
            "checkpoint": run.checkpoint, "step": run.step, "torch_out": config.torch_out}


def convert(config: ConvertConfig):
    """tools/convert.py: whichever direction the config names."""
    config.check()
    return import_checkpoint(config) if config.into_co2_tf else export_checkpoint(config)
