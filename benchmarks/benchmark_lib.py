"""Speed of the CO2 train step and of the input pipeline (what benchmarks/benchmark.py runs).

Train step (`benchmark_train_step`): the model is built and compiled by the
trainer's own builders, and the step timed is Keras's own train function
around `CO2Model.train_step`: the exact code training runs, on synthetic
inputs already in memory. The result is the median over several timed
executions after warm-up.

The machine's ceiling is the best float32 N x N matmul rate of TF and of
NumPy, measured in the same process and interleaved with the step: each
round times both for about one step's duration just before and just after
the step, so that the utilisation ratio survives a noisy, shared machine.
NumPy is there because TF's own matmul is not the machine's: on an AVX2 CPU
without oneDNN ops it runs at under half NumPy's rate, and a ceiling that
low hides a slow step. The JSON also says which instruction sets the CPU
has and whether oneDNN ops and XLA were on: the three decide the figures.

`--ablate` adds a bare step (the two encoders only: prices the CO2 term,
EMA and queue) and a convs-only step (the backbones without BN, head or
anything else: what this machine's conv kernels reach, a ceiling for the
step that is usually below the matmul's).

FLOPs come from TensorFlow's profiler (`tf.compat.v1.profiler`, float
operations of the step's graph: every op with registered FLOP statistics,
i.e. convolutions and their two backward ops, matmuls, and element-wise
ops), divided by the global batch.

Input pipeline (`benchmark_input`): host CPU-ms per source image (two crops)
of `pipelines.pretrain_dataset_fn`, both placements of the augmentation, on
photograph-like JPEGs of ImageNet's size and weight, against PyTorch's
DataLoader with MoCo v2's transforms on the same files, back to back.
"""

import dataclasses
import json
import os
import platform
import re
import statistics
import tempfile
import time

import numpy as np

from co2_tf.config import flag
from co2_tf.errors import UserError


@dataclasses.dataclass
class BenchmarkConfig:
    """How to time: the step itself is described by a TrainConfig."""
    warmup: int = flag(2, "untimed executions before timing")
    repeats: int = flag(7, "timed executions (the median is reported)")
    matmul_size: int = flag(4096, "N of the float32 N x N matmuls (TF and NumPy) that measure the "
                                  "ceiling")
    ablate: bool = flag(False, "also time a bare step (encoders only) to price CO2 term + EMA + "
                               "queue, and the backbones' convs alone (no BN) for the ceiling of "
                               "the step")
    conv_kernels: bool = flag(False, "time each conv of the backbone alone instead of the step: "
                                     "forward, input gradient and filter gradient, against the "
                                     "matmul ceiling")
    intra_op_threads: int = flag(0, "TF threads per op (0 = TF's default: all cores); the TF matmul"
                                    " then runs cores / intra_op_threads matmuls at once")
    inter_op_threads: int = flag(0, "TF ops run at once (0 = TF's default)")
    cpu_devices: int = flag(0, "split the CPU into this many logical devices (e.g. 2 for "
                               "--strategy=mirrored without GPUs); 0 = leave as is")
    # input pipeline mode
    input_only: bool = flag(False, "benchmark the input pipeline instead of the train step")
    num_jpegs: int = flag(512, "--input_only: photograph-like JPEGs generated (400-500 x 300-375 "
                               "px, ~110 KB)")
    input_batch_size: int = flag(64, "--input_only: batch size of the pipeline")
    input_window: int = flag(4, "--input_only: batches per timed window")
    jpeg_dir: str = flag("", "--input_only: use this folder:PATH image folder instead of generated "
                             "JPEGs")
    input_rounds: int = flag(2, "--input_only: rounds of the back-to-back comparison (medians "
                                "reported)")
    torch_peer: bool = flag(True, "--input_only: also time PyTorch's DataLoader with MoCo v2's "
                                  "transforms on the same files (needs requirements-torch.txt)")

    def check(self):
        def need(ok, message):
            if not ok:
                raise UserError(message)
        need(self.intra_op_threads >= 0 and self.inter_op_threads >= 0,
             "--intra_op_threads and --inter_op_threads must be >= 0 (0 = TF's default)")
        for name in ("repeats", "matmul_size", "num_jpegs", "input_batch_size", "input_window",
                     "input_rounds"):
            need(getattr(self, name) > 0, f"--{name}={getattr(self, name)} must be > 0")
        need(self.warmup >= 0 and self.cpu_devices >= 0,
             "--warmup and --cpu_devices must be >= 0")
        return self


# The TrainConfig fields a benchmark sets itself: no run dir, no step budget.
NOT_A_RUN = {"model_dir": "(benchmark)", "train_steps": 10**6}


# TrainConfig fields a benchmark has no use for (run dir, schedule length,
# checkpoints, monitoring): the tools do not offer them as flags.
UNUSED_TRAIN_FIELDS = (
    "model_dir", "dataset", "data_dir", "split", "eval_split", "epochs", "train_steps",
    "warmup_epochs", "deterministic", "checkpoint_every", "keep_checkpoints", "log_every",
    "knn_every", "end_of_run_knn", "knn_k", "knn_temperature", "log_every_secs")


# ------------------------------------------------------------------- helpers
def _median(values):
    return float(statistics.median(values))


def _sig(x, digits=6):
    """x rounded to `digits` significant digits.

    Significant digits, not decimals: the fields must agree with each other
    (utilisation = gflops_per_sec / matmul_gflops_per_sec) to 0.1% at any
    scale, a tiny test model's 10 ms step as well as a ResNet's 5 s one.
    """
    return float(f"{x:.{digits}g}")


def cores_available():
    from co2_tf.data import pipelines
    return pipelines.num_parallel_calls()


# What decides which kernels TF and PyTorch can use on x86 (/proc/cpuinfo names).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                "amx_bf16", "amx_int8")


def cpu_features(cpuinfo="/proc/cpuinfo"):
    """{"model": ..., "avx2": bool, ...} from /proc/cpuinfo; None where there is none."""
    try:
        with open(cpuinfo) as f:  # a system file, not a user path
            text = f.read()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return dict({"model": fields.get("model name", "")},
                **{name: name in flags for name in CPU_FEATURES})


def execution():
    """Whether TF's oneDNN custom ops and XLA's CPU backend are in play.

    `onednn_opts` is what TF decided when it loaded: TF_ENABLE_ONEDNN_OPTS
    if set (before TF is imported), else TF's own default (on only for CPUs
    with AVX-512 VNNI/BF16 or AMX).
    """
    from co2_tf import compat
    return {"onednn_opts": compat.onednn_enabled(),
            "onednn_opts_env": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}


def environment():
    """What the numbers depend on: versions, cores, instruction sets, load."""
    import keras
    import tensorflow as tf
    return dict({"tensorflow": tf.__version__, "keras": keras.__version__,
                 "numpy": np.__version__, "cores": cores_available(),
                 "machine": platform.machine(), "cpu": cpu_features(),
                 "load_average_1min": round(os.getloadavg()[0], 2)}, **execution())


def matmul_timer(n, parallel=1):
    """A callable run(count) timing `count` calls; returns seconds per call.

    A call is `parallel` independent float32 n x n matmuls (TF runs them
    concurrently on its inter-op threads): 2 n^3 * parallel FLOPs. With one
    intra-op thread per op, it takes one matmul per core to use the machine.
    The results are reduced to a scalar inside the call: no copy to the host
    is timed.
    """
    import tensorflow as tf
    pairs = [(tf.random.stateless_normal([n, n], seed=[1, i]),
              tf.random.stateless_normal([n, n], seed=[2, i])) for i in range(parallel)]

    @tf.function
    def matmul(pairs):
        return tf.add_n([tf.reduce_sum(tf.matmul(a, b)) for a, b in pairs])

    def run(count=1):
        start = time.perf_counter()
        for _ in range(count):
            matmul(pairs).numpy()
        return (time.perf_counter() - start) / count
    run()  # trace and warm up
    return run


def numpy_matmul_timer(n):
    """As matmul_timer, for one float32 n x n NumPy matmul (its BLAS uses every core).

    The other half of the ceiling: a TF wheel's own kernels can be far from
    what the machine does (without oneDNN on an AVX2 CPU, half NumPy's rate).
    """
    rng = np.random.RandomState(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in "ab")
    out = np.empty((n, n), np.float32)

    def run(count=1):
        start = time.perf_counter()
        for _ in range(count):
            np.matmul(a, b, out=out)
        return (time.perf_counter() - start) / count
    run()
    return run


def _exact_conv_backprop_flops(op):
    """2 x the multiply-adds of the forward conv whose gradient `op` computes.

    Both backward ops of a conv do exactly its forward multiply-adds. TF's
    registered formulas (input area / stride^2) overcount convs whose padding
    is explicit, e.g. the stride-2 3x3 convs of torchvision ResNets
    (34^2 / 4 = 289 positions for 16^2 = 256 outputs).
    """
    out_backprop = op.inputs[2].shape.as_list()  # the forward conv's output
    if op.type == "Conv2DBackpropInput":
        kh, kw, in_depth, _ = op.inputs[1].shape.as_list()
    else:  # Conv2DBackpropFilter: inputs are (image, filter_sizes, out_backprop)
        kh, kw, in_depth, _ = op.outputs[0].shape.as_list()
    return 2 * int(np.prod(out_backprop)) * kh * kw * in_depth


def _live_ops(graph):
    """Ops a call of the function graph runs: what its outputs and side effects need."""
    pending = [t.op for t in graph.outputs] + list(graph.control_outputs)
    live = set()
    while pending:
        op = pending.pop()
        if op not in live:
            live.add(op)
            pending.extend(t.op for t in op.inputs)
            pending.extend(op.control_inputs)
    return live


def matmul_parallelism():
    """Concurrent matmuls that use every core: cores / intra-op threads (0 = all cores)."""
    import tensorflow as tf
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    return max(1, cores_available() // intra) if intra else 1


def set_threads(intra_op, inter_op):
    """TF's thread pools (0 = TF's default); only before TF runs its first op."""
    import tensorflow as tf
    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def count_flops(fn, *specs):
    """Float ops of one call of tf.function `fn`: (exact, by op type, TF profiler total).

    Per op, TF's registered FLOP statistics (what tf.compat.v1.profiler's
    float_operation view sums: 2 per multiply-add in convolutions, their two
    backward ops and matmuls; 1 per element in element-wise ops), with two
    corrections that make it exact: a conv's two backward ops count the
    multiply-adds of the forward conv, and ops whose outputs nothing reads
    (e.g. the first conv's input gradient, which the gradient function emits
    and Grappler prunes) are not run, so not counted. A filter gradient computed
    as a matmul (co2_tf.nets.conv_grad) counts as Conv2DBackpropFilter. The
    profiler's own total is returned too.
    """
    import collections

    import tensorflow as tf

    from co2_tf import compat
    graph = fn.get_concrete_function(*specs).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    breakdown = collections.Counter()
    with compat.silenced_deprecation():  # the profiler's v1 shape helpers warn on every use
        profiler_total = int(tf.compat.v1.profiler.profile(graph=graph,
                                                           options=options).total_float_ops)
        live = _live_ops(graph)
        for op in graph.get_operations():
            if op not in live:
                continue  # pruned before running
            if op.type in ("Conv2DBackpropInput", "Conv2DBackpropFilter"):
                breakdown[op.type] += _exact_conv_backprop_flops(op)
                continue
            flops = compat.registered_flops(graph, op.node_def)
            if flops:
                by_matmul = op.type == "MatMul" and _in_matmul_filter_grad(op)
                breakdown["Conv2DBackpropFilter" if by_matmul else op.type] += int(flops)
    return sum(breakdown.values()), dict(breakdown), profiler_total


def _in_matmul_filter_grad(op):
    """Whether graph op `op` is part of a filter gradient by co2_tf.nets.conv_grad's matmul."""
    from co2_tf.nets import conv_grad
    # Scope names are made unique: matmul_filter_grad, matmul_filter_grad_1, ...
    return re.search(rf"(^|/){conv_grad.SCOPE}(_\d+)?/", op.name) is not None


# ------------------------------------------------------------ the train step
def _synthetic_dataset_fn(config, uint8=False):
    """Two fixed crops per image, in memory: the input costs nothing.

    uint8: the crops --augment_on=device hands the step (which then augments them).
    """
    import tensorflow as tf
    rng = np.random.RandomState(config.seed)
    shape = (config.batch_size, config.image_size, config.image_size, 3)
    if uint8:
        x_q, x_k = (rng.randint(0, 256, shape).astype("uint8") for _ in "qk")
    else:
        x_q, x_k = (rng.rand(*shape).astype("float32") for _ in "qk")

    def dataset_fn(context):
        b = context.get_per_replica_batch_size(config.batch_size)
        start = context.input_pipeline_id * b
        ds = tf.data.Dataset.from_tensors((x_q[start:start + b], x_k[start:start + b]))
        return ds.repeat()
    return dataset_fn


def bare_step_fn(model, shuffle_bn):
    """A train step with only the two encoders: what CO2's extras are priced against.

    Query forward + backward + optimizer update and key forward (with the
    model's shuffle-BN if `shuffle_bn`, else one plain batch); no InfoNCE, no
    CO2 term, no EMA, no queue update. The loss is -mean(q . k).
    """
    import tensorflow as tf

    def step(data):
        x_q, x_k = data
        if model.view_transform is not None:  # uint8 crops: priced without the augmentation
            x_q, x_k = (tf.cast(x, tf.float32) / 255.0 for x in (x_q, x_k))
        ctx = tf.distribute.get_replica_context()
        global_b = tf.cast(tf.shape(x_q)[0] * ctx.num_replicas_in_sync, tf.float32)
        if shuffle_bn:
            keys, _ = model.encode_keys(x_k, model.optimizer.iterations)
        else:
            keys = tf.stop_gradient(model.encode_key_groups(x_k))
        qvars = model.query_variables
        with tf.GradientTape() as tape:
            q = model.encode_query(x_q, training=True)
            loss = -tf.reduce_sum(q * keys) / global_b
            scaled = model.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, qvars)
        model.optimizer.apply_gradients(zip(grads, qvars))
        return {"loss": ctx.all_reduce("sum", loss)}
    return step


def convs_only_step(config):
    """The step's convolutions with nothing around them: a ceiling for the step.

    Query-backbone forward + backward and key-backbone forward of the same
    backbone built without normalisation (bn="none"), on one device, with
    no head, loss terms, optimizer, EMA or queue. Its utilisation is what
    this machine's conv kernels reach on this network; the step cannot do
    better, and the gap between the two is BN, ReLU, residual adds and the
    rest of the step. Returns (tf.function of (x_q, x_k), its FLOPs).
    """
    import tensorflow as tf

    from co2_tf.nets import backbones
    query = backbones.build_backbone(config.backbone, config.image_size, bn="none",
                                     seed=config.seed, conv_filter_grad=config.conv_filter_grad)
    key = backbones.build_backbone(config.backbone, config.image_size, bn="none",
                                   seed=config.seed + 1)

    @tf.function
    def step(x_q, x_k):
        k = tf.stop_gradient(key(x_k, training=True))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(query(x_q, training=True) * k, tf.float32))
        grads = tape.gradient(loss, query.trainable_variables)
        # Every gradient is used, so no conv backward op is pruned.
        return {"loss": tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads])}

    spec = tf.TensorSpec([config.batch_size, config.image_size, config.image_size, 3],
                         tf.float32)
    flops, _, _ = count_flops(step, spec, spec)
    return step, flops


def _executor(model, step_fn=None):
    """Keras's train-function harness (the one fit uses) around `step_fn`."""
    if step_fn is None:
        model.make_train_function()
        return model.train_function
    from co2_tf import compat
    return compat.keras_train_function(model, step_fn)


def _timer(function, iterator):
    def run():
        start = time.perf_counter()
        logs = function(iterator)
        float(logs["loss"])  # waits for the execution to finish
        return time.perf_counter() - start
    return run


def _make_strategy(config):
    from co2_tf import distribute
    return distribute.make_strategy(config.strategy, config.tpu or None)


def _trainer():
    """The builders training uses (build_model, build_optimizer, compile_model): the step
    timed is the one training runs, without the trainer's callbacks and signal handling."""
    from co2_tf import build
    return build


def benchmark_train_step(config, timing, strategy=None):
    """Times CO2Model.train_step as training runs it; returns the JSON dict.

    `config` (TrainConfig) is the step, `timing` (BenchmarkConfig) how it is timed.
    """
    import tensorflow as tf

    from co2_tf.nets import conv_grad
    trainer = _trainer()

    config.check()
    timing.check()
    env_before = environment()
    strategy = strategy or _make_strategy(config)
    replicas = strategy.num_replicas_in_sync
    groups = config.check_replicas(replicas)
    with strategy.scope():
        model = trainer.build_model(config, groups, conv_filter_grad=config.conv_filter_grad)
        optimizer = trainer.build_optimizer(config, steps_per_epoch=1000, total_steps=10**6)
        trainer.compile_model(model, optimizer, config)

    # FLOPs of one global step, from the graph of the step on every replica.
    b = config.batch_size // replicas
    on_device = model.view_transform is not None
    spec = tf.TensorSpec([b, config.image_size, config.image_size, 3],
                         tf.uint8 if on_device else tf.float32)
    flop_method = ("TF profiler FLOP statistics per op of the train_step graph (fwd+bwd "
                   "query, fwd key, losses, EMA, queue), conv backward ops recounted "
                   "exactly, unused ops excluded; see benchmarks/benchmark_lib.count_flops")
    profiler_flop_per_image = None
    try:
        step_graph = tf.function(lambda x_q, x_k: strategy.run(model.train_step,
                                                               args=((x_q, x_k),)))
        with strategy.scope():
            total_flops, by_op, profiler_flops = count_flops(step_graph, spec, spec)
        if not total_flops:  # e.g. TPUStrategy: the step is one opaque TPU op here
            raise ValueError("no FLOP statistics in this strategy's step graph")
        flop_per_image = total_flops / config.batch_size
        profiler_flop_per_image = profiler_flops / config.batch_size
    except Exception as e:  # report the time anyway
        flop_per_image, by_op = None, {}
        flop_method = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})"

    iterator = iter(strategy.distribute_datasets_from_function(
        _synthetic_dataset_fn(config, uint8=on_device)))
    timers = {"step": _timer(_executor(model), iterator)}
    if timing.ablate:
        timers["bare"] = _timer(_executor(model, bare_step_fn(model, False)), iterator)
        if config.bn == "shuffle":
            timers["bare_shuffle"] = _timer(_executor(model, bare_step_fn(model, True)),
                                            iterator)
        if replicas == 1:
            convs_fn, convs_flops = convs_only_step(config)
            rng = np.random.RandomState(config.seed)
            shape = (config.batch_size, config.image_size, config.image_size, 3)
            convs_inputs = [tf.constant(rng.rand(*shape).astype("float32")) for _ in "qk"]
            timers["convs_only"] = _timer(lambda _: convs_fn(*convs_inputs), None)
    parallel = matmul_parallelism()
    n = timing.matmul_size
    tf_matmul, np_matmul = matmul_timer(n, parallel), numpy_matmul_timer(n)
    warm = {name: [run() for _ in range(timing.warmup)] for name, run in timers.items()}
    # The ceiling is timed over about as long as one step, just before and
    # just after it: this machine's speed drifts (shared host), and a matmul
    # burst much shorter than the step would sample another moment. Half of
    # each burst is TF's matmul, half NumPy's.
    step_guess = min(warm["step"]) if warm["step"] else timers["step"]()
    tf_count = max(1, round(step_guess / 2 / tf_matmul(2)))
    np_count = max(1, round(step_guess / 2 / np_matmul(2)))
    samples = {name: [] for name in timers}
    tf_samples, np_samples, rounds = [], [], []
    for _ in range(timing.repeats):
        # Interleaved, so that every timer sees the same load.
        before = tf_matmul(tf_count), np_matmul(np_count)
        samples["step"].append(timers["step"]())
        after = tf_matmul(tf_count), np_matmul(np_count)
        tf_samples += [before[0], after[0]]
        np_samples += [before[1], after[1]]
        rounds.append((before, after))
        for name in ("bare", "bare_shuffle", "convs_only"):
            if name in timers:
                samples[name].append(timers[name]())

    spe = config.steps_per_execution
    step_s = _median(samples["step"]) / spe
    tf_matmul_flops = 2 * n ** 3 * parallel
    tf_gflops = _sig(tf_matmul_flops / _median(tf_samples) / 1e9, 4)
    np_gflops = _sig(2 * n ** 3 / _median(np_samples) / 1e9, 4)
    ceiling, source = max((tf_gflops, "tf"), (np_gflops, "numpy"))
    result = {
        "benchmark": "train_step",
        "backbone": config.backbone, "image_size": config.image_size,
        "batch_size": config.batch_size, "queue_size": config.queue_size,
        "precision": config.precision, "jit_compile": bool(model.jit_compile),
        "conv_filter_grad": conv_grad.resolve(config.conv_filter_grad),
        "augment_on": "device" if on_device else "host",
        "jit_compile_requested": config.jit_compile,
        "strategy": type(strategy).__name__, "replicas": replicas, "bn": config.bn,
        "bn_groups": groups, "steps_per_execution": spe,
        "images_per_sec": _sig(config.batch_size / step_s, 4),
        "step_ms": _sig(1000 * step_s, 4),
        "step_ms_samples": [_sig(1000 * t / spe, 4) for t in samples["step"]],
        "gflop_per_image": None if flop_per_image is None else _sig(flop_per_image / 1e9),
        "flop_count_method": flop_method,
        "gflop_per_image_by_op": {k: _sig(v / config.batch_size / 1e9) for k, v in
                                  sorted(by_op.items(), key=lambda kv: -kv[1])},
        "matmul_size": n,
        "matmul_gflops_per_sec": tf_gflops,
        "numpy_matmul_gflops_per_sec": np_gflops,
        "ceiling_gflops_per_sec": ceiling,
        "ceiling_source": source,
        "matmuls_per_sample": tf_count,
        "numpy_matmuls_per_sample": np_count,
        "matmul_parallel": parallel,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "warmup_executions": timing.warmup, "timed_executions": timing.repeats,
    }
    if flop_per_image is not None:
        step_flops = flop_per_image * config.batch_size
        gflops = step_flops / step_s / 1e9
        result["gflops_per_sec"] = _sig(gflops, 4)
        result["utilisation"] = _sig(gflops / ceiling, 4)
        result["utilisation_vs_tf_matmul"] = _sig(gflops / tf_gflops, 4)
        # Round by round: the step against the best matmul rate just before and
        # after it; the median of these ratios is the figure least moved by load.
        ratios = []
        for t, (before, after) in zip(samples["step"], rounds):
            tf_rate = tf_matmul_flops / ((before[0] + after[0]) / 2)
            np_rate = 2 * n ** 3 / ((before[1] + after[1]) / 2)
            ratios.append(step_flops / (t / spe) / max(tf_rate, np_rate))
        result["utilisation_per_round"] = [round(r, 3) for r in ratios]
        result["utilisation_paired_median"] = round(_median(ratios), 3)
        result["gflop_per_image_tf_profiler_total"] = _sig(profiler_flop_per_image / 1e9)
    if timing.ablate:
        bare = _median(samples["bare"]) / spe
        result["step_ms_bare"] = _sig(1000 * bare, 4)
        result["overhead_fraction"] = round(step_s / bare - 1, 4)
        if "bare_shuffle" in samples:
            bare_shuffle = _median(samples["bare_shuffle"]) / spe
            result["step_ms_bare_shuffle_bn"] = _sig(1000 * bare_shuffle, 4)
            result["overhead_fraction_vs_shuffle_bn"] = round(step_s / bare_shuffle - 1, 4)
        if "convs_only" in samples:
            convs_s = _median(samples["convs_only"])
            result["step_ms_convs_only"] = _sig(1000 * convs_s, 4)
            result["gflop_per_image_convs_only"] = _sig(convs_flops / config.batch_size / 1e9)
            result["utilisation_convs_only"] = _sig(convs_flops / convs_s / 1e9 / ceiling, 4)
    env = environment()
    env["load_average_1min_before"] = env_before["load_average_1min"]
    result.update(env)
    return result


# ----------------------------------------------------------- input pipeline
def photo_like(rng, width, height):
    """uint8 [height, width, 3] with a photograph's texture.

    A smooth colour field plus 1/f^0.8 noise (natural images' spectra fall
    off about so) and mild sensor noise: at JPEG quality 90 and 400-500 x
    300-375 px such files weigh ~110 KB, as ImageNet's training JPEGs do;
    smooth fields alone compress to ~40 KB and decode faster, which flatters
    a pipeline.
    """
    from PIL import Image
    coarse = rng.randint(0, 256, size=(rng.randint(3, 9), rng.randint(3, 9), 3))
    base = np.asarray(Image.fromarray(coarse.astype("uint8")).resize(
        (width, height), Image.BICUBIC), np.float32)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f ** 0.8
    spectrum[0, 0] = 0.0
    texture = np.fft.irfft2(spectrum, s=(height, width))
    texture /= texture.std()
    pixels = (base + 80.0 * texture[..., None] * rng.uniform(0.6, 1.0, 3)
              + rng.normal(0.0, 8.0, (height, width, 3)))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_jpegs(root, count, seed=0):
    """`count` photograph-like JPEGs (400-500 x 300-375 px, ~110 KB) in root/<2 classes>/."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    for i in range(count):
        folder = os.path.join(root, f"class_{i % 2}")
        os.makedirs(folder, exist_ok=True)  # local-only: a scratch dir made by the benchmark
        w, h = rng.randint(400, 501), rng.randint(300, 376)
        Image.fromarray(photo_like(rng, w, h)).save(os.path.join(folder, f"{i:05d}.jpg"),
                                                    quality=90)
    return root


def _time_pipeline(spec, config, image_size, seed, augment_on="host"):
    """Host CPU-ms per source image (two views) of pretrain_dataset_fn, and images/s.

    augment_on "device": what the host does then (decode, crop, resize, uint8 batches).
    """
    from co2_tf.data import pipelines
    dataset = pipelines.pretrain_dataset_fn(
        spec, split="train", image_size=image_size, augment="mocov2", seed=seed,
        global_batch_size=config.input_batch_size, augment_on=augment_on)(None)
    iterator = iter(dataset)
    for _ in range(max(1, config.warmup)):  # fills the prefetch buffers, warms the threads
        for _ in range(config.input_window):
            next(iterator)
    rates, cpu, wall = [], 0.0, 0.0
    for _ in range(config.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(config.input_window):
            v1, _ = next(iterator)
        v1.numpy()
        elapsed = time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        wall += elapsed
        rates.append(config.input_window * config.input_batch_size / elapsed)
    images = config.repeats * config.input_window * config.input_batch_size
    return {"source_images_per_sec": round(_median(rates), 1),
            "window_images_per_sec": [round(r, 1) for r in rates],
            "cores_used": round(cpu / wall, 2),
            "cpu_ms_per_image": round(1000 * cpu / images, 2)}


def _time_device_part(config, timing):
    """CPU-ms per source image of the train step's part of the augmentation on this CPU."""
    import tensorflow as tf

    from co2_tf.data import augment_device
    transform = augment_device.ViewTransform("mocov2", config.seed)
    b, s = timing.input_batch_size, config.image_size
    crops = tf.constant(np.random.RandomState(0).randint(0, 256, (b, s, s, 3)).astype("uint8"))

    @tf.function
    def both_views(step):
        ids = step * b + tf.range(b, dtype=tf.int64)
        return [tf.reduce_sum(transform.for_view(v)(crops, ids, step)) for v in (0, 1)]
    both_views(tf.constant(0, tf.int64))
    cpu = []
    for step in range(1, timing.repeats + 1):
        start = time.process_time()
        [x.numpy() for x in both_views(tf.constant(step, tf.int64))]
        cpu.append(time.process_time() - start)
    return {"cpu_ms_per_image": round(1000 * _median(cpu) / b, 2)}


def _time_torch(files, timing, image_size, tmp):
    """PyTorch's DataLoader with MoCo v2's transforms, in a process of its own."""
    import subprocess
    import sys
    listing = os.path.join(tmp, "files.txt")
    with open(listing, "w") as f:  # local-only: a scratch file in the benchmark's temp dir
        f.write("\n".join(files))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_input.py")
    batches = timing.repeats * timing.input_window
    result = subprocess.run(
        [sys.executable, script, f"--files={listing}", f"--batch_size={timing.input_batch_size}",
         f"--workers={cores_available()}", f"--image_size={image_size}",
         f"--warmup={max(1, timing.warmup) * timing.input_window}", f"--batches={batches}"],
        capture_output=True, text=True)
    if result.returncode:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        return {"error": lines[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark_input(config, timing):
    """Host CPU-ms per image of the two-crop MoCo v2 pipeline, against PyTorch's DataLoader.

    On photograph-like JPEGs (or --jpeg_dir), --input_rounds rounds, each
    back to back on the same files and cores: the host part of
    --augment_on=device (decode, crop, resize, uint8 batches), PyTorch's
    DataLoader with MoCo v2's transforms (benchmarks/torch_input.py), and the
    whole augmentation on the host (--augment_on=host); then the device part
    run on this CPU, and the built-in dataset. Medians over the rounds.
    `config` (TrainConfig) gives the image size and seed, `timing` the rest.
    """
    from co2_tf import io
    from co2_tf.data import image_files, sources
    timing.check()
    env_before = environment()
    result = {"benchmark": "input_pipeline", "augment": "mocov2",
              "image_size": config.image_size, "batch_size": timing.input_batch_size,
              "window_batches": timing.input_window, "timed_windows": timing.repeats,
              "rounds": timing.input_rounds, "cores_available": cores_available()}
    rounds = {"host_part": [], "torch_dataloader": [], "host_all": []}
    # local-only: generated JPEGs go to a scratch dir on the benchmark machine's disk
    with tempfile.TemporaryDirectory(prefix="co2_jpegs_") as tmp:
        root = timing.jpeg_dir or write_jpegs(os.path.join(tmp, "jpegs"), timing.num_jpegs,
                                              config.seed)
        listing = image_files.list_folder(root)
        sizes = [io.size(f) for f in listing.files]
        spec = sources.parse_dataset_spec(f"folder:{root}")
        for _ in range(timing.input_rounds):
            rounds["host_part"].append(_time_pipeline(spec, timing, config.image_size,
                                                      config.seed, "device"))
            if timing.torch_peer:
                rounds["torch_dataloader"].append(_time_torch(
                    listing.files, timing, config.image_size, tmp))
            rounds["host_all"].append(_time_pipeline(spec, timing, config.image_size,
                                                     config.seed, "host"))
    result["jpeg"] = {"files": len(listing.files),
                      "mean_file_kb": round(sum(sizes) / len(sizes) / 1024, 1)}
    for name, runs in rounds.items():
        if not runs:
            continue
        if any("error" in r for r in runs):
            result["jpeg"][name] = runs[0]
            continue
        result["jpeg"][name] = dict(runs[-1], cpu_ms_per_image=round(_median(
            [r["cpu_ms_per_image"] for r in runs]), 2), rounds_cpu_ms_per_image=[
            r["cpu_ms_per_image"] for r in runs])
    jpeg = result["jpeg"]
    jpeg["device_part_on_this_cpu"] = _time_device_part(config, timing)
    ours = jpeg["host_part"]["cpu_ms_per_image"]
    if "cpu_ms_per_image" in jpeg.get("torch_dataloader", {}):
        jpeg["host_part_vs_torch"] = round(ours / jpeg["torch_dataloader"]["cpu_ms_per_image"],
                                           3)
    # Host cores one accelerator taking 3,000 images/s (an H100 or a TPU v4 chip on
    # ResNet-50 in bfloat16) needs at the host part's measured cost.
    jpeg["host_cores_at_3000_images_per_sec"] = round(3000 * ours / 1000, 1)
    jpeg["cpu_placement_cpu_ms_per_image"] = {
        "host": jpeg["host_all"]["cpu_ms_per_image"],
        "device": round(ours + jpeg["device_part_on_this_cpu"]["cpu_ms_per_image"], 2)}
    result["builtin"] = _time_pipeline(sources.parse_dataset_spec("builtin"), timing,
                                       config.image_size, config.seed)
    env = environment()
    env["load_average_1min_before"] = env_before["load_average_1min"]
    result.update(env)
    return result


def _conv_shapes(config):
    """{(input HWC, kernel, strides, padding, filters, first): count} of the backbone's convs.

    `first`: the first conv (the layers are in graph order) reads the images, so the step
    computes no input gradient for it. Also returns {key: whether conv_grad's matmul
    filter gradient applies to that conv} and {key: tf.function(x, dy) of that conv's
    filter gradient as --conv_filter_grad=matmul computes it}.
    """
    import collections

    import keras
    import tensorflow as tf

    from co2_tf import compat
    from co2_tf.nets import backbones
    net = backbones.build_backbone(config.backbone, config.image_size, bn="none",
                                   seed=config.seed, conv_filter_grad="matmul")
    counts, matmul, grads = collections.Counter(), {}, {}
    for layer in compat.nested_layers(net):
        if isinstance(layer, keras.layers.Conv2D):
            shape = tuple(layer.input.shape[1:])
            key = (shape, tuple(layer.kernel_size), tuple(layer.strides), layer.padding,
                   layer.filters, not counts)
            counts[key] += 1
            if key in grads:
                continue
            grads[key] = _layer_filter_grad(layer)
            x_shape = (config.batch_size, *shape)
            graph = grads[key].get_concrete_function(
                tf.TensorSpec(x_shape, tf.float32),
                tf.TensorSpec(layer.compute_output_shape(x_shape), tf.float32)).graph
            matmul[key] = any(_in_matmul_filter_grad(op) for op in graph.get_operations())
    return counts, matmul, grads


def _layer_filter_grad(layer):
    """tf.function(x, dy): the filter gradient of conv `layer` as the layer computes it.

    Its forward conv and input gradient are computed by nothing the result reads: pruned.
    """
    import tensorflow as tf

    @tf.function
    def filter_grad(x, dy):
        with tf.GradientTape() as tape:
            y = layer.convolution_op(x, layer.kernel)
        return tape.gradient(y, layer.kernel, output_gradients=dy)
    return filter_grad


def _conv_ops(x, w, dy, strides, padding, matmul_grad=None):
    """{name: tf.function()} of one conv's kernels on these tensors (`matmul_grad`: the
    filter gradient by matmul, see _conv_shapes)."""
    import tensorflow as tf

    pad, stride4 = padding.upper(), [1, *strides, 1]
    ops = {
        "forward": tf.function(lambda: tf.nn.conv2d(x, w, strides, pad)),
        "input_grad": tf.function(lambda: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=x.shape, filter=w, out_backprop=dy, strides=stride4, padding=pad)),
        "filter_grad": tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=w.shape, out_backprop=dy, strides=stride4, padding=pad)),
    }
    if matmul_grad is not None:
        ops["filter_grad_matmul"] = lambda: matmul_grad(x, dy)
    return ops


def conv_kernel_rates(config, timing):
    """Each distinct conv of the backbone, alone, at the step's batch: GFLOP/s of its kernels.

    Per conv shape: TF's forward, input-gradient and filter-gradient ops (and
    co2_tf.nets.conv_grad's matmul filter gradient where it applies), each the
    median of --repeats timed calls, rounds interleaved; the float32 matmul
    ceiling is timed before and after. `conv_seconds_per_step` adds up, over
    the backbone's convs, what the step runs: two forwards (query and key),
    one input gradient (none for the conv that reads the images) and the
    filter gradient the step uses. It is what the step's convs would cost at
    these rates; compare it with step_ms of the step benchmark (same flags).
    Each timed call includes copying its result to the host: for the forward
    and input-gradient ops, a batch of feature maps (67 MB at 32x32x64, batch
    256), so their rates are lower bounds; the filter gradients return kernels.
    """
    import tensorflow as tf

    from co2_tf.nets import conv_grad
    result = environment()
    tf_matmul, np_matmul = matmul_timer(timing.matmul_size), numpy_matmul_timer(timing.matmul_size)
    matmul_flops = 2 * timing.matmul_size ** 3
    ceiling = [max(matmul_flops / tf_matmul(2), matmul_flops / np_matmul(2))]
    uses_matmul = conv_grad.resolve(config.conv_filter_grad) == "matmul"
    counts, matmul_applies, matmul_grads = _conv_shapes(config)
    rng = np.random.RandomState(config.seed)
    rows, conv_seconds = [], 0.0
    for key, count in counts.items():
        shape, kernel, strides, padding, filters, first = key
        batch = config.batch_size
        x = tf.constant(rng.rand(batch, *shape).astype("float32"))
        w = tf.constant(rng.rand(*kernel, shape[-1], filters).astype("float32"))
        y_shape = tf.nn.conv2d(x[:1], w, strides, padding.upper()).shape[1:]
        dy = tf.constant(rng.rand(batch, *y_shape).astype("float32"))
        flops = 2 * batch * y_shape[0] * y_shape[1] * kernel[0] * kernel[1] * shape[-1] * filters
        ops = _conv_ops(x, w, dy, strides, padding,
                        matmul_grads[key] if matmul_applies[key] else None)
        samples = {name: [] for name in ops}
        for round_ in range(timing.warmup + timing.repeats):
            for name, op in ops.items():
                start = time.perf_counter()
                op().numpy()
                if round_ >= timing.warmup:
                    samples[name].append(time.perf_counter() - start)
        seconds = {name: _median(times) for name, times in samples.items()}
        used = "filter_grad_matmul" if uses_matmul and matmul_applies[key] else "filter_grad"
        per_step = 2 * seconds["forward"] + seconds[used] + (0 if first else seconds["input_grad"])
        conv_seconds += count * per_step
        row = {"input": list(shape), "kernel": list(kernel), "strides": list(strides),
               "padding": padding, "filters": filters, "count": count,
               "gflop": _sig(flops / 1e9), "filter_grad_in_step": used,
               "reads_images": first}
        row.update({f"{name}_gflops_per_sec": _sig(flops / t / 1e9, 4)
                    for name, t in seconds.items()})
        rows.append(row)
    ceiling.append(max(matmul_flops / tf_matmul(2), matmul_flops / np_matmul(2)))
    result.update({
        "mode": "conv_kernels", "backbone": config.backbone, "batch_size": config.batch_size,
        "image_size": config.image_size, "convs": rows,
        "conv_seconds_per_step": _sig(conv_seconds, 4),
        "ceiling_gflops_per_sec": _sig(max(ceiling), 4),
        "matmul_filter_grad_on": uses_matmul})
    return result


def run(config, timing):
    """The benchmark `timing` asks for, of the step `config` describes: a JSON-ready dict."""
    if timing.input_only:
        return benchmark_input(config, timing)
    if timing.conv_kernels:
        return conv_kernel_rates(config, timing)
    return benchmark_train_step(config, timing)
