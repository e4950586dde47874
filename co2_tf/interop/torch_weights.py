"""PyTorch weights <-> Keras variables: the name mapping and .pth I/O (numpy in, numpy out).

Our ResNets are torchvision's layer for layer (see co2_tf.nets.backbones), so a
weight maps by name: the Keras layer `layer1_0_downsample_0` is the torch
module `layer1.0.downsample.0`, and

- Conv2D kernel [kh, kw, in, out] (HWIO)  <-> conv `weight` [out, in, kh, kw] (OIHW);
- Dense kernel [in, out]                  <-> Linear `weight` [out, in]; bias as is;
- BatchNormalization gamma, beta, moving_mean, moving_variance <-> BatchNorm2d
  `weight`, `bias`, `running_mean`, `running_var` (same epsilon 1e-5 and the
  same biased/unbiased conventions in eval mode: eval-mode outputs agree);
  `num_batches_tracked` is ignored on the way in and written as 0 on the way
  out (torchvision's strict load wants it present);
- MoCo's heads: v1's `fc` Linear <-> our linear head's `projection`, v2's
  `fc.0` / `fc.2` (Linear, ReLU, Linear) <-> our MLP head's `hidden` /
  `projection`; query and key encoders are `module.encoder_q.*` /
  `module.encoder_k.*`;
- MoCo's `module.queue` [dim, K] (keys as columns) <-> our queue [K, dim]
  (keys as rows), `module.queue_ptr` [1] <-> our scalar pointer. On the way in
  the queue is rotated so that the pointer is 0 (see `queue_from_moco`).

Inputs: our models take float32 NHWC images in [0, 1] and normalise them
inside (the ImageNet mean/std of torchvision's `transforms.Normalize`); a
torchvision ResNet takes NCHW images already normalised with that mean/std.
Fed the same pictures that way, both compute the same features.

torch is optional (requirements-torch.txt): it is imported only to read and
write .pth files; the mapping functions take and return numpy arrays keyed
by torch's names.
"""

import collections
import io as pyio
import sys

import keras
import numpy as np

from co2_tf import io
from co2_tf.errors import UserError

TORCH_REQUIREMENTS = "requirements-torch.txt"
_BN_NAMES = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
             ("running_var", "moving_variance"))
HEAD_MODULES = {"linear": {"projection": "fc"}, "mlp": {"hidden": "fc.0", "projection": "fc.2"}}


# ------------------------------------------------------------------ torch files
def import_torch():
    try:
        import torch
    except ImportError:
        raise UserError("reading and writing .pth files needs PyTorch, an optional dependency: "
                        f"pip install -r {TORCH_REQUIREMENTS}") from None
    return torch


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def read_torch_file(path):
    """torch.load of a .pth (any gfile path), tensors as they are; UserError if unreadable."""
    torch = import_torch()
    if not io.exists(path) or io.isdir(path):
        raise UserError(f"--torch_checkpoint={path} does not exist: pass a .pth / .pth.tar file")
    data = io.read_bytes(path)
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects could run code.
        return torch.load(pyio.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for bad files)
        raise UserError(f"cannot read {path} with torch.load(weights_only=True) "
                        f"({_first_line(e)}): pass a state_dict or a MoCo checkpoint "
                        "saved with torch.save") from None


def write_torch_file(path, obj):
    """torch.save of numpy arrays (nested in dicts) to any gfile path, atomically."""
    torch = import_torch()

    def tensors(value):
        if isinstance(value, dict):
            return collections.OrderedDict((k, tensors(v)) for k, v in value.items())
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        return value

    buffer = pyio.BytesIO()
    torch.save(tensors(obj), buffer)
    io.write_bytes_atomic(path, buffer.getvalue())


def _as_numpy(value, key, source):
    if isinstance(value, np.ndarray):
        return value
    # A tensor exists only if torch is imported: no import needed to recognise one.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    raise UserError(f"{source}: {key} is a {type(value).__name__}, not a tensor: pass a "
                    "state_dict of tensors")


def state_dict_of(obj, source):
    """The numpy state_dict inside what torch.load returned (a MoCo save or a bare one).

    Values may be torch tensors or numpy arrays already.
    """
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{source} holds no state_dict (a dict of tensors): pass a torchvision "
                        "state_dict or a MoCo checkpoint")
    return collections.OrderedDict((key, _as_numpy(value, key, source))
                                   for key, value in obj.items())


# ------------------------------------------------------------- the name mapping
def _torch_module(layer_name):
    return layer_name.replace("_", ".")


def _layer_parameters(layer, module):
    """[(torch key, Keras variable, transform)] of one layer; transform says how to transpose."""
    if isinstance(layer, keras.layers.Conv2D):
        out = [(f"{module}.weight", layer.kernel, "conv")]
        if layer.use_bias:
            out.append((f"{module}.bias", layer.bias, "vector"))
        return out
    if isinstance(layer, keras.layers.Dense):
        return [(f"{module}.weight", layer.kernel, "dense"), (f"{module}.bias", layer.bias,
                                                              "vector")]
    if isinstance(layer, keras.layers.BatchNormalization):
        return [(f"{module}.{t}", getattr(layer, k), "vector") for t, k in _BN_NAMES]
    raise TypeError(f"no torch counterpart for layer {layer.name} ({type(layer).__name__})")


def backbone_parameters(backbone):
    """OrderedDict torch key -> (Keras variable, transform) of a ResNet, in torchvision's order.

    BN layers also name `num_batches_tracked` (variable None): torch has it,
    we do not.
    """
    layers = [layer for layer in backbone.layers if layer.weights]
    # torchvision registers a block's downsample after its convs and BNs;
    # Keras builds it before the block's last BN. Blocks keep their order.
    blocks = {}
    for layer in layers:
        blocks.setdefault("_".join(layer.name.split("_")[:2]), len(blocks))

    def order(layer):
        return blocks["_".join(layer.name.split("_")[:2])], "_downsample_" in layer.name

    params = collections.OrderedDict()
    for layer in sorted(layers, key=order):
        module = _torch_module(layer.name)
        for key, variable, transform in _layer_parameters(layer, module):
            params[key] = (variable, transform)
        if isinstance(layer, keras.layers.BatchNormalization):
            params[f"{module}.num_batches_tracked"] = (None, "counter")
    return params


def head_parameters(head, head_type):
    """OrderedDict torch key -> (Keras variable, transform) of a projection head (MoCo's `fc`)."""
    params = collections.OrderedDict()
    for layer_name, module in HEAD_MODULES[head_type].items():
        for key, variable, how in _layer_parameters(head.get_layer(layer_name), module):
            params[key] = (variable, how)
    return params


def to_torch(array, transform):
    """A Keras weight as torch stores it."""
    if transform == "conv":
        return np.transpose(array, (3, 2, 0, 1))  # HWIO -> OIHW
    if transform == "dense":
        return np.transpose(array)  # [in, out] -> [out, in]
    return np.asarray(array)


def from_torch(array, transform):
    """A torch tensor (numpy) as the Keras weight."""
    if transform == "conv":
        return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
    if transform == "dense":
        return np.transpose(array)
    return np.asarray(array)


def export_parameters(params, prefix=""):
    """The torch state (numpy, torch's keys with `prefix`) of mapped Keras variables."""
    state = collections.OrderedDict()
    for key, (variable, transform) in params.items():
        if transform == "counter":
            state[prefix + key] = np.zeros((), np.int64)
        else:
            state[prefix + key] = to_torch(keras.ops.convert_to_numpy(variable), transform)
    return state


def check_keys(state, expected, source, ignored=()):
    """UserError naming the first missing, unexpected or mis-shaped tensor of `state`.

    expected: key -> shape torch stores; `num_batches_tracked` keys may be
    absent; `ignored` keys may be present.
    """
    for key in expected:
        if key not in state and not key.endswith(".num_batches_tracked"):
            raise UserError(f"{source} has no tensor {key}: pass a checkpoint of this "
                            "architecture (or the right --backbone)")
    for key in state:
        if key not in expected and key not in ignored:
            raise UserError(f"{source} has an unexpected tensor {key}: it is not a "
                            "checkpoint of this architecture (check --backbone)")
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != tuple(shape):
            raise UserError(f"{source}: tensor {key} has shape {list(state[key].shape)}, "
                            f"expected {list(shape)}: pass a checkpoint of this architecture")


def expected_shapes(params, prefix=""):
    """torch key -> the shape torch stores it with."""
    order = {"conv": (3, 2, 0, 1), "dense": (1, 0)}
    return {prefix + key: (() if transform == "counter" else
                           tuple(variable.shape[i] for i in order.get(transform, (0,))))
            for key, (variable, transform) in params.items()}


def assign_parameters(params, state, prefix=""):
    """Assigns `state[prefix + key]` to each mapped variable (keys already checked)."""
    for key, (variable, transform) in params.items():
        if transform != "counter":
            variable.assign(from_torch(state[prefix + key], transform).astype(np.float32))


def load_backbone_state(backbone, state, source, prefix="", ignored=()):
    """Loads a torchvision-layout numpy state_dict into our backbone; UserError if it differs."""
    params = backbone_parameters(backbone)
    check_keys(state, expected_shapes(params, prefix), source, ignored)
    assign_parameters(params, state, prefix)


def backbone_state(backbone):
    """Our backbone as a torchvision state_dict (numpy) without fc: torchvision's strict load
    of a ResNet with `fc = nn.Identity()` takes it."""
    return export_parameters(backbone_parameters(backbone))


def queue_to_moco(queue, ptr):
    """Our queue [K, dim] and pointer -> MoCo's `queue` [dim, K] and `queue_ptr` [1]."""
    return np.ascontiguousarray(np.transpose(queue)), np.array([ptr], np.int64)


def queue_from_moco(queue, ptr):
    """MoCo's `queue` [dim, K] and `queue_ptr` -> our queue [K, dim] and pointer 0.

    The rows are rotated so that MoCo's oldest key (at its pointer) is row 0
    and the pointer becomes 0: the same keys in the same FIFO order, and our
    enqueue, which writes a global batch at rows ptr..ptr+B-1 without
    wrapping, stays in bounds for every batch size that divides K.
    """
    keys = np.transpose(np.asarray(queue, np.float32))
    ptr = int(np.asarray(ptr).reshape(-1)[0]) % keys.shape[0]
    return np.ascontiguousarray(np.roll(keys, -ptr, axis=0)), 0
