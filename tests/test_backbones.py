"""Tests for co2_tf.nets.backbones: layout, numerics, seeds, saving, SyncBN."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from co2_tf.errors import UserError
from co2_tf.nets.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_backbone,
    feature_dim,
)

# Trainable parameters without the fc layer. torchvision's numbers are
# sum(p.numel() for p in model.parameters()) minus fc (all its parameters
# are trainable; BN running stats are buffers, not parameters). Here the
# Keras side sums trainable_weights only: count_params() would add the BN
# moving mean/variance. resnet18_cifar is resnet18 with a 3x3 stem:
# 11,176,512 - 64*3*7*7 + 64*3*3*3.
TORCHVISION_TRAINABLE = {
    "resnet18": 11_176_512,
    "resnet34": 21_284_672,
    "resnet50": 23_508_032,
    "resnet18_cifar": 11_168_832,
    "tiny": 3 * 9 * 32 + 32 * 9 * 64 + 64 * 9 * 128 + 128 * 9 * 256
    + 2 * (32 + 64 + 128 + 256),
}


def _two_replica_strategy():
    """MirroredStrategy over the 2 logical CPUs, without collective ops.

    Every MirroredStrategy restarts its collective instance keys, so a
    second one in the same process (another test, another file) aborts with
    "Shape mismatch in the collective instance 100". ReductionToOneDevice
    runs the same replica_ctx.all_reduce code path without collectives.
    """
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"],
        cross_device_ops=tf.distribute.ReductionToOneDevice())


def _images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(
        size=(n, size, size, 3)).astype(np.float32)


def _trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name", BACKBONES)
def test_builds_shape_and_parameter_count(name):
    model = build_backbone(name, 32, seed=0)
    out = model(_images(2, 32), training=False)
    assert out.shape == (2, feature_dim(name))
    assert out.dtype == tf.float32
    assert _trainable_count(model) == TORCHVISION_TRAINABLE[name]
    assert model.name == name
    bns = [lay for lay in model.layers
           if isinstance(lay, keras.layers.BatchNormalization)]
    assert bns and all(b.momentum == 0.9 and b.epsilon == 1e-5
                       and not b.synchronized for b in bns)
    if name == "resnet50":
        # torchvision's ResNet v1.5: the stride is on the 3x3 conv.
        assert model.get_layer("layer2_0_conv1").strides == (1, 1)
        assert model.get_layer("layer2_0_conv2").strides == (2, 2)


def test_feature_dims_and_bad_input():
    assert [feature_dim(n) for n in BACKBONES] == [512, 512, 2048, 512, 256]
    with pytest.raises(UserError, match="resnet18_cifar"):
        build_backbone("resnet101", 32)
    with pytest.raises(UserError):
        feature_dim("vit")
    with pytest.raises(UserError):
        build_backbone("tiny", 32, bn="group")
    for size in (0, 32.0, "32", True):
        with pytest.raises(UserError):
            build_backbone("tiny", size)


def test_normalisation_inside_the_model():
    model = build_backbone("tiny", 8, seed=0)
    norm = keras.Model(model.input, model.get_layer("normalize").output)
    mean_image = np.broadcast_to(np.array(IMAGENET_MEAN, np.float32),
                                 (2, 8, 8, 3))
    np.testing.assert_allclose(norm(mean_image).numpy(), 0.0, atol=1e-6)
    x = _images(2, 8)
    want = (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(norm(x).numpy(), want, rtol=1e-5, atol=1e-5)
    # Normalisation is the first layer: the first conv (after its
    # PyTorch-style padding) sees the normalised image.
    assert model.layers[1].name == "normalize"
    assert (model.get_layer("conv1_pad").input
            is model.get_layer("normalize").output)


def test_imagenet_stem_pads_like_pytorch():
    """conv1 (7x7/2, pad 3) against a NumPy conv with symmetric padding."""
    model = build_backbone("resnet18", 16, bn="none", seed=1)
    sub = keras.Model(model.input, model.get_layer("conv1").output)
    x = _images(1, 16)
    xn = (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    xp = np.pad(xn[0], ((3, 3), (3, 3), (0, 0)))
    kernel, bias = [w.numpy() for w in model.get_layer("conv1").weights]
    want = np.zeros((8, 8, 64))
    for i in range(8):
        for j in range(8):
            patch = xp[2 * i:2 * i + 7, 2 * j:2 * j + 7]
            want[i, j] = np.einsum("hwc,hwco->o", patch, kernel) + bias
    np.testing.assert_allclose(sub(x).numpy()[0], want, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "resnet18"])
def test_bn_none_output_independent_of_batch(name):
    model = build_backbone(name, 32, bn="none", seed=0)
    assert not any(isinstance(lay, keras.layers.BatchNormalization)
                   for lay in model.layers)
    x = _images(4, 32)
    full = model(x, training=True).numpy()
    alone = model(x[:1], training=True).numpy()
    # Independent up to float32 summation order: oneDNN picks its conv kernels
    # by batch size (3.5e-5 relative measured on AVX2); BN differs by O(0.1).
    np.testing.assert_allclose(full[:1], alone, rtol=1e-4, atol=1e-5)
    # With BN in training mode the batch does matter: the check has teeth.
    bn_model = build_backbone(name, 32, bn="local", seed=0)
    assert not np.allclose(bn_model(x, training=True).numpy()[:1],
                           bn_model(x[:1], training=True).numpy(),
                           atol=1e-3)


def test_seeded_init_is_deterministic_and_he_fan_out():
    a = build_backbone("resnet18_cifar", 32, seed=7)
    b = build_backbone("resnet18_cifar", 32, seed=7)
    c = build_backbone("resnet18_cifar", 32, seed=8)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    assert not np.array_equal(a.weights[0].numpy(), c.weights[0].numpy())
    # Layers of equal shape get different draws (one seed per layer).
    k1 = a.get_layer("layer1_0_conv1").kernel.numpy()
    k2 = a.get_layer("layer1_0_conv2").kernel.numpy()
    assert not np.array_equal(k1, k2)
    # torchvision: kaiming_normal_(mode="fan_out"), std sqrt(2 / (k*k*out)),
    # untruncated (so some draws lie beyond 2 std).
    k = a.get_layer("layer4_1_conv2").kernel.numpy()
    std = np.sqrt(2.0 / (3 * 3 * 512))
    assert abs(k.std() / std - 1) < 0.01 and abs(k.mean()) < 1e-4
    assert np.mean(np.abs(k) > 2 * std) > 0.03
    bn = a.get_layer("layer4_1_bn2")
    np.testing.assert_array_equal(bn.gamma.numpy(), 1.0)
    np.testing.assert_array_equal(bn.beta.numpy(), 0.0)
    z = build_backbone("resnet18_cifar", 32, seed=7, zero_init_residual=True)
    np.testing.assert_array_equal(z.get_layer("layer4_1_bn2").gamma.numpy(),
                                  0.0)
    np.testing.assert_array_equal(z.get_layer("layer4_1_bn1").gamma.numpy(),
                                  1.0)


@pytest.mark.parametrize("name,bn", [("tiny", "sync"),
                                     ("resnet18_cifar", "local")])
def test_keras_file_round_trip(name, bn, tmp_path):
    model = build_backbone(name, 16, bn=bn, seed=3, model_name="query_enc")
    x = _images(4, 16)
    # One training call so the BN moving statistics are not the defaults.
    model(x, training=True)
    path = str(tmp_path / "backbone.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.name == "query_enc"
    assert all(w.trainable for w in loaded.trainable_weights)
    assert len(loaded.trainable_weights) == len(model.trainable_weights)
    for training in (False, True):
        np.testing.assert_array_equal(
            model(x, training=training).numpy(),
            loaded(x, training=training).numpy())
    bns = [lay for lay in loaded.layers
           if isinstance(lay, keras.layers.BatchNormalization)]
    assert all(b.synchronized == (bn == "sync") for b in bns)


@pytest.mark.parametrize("bn", ["sync", "local"])
def test_sync_bn_uses_global_batch_statistics(bn):
    """2 replicas x 4 images: SyncBN == one device on all 8, local BN not."""
    x = _images(8, 16, seed=5)
    ref = build_backbone("tiny", 16, bn="local", seed=4)
    want = ref(x, training=True).numpy()

    strategy = _two_replica_strategy()
    with strategy.scope():
        model = build_backbone("tiny", 16, bn=bn, seed=4)
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: x[4 * ctx.replica_id_in_sync_group:
                      4 * (ctx.replica_id_in_sync_group + 1)])

    @tf.function
    def forward(x):
        return strategy.run(lambda x: model(x, training=True), args=(x,))

    got = np.concatenate([t.numpy() for t in
                          strategy.experimental_local_results(forward(xs))])
    if bn == "sync":
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    else:
        assert not np.allclose(got, want, atol=1e-3)


def test_sync_bn_compiles_with_xla_on_one_device():
    """XLA on one replica is the cheap proxy for "compiles on TPU"."""
    model = build_backbone("tiny", 16, bn="sync", seed=2)
    x = tf.constant(_images(4, 16))

    def loss_and_grads(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x, training=True)))
        return loss, tape.gradient(loss, model.trainable_variables)

    eager_loss, eager_grads = loss_and_grads(x)
    xla_loss, xla_grads = tf.function(loss_and_grads, jit_compile=True)(x)
    np.testing.assert_allclose(xla_loss.numpy(), eager_loss.numpy(),
                               rtol=1e-4)
    for a, b in zip(xla_grads, eager_grads):
        # Reassociated float32 sums: compare at the gradient's own scale.
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3,
                                   atol=1e-4 * np.abs(b.numpy()).max())
