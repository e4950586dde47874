"""Backbone encoders: images in [0, 1] -> pooled features [B, F].

Every backbone is a plain functional `keras.Model` made only of built-in Keras
layers, so `.keras` saving and loading needs no custom objects. The model
normalises its input itself (ImageNet mean/std per channel, as torchvision and
MoCo do), so callers feed float32 images in [0, 1].

ResNets follow torchvision's layout and conventions so that numbers and
checkpoints are comparable with MoCo's PyTorch code:

- ResNet v1.5: in a bottleneck block the stride sits on the 3x3 conv.
- Convs have no bias (BN follows), BN after each conv, BN momentum 0.9 in
  Keras terms (PyTorch's 0.1) and epsilon 1e-5.
- Convs are initialised He normal with fan_out (torchvision's
  `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, untruncated).
- Strided convs pad symmetrically as PyTorch does (Keras "same" padding pads
  only bottom/right for stride 2 on even sizes, which would shift features).
- Layer names mirror torchvision's parameter names (`layer1.0.conv1` ->
  `layer1_0_conv1`) to make porting weights mechanical.

`keras.applications.ResNet50` is not used: it is ResNet v1 (stride on the
first 1x1 conv), its convs carry biases, and its BN hyper-parameters are fixed
(epsilon 1.001e-5, momentum 0.99) with no way to make BN synchronized.
"""
import numbers

import keras

from co2_tf.errors import UserError
from co2_tf.nets import BACKBONES, conv_grad

# How a backbone's BatchNormalization layers get their statistics (not the
# CO2 key-encoder modes of co2_tf.method.BN_MODES, which map onto these).
LAYER_BN_MODES = ("local", "sync", "none")

# torchvision / MoCo input normalisation (RGB, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PyTorch BatchNorm2d defaults, expressed in Keras terms.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

_FEATURE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet18_cifar": 512,
    "tiny": 256,
}
# (block type, blocks per stage) as in torchvision.
_RESNET_LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet18_cifar": ("basic", (2, 2, 2, 2)),
}
_TINY_WIDTHS = (32, 64, 128, 256)


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_name(name):
    if name not in _FEATURE_DIMS:
        raise UserError(
            f"unknown backbone {name!r}: use one of {', '.join(BACKBONES)}")


def feature_dim(name):
    """Width F of the pooled features that backbone `name` returns."""
    _check_name(name)
    return _FEATURE_DIMS[name]


def feature_pyramid(name):
    """The backbone's four stages as a feature pyramid: ((level, layer, stride), ...).

    Levels are named C2..C5 after the stages (ResNet's layer1..layer4, the
    tiny convnet's four convs), as detection code names them; `layer` is the
    name of the stage's last layer and `stride` its output stride. Only the
    ImageNet ResNets have the strides C_k usually implies (2**k: 4, 8, 16,
    32); the CIFAR stem keeps full resolution (1, 2, 4, 8) and the tiny
    convnet halves the size at every conv (2, 4, 8, 16).
    """
    _check_name(name)
    if name == "tiny":
        layers = [f"relu{i + 1}" for i in range(len(_TINY_WIDTHS))]
        strides = (2, 4, 8, 16)
    else:
        layers = [f"layer{stage + 1}_{blocks - 1}_out"
                  for stage, blocks in enumerate(_RESNET_LAYOUTS[name][1])]
        strides = (1, 2, 4, 8) if name.endswith("_cifar") else (4, 8, 16, 32)
    return tuple((f"C{i + 2}", layer, stride)
                 for i, (layer, stride) in enumerate(zip(layers, strides)))


class _Builder:
    """Creates the layers of one backbone with per-layer seeds and names."""

    def __init__(self, bn, seed):
        self.bn = bn
        self.seed = seed
        self._count = 0

    def _next_seed(self):
        # Each initializer gets its own seed: one shared int seed would give
        # every layer of the same shape identical weights.
        if self.seed is None:
            return None
        self._count += 1
        # Kept below 2**31: the stateless RNG takes int32-range seeds.
        return (self.seed * 1000 + self._count) % (2**31 - 1)

    def conv(self, x, filters, kernel, stride, name):
        """Conv as torch.nn.Conv2d(padding=kernel // 2, bias=False)."""
        pad = kernel // 2
        padding = "same"
        if stride > 1 and pad > 0:
            # Symmetric padding as PyTorch; Keras "same" would pad 0/1.
            x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
            padding = "valid"
        init = keras.initializers.VarianceScaling(
            scale=2.0, mode="fan_out", distribution="untruncated_normal",
            seed=self._next_seed())
        # Without BN the conv needs its own shift; with BN it is redundant.
        return keras.layers.Conv2D(
            filters, kernel, strides=stride, padding=padding,
            use_bias=self.bn == "none", kernel_initializer=init,
            bias_initializer="zeros", name=name)(x)

    def norm(self, x, name, zero_gamma=False):
        """BatchNorm with PyTorch hyper-parameters, or nothing (bn="none")."""
        if self.bn == "none":
            return x
        return keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
            gamma_initializer="zeros" if zero_gamma else "ones",
            synchronized=self.bn == "sync", name=name)(x)

    @staticmethod
    def relu(x, name):
        return keras.layers.ReLU(name=name)(x)


def _basic_block(b, x, planes, stride, prefix, zero_init_residual):
    identity = x
    out = b.conv(x, planes, 3, stride, f"{prefix}_conv1")
    out = b.norm(out, f"{prefix}_bn1")
    out = b.relu(out, f"{prefix}_relu1")
    out = b.conv(out, planes, 3, 1, f"{prefix}_conv2")
    out = b.norm(out, f"{prefix}_bn2", zero_gamma=zero_init_residual)
    if stride != 1 or x.shape[-1] != planes:
        identity = b.conv(x, planes, 1, stride, f"{prefix}_downsample_0")
        identity = b.norm(identity, f"{prefix}_downsample_1")
    out = keras.layers.Add(name=f"{prefix}_add")([out, identity])
    return b.relu(out, f"{prefix}_out")


def _bottleneck_block(b, x, planes, stride, prefix, zero_init_residual):
    identity = x
    width = planes * 4
    out = b.conv(x, planes, 1, 1, f"{prefix}_conv1")
    out = b.norm(out, f"{prefix}_bn1")
    out = b.relu(out, f"{prefix}_relu1")
    out = b.conv(out, planes, 3, stride, f"{prefix}_conv2")
    out = b.norm(out, f"{prefix}_bn2")
    out = b.relu(out, f"{prefix}_relu2")
    out = b.conv(out, width, 1, 1, f"{prefix}_conv3")
    out = b.norm(out, f"{prefix}_bn3", zero_gamma=zero_init_residual)
    if stride != 1 or x.shape[-1] != width:
        identity = b.conv(x, width, 1, stride, f"{prefix}_downsample_0")
        identity = b.norm(identity, f"{prefix}_downsample_1")
    out = keras.layers.Add(name=f"{prefix}_add")([out, identity])
    return b.relu(out, f"{prefix}_out")


def _resnet(b, x, name, zero_init_residual):
    block_type, layout = _RESNET_LAYOUTS[name]
    block = _basic_block if block_type == "basic" else _bottleneck_block
    if name.endswith("_cifar"):
        # CIFAR stem: 3x3/1 conv, no max-pool, keeps 32x32 resolution.
        x = b.conv(x, 64, 3, 1, "conv1")
        x = b.norm(x, "bn1")
        x = b.relu(x, "relu")
    else:
        x = b.conv(x, 64, 7, 2, "conv1")
        x = b.norm(x, "bn1")
        x = b.relu(x, "relu")
        # Zero padding equals PyTorch's -inf padding here: inputs are >= 0
        # after the ReLU.
        x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layout)):
        for i in range(blocks):
            stride = 2 if (stage > 0 and i == 0) else 1
            x = block(b, x, planes, stride, f"layer{stage + 1}_{i}",
                      zero_init_residual)
    return x


def _tiny(b, x):
    for i, width in enumerate(_TINY_WIDTHS):
        x = b.conv(x, width, 3, 2, f"conv{i + 1}")
        x = b.norm(x, f"bn{i + 1}")
        x = b.relu(x, f"relu{i + 1}")
    return x


def build_backbone(name, image_size, *, bn="local", model_name=None,
                   seed=None, zero_init_residual=False, conv_filter_grad="tf"):
    """Builds backbone `name` as a functional `keras.Model`.

    Args:
        name: one of `BACKBONES`.
        image_size: side S of the square input images (int), or None for a
            model that accepts any spatial size.
        bn: "local" (per-replica BatchNormalization), "sync" (BN statistics
            all-reduced across replicas under tf.distribute; plain BN
            without a strategy) or "none" (no normalisation layers, convs
            get biases: each example's output is independent of the batch).
        model_name: name of the returned model (default: `name`). Give the
            query and key encoders different names when both live in one
            model.
        seed: int to make the initial weights deterministic: two builds with
            the same seed have identical weights. None draws fresh weights.
        zero_init_residual: zero-init the gamma of the last BN in each
            residual block (Goyal et al.); off by default, as in MoCo.
        conv_filter_grad: the convs' filter-gradient kernel, "tf", "matmul"
            or "auto" (co2_tf.nets.conv_grad): what training sets from
            --conv_filter_grad; TF's own by default, as evaluation and
            export keep it.

    Returns:
        keras.Model mapping float32 images [B, S, S, 3] in [0, 1] to pooled
        features [B, feature_dim(name)].
    """
    _check_name(name)
    if bn not in LAYER_BN_MODES:
        raise UserError(
            f"unknown bn mode {bn!r}: use one of {', '.join(LAYER_BN_MODES)}")
    if image_size is not None and (not _is_int(image_size) or image_size < 1):
        raise UserError(
            f"image_size must be a positive int, got {image_size!r}: pass "
            "the side of the square input images in pixels")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise UserError(
            f"seed must be a non-negative int or None, got {seed!r}")

    if image_size is not None:
        image_size = int(image_size)
    b = _Builder(bn, None if seed is None else int(seed))
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32",
                         name="images")
    x = keras.layers.Normalization(
        mean=IMAGENET_MEAN, variance=[s * s for s in IMAGENET_STD],
        name="normalize")(inputs)
    if name == "tiny":
        x = _tiny(b, x)
    else:
        x = _resnet(b, x, name, zero_init_residual)
    features = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    return conv_grad.use(keras.Model(inputs, features, name=model_name or name),
                         conv_filter_grad)
