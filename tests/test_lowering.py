"""TPU-ready by construction: the device functions lower to XLA's HLO with static input specs,
without running, and hold no host op; the pretraining input keeps fully static shapes.

TPUStrategy compiles every step with XLA. A step replicated over logical CPUs does not
compile with XLA (distribute.xla_problem), so each function is lowered as one replica runs
it, on one device (`experimental_get_compiler_ir(*specs)(stage="hlo")` fails on any op XLA
cannot compile, a dynamic shape among them). Batch 2 at the real sizes: the graphs are those
of the presets, and lowering never runs them. One model per kind, lowered once per module.
"""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers.presets import preset_config
from PIL import Image

from co2_tf import build, precision
from co2_tf.data import pipelines
from co2_tf.evaluation import classifier, linear_probe
from co2_tf.nets import backbones

BATCH = 2
# Ops that call back into Python or carry strings: none may be in a device graph.
HOST_OPS = {"EagerPyFunc", "PyFunc", "PyFuncStateless"}


def lower(fn, *specs):
    """HLO text of fn lowered by XLA, and the nodes of its TF graph (nested functions too).

    `specs`: one tf.TensorSpec per argument (lowering with specs needs flat arguments).
    """
    compiled = tf.function(fn, jit_compile=True, autograph=False)
    hlo = compiled.experimental_get_compiler_ir(*specs)(stage="hlo")
    graph = compiled.get_concrete_function(*specs).graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return hlo, nodes


def _packed(step):
    """A Keras step taking (x, y, sample_weight) as one tuple, as three arguments."""
    return lambda x, y, w: step((x, y, w))


def assert_device_graph(nodes):
    ops = {n.op for n in nodes}
    assert not ops & HOST_OPS, ops & HOST_OPS
    strings = sorted({n.op for n in nodes if any(
        a.type == tf.string.as_datatype_enum or a.list.type and tf.string.as_datatype_enum
        in a.list.type for a in n.attr.values())})
    assert not strings, f"string ops in a device graph: {strings}"


# ------------------------------------------------------------------ pretraining
@pytest.fixture(scope="module")
def tpu_model():
    """The TPU preset's model (ResNet-50, 224 px, mixed_bfloat16), one replica's batch of 2."""
    config = preset_config("imagenet_mocov2_co2_tpu.cfg", batch_size=BATCH)
    assert config.precision == "mixed_bfloat16" and config.image_size == 224
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = build.build_model(config, bn_groups=1)  # as each of several replicas
        optimizer = build.build_optimizer(config, steps_per_epoch=10, total_steps=100)
        build.compile_model(model, optimizer, config)
    return config, model


def test_train_step_lowers_in_mixed_bfloat16(tpu_model):
    config, model = tpu_model
    before = model.queue.numpy()[:4].copy(), int(model.step_counter.numpy())
    spec = tf.TensorSpec([BATCH, 224, 224, 3], tf.float32)
    hlo, nodes = lower(lambda x_q, x_k: model.train_step((x_q, x_k)), spec, spec)
    assert_device_graph(nodes)
    # Query forward + backward (input and filter gradients), key forward: 53 convs each.
    assert hlo.count(" convolution(") >= 53 * 4
    assert "bf16[2,112,112,64]" in hlo  # the stem's output, in bfloat16
    assert "f32[65536,128]" in hlo  # the queue stays float32
    assert "custom-call" not in hlo  # no host callbacks
    # Lowered, not run: nothing moved.
    np.testing.assert_array_equal(model.queue.numpy()[:4], before[0])
    assert int(model.step_counter.numpy()) == before[1]


# ------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def eval_backbone():
    """A ResNet-50 at 224 px in float32 (evaluation computes in float32)."""
    with precision.policy_scope("float32"):
        return backbones.build_backbone("resnet50", 224, model_name="backbone", seed=0)


def test_feature_extraction_lowers(eval_backbone):
    """What Keras's predict function runs per replica (the kNN and probe features)."""
    hlo, nodes = lower(eval_backbone.predict_step,
                       tf.TensorSpec([BATCH, 224, 224, 3], tf.float32))
    assert_device_graph(nodes)
    assert hlo.count(" convolution(") == 53
    assert "f32[2,2048]" in hlo


def test_linear_classifier_steps_lower(eval_backbone):
    """The linear probe's train and test steps (weighted batches, as padded ones are), both
    on images through the frozen backbone (MoCo's protocol) and on cached features."""
    images = tf.TensorSpec([BATCH, 224, 224, 3], tf.float32)
    labels = tf.TensorSpec([BATCH], tf.int32)
    weights = tf.TensorSpec([BATCH], tf.float32)
    features = tf.TensorSpec([BATCH, 2048], tf.float32)

    def compiled(model):
        optimizer = classifier.step_optimizer(30.0, boundaries=(0.6, 0.8), decay=0.1,
                                              total_steps=100, momentum=0.9, weight_decay=0.0)
        classifier.compile_classifier(model, optimizer, 1000)
        optimizer.build(model.trainable_variables)
        return model

    frozen = compiled(linear_probe.frozen_classifier(eval_backbone, 224, 1000, seed=0))
    inputs = keras.Input((2048,))
    on_features = compiled(keras.Model(inputs, classifier.linear_layer(1000, 0)(inputs)))
    # The frozen backbone's test step is test_feature_extraction_lowers' graph plus the
    # layer lowered here on features: not lowered a second time.
    for step, x in ((frozen.train_step, images), (on_features.train_step, features),
                    (on_features.test_step, features)):
        hlo, nodes = lower(_packed(step), x, labels, weights)
        assert_device_graph(nodes)
        assert "f32[2048,1000]" in hlo


# ------------------------------------------------------------------ input
def _folder(root):
    rng = np.random.RandomState(0)
    for cls in ("a", "b"):
        os.makedirs(os.path.join(root, cls))
        for i in range(8):
            Image.fromarray(rng.randint(0, 256, (10, 12, 3)).astype(np.uint8)).save(
                os.path.join(root, cls, f"{i}.png"))
    return f"folder:{root}"


# (replicas, pipeline id) per source: 8 pipelines (a pod slice's hosts) for 8 or 16 replicas.
# Pipelines differ only in which examples they read, and each build traces the augmentation
# (CI time): one case per source, together covering both replica counts and both ends.
CASES = {"builtin": (8, 0), "folder": (16, 7), "tfds": (16, 3)}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_pretraining_element_spec_is_static(kind, tmp_path):
    """The views the device gets have one static shape, whatever the source."""
    spec = {"builtin": "builtin", "tfds": "tfds:cifar10"}.get(kind) or _folder(str(tmp_path))
    replicas, k = CASES[kind]
    size = 16
    with tfds.testing.mock_data(num_examples=32):
        fn = pipelines.pretrain_dataset_fn(spec, image_size=size, augment="mocov2", seed=0,
                                           global_batch_size=replicas)
        ctx = tf.distribute.InputContext(num_input_pipelines=8, input_pipeline_id=k,
                                         num_replicas_in_sync=replicas)
        element = fn(ctx).element_spec
    for view in tf.nest.flatten(element):
        assert view.shape.is_fully_defined(), element
        assert view.shape == (1, size, size, 3), element
