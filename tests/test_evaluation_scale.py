"""Evaluation at scale: several replicas, checkpoints and resume, the classifiers kept.

Each test reuses the session's trained `run_dir` and trains its classifiers on
the builtin test split (2000 images, 16 px) for 1-2 epochs.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers.references import split_arrays

from co2_tf.errors import UserError
from co2_tf.evaluation import classifier, common, knn, linear_probe, semi_supervised
from co2_tf.run.preemption import Preempted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "helpers")


def _weights(path):
    return keras.models.load_model(path).get_layer("classifier").get_weights()


class CountBatches(keras.callbacks.Callback):
    def __init__(self, sigterm_at=None):
        super().__init__()
        self.batches = 0
        self.sigterm_at = sigterm_at

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if self.batches == self.sigterm_at:  # a preemption notice
            os.kill(os.getpid(), signal.SIGTERM)


def test_two_replicas_give_the_one_replica_results(run_dir, reference, two_replicas, tmp_path):
    # Features: each global batch split across the replicas (the last one, of 1
    # image, leaves a replica empty); every feature comes back, in order.
    config = linear_probe.LinearEvalConfig(model_dir=run_dir, split="test", epochs=1,
                                           batch_size=100, eval_every=0)
    _, loaded, _ = common.prepare(config, two_replicas)
    _, ref = reference
    images, labels = ref["test"][0][:101], ref["test"][1][:101]
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(50)
    features, got = knn.extract_features(loaded.backbone, batches, normalize=False,
                                         strategy=two_replicas)
    np.testing.assert_allclose(features.numpy(), ref["test"][2][:101], atol=1e-5)
    np.testing.assert_array_equal(got.numpy(), labels)

    # The moco protocol's classifier trained on half batches, the global batch
    # keeping its meaning.
    one, two = (linear_probe.linear_eval(dataclasses.replace(config, output_dir=str(
        tmp_path / f"moco{n}")), verbose=0, strategy=strategy)
        for n, strategy in ((1, None), (2, two_replicas)))
    assert (one["replicas"], two["replicas"]) == (1, 2)
    # Measured (AVX2, oneDNN): equal top-1 and top-5; kernels within 2.7e-6 of their
    # largest value (the replicas' half-batch gradients are summed in another order
    # than one batch's, and MoCo's lr 30 amplifies the rounding). Tolerances: 1e-4
    # of the largest weight, and 2 of the 2000 held-out images (0.1%) for a
    # prediction at a near tie flipping on another CPU.
    assert two["top1"] == pytest.approx(one["top1"], abs=0.001)
    assert two["top5"] == pytest.approx(one["top5"], abs=0.001)
    w1, w2 = _weights(one["model_file"])[0], _weights(two["model_file"])[0]
    np.testing.assert_allclose(w2, w1, atol=1e-4 * np.abs(w1).max())
    with pytest.raises(UserError, match="--batch_size=25 .* multiple of the 2 replicas"):
        linear_probe.linear_eval(dataclasses.replace(config, batch_size=25),
                                 strategy=two_replicas)


def test_a_last_batch_smaller_than_the_replicas_is_padded(two_replicas, tmp_path):
    # 101 examples in batches of 50: the last one has 1 image for 2 replicas, which
    # Keras's layers fail on unless padded; the padding (weight 0) counts nowhere.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((101, 4, 4, 3), np.float32)
    y = rng.integers(0, 3, 101).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(50)

    def model():
        return keras.Sequential([
            keras.Input((4, 4, 3)), keras.layers.Conv2D(4, 1), keras.layers.BatchNormalization(),
            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    with two_replicas.scope():
        trained = model()
        classifier.compile_classifier(trained, keras.optimizers.SGD(0.1), 3)
    metrics = classifier.train_classifier(trained, lambda epoch, skip: data, data, epochs=2,
                                          log_dir=str(tmp_path), verbose=0)
    copy = model()  # on one device: its predictions are the reference
    copy.set_weights(trained.get_weights())
    logits = copy.predict(x, verbose=0)
    # 2 replicas and 1 device round differently (~1e-6): an example whose two best
    # logits are that close may flip (CI once flipped one of 101). Those may go either
    # way; every other example must count exactly as on one device.
    top2 = np.sort(logits, 1)[:, -2:]
    tied = top2[:, 1] - top2[:, 0] < 1e-4
    assert tied.sum() <= 2, "too many near-ties for the check to mean anything"
    correct = np.argmax(logits, 1) == y
    low, high = np.sum(correct & ~tied), np.sum(correct | tied)
    assert low / 101 - 1e-6 <= metrics["top1"] <= high / 101 + 1e-6
    # The loss is Keras's mean of the replicas' batch means: the padded last batch (1
    # image) does not weigh as 1 image of 101. Measured: 0.8% off the exact mean.
    xent = np.log(np.exp(logits).sum(1)) - logits[np.arange(101), y]
    assert metrics["loss"] == pytest.approx(xent.mean(), rel=0.03)


@pytest.fixture(scope="module")
def semi_resumed(run_dir, two_replicas, tmp_path_factory):
    """Fine-tuning stopped by SIGTERM mid-epoch and resumed, and the same run uninterrupted.

    8 steps (200 labelled examples, batch 50, 2 epochs); SIGTERM after step 5.
    """
    root = tmp_path_factory.mktemp("semi")

    def config(name, **overrides):
        return semi_supervised.SemiSupervisedConfig(**dict(dict(
            model_dir=run_dir, split="test", label_fraction=0.1, epochs=2, batch_size=50,
            eval_every=0, checkpoint_every=3, output_dir=str(root / name)), **overrides))
    stopped = CountBatches(sigterm_at=5)
    with pytest.raises(Preempted) as preempted:
        semi_supervised.fine_tune(config("resumed"), verbose=0, strategy=two_replicas,
                                  callbacks=[stopped])
    resumed = CountBatches()
    results = semi_supervised.fine_tune(config("resumed"), verbose=0, strategy=two_replicas,
                                        callbacks=[resumed])
    whole = semi_supervised.fine_tune(config("whole"), verbose=0, strategy=two_replicas)
    return dict(preempted=preempted.value, stopped=stopped, resumed=resumed, results=results,
                whole=whole, config=config)


def test_fine_tuning_resumes_after_sigterm_as_if_uninterrupted(semi_resumed):
    s = semi_resumed
    # The checkpoint is written at the end of the step after the signal (step 6,
    # batch 2 of epoch 2): exit code 143, as training's.
    assert s["preempted"].exit_code == 143 and s["preempted"].step == 6
    assert s["stopped"].batches == 5 and s["resumed"].batches == 2
    ckpts = os.path.join(s["config"]("resumed").output_dir, "checkpoints")
    assert "ckpt-6.index" in os.listdir(ckpts) and "evaluation.json" in os.listdir(ckpts)
    # Same batches, same optimizer state: the resumed run is the uninterrupted one
    # (measured: identical top-1; weights equal to float rounding, 1e-6, which may
    # flip a prediction at a near tie on another CPU: one image of 2000 allowed).
    assert s["results"]["top1"] == pytest.approx(s["whole"]["top1"], abs=1 / 2000 + 1e-9)
    resumed = keras.models.load_model(s["results"]["model_file"]).get_weights()
    whole = keras.models.load_model(s["whole"]["model_file"]).get_weights()
    for a, b in zip(resumed, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Other flags in the same output dir: one line, nothing restored.
    with pytest.raises(UserError, match=r"holds checkpoints of another evaluation "
                                        r"\(flags.head_learning_rate: 0.2 there, 0.5 now\)"):
        semi_supervised.fine_tune(s["config"]("resumed", head_learning_rate=0.5), verbose=0)


def test_linear_eval_resumes_after_kill_9_and_its_models_reload(
        run_dir, two_replicas, semi_resumed, tmp_path):
    """The acceptance command: tools/linear_eval.py --protocol=moco --strategy=mirrored, on 2
    logical CPUs (--cpu_devices=2), killed with SIGKILL after its first checkpoint, resumed;
    then both kept classifiers reload in a fresh process and give their reported top-1."""
    out = tmp_path / "lin"
    flags = dict(protocol="moco", split="test", epochs=2, batch_size=100, eval_every=0,
                 checkpoint_every=5)
    tool = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tools", "linear_eval.py"), f"--model_dir={run_dir}",
         "--strategy=mirrored", "--cpu_devices=2", f"--output_dir={out}"]
        + [f"--{k}={v}" for k, v in flags.items()],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 300
    while not state.exists() and tool.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    tool.kill()
    _, stderr = tool.communicate()
    assert tool.returncode == -signal.SIGKILL, stderr  # killed, not finished (40 steps)
    assert not (out / "linear_eval.json").exists()

    config = linear_probe.LinearEvalConfig(model_dir=run_dir, strategy="mirrored",
                                           output_dir=str(out), **flags)
    resumed = CountBatches()
    results = linear_probe.linear_eval(config, verbose=0, strategy=two_replicas,
                                       callbacks=[resumed])
    assert 0 < resumed.batches < 40
    whole = linear_probe.linear_eval(
        linear_probe.LinearEvalConfig(model_dir=run_dir, output_dir=str(tmp_path / "whole"),
                                      **flags), verbose=0, strategy=two_replicas)
    # Measured: the same top-1 and weights to float rounding (1e-6); one image of 2000
    # may flip at a near tie on another CPU.
    assert results["top1"] == pytest.approx(whole["top1"], abs=1 / 2000 + 1e-9)
    assert results["replicas"] == 2
    for a, b in zip(_weights(results["model_file"]), _weights(whole["model_file"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    images, labels = split_arrays("test")
    np.savez(tmp_path / "test.npz", images=images, labels=labels)
    semi = semi_resumed["results"]
    assert os.path.basename(semi["model_file"]) == "semi_supervised_classifier.keras"
    assert os.path.dirname(results["model_file"]) == str(out)
    reload = subprocess.run(
        [sys.executable, os.path.join(HELPERS, "reload_classifiers.py"), str(tmp_path / "test.npz"),
         results["model_file"], semi["model_file"]], capture_output=True, text=True, timeout=300)
    assert reload.returncode == 0, reload.stderr
    top1 = json.loads(reload.stdout.strip().splitlines()[-1])
    # One device there, two replicas here: 1 of 2000 images at a near tie may flip.
    assert top1[results["model_file"]] == pytest.approx(results["top1"], abs=0.0005)
    assert top1[semi["model_file"]] == pytest.approx(semi["top1"], abs=0.0005)
