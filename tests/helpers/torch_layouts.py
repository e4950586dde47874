"""tests/fixtures/torch_layouts.txt: real torchvision / MoCo layouts and features, read back.

The fixture was made once, outside CI, by tests/helpers/make_torch_layouts.py from a real
torchvision install and MoCo's own builder.py (its header says which versions). It holds

- ``[layout NAME]``: every key of a `state_dict()`, in order, with its dtype and shape
  (resnet18, resnet34, resnet50: torchvision's; moco_v2: MoCo v2's ResNet-50 checkpoint);
- ``[checkpoint moco_v2]``: the top-level entries main_moco.py's save_checkpoint writes;
- ``[features NAME]``: what real torchvision (and MoCo's model) computes, in eval mode,
  from the weights `deterministic_state(layout, seed)` gives and the images
  `deterministic_images(...)` gives: 32 evenly spaced values, the norm and the largest
  magnitude of each output. The tests regenerate the same weights and images with NumPy
  (no torch needed) and compare co2_tf's outputs with those numbers.

NumPy only: the make script (torch 2.14.1) and the tests (torch 2.13.0 or none) share it.
"""

import collections
import os

import numpy as np

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures",
                       "torch_layouts.txt")
SAMPLES = 32  # values recorded per output


def deterministic_state(layout, seed):
    """A state_dict (numpy) of `layout` (key -> (dtype, shape)) with seeded random values.

    Chosen so that activations are large, as those of issue 21's failing checkpoint were:
    convs of std sqrt(1.2 / fan_in), BN scale 0.5-1.5, shift 0-1, running mean +-0.1 and
    variance 0.5-1.5 (away from their defaults 1, 0, 0, 1): a ResNet-50's pooled features
    reach the hundreds at 224 px (tens for a ResNet-18), its C5 maps more.
    Drawn key by key in the layout's order from one PCG64 stream (NumPy keeps its streams
    stable across versions; `checksum` detects a change).
    """
    rng = np.random.default_rng(seed)
    state = collections.OrderedDict()
    for key, (dtype, shape) in layout.items():
        leaf = key.rsplit(".", 1)[-1]
        if dtype == "int64":  # num_batches_tracked, queue_ptr
            state[key] = np.zeros(shape, np.int64)
        elif key.endswith("queue"):  # MoCo's [dim, K], unit columns
            q = rng.standard_normal(shape).astype(np.float32)
            state[key] = q / np.linalg.norm(q, axis=0, keepdims=True)
        elif len(shape) == 4:  # conv, OIHW
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = (rng.standard_normal(shape) * np.sqrt(1.2 / fan_in)).astype(np.float32)
        elif len(shape) == 2:  # Linear, [out, in]
            state[key] = (rng.standard_normal(shape) * np.sqrt(1.0 / shape[1])).astype(
                np.float32)
        elif leaf == "weight":  # BN scale
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif leaf == "bias" and ".fc" not in "." + key:  # BN shift
            state[key] = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        elif leaf == "bias":  # Linear
            state[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif leaf == "running_mean":
            state[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif leaf == "running_var":
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            raise ValueError(f"no rule for {key} {dtype} {shape}")
    return state


def deterministic_images(size, n=1, seed=0):
    """NHWC float32 images in [0, 1] (co2_tf's input; torch gets them normalised)."""
    return np.random.default_rng(seed).random((n, size, size, 3), np.float32)


def checksum(arrays):
    """One float of a list of arrays: tells whether NumPy gave the same values."""
    return float(sum(np.sum(np.abs(a.astype(np.float64))) for a in arrays))


def summary(values):
    """32 evenly spaced values, the norm and the largest magnitude of an output (flattened)."""
    flat = np.asarray(values, np.float64).ravel()
    index = np.linspace(0, flat.size - 1, SAMPLES).round().astype(int)
    return {"samples": flat[index], "norm": np.linalg.norm(flat), "max": np.abs(flat).max()}


def sampled(values):
    """The values `summary` sampled (for comparing with the fixture's samples)."""
    flat = np.asarray(values, np.float64).ravel()
    return flat[np.linspace(0, flat.size - 1, SAMPLES).round().astype(int)]


def _shape(text):
    return () if text == "-" else tuple(int(d) for d in text.split(","))


def read(path=FIXTURE):
    """The fixture as {"layout": {name: OrderedDict key -> (dtype, shape)},
    "checkpoint": {name: OrderedDict key -> (type, value)}, "features": {name: {field: ...}}}."""
    out = {"layout": {}, "checkpoint": {}, "features": {}}
    section = None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                kind, name = line.strip("[]").split()
                section = out[kind].setdefault(name, collections.OrderedDict())
                continue
            fields = line.split()
            if kind == "layout":
                section[fields[0]] = (fields[1], _shape(fields[2]))
            elif kind == "checkpoint":
                section[fields[0]] = (fields[1], fields[2] if len(fields) > 2 else None)
            else:
                values = [float(v) for v in fields[1:]]
                section[fields[0]] = values[0] if len(values) == 1 else np.array(values)
    return out


def without_fc(layout):
    """A torchvision layout minus the classifier (what co2_tf's backbone holds)."""
    return collections.OrderedDict((k, v) for k, v in layout.items() if not k.startswith("fc."))


def within(layout, prefix):
    """The entries under `prefix`, with it stripped."""
    return collections.OrderedDict((k[len(prefix):], v) for k, v in layout.items()
                                   if k.startswith(prefix))
