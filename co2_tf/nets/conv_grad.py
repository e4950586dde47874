"""The convs' filter-gradient kernel: TF's, or a matmul over image patches (AVX2 CPUs).

On an AVX2 + FMA CPU (no AVX-512), oneDNN's backward-weights kernel for 3x3
convolutions (`jit:avx2`) is the slowest part of the CIFAR ResNet-18 train
step, slowest on the small maps of the last stages. The filter gradient is one
matmul, patches(x)^T @ dy, which TF's oneDNN matmul runs faster on 4x4 maps;
on larger maps, and for strided convs, copying the patches costs more than it
saves (`benchmarks/benchmark.py --conv_kernels`; measured: docs/performance.md).

`build_backbone(..., conv_filter_grad=...)` (--conv_filter_grad) picks the
kernel: "tf", "matmul", or "auto" = "matmul" where `pays_off()` (a CPU-only
host without AVX-512). Training and the benchmark pass the flag; evaluation
and export keep TF's kernel (the default). With "matmul", the model's stride-1
Conv2D layers with output maps of at most 16 pixels and at least 4M
multiply-adds per image compute their filter gradient that way (the forward
conv and the input gradient stay TF's oneDNN ops; smaller convs ran slower by
matmul); the result equals Conv2DBackpropFilter up to float32 rounding
(another summation order). Only float32 channels-last convs with a kernel
larger than 1x1, no dilation and no groups are changed. The layers stay
`keras.layers.Conv2D` (only each instance's convolution op changes, through
co2_tf.compat), so saved `.keras` files hold built-in layers only.
"""

import keras
import tensorflow as tf

from co2_tf import compat
from co2_tf.errors import UserError
from co2_tf.nets import CONV_FILTER_GRADS

# The ops of the matmul filter gradient are named under this scope (profilers, e.g.
# benchmarks/benchmark_lib.py, count their FLOPs as the filter gradient's).
SCOPE = "matmul_filter_grad"
# Where the matmul gained, timed per conv (measured: docs/performance.md): stride 1, 4x4 maps.
_MAX_OUTPUT_PIXELS = 16
_STRIDED = False
# Small convs keep TF's kernel: the tiny convnet's (1.2M multiply-adds per image each) made
# the demo step slower; ResNet-18's layer4 convs, which gain, have 38M.
_MIN_MACS_PER_IMAGE = 4_000_000
# Above this, the patch matrix is built one kernel row at a time: the whole
# matrix of a 32x32 layer of 64 channels at batch 256 would be 600 MB.
_PATCH_BYTES_AT_ONCE = 160 * 2**20


def _pads(size, kernel, stride, padding):
    """(before, after) padding of one spatial dimension, as TF's conv pads it."""
    if padding == "valid":
        return 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _filter_grad(x, dy, kernel_shape, strides, padding):
    """d(loss)/d(kernel) of conv2d(x, kernel): patches(x)^T @ dy, float32."""
    kh, kw, cin, cout = kernel_shape
    _, h, w, _ = x.shape
    oh, ow = dy.shape[1], dy.shape[2]
    sh, sw = strides
    ph, pw = _pads(h, kh, sh, padding), _pads(w, kw, sw, padding)
    if any(ph) or any(pw):
        x = tf.pad(x, [[0, 0], list(ph), list(pw), [0, 0]])
    dy = tf.reshape(dy, [-1, cout])

    def taps(row, columns):
        # [N*OH*OW, len(columns)*cin]: the inputs each output pixel sees at these taps.
        parts = [x[:, row:row + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :]
                 for j in columns]
        patch = tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0]
        return tf.reshape(patch, [-1, len(columns) * cin])

    batch = x.shape[0]
    patch_bytes = (batch or 2**20) * oh * ow * kh * kw * cin * 4
    if patch_bytes <= _PATCH_BYTES_AT_ONCE:
        patches = tf.concat([taps(i, range(kw)) for i in range(kh)], axis=-1)
        grad = tf.matmul(patches, dy, transpose_a=True)
    else:
        grad = tf.concat([tf.matmul(taps(i, range(kw)), dy, transpose_a=True)
                          for i in range(kh)], axis=0)
    return tf.reshape(grad, [kh, kw, cin, cout])


def _applies(layer, input_shape, dtype=tf.float32):
    """Whether `matmul_filter_grad` changes Conv2D `layer` on inputs of this shape and dtype."""
    if not (dtype == tf.float32 and layer.data_format == "channels_last"
            and len(input_shape) == 4 and None not in input_shape[1:]
            and max(layer.kernel_size) > 1 and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1 and (_STRIDED or tuple(layer.strides) == (1, 1))):
        return False
    out_h, out_w = layer.compute_output_shape(input_shape)[1:3]
    macs = out_h * out_w * layer.kernel_size[0] * layer.kernel_size[1] * input_shape[-1] * (
        layer.filters)
    return out_h * out_w <= _MAX_OUTPUT_PIXELS and macs >= _MIN_MACS_PER_IMAGE


def _convolution_op(self, inputs, kernel):
    if not _applies(self, tuple(inputs.shape), inputs.dtype):
        return keras.layers.Conv2D.convolution_op(self, inputs, kernel)
    strides = tuple(self.strides)
    padding = self.padding.upper()

    @tf.custom_gradient
    def conv(x, k):
        y = tf.nn.conv2d(x, k, strides=strides, padding=padding)

        def grad(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x), filter=k, out_backprop=dy,
                strides=[1, *strides, 1], padding=padding)
            with tf.name_scope(SCOPE):
                dk = _filter_grad(x, dy, k.shape, strides, self.padding)
            return dx, dk
        return y, grad

    return conv(inputs, tf.convert_to_tensor(kernel))


def matmul_filter_grad(model):
    """Makes `model`'s Conv2D layers compute their filter gradient by matmul; returns it."""
    for layer in compat.nested_layers(model):
        if type(layer) is keras.layers.Conv2D:
            compat.replace_convolution_op(layer, _convolution_op)
    return model


def resolve(conv_filter_grad):
    """"tf" or "matmul": the kernel --conv_filter_grad=auto|tf|matmul means on this host."""
    if conv_filter_grad == "auto":
        return "matmul" if pays_off() else "tf"
    if conv_filter_grad not in CONV_FILTER_GRADS:
        raise UserError(f"unknown --conv_filter_grad={conv_filter_grad!r}: use one of "
                        f"{', '.join(CONV_FILTER_GRADS)}")
    return conv_filter_grad


def use(model, conv_filter_grad):
    """Gives `model`'s convs the filter-gradient kernel --conv_filter_grad names; returns it."""
    if resolve(conv_filter_grad) == "matmul":
        matmul_filter_grad(model)
    return model


def pays_off(cpuinfo="/proc/cpuinfo"):
    """Whether the matmul pays off here (--conv_filter_grad=auto): an AVX2 + FMA CPU-only
    host without AVX-512.

    Measured faster on AVX2 + FMA only (docs/performance.md); GPUs (cuDNN) and TPUs
    have fast filter-gradient kernels, and AVX-512 CPUs a faster oneDNN kernel.
    """
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return False
    try:
        with open(cpuinfo) as f:  # local-only: the host's CPU, not a user path
            flags = f.read().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags and "avx512f" not in flags
