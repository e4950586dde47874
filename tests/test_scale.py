"""Scale: XLA compilation, mixed precision, steps_per_execution, multi-worker training.

The two-worker test launches this file as a script (`python test_scale.py
worker ARGS_JSON`): each process is one worker of a
MultiWorkerMirroredStrategy on localhost, running training.train.
"""

import glob
import json
import logging
import os
import socket
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # also when run as a worker script

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from co2_tf import training  # noqa: E402
from co2_tf.config import TrainConfig  # noqa: E402

# Small enough for tests: tiny convnet with BN, 16 px, 4 shuffle-BN groups.
MODEL = dict(backbone="tiny", image_size=16, batch_size=16, queue_size=64, dim=16, seed=3,
             learning_rate=0.1, schedule="constant", weight_decay=1e-4)


def build(strategy=None, **overrides):
    """Model and optimizer exactly as training.train builds them."""
    config = TrainConfig(model_dir="unused", train_steps=100, **dict(MODEL, **overrides))
    strategy = strategy or tf.distribute.OneDeviceStrategy("/cpu:0")
    groups = config.check_replicas(strategy.num_replicas_in_sync)
    with strategy.scope():
        model = training.build_model(config, groups)
        optimizer = training.build_optimizer(config, steps_per_epoch=10, total_steps=100)
        training.compile_model(model, optimizer, config)
    return model, strategy


def batches(steps, batch=16, size=16, seed=0):
    rng = np.random.RandomState(seed)
    shape = (steps * batch, size, size, 3)
    return rng.rand(*shape).astype("float32"), rng.rand(*shape).astype("float32")


def run_steps(model, strategy, data, batch=16):
    """Keras's own train function (what fit runs), one call per step; returns the logs."""
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(batch)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    model.make_train_function()
    history = []
    for _ in range(len(data[0]) // batch):
        logs = model.train_function(iterator)
        history.append({k: float(v) for k, v in logs.items()})
    return history


def state(model):
    """Every weight of the model (both encoders, BN statistics, queue, pointer).

    Keys are "index path": the two encoders have the same layer names.
    """
    return {f"{i:03d} {w.path}": np.asarray(w.numpy()) for i, w in enumerate(model.weights)}


def find(values, path):
    (key,) = [k for k in values if k.endswith(" " + path)]
    return values[key]


# ------------------------------------------------------------------------ XLA
def test_full_train_step_lowers_to_xla():
    """The TPU proxy: the whole single-replica step (4 shuffle-BN groups) lowers
    to XLA: static shapes, no host callbacks, nothing run while lowering."""
    model, _ = build(jit_compile=True)
    assert model.bn_groups == 4
    before = state(model)
    x_q, x_k = (tf.constant(x[:16]) for x in batches(1))
    step = tf.function(model.train_step, jit_compile=True)
    hlo = step.experimental_get_compiler_ir((x_q, x_k))(stage="hlo")  # fails on any non-XLA op
    assert hlo.count("convolution(") >= 3 * 4  # query fwd + bwd, key fwd of the convs
    assert "sort(" in hlo  # the shuffle permutation
    assert "custom-call" not in hlo  # no host callbacks
    for name, value in state(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_xla_steps_match_the_plain_steps():
    """Keras's jit_compile path (what --jit_compile runs): 2 XLA steps give the
    plain steps' losses, weights, BN statistics and queue.

    One shuffle-BN group: TF's stateless RNG draws other numbers under XLA, so
    with several groups XLA would form other (equally valid) BN groups; with
    one group the permutation cancels out.
    """
    data = batches(2)
    plain, strategy = build(jit_compile=False, bn_groups=1)
    xla, _ = build(jit_compile=True, bn_groups=1)
    assert xla.jit_compile is True and plain.jit_compile is False
    before = state(xla)
    for a, b in zip(before.values(), state(plain).values(), strict=True):
        np.testing.assert_array_equal(a, b)

    h_plain = run_steps(plain, strategy, data)
    h_xla = run_steps(xla, strategy, data)
    for p, x in zip(h_plain, h_xla, strict=True):
        for name in ("loss", "loss_ins", "loss_con"):
            np.testing.assert_allclose(x[name], p[name], rtol=1e-4, err_msg=name)
    assert h_plain[1]["loss"] != h_plain[0]["loss"]
    s_plain, s_xla = state(plain), state(xla)
    moved = 0
    for name, value in s_plain.items():
        np.testing.assert_allclose(s_xla[name], value, rtol=1e-3, atol=2e-5, err_msg=name)
        moved += not np.array_equal(value, before[name])
    assert moved > len(s_plain) // 2, "the steps changed almost nothing: the test proves nothing"
    assert int(find(s_xla, "co2/queue_ptr")) == 32
    np.testing.assert_allclose(np.linalg.norm(find(s_xla, "co2/queue"), axis=1), 1.0, rtol=1e-5)


def test_xla_under_mirrored_cpu_falls_back_with_one_warning(two_replicas, caplog):
    with caplog.at_level(logging.WARNING, logger="co2_tf.distribute"):
        model, _ = build(two_replicas, jit_compile=True)
    assert model.jit_compile is False
    warnings = [r.getMessage() for r in caplog.records if r.name == "co2_tf.distribute"]
    assert len(warnings) == 1 and "--jit_compile ignored" in warnings[0]
    assert "\n" not in warnings[0]


# ------------------------------------------------------------------ fused BN
@pytest.mark.parametrize("precision_name", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_is_keras_batch_norm(precision_name, tmp_path):
    """The fused training-mode BN (what the trainer's backbones use) gives Keras
    BN's outputs, gradients and moving statistics, and saves as built-in BN."""
    from co2_tf import backbones, fused_batchnorm, precision
    with precision.policy_scope(precision_name):
        keras_bn = backbones.build_backbone("tiny", 16, seed=1)
        fused = fused_batchnorm.fuse_batch_norm(backbones.build_backbone("tiny", 16, seed=1))
    graph = tf.function(lambda x: fused(x, training=True)).get_concrete_function(
        tf.TensorSpec([8, 16, 16, 3])).graph
    assert sum(op.type == "FusedBatchNormV3" for op in graph.get_operations()) == 4
    x = tf.constant(batches(1, batch=8)[0])
    results = []
    for model in (keras_bn, fused):
        with tf.GradientTape() as tape:
            y = tf.cast(model(x, training=True), tf.float32)
            loss = tf.reduce_sum(y * y)
        grads = tape.gradient(loss, model.trainable_variables)
        results.append((y.numpy(), [g.numpy() for g in grads],
                        [v.numpy() for v in model.non_trainable_variables]))
    (y0, g0, m0), (y1, g1, m1) = results
    rtol = 1e-4 if precision_name == "float32" else 1e-2  # bfloat16: 8-bit mantissa
    np.testing.assert_allclose(y1, y0, rtol=rtol, atol=rtol / 10)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(b, a, rtol=10 * rtol, atol=rtol * np.abs(a).max())
    assert len(m0) == 8 and all(np.abs(m - np.round(m)).max() > 1e-4 for m in m0)  # updated
    for a, b in zip(m0, m1, strict=True):  # moving mean / variance after one update
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # Inference (moving statistics) is Keras's own code; saving keeps built-in layers.
    np.testing.assert_allclose(np.float32(fused(x)), np.float32(keras_bn(x)), rtol=1e-5, atol=1e-6)
    fused.save(tmp_path / "fused.keras")
    loaded = keras.models.load_model(tmp_path / "fused.keras")
    assert {type(l) for l in loaded.layers} <= {type(l) for l in keras_bn.layers}
    np.testing.assert_allclose(np.float32(loaded(x)), np.float32(fused(x)), rtol=1e-6)


# ----------------------------------------------------------- mixed precision
def test_mixed_bfloat16_computes_in_bfloat16_and_keeps_float32_where_it_matters():
    data = batches(3, seed=1)
    f32, strategy = build()
    bf16, _ = build(precision="mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32", "the global policy leaked"
    convs = [l for l in bf16.query_backbone.layers if isinstance(l, keras.layers.Conv2D)]
    assert convs and all(l.compute_dtype == "bfloat16" for l in convs)
    assert all(v.dtype == "float32" for v in bf16.weights if v.path != "co2/queue_ptr")
    assert bf16.query_backbone(data[0][:4], training=False).dtype == "bfloat16"
    assert bf16.encode_query(data[0][:4]).dtype == tf.float32
    assert f32.query_backbone(data[0][:4], training=False).dtype == "float32"

    h32 = run_steps(f32, strategy, data)
    h16 = run_steps(bf16, strategy, data)
    for a, b in zip(h32, h16, strict=True):
        assert np.isfinite(b["loss"]) and b["loss"] > 0
        # Same weights and data: bfloat16's 8-bit mantissa moves the loss by ~1%.
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=0.05)
    assert bf16.queue.dtype == "float32"
    queue = bf16.queue.numpy()
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-5)
    assert int(bf16.queue_ptr.numpy()) == 48
    # The enqueued keys are close to float32's keys (both models saw the same images).
    np.testing.assert_allclose(queue[:48], f32.queue.numpy()[:48], atol=0.1)
    assert not np.allclose(queue[:48], queue[48:].mean())


def test_mixed_float16_trains_with_loss_scaling():
    model, strategy = build(precision="mixed_float16")
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.query_backbone.layers[-2].compute_dtype == "float16"
    initial_scale = float(optimizer.dynamic_scale.numpy())
    weights0 = [v.numpy().copy() for v in model.query_variables]
    history = run_steps(model, strategy, batches(4, seed=2))
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
    # Dynamic loss scaling: a step whose float16 gradients overflow is skipped
    # and halves the scale (Keras starts at 2^15: the first steps overflow).
    scale = float(optimizer.dynamic_scale.numpy())
    skipped = int(round(np.log2(initial_scale / scale)))
    applied = int(optimizer.iterations.numpy())
    assert applied >= 1 and applied + skipped == 4, (applied, skipped)
    assert any(np.abs(v.numpy() - w).max() > 1e-4 for v, w in zip(model.query_variables, weights0))
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
    assert model.queue.dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(model.queue.numpy(), axis=1), 1.0, rtol=1e-5)


# ------------------------------------------------- runs on a tiny image folder
def image_folder(root, count=48, size=24):
    """`count` small PNGs in 2 classes: 48 images at batch 8 make 6-step epochs."""
    from PIL import Image
    rng = np.random.RandomState(0)
    for i in range(count):
        folder = os.path.join(root, f"c{i % 2}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (size, size, 3)).astype("uint8")).save(
            os.path.join(folder, f"{i:03d}.png"))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(str(tmp_path_factory.mktemp("images")))


def run_config(model_dir, folder, **overrides):
    values = dict(MODEL, batch_size=8, queue_size=32, knn_every=0, log_every=1,
                  checkpoint_every=4, dataset=f"folder:{folder}")
    values.update(overrides)
    return TrainConfig(model_dir=str(model_dir), **values)


class DumpWeights(keras.callbacks.Callback):
    """Writes every weight (and the step) to an .npz at the end of training."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_end(self, logs=None):
        values = state(self.model)
        # Every local replica's copy of the queue (a tf.distribute MirroredVariable).
        for i, copy in enumerate(getattr(self.model.queue.value, "values", ())):
            values[f"queue_replica_{i}"] = copy.numpy()
        values["step"] = np.asarray(self.model.optimizer.iterations.numpy())
        np.savez(self.path, **values)


def _checkpoint_steps(model_dir):
    state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
    return sorted(int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths)


def _tensorboard_steps(model_dir, tag="batch_loss"):
    steps = []
    for path in glob.glob(os.path.join(model_dir, "logs", "train", "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


def test_steps_per_execution_runs_exact_steps_checkpoints_and_summaries(tmp_path, folder):
    """14 steps over epochs of 6 with 4 steps per execution: executions end at
    4, 6 | 10, 12 | 14 (cut at every epoch end), and the result is the
    1-step-per-execution run's."""
    ends = {}
    for spe in (1, 4):
        config = run_config(tmp_path / f"spe{spe}", folder, train_steps=14,
                            steps_per_execution=spe, keep_checkpoints=10)
        dump = str(tmp_path / f"spe{spe}.npz")
        summary = training.train(config, callbacks=[DumpWeights(dump)], verbose=0)
        assert summary["steps"] == 14
        ends[spe] = dict(np.load(dump))
        assert int(ends[spe]["step"]) == 14
    # Checkpoints at the first execution end at or past each multiple of 4, at
    # epoch ends (6, 12) and at the end.
    assert _checkpoint_steps(str(tmp_path / "spe1")) == [4, 6, 8, 12, 14]
    assert _checkpoint_steps(str(tmp_path / "spe4")) == [4, 6, 10, 12, 14]
    assert _tensorboard_steps(str(tmp_path / "spe1")) == list(range(1, 15))
    assert _tensorboard_steps(str(tmp_path / "spe4")) == [4, 6, 10, 12, 14]
    for name, value in ends[1].items():
        np.testing.assert_allclose(ends[4][name], value, rtol=1e-4, atol=1e-5, err_msg=name)


# --------------------------------------------------------------- multi-worker
def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _launch_workers(config, dumps, timeout=300):
    """Runs training.train in 2 worker processes (TF_CONFIG on localhost); waits for both."""
    ports = _free_ports(2)
    procs = []
    for index, dump in enumerate(dumps):
        env = dict(os.environ, TF_CONFIG=json.dumps({
            "cluster": {"worker": [f"localhost:{p}" for p in ports]},
            "task": {"type": "worker", "index": index}}), TF_CPP_MIN_LOG_LEVEL="2")
        args = json.dumps({"config": json.loads(config.to_json()), "dump": dump})
        procs.append(subprocess.Popen([sys.executable, HERE, "worker", args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    deadline = time.time() + timeout
    try:
        # A failed worker leaves the other waiting for collectives: stop at the first failure.
        while (any(p.poll() is None for p in procs) and time.time() < deadline
               and not any(p.poll() not in (None, 0) for p in procs)):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate()[0] for p in procs]
    # The worker that failed first (not the one killed here) explains.
    for index in sorted(range(len(procs)), key=lambda i: procs[i].returncode == -9):
        assert procs[index].returncode == 0, (
            f"worker {index} exit {procs[index].returncode}:\n{outputs[index][-3000:]}")
    return outputs


def test_two_workers_on_localhost_match_one_process_and_resume_from_the_chief(
        tmp_path, folder, two_replicas):
    """2 workers x 1 replica (MultiWorkerMirroredStrategy) train 3 steps, stop,
    restart and train to 6; the single-process 2-replica run of the same global
    batch does the 6 steps at once. Same index-based input, same shuffle-BN
    permutations: same weights, same queue, on both workers."""
    model_dir = tmp_path / "multi"
    dumps = [str(tmp_path / f"worker{i}.npz") for i in range(2)]
    _launch_workers(run_config(model_dir, folder, strategy="multi_worker", train_steps=3,
                               checkpoint_every=100), dumps)
    assert _checkpoint_steps(str(model_dir)) == [3]
    assert not glob.glob(str(model_dir / ".worker_*")), "the scratch checkpoints stayed"
    # With the kNN monitor this time: every worker evaluates (Keras's predict
    # would gather both workers' features).
    _launch_workers(run_config(model_dir, folder, strategy="multi_worker", train_steps=6,
                               checkpoint_every=100, knn_every=1, eval_split="train"), dumps)
    assert _checkpoint_steps(str(model_dir)) == [3, 6]
    assert not glob.glob(str(model_dir / ".worker_*"))
    with open(model_dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == 6 and 0 <= summary["knn_top1"] <= 1
    workers = [dict(np.load(d)) for d in dumps]

    reference_dump = str(tmp_path / "reference.npz")
    training.train(run_config(tmp_path / "single", folder, train_steps=6),
                   strategy=two_replicas, callbacks=[DumpWeights(reference_dump)], verbose=0)
    reference = dict(np.load(reference_dump))

    for worker in workers:
        assert int(worker["step"]) == 6
        assert int(find(worker, "co2/queue_ptr")) == 6 * 8 % 32
    compared = 0
    for name, value in workers[0].items():
        if name.startswith("queue_replica"):
            continue
        # Worker 0 is the single process's replica 0 (all-reduce order differs: a tolerance).
        np.testing.assert_allclose(value, reference[name], rtol=1e-4, atol=1e-5, err_msg=name)
        if "moving_" in name:
            # BN moving statistics are per replica, as with PyTorch DDP (Keras
            # creates them with aggregation "none"): the chief's are saved.
            continue
        # Everything trained, the EMA encoder, queue and optimizer: identical on both workers.
        np.testing.assert_array_equal(workers[1][name], value, err_msg=name)
        compared += 1
    assert compared >= 34  # 2 x (4 convs, 4 BN gamma + beta, 2 dense + biases), queue, pointer
    # The queue holds both workers' keys: 6 steps of 8 keys (4 per worker)
    # overwrote all 32 initial rows; the last 4 global batches are in it.
    queue = find(workers[0], "co2/queue")
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-5)
    initial = _initial_queue()
    assert not np.isclose(queue, initial, atol=1e-6).all(axis=1).any()
    np.testing.assert_allclose(queue, reference["queue_replica_1"], rtol=1e-4, atol=1e-5)


def _initial_queue():
    model, _ = build(batch_size=8, queue_size=32)
    return model.queue.numpy()


# ------------------------------------------------------------- worker script
def _worker_main(args):
    """One worker: training.train under the TF_CONFIG cluster, weights dumped at the end."""
    logging.getLogger().setLevel(logging.WARNING)
    spec = json.loads(args)
    config = TrainConfig.from_dict(spec["config"])
    training.train(config, callbacks=[DumpWeights(spec["dump"])], verbose=0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        keras.config.disable_traceback_filtering()
        _worker_main(sys.argv[2])
