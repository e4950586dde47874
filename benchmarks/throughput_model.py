"""A throughput model of one training step: arithmetic only, no TF.

For a run's configuration and a target (accelerator kind, replicas, hosts), per step and per
replica: the FLOPs, what crosses replicas by kind (the call sites tests/test_traffic.py
accounts), the bytes each image costs from host to device, and so the host cores each
accelerator needs at the host CPU cost per image. Both follow the run's --augment_on: where
flip, colour jitter, grayscale and blur run decides the dtype the pipeline hands the device
(the key images cross replicas in it) and what the host spends per image. The targets' peak
rates and the utilisation are stated assumptions (docs/accelerators.md), not measurements: no
accelerator was reachable while this was written.

Conventions: a multiply-add is 2 FLOPs; only convolutions, dense layers and the loss's
matmuls are counted (BN, ReLU, pooling, the EMA and the optimizer are elementwise and small
next to them); a layer's backward pass costs twice its forward (input and weight gradients).
"""

import dataclasses

from co2_tf.data import resolve_placement
from co2_tf.errors import UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1}
# What train_step all-reduces for its logs: loss, loss_ins, loss_con, acc, pos_sim, neg_sim.
LOG_SCALARS = 6
# Keras's optimizer.iterations (int64, aggregation "only_first_replica"): its += 1 in replica
# context is a merge call and a broadcast of 8 bytes. Keras's, not ours.
OPTIMIZER_STEP_BYTES = 8
# With loss scaling (mixed_float16), train_step all-reduces one float32 before the optimizer
# so that every replica skips the same steps (co2_tf.precision.agree_on_overflow).
OVERFLOW_FLAG_BYTES = 4

COLLECTIVES = {  # kind -> (operation, what)
    "gradients": ("all-reduce", "float32 gradients of the query encoder"),
    "key images": ("all-gather", "shuffle-BN: the key crops, in the dtype they arrive in"),
    "keys": ("all-gather", "float32 keys of the replica's examples"),
    "BN statistics": ("all-reduce", "replica 0's BN moving statistics, both encoders"),
    "logs": ("all-reduce", "the step's scalar logs"),
    "optimizer step": ("broadcast", "Keras's optimizer.iterations"),
    "overflow flag": ("all-reduce", "mixed_float16: how many replicas' gradients overflowed"),
}


@dataclasses.dataclass(frozen=True)
class Network:
    """Trainable parameters, BN moving statistics and forward multiply-adds per image."""
    params: int
    bn_statistics: int
    macs: int

    def __add__(self, other):
        return Network(self.params + other.params, self.bn_statistics + other.bn_statistics,
                       self.macs + other.macs)


_LAYOUTS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
            "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet18_cifar": ("basic", (2, 2, 2, 2))}
_TINY_WIDTHS = (32, 64, 128, 256)
_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet18_cifar": 512,
             "tiny": 256}


class _Walk:
    """Accumulates the convs (no bias) and BN layers of co2_tf.nets.backbones' layouts."""

    def __init__(self, size):
        self.size, self.channels = size, 3
        self.net = Network(0, 0, 0)

    def conv(self, cout, kernel, stride, size=None, cin=None):
        size = self.size if size is None else size
        out = (size - 1) // stride + 1  # PyTorch padding kernel // 2, as the backbones pad
        weights = kernel * kernel * (cin or self.channels) * cout
        self.net += Network(weights + 2 * cout, 2 * cout, weights * out * out)  # + BN
        return out

    def step(self, cout, kernel, stride):
        self.size = self.conv(cout, kernel, stride)
        self.channels = cout


def backbone(name, image_size):
    """The backbone of co2_tf.nets.backbones `name` at `image_size` px (pooled features, no fc)."""
    if name not in _FEATURES:
        raise UserError(f"unknown backbone {name!r}: use one of {', '.join(_FEATURES)}")
    w = _Walk(image_size)
    if name == "tiny":
        for width in _TINY_WIDTHS:
            w.step(width, 3, 2)
        return w.net
    block, layout = _LAYOUTS[name]
    if name.endswith("_cifar"):
        w.step(64, 3, 1)
    else:
        w.step(64, 7, 2)
        w.size = (w.size - 1) // 2 + 1  # max-pool 3x3 / 2, padding 1
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layout)):
        for i in range(blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            cin, size = w.channels, w.size
            width = planes * 4 if block == "bottleneck" else planes
            if block == "bottleneck":
                w.step(planes, 1, 1)
                w.step(planes, 3, stride)
                w.step(width, 1, 1)
            else:
                w.step(planes, 3, stride)
                w.step(planes, 3, 1)
            if stride != 1 or cin != width:
                w.conv(width, 1, stride, size=size, cin=cin)  # downsample
    return w.net


def head(kind, features, dim):
    """MoCo v1's linear head or v2's MLP (hidden = features), with biases."""
    layers = [(features, dim)] if kind == "linear" else [(features, features), (features, dim)]
    return Network(sum(i * o + o for i, o in layers), 0, sum(i * o for i, o in layers))


def encoder(config):
    """Backbone + projection head of a TrainConfig (one of the two encoders)."""
    return backbone(config.backbone, config.image_size) + head(
        config.head, _FEATURES[config.backbone], config.dim)


def step_flops(encoder_net, per_replica_batch, queue_size, dim):
    """FLOPs of one replica's step, by part: {"query", "key", "loss", "total"}.

    Query encoder forward + backward (3x forward), key encoder forward, and the loss's
    matmuls: q against the queue forward and backward (the queue gets no gradient), p against
    the queue forward (the consistency term's P).
    """
    forward = 2 * encoder_net.macs * per_replica_batch
    parts = {"query": 3 * forward, "key": forward,
             "loss": 3 * 2 * queue_size * dim * per_replica_batch}
    parts["total"] = sum(parts.values())
    return parts


def collective_bytes(*, params, bn_statistics, per_replica_batch, image_size, image_bytes, dim,
                     bn, replicas=2, loss_scaling=False):
    """What one replica hands to each cross-replica call per step, in bytes, by kind.

    The call-site payload (what tests/test_traffic.py measures). `wire_bytes` turns it into
    what a replica receives. Nothing crosses with one replica. `loss_scaling`: the run's
    precision is mixed_float16 (dynamic loss scaling).
    """
    if bn == "sync":
        raise UserError("the throughput model does not cover --bn=sync (SyncBN all-reduces "
                        "every BN layer's moments in every forward): use shuffle or local")
    if replicas == 1:
        return {kind: 0 for kind in COLLECTIVES}
    b = per_replica_batch
    return {
        "gradients": 4 * params,
        "key images": b * image_size * image_size * 3 * image_bytes if bn == "shuffle" else 0,
        "keys": b * dim * 4,
        "BN statistics": 4 * bn_statistics,
        "logs": 4 * LOG_SCALARS,
        "optimizer step": OPTIMIZER_STEP_BYTES,
        "overflow flag": OVERFLOW_FLAG_BYTES if loss_scaling else 0,
    }


def wire_bytes(kind, payload, replicas):
    """Bytes a replica receives for a payload: ring all-reduce 2(N-1)/N x payload,
    all-gather (N-1) x payload, broadcast the payload (replicas other than the first)."""
    op = COLLECTIVES[kind][0]
    n = replicas
    if n == 1:
        return 0
    if op == "all-reduce":
        return 2 * (n - 1) * payload / n
    if op == "all-gather":
        return (n - 1) * payload
    return payload


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator setup. Peak rates are dense tensor-core / MXU FLOP/s per accelerator
    as their makers publish them (stated assumptions, docs/accelerators.md)."""
    description: str
    replicas: int
    hosts: int
    peak_flops: dict  # precision -> FLOP/s per accelerator


TARGETS = {
    "h100": Target("one NVIDIA H100 SXM", 1, 1,
                   {"mixed_bfloat16": 989e12, "mixed_float16": 989e12, "float32": 495e12}),
    "8xa100": Target("8 x NVIDIA A100 SXM on one host", 8, 1,
                     {"mixed_bfloat16": 312e12, "mixed_float16": 312e12, "float32": 156e12}),
    "tpu_v4_32": Target("TPU v4-32: 16 chips (one replica each), 4 hosts", 16, 4,
                        {"mixed_bfloat16": 275e12}),
}
# Model FLOPs utilisation: a round assumption for a convnet step in mixed precision, not a
# measurement (none was possible here); --mfu changes it.
DEFAULT_MFU = 0.25
# What co2_tf.data.pipelines.pretrain_dataset_fn hands the step, by placement: the uint8 crops that
# co2_tf.data.augment_device.ViewTransform finishes on the device, or the host's float32 views.
IMAGE_DTYPES = {"device": "uint8", "host": "float32"}
# docs/performance.md: benchmarks/benchmark.py --input_only's host CPU-ms per source image.
CPU_MS_PER_IMAGE = {"device": 1.91, "host": 5.65}


def placement(augment_on):
    """Where the augmentation after the crop runs on an accelerator (every target is one)."""
    return resolve_placement(augment_on, accelerated=True)


def model(config, target_name, *, image_dtype=None, mfu=DEFAULT_MFU, cpu_ms_per_image=None):
    """The whole model for a TrainConfig on a target: a dict of named figures.

    image_dtype (of the images handed to the device, and so of the key images gathered) and
    cpu_ms_per_image (host CPU-ms per source image, both views) default to the config's
    --augment_on placement's (IMAGE_DTYPES, CPU_MS_PER_IMAGE); given, they override it.
    """
    if target_name not in TARGETS:
        raise UserError(f"unknown --target={target_name!r}: use one of {', '.join(TARGETS)}")
    where = placement(config.augment_on)
    image_dtype = IMAGE_DTYPES[where] if image_dtype is None else image_dtype
    cpu_ms_per_image = CPU_MS_PER_IMAGE[where] if cpu_ms_per_image is None else cpu_ms_per_image
    if image_dtype not in DTYPE_BYTES:
        raise UserError(f"unknown --image_dtype={image_dtype!r}: use one of "
                        f"{', '.join(DTYPE_BYTES)}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu={mfu} must be in (0, 1]")
    if cpu_ms_per_image < 0:
        raise UserError(f"--cpu_ms_per_image={cpu_ms_per_image} must be >= 0")
    target = TARGETS[target_name]
    n = target.replicas
    if config.batch_size % n:
        raise UserError(f"--batch_size={config.batch_size} is not a multiple of the {n} "
                        f"replicas of {target_name}: use a multiple of {n}")
    peak = target.peak_flops.get(config.precision)
    if peak is None:
        raise UserError(f"{target_name} has no stated {config.precision} rate: use "
                        f"--precision={' or '.join(target.peak_flops)}")
    b = config.batch_size // n
    net = encoder(config)
    flops = step_flops(net, b, config.queue_size, config.dim)
    image_bytes = DTYPE_BYTES[image_dtype]
    payload = collective_bytes(
        params=net.params, bn_statistics=2 * net.bn_statistics, per_replica_batch=b,
        image_size=config.image_size, image_bytes=image_bytes, dim=config.dim, bn=config.bn,
        replicas=n, loss_scaling=config.precision == "mixed_float16")
    wire = {k: wire_bytes(k, v, n) for k, v in payload.items()}
    step_seconds = flops["total"] / (peak * mfu)
    images_per_second = b / step_seconds  # per accelerator
    return {
        "target": target_name, "target_description": target.description, "replicas": n,
        "hosts": target.hosts, "global_batch": config.batch_size, "per_replica_batch": b,
        "precision": config.precision, "augment_on": where, "image_dtype": image_dtype,
        "encoder_params": net.params, "bn_statistics": 2 * net.bn_statistics,
        "encoder_forward_macs_per_image": net.macs,
        "flops_per_step_per_replica": flops,
        "collective_payload_bytes_per_step_per_replica": payload,
        "collective_received_bytes_per_step_per_replica": wire,
        "host_to_device_bytes_per_image": 2 * config.image_size ** 2 * 3 * image_bytes,
        "peak_flops_per_accelerator": peak, "mfu": mfu,
        "step_seconds": step_seconds,
        "images_per_second_per_accelerator": images_per_second,
        "interconnect_bytes_per_second_per_replica": sum(wire.values()) / step_seconds,
        "host_to_device_bytes_per_second_per_accelerator":
            images_per_second * 2 * config.image_size ** 2 * 3 * image_bytes,
        "cpu_ms_per_image": cpu_ms_per_image,
        "host_cores_per_accelerator": images_per_second * cpu_ms_per_image / 1000,
        "host_cores_per_host": images_per_second * cpu_ms_per_image / 1000 * n / target.hosts,
    }
