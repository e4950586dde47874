"""Tests for co2_tf.evaluation.semi_supervised: subsets, split files, fine-tuning."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers.references import split_arrays, topk

from co2_tf.data.sources import make_source
from co2_tf.errors import UserError
from co2_tf.evaluation import classifier, common, semi_supervised
from co2_tf.run import trained


def test_balanced_subset_and_split_files(tmp_path):
    labels = np.repeat(np.arange(4), [100, 40, 7, 1])
    subset = semi_supervised.balanced_subset(labels, 0.1, seed=3)
    counts = np.bincount(labels[subset], minlength=4)
    np.testing.assert_array_equal(counts, [10, 4, 1, 1])  # round(0.1 n_c), at least 1
    assert len(np.unique(subset)) == len(subset) and np.all(np.diff(subset) > 0)
    np.testing.assert_array_equal(subset, semi_supervised.balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(subset, semi_supervised.balanced_subset(labels, 0.1, seed=4))
    assert len(semi_supervised.balanced_subset(labels, 1.0, seed=0)) == len(labels)

    path = tmp_path / "labels.txt"
    semi_supervised.write_split_file(str(path), subset, dataset="builtin", split="train",
                                     fraction=0.1, seed=3, total=148)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    assert "dataset=builtin split=train fraction=0.1 seed=3" in lines[0]
    assert [int(i) for i in lines[1:]] == subset.tolist()
    indices, header = semi_supervised.read_split_file(str(path), dataset="builtin",
                                                      split="train", total=148)
    np.testing.assert_array_equal(indices, subset)
    assert header["fraction"] == "0.1" and header["seed"] == "3"

    with pytest.raises(UserError, match="not builtin test"):
        semi_supervised.read_split_file(str(path), dataset="builtin", split="test", total=148)
    with pytest.raises(UserError, match="not an example index"):
        semi_supervised.read_split_file(str(path), dataset="builtin", split="train", total=50)
    path.write_text(path.read_text() + "oops\n")
    with pytest.raises(UserError, match="line 18"):
        semi_supervised.read_split_file(str(path), dataset="builtin", split="train", total=148)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_fraction_outside_0_1_is_an_error(fraction):
    with pytest.raises(UserError, match=r"--label_fraction.*\(0, 1\]"):
        semi_supervised.SemiSupervisedConfig(model_dir="x", label_fraction=fraction).check()
    semi_supervised.SemiSupervisedConfig(model_dir="x", label_fraction=1.0).check()


def test_fine_tuner_gives_backbone_and_head_their_own_learning_rates():
    from co2_tf.nets import backbones  # noqa: PLC0415
    backbone = backbones.build_backbone("tiny", 16, seed=0)

    def sgd(lr):
        return classifier.step_optimizer(lr, boundaries=(), decay=0.1, total_steps=10,
                                         momentum=0.9, weight_decay=0.0)
    model = semi_supervised.FineTuner(backbone, 5, 16, seed=0, backbone_optimizer=sgd(0.01))
    model.compile(optimizer=sgd(0.5), loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=classifier.classification_metrics(5))
    model.optimizer.build(model.head.trainable_variables)
    model.backbone_optimizer.build(backbone.trainable_variables)
    rng = np.random.default_rng(0)
    x = rng.random((8, 16, 16, 3), np.float32)
    y = rng.integers(0, 5, 8).astype(np.int32)
    variables = backbone.trainable_variables + model.head.trainable_variables
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits,
                                                                           from_logits=True))
    grads = [g.numpy() for g in tape.gradient(loss, variables)]
    before = [v.numpy() for v in variables]
    logs = model.train_step((tf.constant(x), tf.constant(y)))
    n = len(backbone.trainable_variables)
    for i, (v, b, g) in enumerate(zip(variables, before, grads)):
        lr = 0.01 if i < n else 0.5  # first SGD step: w - lr * g
        np.testing.assert_allclose(v.numpy(), b - lr * g, atol=1e-6, err_msg=v.path)
    logits = logits.numpy()
    shifted = logits - logits.max(1, keepdims=True)
    xent = np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(8), y])
    assert float(logs["loss"]) == pytest.approx(xent, rel=1e-5)
    assert float(logs["top1"]) == pytest.approx(topk(logits, y, 1))


def test_fine_tune_on_a_tenth_of_the_labels(run_dir, tmp_path):
    # The subset drawn from the small test split, to keep the test short.
    config = semi_supervised.SemiSupervisedConfig(
        model_dir=run_dir, split="test", label_fraction=0.1, epochs=2, batch_size=50,
        output_dir=str(tmp_path / "semi"))
    results = semi_supervised.fine_tune(config, verbose=0)
    split_file = tmp_path / "semi" / "labels_0.1_seed0.txt"
    indices = [int(i) for i in split_file.read_text().splitlines()[1:]]
    split_labels = make_source("builtin").labels("test")
    np.testing.assert_array_equal(np.bincount(split_labels[indices]), [20] * 10)
    assert results["subset"] == {"split_file": str(split_file), "fraction": 0.1, "seed": 0,
                                 "examples": 200}

    # The saved model is the fine-tuned one: its held-out predictions give the top-1/5.
    model = keras.models.load_model(results["model_file"])
    images, labels = split_arrays("test")
    logits = model.predict(images, batch_size=500, verbose=0)
    assert results["top1"] == pytest.approx(topk(logits, labels, 1), abs=1e-3)
    assert results["top5"] == pytest.approx(topk(logits, labels, 5), abs=1e-3)
    start = trained.load_run(run_dir).model.query_backbone.trainable_weights
    tuned = model.get_layer("query_backbone").trainable_weights
    assert all(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(start, tuned))

    # --split_file gives the very same examples (here for a random-init baseline).
    again = semi_supervised.SemiSupervisedConfig(model_dir=run_dir, split="test",
                                                 split_file=str(split_file), random_init=True)
    loaded = common.load_backbone(again)
    _, reused, subset = semi_supervised.label_subset(again, common.resolve_data(again, loaded),
                                                     str(tmp_path / "unused"))
    assert reused.tolist() == indices and subset["examples"] == 200


def test_imagenet_fractions_use_the_standard_subsets(tmp_path):
    import tensorflow_datasets as tfds  # noqa: PLC0415
    imagenet = common.EvalData(source=make_source("tfds:imagenet2012"),
                               split="train", eval_split="validation", image_size=16,
                               class_names=[str(i) for i in range(1000)], batch_size=4)
    with tfds.testing.mock_data(num_examples=6):
        for fraction, name in ((0.01, "1pct"), (0.1, "10pct")):
            config = semi_supervised.SemiSupervisedConfig(model_dir="x", label_fraction=fraction)
            train, indices, subset = semi_supervised.label_subset(config, imagenet, str(tmp_path))
            assert str(train.source) == f"tfds:imagenet2012_subset/{name}" and indices is None
            assert subset["standard_subset"] == str(train.source)
        config = semi_supervised.SemiSupervisedConfig(model_dir="x", label_fraction=0.05)
        train, indices, subset = semi_supervised.label_subset(config, imagenet, str(tmp_path))
        assert str(train.source) == "tfds:imagenet2012" and os.path.exists(subset["split_file"])
    assert os.listdir(tmp_path) == ["labels_0.05_seed0.txt"]
