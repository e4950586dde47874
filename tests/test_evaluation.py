"""Evaluation tools: kNN, linear probe, semi-supervised fine-tuning, retrieval, projector.

Numbers are checked against NumPy references computed here from independently
extracted features or from the trained models' own outputs.
"""

import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from co2_tf import (data, evaluation, export, knn, linear_probe, retrieval, runs,
                    semi_supervised, training)
from co2_tf.config import TrainConfig
from co2_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(image_size=16, batch_size=16, queue_size=64, dim=16, train_steps=3, knn_every=0,
             seed=7)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("evaluation") / "run")
    training.train(TrainConfig(model_dir=model_dir, **SMALL), verbose=0)
    return model_dir


def split_arrays(split, image_size=16):
    """Centre-cropped images and labels of a builtin split, as NumPy."""
    batches = list(data.labelled_dataset("builtin", split=split, image_size=image_size,
                                         batch_size=500))
    return (np.concatenate([x.numpy() for x, _ in batches]),
            np.concatenate([y.numpy() for _, y in batches]))


@pytest.fixture(scope="module")
def reference(run_dir):
    """The run's backbone and NumPy features of both builtin splits."""
    backbone = runs.load_run(run_dir).model.query_backbone
    out = {}
    for split in ("train", "test"):
        images, labels = split_arrays(split)
        out[split] = (images, labels, backbone.predict(images, batch_size=500, verbose=0))
    return backbone, out


def unit(f):
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def numpy_knn(bank_f, bank_y, query_f, classes, k, t):
    """InstDisc's weighted kNN, written out: class scores [Q, C]."""
    sims = unit(query_f) @ unit(bank_f).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    weights = np.exp(np.take_along_axis(sims, top, 1) / t)
    scores = np.zeros((len(query_f), classes))
    for c in range(classes):
        scores[:, c] = (weights * (bank_y[top] == c)).sum(1)
    return scores


def topk(scores, labels, k):
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(best == np.asarray(labels)[:, None], axis=1)))


# ------------------------------------------------------------------- kNN
def test_knn_scores_match_numpy():
    rng = np.random.default_rng(0)
    bank, query = rng.normal(size=(300, 8)), rng.normal(size=(50, 8))
    bank_y, query_y = rng.integers(0, 4, 300), rng.integers(0, 4, 50)
    scores = evaluation.knn_predict_scores(
        tf.constant(unit(bank), tf.float32), tf.constant(bank_y, tf.int32),
        tf.constant(unit(query), tf.float32), 4, k=20, temperature=0.1, chunk=16).numpy()
    np.testing.assert_allclose(scores, numpy_knn(bank, bank_y, query, 4, 20, 0.1), rtol=1e-4)
    accuracy = evaluation.knn_accuracy(
        tf.constant(unit(bank), tf.float32), tf.constant(bank_y, tf.int32),
        tf.constant(unit(query), tf.float32), query_y, 4, k=20, temperature=0.1)
    assert accuracy == topk(numpy_knn(bank, bank_y, query, 4, 20, 0.1), query_y, 1)


def test_knn_tool_matches_numpy_the_monitor_and_the_export(run_dir, reference, tmp_path):
    _, ref = reference
    results = knn.knn_eval(knn.KnnConfig(model_dir=run_dir, output_dir=str(tmp_path / "knn"),
                                         projector_dir=str(tmp_path / "projector"),
                                         projector_points=50), verbose=0)
    _, train_y, train_f = ref["train"]
    test_images, test_y, test_f = ref["test"]
    scores = numpy_knn(train_f, train_y, test_f, 10, 200, 0.1)
    assert results["top1"] == pytest.approx(topk(scores, test_y, 1), abs=1e-3)
    assert results["top5"] == pytest.approx(topk(scores, test_y, 5), abs=1e-3)
    with open(os.path.join(run_dir, "summary.json")) as f:  # the pretraining monitor's value
        assert results["top1"] == json.load(f)["knn_top1"]
    with open(tmp_path / "knn" / "knn_eval.json") as f:
        assert json.load(f)["top1"] == results["top1"]

    # Projector: the first 50 held-out embeddings, their classes, thumbnails.
    projector = tmp_path / "projector"
    reader = tf.train.load_checkpoint(str(projector))
    np.testing.assert_allclose(reader.get_tensor("embeddings/.ATTRIBUTES/VARIABLE_VALUE"),
                               unit(test_f[:50]), atol=1e-5)
    lines = (projector / "metadata.tsv").read_text().splitlines()
    assert lines[0] == "label\tclass" and len(lines) == 51
    assert lines[1:] == [f"{y}\t{data.builtin.CLASS_NAMES[y]}" for y in test_y[:50]]
    config = (projector / "projector_config.pbtxt").read_text()
    assert "metadata.tsv" in config and "sprite.png" in config
    sprite = tf.io.decode_png(tf.io.read_file(str(projector / "sprite.png"))).numpy()
    assert sprite.shape == (8 * 16, 8 * 16, 3)  # ceil(sqrt(50)) = 8 thumbnails a side
    np.testing.assert_allclose(sprite[16:32, :16] / 255.0, test_images[8], atol=1 / 255 + 1e-6)

    # The same numbers from the exported backbone.keras.
    out = str(tmp_path / "export")
    export.export(export.ExportConfig(model_dir=run_dir, export_dir=out))
    from_export = knn.knn_eval(knn.KnnConfig(keras_model=os.path.join(out, "backbone.keras"),
                                             output_dir=str(tmp_path / "knn2")), verbose=0)
    assert from_export["top1"] == results["top1"] and from_export["top5"] == results["top5"]
    assert from_export["data"]["dataset"] == "builtin"  # from export.json


# ---------------------------------------------------------- linear probe
def test_train_classifier_reports_its_models_top1_top5(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(7, 12))
    y = rng.integers(0, 7, 400)
    x = (centres[y] + 1.5 * rng.normal(size=(400, 12))).astype(np.float32)
    inputs = keras.Input((12,))
    model = keras.Model(inputs, evaluation.linear_layer(7, seed=0)(inputs))
    model.compile(optimizer=evaluation.step_optimizer(0.5, boundaries=(0.5,), decay=0.1,
                                                      total_steps=3 * 4, momentum=0.9,
                                                      weight_decay=0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=evaluation.classification_metrics(7))
    train = tf.data.Dataset.from_tensor_slices((x[:300], y[:300]))
    held_out = tf.data.Dataset.from_tensor_slices((x[300:], y[300:])).batch(32)
    metrics = evaluation.train_classifier(
        model, lambda epoch: train.shuffle(300, seed=epoch).batch(100), held_out, epochs=3,
        log_dir=str(tmp_path / "logs"), eval_every=2, verbose=0)
    kernel, bias = (w.numpy() for w in model.layers[-1].weights)
    logits = x[300:] @ kernel + bias
    assert metrics["top1"] == pytest.approx(topk(logits, y[300:], 1), abs=1e-6)
    assert metrics["top5"] == pytest.approx(topk(logits, y[300:], 5), abs=1e-6)
    shifted = logits - logits.max(1, keepdims=True)
    xent = np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(100), y[300:]])
    assert metrics["loss"] == pytest.approx(xent, rel=1e-4)
    assert 0.5 < metrics["top1"] < 1 and metrics["top5"] > metrics["top1"]

    steps = {}
    for sub in ("train", "validation"):
        for path in glob.glob(str(tmp_path / "logs" / sub / "events*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    steps.setdefault((sub, value.tag), []).append(event.step)
    assert len(glob.glob(str(tmp_path / "logs" / "train" / "events*"))) == 1
    assert steps[("train", "epoch_top1")] == [0, 1, 2]
    assert steps[("validation", "epoch_top1")] == [1, 2]  # every 2nd epoch and the last
    assert steps[("validation", "epoch_top5")] == [1, 2]


def test_linear_fast_protocol_and_its_feature_cache(run_dir, reference, tmp_path, monkeypatch):
    _, ref = reference
    config = linear_probe.LinearEvalConfig(model_dir=run_dir, protocol="fast", epochs=3,
                                           output_dir=str(tmp_path / "fast"))
    results = linear_probe.linear_eval(config, verbose=0)
    with np.load(tmp_path / "fast" / "features.npz") as cached:
        np.testing.assert_allclose(cached["train_f"], ref["train"][2], atol=1e-4)
        np.testing.assert_allclose(cached["eval_f"], ref["test"][2], atol=1e-4)
        np.testing.assert_array_equal(cached["eval_y"], ref["test"][1])
    with open(tmp_path / "fast" / "linear_eval.json") as f:
        on_disk = json.load(f)
    assert on_disk["top1"] == results["top1"] and 0 < results["top1"] <= results["top5"] <= 1
    assert on_disk["hyper_parameters"]["learning_rate"] == 0.1  # the fast protocol's default
    assert on_disk["backbone"]["step"] == 3 and not on_disk["backbone"]["random_init"]
    assert on_disk["data"]["train_examples"] == 8000

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again instead of read from the cache")
    monkeypatch.setattr(evaluation, "extract_features", no_extraction)
    again = linear_probe.linear_eval(config, verbose=0)
    assert again["top1"] == pytest.approx(results["top1"], abs=1e-3)


def test_linear_moco_protocol_trains_only_the_classifier(run_dir, tmp_path, monkeypatch):
    loaded = runs.load_backbone(runs.EvalConfig(model_dir=run_dir))
    before = loaded.backbone.get_weights()  # BN moving statistics included
    monkeypatch.setattr(runs, "load_backbone", lambda config: loaded)  # to inspect it after
    results = linear_probe.linear_eval(linear_probe.LinearEvalConfig(
        model_dir=run_dir, epochs=1, split="test", batch_size=128,
        output_dir=str(tmp_path / "moco")), verbose=0)
    after = loaded.backbone.get_weights()
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(before, after))
    assert results["protocol"] == "moco" and results["hyper_parameters"]["learning_rate"] == 30
    assert 0 <= results["top1"] <= results["top5"] <= 1


def test_evaluating_at_another_image_size(run_dir, reference):
    backbone, _ = reference
    loaded = runs.load_backbone(runs.EvalConfig(model_dir=run_dir, image_size=24))
    assert loaded.image_size == 24
    x = np.random.default_rng(0).random((2, 24, 24, 3), np.float32)
    assert loaded.backbone(x).shape == (2, 256)
    for a, b in zip(loaded.backbone.get_weights(), backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------- semi-supervised
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
    from co2_tf import backbones  # noqa: PLC0415
    backbone = backbones.build_backbone("tiny", 16, seed=0)

    def sgd(lr):
        return evaluation.step_optimizer(lr, boundaries=(), decay=0.1, total_steps=10,
                                         momentum=0.9, weight_decay=0.0)
    model = semi_supervised.FineTuner(backbone, 5, 16, seed=0, backbone_optimizer=sgd(0.01))
    model.compile(optimizer=sgd(0.5), loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=evaluation.classification_metrics(5))
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
    split_labels = data.split_labels("builtin", "test")
    np.testing.assert_array_equal(np.bincount(split_labels[indices]), [20] * 10)
    assert results["subset"] == {"split_file": str(split_file), "fraction": 0.1, "seed": 0,
                                 "examples": 200}

    # The saved model is the fine-tuned one: its held-out predictions give the top-1/5.
    model = keras.models.load_model(results["model_file"])
    images, labels = split_arrays("test")
    logits = model.predict(images, batch_size=500, verbose=0)
    assert results["top1"] == pytest.approx(topk(logits, labels, 1), abs=1e-3)
    assert results["top5"] == pytest.approx(topk(logits, labels, 5), abs=1e-3)
    start = runs.load_run(run_dir).model.query_backbone.trainable_weights
    tuned = model.get_layer("query_backbone").trainable_weights
    assert all(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(start, tuned))

    # --split_file gives the very same examples (here for a random-init baseline).
    again = semi_supervised.SemiSupervisedConfig(model_dir=run_dir, split="test",
                                                 split_file=str(split_file), random_init=True)
    loaded = runs.load_backbone(again)
    _, reused, subset = semi_supervised.label_subset(again, runs.resolve_data(again, loaded),
                                                     str(tmp_path / "unused"))
    assert reused.tolist() == indices and subset["examples"] == 200


def test_imagenet_fractions_use_the_standard_subsets(tmp_path):
    import tensorflow_datasets as tfds  # noqa: PLC0415
    imagenet = runs.EvalData(spec=data.parse_dataset_spec("tfds:imagenet2012"), data_dir=None,
                             split="train", eval_split="validation", image_size=16,
                             class_names=[str(i) for i in range(1000)], batch_size=4)
    with tfds.testing.mock_data(num_examples=6):
        for fraction, name in ((0.01, "1pct"), (0.1, "10pct")):
            config = semi_supervised.SemiSupervisedConfig(model_dir="x", label_fraction=fraction)
            train, indices, subset = semi_supervised.label_subset(config, imagenet, str(tmp_path))
            assert str(train.spec) == f"tfds:imagenet2012_subset/{name}" and indices is None
            assert subset["standard_subset"] == str(train.spec)
        config = semi_supervised.SemiSupervisedConfig(model_dir="x", label_fraction=0.05)
        train, indices, subset = semi_supervised.label_subset(config, imagenet, str(tmp_path))
        assert str(train.spec) == "tfds:imagenet2012" and os.path.exists(subset["split_file"])
    assert os.listdir(tmp_path) == ["labels_0.05_seed0.txt"]


# ------------------------------------------------------------------ data
def test_labelled_dataset_indices_select_those_examples():
    images, labels = split_arrays("test")
    chosen = [1999, 3, 17, 500]
    subset = list(data.labelled_dataset("builtin", split="test", image_size=16, batch_size=3,
                                        indices=chosen))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in subset]), images[chosen])
    np.testing.assert_array_equal(np.concatenate([y for _, y in subset]), labels[chosen])
    np.testing.assert_array_equal(data.split_labels("builtin", "test"), labels)
    augmented = data.labelled_dataset("builtin", split="test", image_size=16, batch_size=8,
                                      indices=chosen, transform="linear_train", seed=1)
    assert sorted(np.concatenate([y for _, y in augmented])) == sorted(labels[chosen])


def test_labelled_dataset_indices_with_tfds():
    import tensorflow_datasets as tfds  # noqa: PLC0415
    with tfds.testing.mock_data(num_examples=12):
        full = list(data.labelled_dataset("tfds:mnist", split="test", image_size=16,
                                          batch_size=12))
        images, labels = full[0][0].numpy(), full[0][1].numpy()
        np.testing.assert_array_equal(data.split_labels("tfds:mnist", "test"), labels)
        subset = list(data.labelled_dataset("tfds:mnist", split="test", image_size=16,
                                            batch_size=12, indices=[2, 5, 11]))
        np.testing.assert_array_equal(subset[0][0].numpy(), images[[2, 5, 11]])
        np.testing.assert_array_equal(subset[0][1].numpy(), labels[[2, 5, 11]])


# ------------------------------------------------------------- retrieval
def test_retrieval_picture_shows_the_nearest_neighbours(run_dir, reference, tmp_path):
    _, ref = reference
    result = retrieval.retrieval_picture(retrieval.RetrievalConfig(
        model_dir=run_dir, out=str(tmp_path / "grid.png"), num_queries=3, k=4, thumb_size=32,
        seed=2), verbose=0)
    _, _, train_f = ref["train"]
    _, _, test_f = ref["test"]
    sims = unit(test_f[result["queries"]]) @ unit(train_f).T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :4]
    assert result["neighbours"] == expected.tolist()
    np.testing.assert_allclose(result["similarities"], np.take_along_axis(sims, expected, 1),
                               atol=1e-5)
    from PIL import Image  # noqa: PLC0415
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.format == "PNG"
        width, height = picture.size
    assert width > 5 * 32 and height > 3 * 32


# ----------------------------------------------------------------- errors
def test_user_errors(run_dir, tmp_path):
    with pytest.raises(UserError, match="nothing to evaluate"):
        knn.knn_eval(knn.KnnConfig())
    with pytest.raises(UserError, match="either --keras_model"):
        knn.knn_eval(knn.KnnConfig(model_dir=run_dir, keras_model="x.keras"))
    with pytest.raises(UserError, match="--output_dir is required"):
        knn.knn_eval(knn.KnnConfig(keras_model=str(tmp_path / "backbone.keras")))
    with pytest.raises(UserError, match="does not exist"):
        knn.knn_eval(knn.KnnConfig(keras_model=str(tmp_path / "missing.keras"),
                                   output_dir=str(tmp_path)))
    empty = tmp_path / "untrained"
    empty.mkdir()
    (empty / "config.json").write_text(TrainConfig(model_dir=str(empty), **SMALL).to_json())
    with pytest.raises(UserError, match="has no checkpoint"):
        linear_probe.linear_eval(linear_probe.LinearEvalConfig(model_dir=str(empty)))

    import tensorflow_datasets as tfds  # noqa: PLC0415
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(UserError, match="no 'label'"):
            knn.knn_eval(knn.KnnConfig(model_dir=run_dir, dataset="tfds:celeb_a"))


@pytest.mark.parametrize("tool,flags,fragment", [
    ("linear_eval.py", ["--model_dir={empty}"], "has no checkpoint"),
    ("semi_supervised.py", ["--model_dir={run}", "--label_fraction=0"], "--label_fraction"),
])
def test_tools_print_one_line_errors(run_dir, tmp_path, tool, flags, fragment):
    empty = tmp_path / "untrained"
    empty.mkdir()
    (empty / "config.json").write_text(TrainConfig(model_dir=str(empty), **SMALL).to_json())
    args = [f.format(empty=empty, run=run_dir) for f in flags]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool)] + args,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, result.stderr


@pytest.mark.parametrize("make", [linear_probe.LinearEvalConfig,
                                  semi_supervised.SemiSupervisedConfig])
@pytest.mark.parametrize("field, value, flag", [
    ("epochs", 0, "--epochs"), ("momentum", -0.1, "--momentum"),
    ("weight_decay", -1e-4, "--weight_decay"), ("lr_decay", 0.0, "--lr_decay"),
    ("eval_every", -1, "--eval_every"), ("lr_boundaries", "0.8,0.6", "--lr_boundaries"),
    ("lr_boundaries", "1.5", "--lr_boundaries")])
def test_classifier_schedule_flags_are_checked(make, field, value, flag):
    # Both tools share evaluation.check_sgd_schedule: a bad value names its flag.
    assert make(model_dir="/nonexistent").check()  # the defaults pass (no files read)
    with pytest.raises(UserError, match=flag):
        make(model_dir="/nonexistent", **{field: value}).check()
