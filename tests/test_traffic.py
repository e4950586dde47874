"""What crosses replicas in one training step, accounted at tf.distribute's call sites.

On logical CPUs MirroredStrategy moves tensors with copies, not collective ops, so a graph
has nothing to count. Instead, while Keras traces one 2-replica train step, every call of the
replica context's all_reduce / all_gather / merge_call and every cross-replica broadcast /
reduce is recorded with its call site and the bytes it carries; the sums per kind must equal
the table of docs/accelerators.md ("Traffic per replica per step"), written here by formula.
A returning broadcast of the queue (aggregation "only_first_replica") adds a merge call and a
broadcast to this step and fails the test (test_a_queue_broadcast_is_caught).
"""
import re
import threading
import traceback
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import throughput_model as throughput
from helpers.models import MODEL, batches, build
from tensorflow.python.distribute import distribute_lib

DOC = Path(__file__).resolve().parent.parent / "docs" / "accelerators.md"


def _bytes(value):
    total = 0
    for t in tf.nest.flatten(value, expand_composites=True):
        if isinstance(t, (tf.Tensor, tf.Variable)) or hasattr(t, "dtype"):
            shape = t.shape
            assert shape.is_fully_defined(), f"a collective of unknown size: {t}"
            total += shape.num_elements() * tf.as_dtype(t.dtype).size
    return total


def _site():
    """The innermost co2_tf function and, below it, the innermost Keras function (co2_tf.compat's
    wrappers of private APIs pass through: their caller is the site)."""
    ours = keras = None
    for frame in traceback.extract_stack():
        path = frame.filename.replace("\\", "/")
        if path.endswith("/co2_tf/compat.py"):
            continue
        if "/co2_tf/" in path:
            ours, keras = f"{Path(path).stem}.{frame.name}", None
        elif "/keras/" in path:
            keras = frame.name
    return ours, keras


class CallSites:
    """Wraps the cross-replica entry points; `records` holds (kind, site, bytes per replica).

    Replica-context calls (each replica makes its own) are counted once per replica, at the
    outermost level only: MirroredStrategy implements all_reduce with a merge call and a
    batch_reduce_to, which belong to the all-reduce. Cross-replica calls made inside a merge
    function that is not itself part of a counted collective (an "only_first_replica"
    assign's broadcast, say) are counted once, attributed to the merge call's site.
    """

    REPLICA = ("all_reduce", "all_gather", "merge_call")
    CROSS = ((distribute_lib.StrategyExtendedV1, "broadcast_to"),
             (distribute_lib.StrategyExtendedV2, "reduce_to"),
             (distribute_lib.StrategyExtendedV2, "batch_reduce_to"))

    def __init__(self):
        self.records = []
        self._local = threading.local()
        self._merge = []  # the sites of the merge functions running (main thread)
        self._lock = threading.Lock()
        self._saved = []

    def __enter__(self):
        for name in self.REPLICA:
            self._patch(tf.distribute.ReplicaContext, name, self._replica_wrapper)
        for cls, name in self.CROSS:
            self._patch(cls, name, self._cross_wrapper)
        return self

    def __exit__(self, *exc):
        for cls, name, had, original in reversed(self._saved):
            if had:
                setattr(cls, name, original)
            else:
                delattr(cls, name)

    def _patch(self, cls, name, make):
        had = name in cls.__dict__
        original = getattr(cls, name)
        self._saved.append((cls, name, had, cls.__dict__.get(name)))
        setattr(cls, name, make(name, original))

    def _record(self, kind, site, nbytes):
        with self._lock:
            self.records.append((kind, site, nbytes))

    def _replica_wrapper(self, kind, original):
        sites = self

        def wrapper(ctx, *args, **kwargs):
            depth = getattr(sites._local, "depth", 0)
            # Replica calls inside a merge function (call_for_each_replica, e.g. Keras's
            # LossScaleOptimizer) count unless that merge belongs to a counted collective.
            counted = depth == 0 and not (sites._merge and sites._merge[-1][1])
            site = _site()
            if site[0] is None and sites._merge:  # a fresh replica thread: the merge's site
                site = (sites._merge[-1][0][0], site[1])
            if counted:
                if kind == "merge_call":  # its arguments stay on their devices

                    payload = None
                else:
                    payload = kwargs.get("value", args[1] if kind == "all_reduce" else args[0])
                sites._record(kind, site, _bytes(payload))
            if kind == "merge_call":
                fn = args[0] if args else kwargs.pop("merge_fn")
                inner = (site, not counted)

                def merge_fn(*a, **k):
                    sites._merge.append(inner)
                    try:
                        return fn(*a, **k)
                    finally:
                        sites._merge.pop()
                args = (merge_fn, *args[1:])
            sites._local.depth = depth + 1
            try:
                return original(ctx, *args, **kwargs)
            finally:
                sites._local.depth = depth
        return wrapper

    def _cross_wrapper(self, kind, original):
        sites = self

        def wrapper(extended, *args, **kwargs):
            if sites._merge and not sites._merge[-1][1]:
                value = args[0] if kind == "broadcast_to" else args[1] if args[1:] else None
                if kind == "batch_reduce_to":
                    value = [v for v, _ in args[1]]
                sites._record(kind, sites._merge[-1][0], _bytes(value))
            return original(extended, *args, **kwargs)
        return wrapper

    def per_replica(self, replicas):
        """{(kind, site): bytes per replica}; replica-context calls summed over replicas / N."""
        out = {}
        for kind, site, nbytes in self.records:
            share = nbytes / replicas if kind in self.REPLICA else nbytes
            calls = 1 / replicas if kind in self.REPLICA else 1
            b, c = out.get((kind, site), (0, 0))
            out[(kind, site)] = (b + share, c + calls)
        return out


def _label(kind, site):
    ours, keras = site
    if kind in ("merge_call", "broadcast_to"):
        what = "merge call" if kind == "merge_call" else "broadcast"
        return f"{what}: " + ("optimizer (Keras)" if keras else ours)
    if kind == "all_gather" and ours == "distribute.all_gather_in_own_bytes":
        return "key images"
    if kind == "all_gather" and ours == "model.encode_keys":
        return "keys"
    if kind == "all_reduce" and ours == "model.train_step":
        return "gradients" if keras == "_all_reduce_sum_gradients" else "logs"
    if kind == "all_reduce" and ours == "distribute.copy_first_replica":
        return "BN statistics"
    if kind == "all_reduce" and ours == "precision.agree_on_overflow":
        return "overflow flag"
    return f"{kind}: {ours} / {keras}"


def _trace_one_step(strategy, **overrides):
    model, _ = build(strategy, **overrides)
    dataset = tf.data.Dataset.from_tensor_slices(batches(1)).batch(MODEL["batch_size"])
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    # What Keras's train function runs per step (strategy.run of train_step), traced, not run.
    step = tf.function(lambda data: strategy.run(model.train_step, args=(data,)),
                       autograph=False)  # as Keras (do_not_convert)
    with CallSites() as sites:
        step.get_concrete_function(batch)
    return model, sites


def _measured(sites, replicas):
    """{label: (bytes per replica, calls per replica)} of one traced step."""
    table = {}
    for (kind, site), (nbytes, calls) in sites.per_replica(replicas).items():
        label = _label(kind, site)
        old = table.get(label, (0, 0))
        table[label] = (old[0] + nbytes, old[1] + calls)
    return table


def _expected(model, replicas):
    """The table of docs/accelerators.md by formula, for the helpers' model (float32)."""
    b = MODEL["batch_size"] // replicas
    size, dim = MODEL["image_size"], MODEL["dim"]
    params = sum(int(np.prod(v.shape)) for v in model.query_variables)
    bn_stats = sum(int(np.prod(w.shape))
                   for part in (model.query_backbone, model.key_backbone)
                   for w in part.non_trainable_weights if "moving_" in w.path)
    assert bn_stats == 2 * 2 * (32 + 64 + 128 + 256)  # tiny convnet: 4 BN layers, 2 encoders
    return params, bn_stats, {  # bytes per replica per step, calls per replica per step
        "gradients": (4 * params, 1),  # float32 gradients of the query encoder
        "key images": (b * size * size * 3 * 4, 1),  # float32 images, as they arrive
        "keys": (b * dim * 4, 1),
        "logs": (6 * 4, 1),  # loss, loss_ins, loss_con, acc, pos_sim, neg_sim: one call
        "BN statistics": (4 * bn_stats, 1),  # replica 0's moving mean and variance
        "broadcast: optimizer (Keras)": (8, 1),  # Keras's optimizer.iterations
        "merge call: optimizer (Keras)": (0, 2),  # Keras's apply and its iterations += 1
        "merge call: model._momentum_update": (0, 1),  # the EMA (local updates only)
    }


def _doc_rows():
    """The kinds the docs' traffic table lists (its first column)."""
    text = DOC.read_text()
    section = text.split("## Traffic per replica per step", 1)[1].split("\n## ", 1)[0]
    return {m.group(1).strip() for m in re.finditer(r"^\| ([^|]+?) \|", section, re.M)
            if m.group(1).strip() not in ("what", "---")}


@pytest.fixture(scope="module", params=["float32", "mixed_float16"])
def traced(two_replicas, request):
    """One step traced in float32 and in the GPU presets' mixed_float16 (Keras's
    LossScaleOptimizer adds a merge call, in which each replica applies its gradients, and
    train_step an all-reduce of whether any replica's gradients overflowed)."""
    return request.param, *_trace_one_step(two_replicas, precision=request.param)


def test_one_step_moves_what_the_table_says(traced):
    precision, model, sites = traced
    n = 2
    params, bn_stats, expected = _expected(model, n)
    loss_scaling = precision == "mixed_float16"
    if loss_scaling:
        expected["merge call: optimizer (Keras)"] = (0, 3)
        # Whether any replica's gradients overflowed: one float32, before the optimizer.
        expected["overflow flag"] = (4, 1)
    assert _measured(sites, n) == expected
    # The library's arithmetic (co2_tf.throughput, what benchmarks/throughput.py prints) agrees.
    b = MODEL["batch_size"] // n
    lib = throughput.collective_bytes(
        params=params, bn_statistics=bn_stats, per_replica_batch=b,
        image_size=MODEL["image_size"], image_bytes=4, dim=MODEL["dim"], bn="shuffle",
        loss_scaling=loss_scaling)
    assert lib == {label: expected[label][0] for label in
                   ("gradients", "key images", "keys", "logs", "BN statistics")} | {
        "optimizer step": 8, "overflow flag": 4 if loss_scaling else 0}
    # The docs' table lists each kind measured here.
    assert _doc_rows() >= set(lib) | {"merge calls"}


def test_a_queue_broadcast_is_caught(two_replicas, monkeypatch):
    """The accounting sees the traffic this work removed: with the queue back on
    "only_first_replica", the same step gains a merge call and a broadcast of the queue."""
    from co2_tf.method import model as model_module  # noqa: PLC0415

    original = model_module.CO2Model.add_weight

    def add_weight(self, *args, **kwargs):
        if kwargs.get("name") == "queue":
            kwargs["aggregation"] = "only_first_replica"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(model_module.CO2Model, "add_weight", add_weight)
    model, sites = _trace_one_step(two_replicas)
    assert model.queue.aggregation == "only_first_replica"
    measured = _measured(sites, 2)
    assert measured != _expected(model, 2)[2]
    rows = MODEL["batch_size"]  # the enqueued rows: float32 values and int64 indices
    assert measured.pop("broadcast: model._enqueue") == (rows * MODEL["dim"] * 4 + rows * 8, 1)
    assert measured.pop("merge call: model._enqueue") == (0, 1)
    assert measured == _expected(model, 2)[2]


def test_key_images_cross_in_their_dtype_and_the_transform_sees_global_ids(two_replicas):
    """uint8 key images are gathered as uint8 (a quarter of float32's bytes); the transform
    (here: to floats) runs after the gather and shuffle on each replica's shard, with the
    shard's global example ids, and gives the keys of the float images."""
    model, _ = build(two_replicas)
    n, batch, size, step = 2, MODEL["batch_size"], MODEL["image_size"], 3
    b = batch // n
    images = np.random.RandomState(0).randint(0, 256, (batch, size, size, 3)).astype(np.uint8)
    images[:, 0, 0, 0] = np.arange(batch)  # each image carries its place in the global batch
    shards = []

    def transform(shard, ids, at_step):
        assert shard.dtype == tf.uint8 and ids.dtype == tf.int64 and ids.shape == (b,)
        # The ids are step * B + position in the global batch, in the shard's (shuffled) order.
        check = tf.debugging.assert_equal(
            tf.cast(shard[:, 0, 0, 0], tf.int64) + tf.cast(at_step, tf.int64) * batch, ids)
        shards.append(ids)
        with tf.control_dependencies([check]):
            return tf.cast(shard, tf.float32) / 255.0

    def per_replica(x):
        return two_replicas.experimental_distribute_values_from_function(
            lambda ctx: x[ctx.replica_id_in_sync_group * b:(ctx.replica_id_in_sync_group + 1)
                          * b])

    def keys(x, fn):
        run = tf.function(lambda v: two_replicas.run(
            lambda y: model.encode_keys(y, tf.constant(step, tf.int64), fn), args=(v,)),
            autograph=False)
        return run(per_replica(x))

    with CallSites() as sites:
        local, everyone = keys(tf.constant(images), transform)
    assert _measured(sites, n)["key images"] == (b * size * size * 3, 1)  # uint8: 1 byte
    assert len(shards) == n  # called once per replica
    _, plain = keys(tf.constant(images.astype(np.float32) / 255.0), None)
    for ours, theirs in zip(two_replicas.experimental_local_results(everyone),
                            two_replicas.experimental_local_results(plain), strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, shape", [(np.uint8, (3, 3, 3)), ("bfloat16", (5,)),
                                          (np.float16, (2, 3))])
def test_all_gather_in_own_bytes(two_replicas, dtype, shape):
    """Dtypes the collective refuses (uint8, bfloat16) cross bitcast into int32 words, examples
    padded to whole words, and come out exact; others go through as they are."""
    from co2_tf.distribute import all_gather_in_own_bytes  # noqa: PLC0415

    dtype = tf.as_dtype(dtype)
    parts = [np.random.RandomState(i).randint(0, 200, (2, *shape)) for i in range(2)]
    values = two_replicas.experimental_distribute_values_from_function(
        lambda ctx: tf.cast(tf.constant(parts[ctx.replica_id_in_sync_group]), dtype))
    gather = tf.function(lambda v: two_replicas.run(
        lambda x: all_gather_in_own_bytes(tf.distribute.get_replica_context(), x), args=(v,)))
    for result in two_replicas.experimental_local_results(gather(values)):
        assert result.dtype == dtype and result.shape == (4, *shape)
        np.testing.assert_array_equal(tf.cast(result, tf.int32).numpy(), np.concatenate(parts))
