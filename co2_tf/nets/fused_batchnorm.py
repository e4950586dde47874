"""Training-mode BatchNormalization as one fused TF op (FusedBatchNormV3).

Keras 3's BatchNormalization computes batch statistics and the normalisation
as separate element-wise ops (mean, squared difference, mean, rsqrt, multiply,
add; in mixed precision also an upcast of the whole activation to float32),
and autodiff adds as many again in the backward pass. On a CPU these
memory-bound passes are a large part of a CIFAR ResNet-18 train step
(measured: docs/performance.md).
FusedBatchNormV3 (oneDNN on CPU, cuDNN on GPU, a native XLA op on TPU) does
each direction in one op, float32 statistics included, for float32, bfloat16
and float16 activations.

`fuse_batch_norm(model)` switches the BatchNormalization layers of a model
to the fused op for training-mode calls, in place. The semantics are Keras's
(normalise with the biased batch variance; moving statistics updated as
`moving = momentum * moving + (1 - momentum) * batch`, biased variance);
inference, synchronized BN, renorm, masks and non-NHWC layouts keep Keras's
own code. The layers stay `keras.layers.BatchNormalization` (only the bound
`call` of each instance changes), so saved `.keras` files hold built-in layers
only and load without co2_tf.
"""

import keras
import tensorflow as tf

from co2_tf import compat


def _fusable(layer, inputs, training, mask):
    return (training and layer.trainable and mask is None and not layer.synchronized
            and not layer.renorm and len(inputs.shape) == 4
            and layer.axis in (-1, 3) and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16))


def _fused_call(self, inputs, training=None, mask=None):
    if not _fusable(self, inputs, training, mask):
        return keras.layers.BatchNormalization.call(self, inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    # gamma and beta are float32 weights (Keras does not autocast them).
    scale = self.gamma if self.scale else tf.ones([channels], tf.float32)
    offset = self.beta if self.center else tf.zeros([channels], tf.float32)
    outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        inputs, tf.cast(scale, tf.float32), tf.cast(offset, tf.float32), epsilon=self.epsilon,
        data_format="NHWC", is_training=True)[:3]
    # The op returns the unbiased (n / (n - 1)) batch variance for the moving
    # average; Keras averages the biased one.
    shape = tf.shape(inputs)
    n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
    variance = variance * tf.maximum(n - 1.0, 0.0) / n
    momentum = self.momentum
    self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
    self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
    return tf.cast(outputs, self.compute_dtype)


def fuse_batch_norm(model):
    """Makes `model`'s BatchNormalization layers train with the fused op; returns it."""
    for layer in compat.nested_layers(model):
        if type(layer) is keras.layers.BatchNormalization:
            compat.rebind_call(layer, _fused_call)
    return model
