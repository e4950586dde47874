"""Tests for co2_tf.evaluation.classifier: the classifier loop and its SGD schedule flags."""
import glob

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers.references import topk

from co2_tf.errors import UserError
from co2_tf.evaluation import classifier, linear_probe, semi_supervised


def test_train_classifier_reports_its_models_top1_top5(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(7, 12))
    y = rng.integers(0, 7, 400)
    x = (centres[y] + 1.5 * rng.normal(size=(400, 12))).astype(np.float32)
    inputs = keras.Input((12,))
    model = keras.Model(inputs, classifier.linear_layer(7, seed=0)(inputs))
    classifier.compile_classifier(
        model, classifier.step_optimizer(0.5, boundaries=(0.5,), decay=0.1, total_steps=3 * 4,
                                         momentum=0.9, weight_decay=0.0), 7)
    train = tf.data.Dataset.from_tensor_slices((x[:300], y[:300]))
    held_out = tf.data.Dataset.from_tensor_slices((x[300:], y[300:])).batch(32)
    metrics = classifier.train_classifier(
        model, lambda epoch, skip: train.shuffle(300, seed=epoch).batch(100), held_out, epochs=3,
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


@pytest.mark.parametrize("make", [linear_probe.LinearEvalConfig,
                                  semi_supervised.SemiSupervisedConfig])
@pytest.mark.parametrize("field, value, flag", [
    ("epochs", 0, "--epochs"), ("momentum", -0.1, "--momentum"),
    ("weight_decay", -1e-4, "--weight_decay"), ("lr_decay", 0.0, "--lr_decay"),
    ("eval_every", -1, "--eval_every"), ("lr_boundaries", "0.8,0.6", "--lr_boundaries"),
    ("lr_boundaries", "1.5", "--lr_boundaries")])
def test_classifier_schedule_flags_are_checked(make, field, value, flag):
    # Both tools share classifier.check_sgd_schedule: a bad value names its flag.
    assert make(model_dir="/nonexistent").check()  # the defaults pass (no files read)
    with pytest.raises(UserError, match=flag):
        make(model_dir="/nonexistent", **{field: value}).check()
