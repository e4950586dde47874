"""co2_tf's train step written in PyTorch, timed: the reference benchmarks/compare_torch.py runs.

  pip install -r requirements-torch.txt
  python benchmarks/torch_step.py --backbone=resnet18_cifar --image_size=32 --batch_size=256 \\
      --queue_size=4096

The same step as CO2Model.train_step, as a PyTorch user would write it (MoCo's
builder.py plus CO2's loss): a torchvision-layout ResNet (written here,
torchvision is not needed) with the ImageNet input normalisation inside;
linear or MLP head; keys from an EMA key encoder with shuffle-BN (one
permutation, the key batch encoded in --bn_groups groups, 4 on one device,
as co2_tf); InfoNCE against a queue of K keys plus alpha times CO2's
symmetric KL over the K negatives at tau_con; torch.optim.SGD with momentum
and coupled weight decay; the EMA after the update, then the enqueue (co2_tf's
order). Compiled with torch.compile, channels_last, float32, in memory.
Prints one JSON line: images_per_sec (median of --repeats timed steps), loss
of the first step, and what ran.
"""

import dataclasses
import json
import os
import statistics
import sys
import time

# tools/common.py, the runner every binary shares, also puts the checkout on sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import common  # noqa: E402  (first: it sets TF's environment before TF is imported)

# isort: split
import benchmark_lib
import numpy as np

from co2_tf.config import TrainConfig, flag
from co2_tf.errors import UserError

MISSING_TORCH = ("PyTorch is not installed: pip install -r requirements-torch.txt "
                 "(only this comparison needs it)")
try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError:
    if __name__ == "__main__":
        common.fail(MISSING_TORCH)
    raise UserError(MISSING_TORCH) from None  # compare_torch.py prints it in one line

BACKBONES = ("resnet18_cifar", "tiny")  # the backbones written here


@dataclasses.dataclass
class TorchConfig:
    warmup: int = flag(2, "untimed steps before timing (the first compiles)")
    repeats: int = flag(7, "timed steps (the median is reported)")
    torch_compile: bool = flag(True, "torch.compile the key forward and the query forward + loss")
    channels_last: bool = flag(True, "NHWC memory layout (faster for convs on CPU)")
    torch_threads: int = flag(0, "torch.set_num_threads (0 = PyTorch's default)")

    def check(self):
        if self.warmup < 0 or self.repeats <= 0 or self.torch_threads < 0:
            raise UserError("--warmup and --torch_threads must be >= 0, --repeats > 0")
        return self


def check_supported(config):
    """The part of TrainConfig this step implements; UserError for the rest."""
    def need(ok, message):
        if not ok:
            raise UserError(message)
    need(config.backbone in BACKBONES,
         f"--backbone={config.backbone} has no PyTorch version here: use one of "
         f"{', '.join(BACKBONES)}")
    need(config.precision == "float32", "the PyTorch step runs --precision=float32 only")
    need(config.optimizer == "sgd", "the PyTorch step runs --optimizer=sgd only")
    need(config.strategy in ("auto", "one_device"),
         "the PyTorch step runs on one device: use --strategy=one_device")
    return config


# ------------------------------------------------------------------- the model
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


def _conv(cin, cout, kernel, stride):
    conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (same attribute order, so weights map in order)."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), _bn(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, 1), _bn(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(_conv(cin, planes, 1, stride), _bn(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Backbone(nn.Module):
    """Images in [0, 1] -> pooled features, as co2_tf.nets.backbones builds them."""

    def __init__(self, name):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        if name == "tiny":
            layers, cin = [], 3
            for width in (32, 64, 128, 256):
                layers += [_conv(cin, width, 3, 2), _bn(width), nn.ReLU()]
                cin = width
        else:  # resnet18_cifar: 3x3/1 stem, no max-pool, torchvision's layer1-4
            layers, cin = [_conv(3, 64, 3, 1), _bn(64), nn.ReLU()], 64
            for stage, planes in enumerate((64, 128, 256, 512)):
                for i in range(2):
                    layers.append(BasicBlock(cin, planes, 2 if stage > 0 and i == 0 else 1))
                    cin = planes
        self.body = nn.Sequential(*layers)
        self.feature_dim = cin

    def forward(self, x):
        return self.body((x - self.mean) / self.std).mean(dim=(2, 3))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.backbone = Backbone(config.backbone)
        f = self.backbone.feature_dim
        if config.head == "mlp":
            self.head = nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, config.dim))
        else:
            self.head = nn.Linear(f, config.dim)

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)), dim=-1)


def co2_loss(q, k, queue, temperature, consistency_temperature, consistency_weight):
    """Per-example (loss, l_ins, l_con), as co2_tf.method.objective.CO2Objective."""
    positive = (q * k).sum(-1)
    q_neg, k_neg = q @ queue.t(), k @ queue.t()
    logits = torch.cat([positive[:, None], q_neg], dim=1) / temperature
    l_ins = -F.log_softmax(logits, dim=1)[:, 0]
    log_q = F.log_softmax(q_neg / consistency_temperature, dim=1)
    log_p = F.log_softmax(k_neg / consistency_temperature, dim=1)
    l_con = 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)
    return l_ins + consistency_weight * l_con, l_ins, l_con


class MoCoCO2(nn.Module):
    """Query encoder, EMA key encoder and queue, as MoCo's builder.py."""

    def __init__(self, config, groups):
        super().__init__()
        self.config, self.groups = config, groups
        self.encoder_q = Encoder(config)
        self.encoder_k = Encoder(config)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.dim),
                                                  dim=1))
        self.ptr = 0

    def encode_keys(self, x_k, perm):
        """Shuffle-BN: keys of x_k[perm] in `groups` BN groups, back in x_k's order."""
        parts = x_k[perm].chunk(self.groups) if self.groups > 1 else [x_k[perm]]
        keys = torch.cat([self.encoder_k(p) for p in parts])
        return keys[torch.argsort(perm)]

    def loss(self, x_q, keys):
        c = self.config
        total, _, _ = co2_loss(self.encoder_q(x_q), keys, self.queue, c.temperature,
                               c.consistency_temperature, c.consistency_weight)
        return total.mean()

    @torch.no_grad()
    def momentum_update(self):
        m = self.config.ema_momentum
        k_params = list(self.encoder_k.parameters())
        torch._foreach_mul_(k_params, m)
        torch._foreach_add_(k_params, list(self.encoder_q.parameters()), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, keys):
        b = keys.shape[0]
        self.queue[self.ptr:self.ptr + b] = keys
        self.ptr = (self.ptr + b) % self.queue.shape[0]


class TrainStep:
    """One MoCo + CO2 step: keys, query forward + backward, SGD, EMA, enqueue."""

    def __init__(self, model, config, compile=True):
        self.model = model
        self.optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=config.learning_rate,
                                         momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.encode_keys = model.encode_keys
        self.loss = model.loss
        if compile:
            self.encode_keys = torch.compile(model.encode_keys)
            self.loss = torch.compile(model.loss)
        self.generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, x_q, x_k):
        perm = torch.randperm(x_k.shape[0], generator=self.generator)
        with torch.no_grad():
            keys = self.encode_keys(x_k, perm)
        loss = self.loss(x_q, keys)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.momentum_update()
        self.model.enqueue(keys)
        return loss.detach()


def build(config, torch_config):
    """(model, step, x_q, x_k): the model in train mode and synthetic inputs."""
    torch.manual_seed(config.seed)
    groups = config.check_replicas(1) if config.bn == "shuffle" else 1
    model = MoCoCO2(config, groups).train()
    rng = np.random.RandomState(config.seed)
    shape = (config.batch_size, 3, config.image_size, config.image_size)
    x_q, x_k = (torch.from_numpy(rng.rand(*shape).astype("float32")) for _ in "qk")
    if torch_config.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x_q, x_k = (x.contiguous(memory_format=torch.channels_last) for x in (x_q, x_k))
    return model, TrainStep(model, config, torch_config.torch_compile), x_q, x_k


def benchmark(config, torch_config):
    """Times the step; a JSON-ready dict."""
    check_supported(config.check())
    torch_config.check()
    if torch_config.torch_threads:
        torch.set_num_threads(torch_config.torch_threads)
    load_before = os.getloadavg()[0]
    model, step, x_q, x_k = build(config, torch_config)
    first_loss = float(step(x_q, x_k))
    for _ in range(max(0, torch_config.warmup - 1)):
        float(step(x_q, x_k))
    samples = []
    for _ in range(torch_config.repeats):
        start = time.perf_counter()
        float(step(x_q, x_k))
        samples.append(time.perf_counter() - start)
    step_s = statistics.median(samples)
    return {
        "benchmark": "torch_train_step", "backbone": config.backbone,
        "image_size": config.image_size, "batch_size": config.batch_size,
        "queue_size": config.queue_size, "head": config.head, "bn": config.bn,
        "bn_groups": model.groups, "images_per_sec": round(config.batch_size / step_s, 3),
        "step_ms": round(1000 * step_s, 2), "step_ms_samples": [round(1000 * t, 2)
                                                               for t in samples],
        "loss_first_step": first_loss, "warmup_steps": max(1, torch_config.warmup),
        "timed_steps": torch_config.repeats, "torch": torch.__version__,
        "torch_compile": torch_config.torch_compile,
        "channels_last": torch_config.channels_last, "threads": torch.get_num_threads(),
        "cpu": benchmark_lib.cpu_features(), "load_average_1min_before": round(load_before, 2),
        "load_average_1min": round(os.getloadavg()[0], 2)}


def benchmark_and_print(config, torch_config):
    print(json.dumps(benchmark(config, torch_config)), flush=True)


def make_main():
    """Defines the flags (not at import: tests import this module beside compare_torch)."""
    return common.tool(benchmark_and_print, TrainConfig, TorchConfig,
                       skip=benchmark_lib.UNUSED_TRAIN_FIELDS, overrides=benchmark_lib.NOT_A_RUN,
                       check=False)


if __name__ == "__main__":
    common.run_tool(make_main())
