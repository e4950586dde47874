"""co2_tf.nets.conv_grad: the filter gradient by matmul equals a NumPy reference, and
--conv_filter_grad picks it for training only."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from co2_tf import build, compat
from co2_tf.config import TrainConfig
from co2_tf.errors import UserError
from co2_tf.evaluation import common
from co2_tf.nets import backbones, conv_grad
from co2_tf.run import rundir
from co2_tf.run import trained as trained_run


def _numpy_filter_grad(x, g, kernel, stride, pads):
    """sum over n, output pixel of x_padded[n, tap] * g[n, pixel]: float64."""
    (top, bottom), (left, right) = pads
    xp = np.pad(x.astype(np.float64), [(0, 0), (top, bottom), (left, right), (0, 0)])
    _, oh, ow, _ = g.shape
    grad = np.zeros((kernel, kernel, x.shape[-1], g.shape[-1]))
    for i in range(kernel):
        for j in range(kernel):
            window = xp[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
            grad[i, j] = np.einsum("nhwc,nhwd->cd", window, g.astype(np.float64))
    return grad


@pytest.mark.parametrize("kernel,stride,padding,size,pads,at_once", [
    (3, 1, "same", 8, ((1, 1), (1, 1)), True),
    (3, 1, "same", 8, ((1, 1), (1, 1)), False),  # one kernel row at a time
    (3, 2, "same", 8, ((0, 1), (0, 1)), True),  # TF's asymmetric "same"
    (3, 2, "valid", 9, ((0, 0), (0, 0)), True),  # after ZeroPadding2D, as the ResNets
    (1, 1, "same", 8, None, True),  # 1x1: left to TF
])
def test_filter_and_input_gradients_match_references(monkeypatch, kernel, stride, padding,
                                                     size, pads, at_once):
    # The math on every shape: these convs are small, 8x8 and strided are left to TF by default.
    monkeypatch.setattr(conv_grad, "_MIN_MACS_PER_IMAGE", 0)
    monkeypatch.setattr(conv_grad, "_MAX_OUTPUT_PIXELS", 64)
    monkeypatch.setattr(conv_grad, "_STRIDED", True)
    if not at_once:
        monkeypatch.setattr(conv_grad, "_PATCH_BYTES_AT_ONCE", 0)
    rng = np.random.RandomState(kernel * 10 + stride)
    x = rng.randn(4, size, size, 5).astype(np.float32)
    layers = [keras.layers.Conv2D(6, kernel, strides=stride, padding=padding, use_bias=False)
              for _ in range(2)]
    model = keras.Sequential([keras.Input((size, size, 5)), layers[1]])
    layers[0].build((None, size, size, 5))
    layers[0].set_weights(layers[1].get_weights())
    conv_grad.matmul_filter_grad(model)
    assert type(layers[1]) is keras.layers.Conv2D
    out_size = layers[0].compute_output_shape((4, size, size, 5))[1]
    assert conv_grad._applies(layers[1], x.shape) == (kernel > 1)  # the path tested
    g = rng.randn(4, out_size, out_size, 6).astype(np.float32)

    @tf.function
    def grads(layer, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * g)
        return (y,) + tuple(tape.gradient(loss, [x, layer.kernel]))

    y_tf, dx_tf, dk_tf = grads(layers[0], tf.constant(x))
    y, dx, dk = grads(layers[1], tf.constant(x))
    np.testing.assert_array_equal(y.numpy(), y_tf.numpy())  # the forward op is TF's own
    np.testing.assert_allclose(dx.numpy(), dx_tf.numpy(), rtol=1e-5, atol=1e-5)
    if pads is not None:
        reference = _numpy_filter_grad(x, g, kernel, stride, pads)
        np.testing.assert_allclose(dk.numpy(), reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dk.numpy(), dk_tf.numpy(), rtol=1e-4, atol=1e-4)


def test_pays_off_only_on_avx2_without_avx512(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
    avx512 = tmp_path / "avx512"
    avx512.write_text("flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni\n")
    assert conv_grad.pays_off(str(avx2))  # the tests run on CPU only
    assert not conv_grad.pays_off(str(avx512))
    assert not conv_grad.pays_off(str(tmp_path / "missing"))


def test_small_convs_keep_tfs_kernel():
    # The tiny convnet's convs (1.2M multiply-adds per image) ran slower by matmul;
    # ResNet-18's layer4 conv (4x4 output, 512 -> 512: 38M) is changed; layer3's (8x8) and
    # the strided ones (layer4's first: 10x10 padded input -> 4x4) keep TF's kernel.
    tiny = keras.layers.Conv2D(256, 3, strides=2, padding="same")
    tiny.build((None, 4, 4, 128))
    assert not conv_grad._applies(tiny, (2, 4, 4, 128))
    layer4 = keras.layers.Conv2D(512, 3, padding="same")
    layer4.build((None, 4, 4, 512))
    assert conv_grad._applies(layer4, (2, 4, 4, 512))
    layer3 = keras.layers.Conv2D(256, 3, padding="same")
    layer3.build((None, 8, 8, 256))
    assert not conv_grad._applies(layer3, (2, 8, 8, 256))
    strided = keras.layers.Conv2D(512, 3, strides=2, padding="valid")
    strided.build((None, 10, 10, 256))
    assert not conv_grad._applies(strided, (2, 10, 10, 256))


# --conv_filter_grad: a parameter of building the backbone. -------------------------------

def _patched(model):
    """Which of `model`'s convs compute their filter gradient by conv_grad's matmul."""
    return [getattr(layer.convolution_op, "__func__", None) is conv_grad._convolution_op
            for layer in compat.nested_layers(model) if isinstance(layer, keras.layers.Conv2D)]


def test_conv_filter_grad_picks_the_kernel(monkeypatch):
    tf_kernel = backbones.build_backbone("tiny", 16, conv_filter_grad="tf")
    assert _patched(tf_kernel) == [False] * 4
    assert all("convolution_op" not in vars(layer) for layer in compat.nested_layers(tf_kernel))
    assert _patched(backbones.build_backbone("tiny", 16, conv_filter_grad="matmul")) == [True] * 4
    assert _patched(backbones.build_backbone("tiny", 16)) == [False] * 4  # TF's by default
    for pays_off in (True, False):  # auto: the host's rule
        monkeypatch.setattr(conv_grad, "pays_off", lambda pays_off=pays_off: pays_off)
        assert conv_grad.resolve("auto") == ("matmul" if pays_off else "tf")
        auto = backbones.build_backbone("tiny", 16, conv_filter_grad="auto")
        assert _patched(auto) == [pays_off] * 4
    with pytest.raises(UserError, match="conv_filter_grad='fast'"):
        backbones.build_backbone("tiny", 16, conv_filter_grad="fast")


def test_evaluation_and_export_keep_tfs_kernel(tmp_path):
    """Training built with --conv_filter_grad=matmul; every backbone rebuilt from its run dir
    (evaluation, export, the kNN monitor's and the random-init baseline's) has TF's kernel."""
    config = TrainConfig(model_dir=str(tmp_path), backbone="tiny", image_size=16, dim=16,
                         queue_size=64, batch_size=8, conv_filter_grad="matmul")
    trained = build.build_model(config, 1, conv_filter_grad=config.conv_filter_grad)
    assert all(_patched(trained.query_backbone)) and all(_patched(trained.key_backbone))
    rundir.write_run_config(str(tmp_path), config)

    run = trained_run.load_run(str(tmp_path), restore_weights=False)  # evaluation's and export's
    assert run.config.conv_filter_grad == "matmul"
    assert not any(_patched(run.model.query_backbone) + _patched(run.model.key_backbone))
    exported = build.any_size_copy(run.config, run.model.query_backbone)  # export_run's
    assert not any(_patched(exported))
    for image_size in (0, 24):  # the run's size, and another one (a copy)
        loaded = common.load_backbone(common.EvalConfig(model_dir=str(tmp_path),
                                                        random_init=True, image_size=image_size))
        assert not any(_patched(loaded.backbone))
    # The kNN monitor's copy and the end-of-run random-init baseline: backbone_fn's default.
    assert not any(_patched(build.backbone_fn(config)("knn_backbone")))
