"""Every path on N replicas (issue 19): evaluation over a run trained under a strategy, one
static evaluation batch shape, --jit_compile's decision, the host-side step count under
--steps_per_execution, non-chief scratch checkpoints.

2 replicas run in this process (the session's `two_replicas`); 4 in a subprocess
(tests/helpers/replicas_worker.py: one process holds one MirroredStrategy), started first
and waited for last, so that its TF import overlaps the 2-replica work.
"""
import itertools
import json
import os
import subprocess
import sys
import tempfile
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers.references import SMALL

from co2_tf import distribute, progress, training
from co2_tf.config import TrainConfig
from co2_tf.evaluation import classifier, common, knn, retrieval
from co2_tf.run import callbacks, rundir, worker_checkpoints

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers",
                      "replicas_worker.py")
# The shared small run, with the kNN monitor at every epoch end (3 steps: one epoch end) and
# the end-of-run kNN (the summary's knn_top1).
MONITORED = dict(SMALL, knn_every=1, end_of_run_knn=True)
# Ops that cannot run in a TPU's device graph (host callbacks, strings).
HOST_OPS = ("PyFunc", "EagerPyFunc", "PyFuncStateless", "DecodeJpeg", "DecodePng",
            "DecodeImage", "ReadFile", "StringFormat", "AsString", "RegexReplace")


def one_device():
    return tf.distribute.OneDeviceStrategy("/cpu:0")


@pytest.fixture(scope="module")
def four_replicas(tmp_path_factory):
    """The monitored run trained on 4 replicas in a subprocess: (model_dir, wait())."""
    model_dir = str(tmp_path_factory.mktemp("four") / "run")
    config = json.loads(TrainConfig(model_dir=model_dir, **MONITORED).to_json())
    proc = subprocess.Popen([sys.executable, WORKER, json.dumps({"replicas": 4,
                                                                  "config": config})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])
    yield model_dir, wait
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def two_replica_run(tmp_path_factory, two_replicas, four_replicas):
    """The monitored run trained on the session's 2 replicas (the 4-replica one started)."""
    model_dir = str(tmp_path_factory.mktemp("two") / "run")
    summary = training.train(TrainConfig(model_dir=model_dir, **MONITORED),
                             strategy=two_replicas, verbose=0)
    return model_dir, summary


def _monitor_equals_the_tool(model_dir, summary, tmp_path, **tool):
    """The monitor's top-1 (summary and TensorBoard) is the kNN tool's on one device."""
    (step, logged), = rundir.read_scalars(model_dir, "epoch_knn_top1")
    assert step == 0 and logged == pytest.approx(summary["knn_top1"], abs=1e-6)
    results = knn.knn_eval(knn.KnnConfig(model_dir=model_dir, output_dir=str(tmp_path / "knn"),
                                         **tool), verbose=0, strategy=one_device())
    assert results["replicas"] == 1 and results["backbone"]["step"] == 3
    assert results["data"]["bank_examples"] == 8000  # no replica's copies, no padding
    # Features on N replicas and on one device differ by float rounding: a query at a
    # near tie may flip on another CPU (measured here: equal). One of 2000 allowed.
    assert summary["knn_top1"] == pytest.approx(results["top1"], abs=1 / 2000 + 1e-9)
    assert 0 < results["top1"] < 1
    return results


def test_two_replicas_monitor_tool_retrieval_and_projector(two_replica_run, tmp_path):
    """Failed on main: the monitor's first evaluation crashed (indices out of [0, 8000))."""
    model_dir, summary = two_replica_run
    assert summary["steps"] == 3
    _monitor_equals_the_tool(model_dir, summary, tmp_path, projector_dir=str(
        tmp_path / "projector"), projector_points=20)
    # The projector's embeddings: the tool's held-out features, 20 of them, not 2 x 10.
    embeddings = tf.train.load_checkpoint(str(tmp_path / "projector")).get_tensor(
        "embeddings/.ATTRIBUTES/VARIABLE_VALUE")
    assert embeddings.shape == (20, 256)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # Retrieval of the same checkpoint: each neighbour is the most similar bank image by
    # the one-device features of those very images.
    picture = retrieval.retrieval_picture(retrieval.RetrievalConfig(
        model_dir=model_dir, out=str(tmp_path / "r.png"), num_queries=3, k=4), verbose=0)
    loaded = common.load_backbone(common.EvalConfig(model_dir=model_dir))
    d = common.resolve_data(common.EvalConfig(model_dir=model_dir), loaded)
    queries, _ = retrieval._images(d, d.eval_split, np.array(picture["queries"]))
    neighbours, _ = retrieval._images(d, d.split, np.array(picture["neighbours"]))
    unit = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)  # noqa: E731
    q = unit(loaded.backbone.predict(queries, verbose=0))
    n = unit(loaded.backbone.predict(neighbours.reshape((-1, *queries.shape[1:])), verbose=0))
    sims = np.einsum("qf,qkf->qk", q, n.reshape(3, 4, -1))
    np.testing.assert_allclose(picture["similarities"], sims, atol=1e-5)


def test_four_replicas_monitor_equals_the_tool_on_one_device(four_replicas, tmp_path):
    model_dir, wait = four_replicas
    summary = wait()
    assert summary["steps"] == 3
    _monitor_equals_the_tool(model_dir, summary, tmp_path)


# ------------------------------------------------- one static evaluation batch shape
def _ops(concrete):
    graph = concrete.graph.as_graph_def()
    return {node.op for node in graph.node} | {
        node.op for f in graph.library.function for node in f.node_def}


def test_feature_extraction_one_trace_static_shapes_exact(two_replica_run, two_replicas):
    """101 images in batches of 50 (a last batch of 1): one trace of one static shape on
    one device and on 2 replicas (the backbone's own strategy, not passed), padding
    dropped, features those of Keras's predict on one device (today's path)."""
    model_dir, _ = two_replica_run
    config = common.EvalConfig(model_dir=model_dir)
    on_one = common.load_backbone(config).backbone
    _, on_two, _ = common.prepare(config, two_replicas)
    assert on_two.backbone.distribute_strategy is two_replicas
    rng = np.random.default_rng(0)
    images = rng.random((101, 16, 16, 3), np.float32)
    labels = rng.integers(0, 10, 101).astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(50)
    expected = on_one.predict(images, batch_size=50, verbose=0)
    for backbone, replicas in ((on_one, 1), (on_two.backbone, 2)):
        extractor = knn.FeatureExtractor(backbone)
        assert extractor.replicas == replicas
        f, y = knn.extract_features(extractor, dataset, normalize=False)
        np.testing.assert_allclose(f.numpy(), expected, atol=1e-5)
        np.testing.assert_array_equal(y.numpy(), labels)
        assert extractor.step.experimental_get_tracing_count() == 1
        batches = extractor.batches(dataset, 50)
        specs = tf.nest.flatten(batches.element_spec, expand_composites=True)
        assert all(s.shape.is_fully_defined() for s in specs), specs
        first = next(iter(batches))
        concrete = extractor.step.get_concrete_function(first)
        assert extractor.step.experimental_get_tracing_count() == 1  # the same trace
        for t in tf.nest.flatten(concrete.structured_input_signature, expand_composites=True):
            if isinstance(t, tf.TensorSpec):
                assert t.shape.is_fully_defined() and t.shape[0] == 50 // replicas, t
        ops = _ops(concrete)
        assert "Conv2D" in ops or "_FusedConv2D" in ops or any("Conv" in o for o in ops)
        assert not ops & set(HOST_OPS), ops & set(HOST_OPS)
        assert not any("String" in op for op in ops)


def test_held_out_batches_are_full_and_results_exact(tmp_path):
    """The classifiers' held-out batches: one static shape (the last padded with weight 0);
    top-1 and the loss exact over the 101 real examples."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    x = rng.random((101, 4, 4, 3), np.float32)
    y = rng.integers(0, 3, 101).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(50)
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(4, 1),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    classifier.compile_classifier(model, keras.optimizers.SGD(0.1), 3)
    seen = []
    evaluate = model.evaluate

    def recording(data, **kwargs):
        seen.append(data.element_spec)
        return evaluate(data, **kwargs)
    model.evaluate = recording
    metrics = classifier.train_classifier(model, lambda epoch, skip: data, data, epochs=1,
                                          log_dir=str(tmp_path), verbose=0)
    (images, labels, weights), = seen
    assert images.shape == (50, 4, 4, 3) and labels.shape == (50,) and weights.shape == (50,)
    logits = model.predict(x, verbose=0)
    # Exact: 35 of 101, not of a padded count (Keras's metrics are float32).
    assert metrics["top1"] == pytest.approx(np.mean(np.argmax(logits, 1) == y), abs=1e-6)
    xent = np.log(np.exp(logits).sum(1)) - logits[np.arange(101), y]
    assert metrics["loss"] == pytest.approx(xent.mean(), rel=1e-5)


# ---------------------------------------------------------------- --jit_compile
def _mocked(devices):
    return types.SimpleNamespace(num_replicas_in_sync=len(devices),
                                 extended=types.SimpleNamespace(worker_devices=tuple(devices)))


def test_jit_compile_is_refused_with_one_line_on_several_gpus(caplog):
    """Keras would compile strategy.run itself inside one XLA function: refused with one
    line whatever the device type (failed on main: allowed on GPUs); one GPU keeps XLA."""
    gpus = [f"/job:localhost/replica:0/task:0/device:GPU:{i}" for i in range(8)]
    with caplog.at_level("WARNING", logger="co2_tf.distribute"):
        assert distribute.resolve_jit_compile(True, _mocked(gpus)) is False
        assert distribute.resolve_jit_compile(True, _mocked(gpus[:1])) is True
        assert distribute.resolve_jit_compile(False, _mocked(gpus[:1])) is False
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "--jit_compile ignored" in lines[0]
    assert "8 replicas (GPU devices)" in lines[0]


# ------------------------------------------- host step count, --steps_per_execution
class CountedReads:
    """A step counter whose host reads are counted."""

    def __init__(self, variable):
        self.variable, self.reads = variable, 0

    def numpy(self):
        self.reads += 1
        return self.variable.numpy()


class Toy(keras.Model):
    """A one-layer model whose step logs look collapsed (for the collapse monitor)."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.counter = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                       trainable=False, name="counter")
        self.step_counter = CountedReads(self.counter)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        self.counter.assign_add(1)
        loss = tf.reduce_mean(tf.square(self(data)))
        return {"loss": loss, "pos_sim": 0.95, "neg_sim": 0.9, "loss_ins": 10.0}


class Manager:
    """Records each save's number and the device's step at that moment."""

    def __init__(self, model):
        self.model, self.saved = model, []

    def save(self, checkpoint_number=None):
        self.saved.append((checkpoint_number, int(self.model.counter.numpy())))


def test_steps_per_execution_preemption_progress_and_collapse_on_host_steps():
    """Epochs of 6 steps at 4 steps per execution: Keras calls the callbacks at steps
    4, 6 | 10, 12. The step is read from the device once per fit() call per callback;
    preemption (and the multi-worker all-reduce) is checked once per execution; progress
    lines and the collapse monitor see the true steps."""
    model = Toy()
    model.compile(optimizer="sgd", steps_per_execution=4)
    data = tf.data.Dataset.from_tensor_slices(np.ones((24, 2), np.float32)).batch(4)
    preemption = types.SimpleNamespace(requested=False, signum=None)
    checked = []
    manager = Manager(model)
    saver = callbacks.CheckpointCallback(manager, 5, preemption,
                                         any_worker=lambda flag: checked.append(flag) or flag)
    lines = []
    reporter = progress.Reporter(1, itertools.count().__next__, lines.append)  # always due
    progress_cb = callbacks.ProgressCallback(reporter, "train", total=18)
    collapse = callbacks.CollapseMonitor(queue_size=64, patience=5)

    class Truth(keras.callbacks.Callback):  # what the device says at each call
        steps = []

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append(int(model.counter.numpy()))
    cbs = [saver, collapse, progress_cb, Truth()]
    model.fit(data, epochs=2, callbacks=cbs, verbose=0)
    assert Truth.steps == [4, 6, 10, 12]
    assert model.step_counter.reads == 3  # one per callback, at the fit() call's start
    assert len(checked) == 4  # per execution, not per step
    # Saves: the first execution end at or past each multiple of 5, and epoch ends.
    assert manager.saved == [(6, 6), (10, 10), (12, 12)]
    assert [int(line.split(":")[1].split("/")[0]) for line in lines] == [4, 6, 10, 12]
    # Patience 5 steps: reached at the second execution (4 + 2 steps), not the fifth call.
    assert collapse.report()["detected"]["step"] == 6

    class Preempt(keras.callbacks.Callback):  # a SIGTERM during the first execution
        def on_train_batch_begin(self, batch, logs=None):
            preemption.requested = True
    model.fit(data, initial_epoch=2, epochs=3, callbacks=[saver, Preempt()], verbose=0)
    assert saver.preempted_at == 16 and manager.saved[-1] == (16, 16)
    assert int(model.counter.numpy()) == 16 and model.step_counter.reads == 4


# ------------------------------------------------------- non-chief scratch saves
def test_worker_scratch_checkpoints_go_to_local_disk(tmp_path):
    chief = tmp_path / "model_dir" / "checkpoints"
    chief.mkdir(parents=True)
    variable = tf.Variable(3.0)
    checkpoint = tf.train.Checkpoint(v=variable)
    chief_path = tf.train.CheckpointManager(checkpoint, str(chief), 1).save(7)
    scratch_root = tmp_path / "local"
    scratch_root.mkdir()
    manager = worker_checkpoints.WorkerCheckpointManager(checkpoint, f"file://{chief}",
                                                         scratch_root=str(scratch_root))
    path = manager.save(checkpoint_number=8)
    assert path.startswith(str(scratch_root)) and not os.listdir(scratch_root)  # deleted
    assert sorted(os.listdir(tmp_path / "model_dir")) == ["checkpoints"]
    assert manager.latest_checkpoint.endswith(os.path.basename(chief_path))
    # Default: the system's temp dir (local disk), whatever --model_dir is.
    path = worker_checkpoints.WorkerCheckpointManager(checkpoint, str(chief)).save(9)
    assert path.startswith(tempfile.gettempdir()) and not os.path.exists(os.path.dirname(path))
