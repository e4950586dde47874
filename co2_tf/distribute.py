"""Choosing and creating the tf.distribute strategy.

co2_tf only uses tf.distribute's own engines: one device, MirroredStrategy
(one host, several GPUs), MultiWorkerMirroredStrategy (several hosts, cluster
from TF_CONFIG) and TPUStrategy (a TPU VM or pod slice).
"""

import json
import logging
import os

import tensorflow as tf

from co2_tf.choices import STRATEGIES
from co2_tf.errors import UserError


def resolve_kind(kind, tpu=None):
    """What `auto` means here: TPU when an address is given, mirrored with >1 GPU."""
    if kind not in STRATEGIES:
        raise UserError(f"unknown --strategy={kind!r}: use one of {', '.join(STRATEGIES)}")
    if kind != "auto":
        return kind
    if tpu:
        return "tpu"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "one_device"


def split_cpu(devices):
    """Splits the CPU into `devices` logical devices (0: leave it as one).

    What lets --strategy=mirrored run real multi-replica code on a machine
    without GPUs (tests, CPU proxies of a GPU box). Only possible before TF
    has started using its devices.
    """
    if devices <= 0:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    except RuntimeError:  # TF's devices already initialised
        if len(tf.config.list_logical_devices("CPU")) != devices:
            raise UserError(f"cannot split the CPU into {devices} devices: TF already "
                            "started; split it first thing in the process") from None


def make_strategy(kind="auto", tpu=None):
    """Creates the strategy. Must run before any other TF op touches devices."""
    name = resolve_kind(kind, tpu)
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        cpus = tf.config.list_logical_devices("CPU")
        # With no GPU, mirror over logical CPU devices (how tests and CPU
        # proxies run real multi-replica code).
        return tf.distribute.MirroredStrategy([d.name for d in (gpus or cpus)])
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    # TPU VM: tpu="local"; a remote TPU: its name or grpc:// address.
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "local")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot reach TPU {tpu or 'local'!r} ({first}): check --tpu "
                        "(use --tpu=local on a TPU VM) or use another --strategy") from None
    return tf.distribute.TPUStrategy(resolver)


def _check_tf_config():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise UserError("--strategy=multi_worker needs the cluster in the TF_CONFIG environment "
                        "variable (see README, 'Several hosts')")
    try:
        cfg = json.loads(raw)
        cfg["cluster"]["worker"], cfg["task"]["index"]
    except (ValueError, KeyError, TypeError):
        raise UserError("TF_CONFIG is not valid: it needs {\"cluster\": {\"worker\": [...]}, "
                        "\"task\": {\"type\": \"worker\", \"index\": N}}") from None


def copy_first_replica(variables):
    """Gives every replica's copy of `variables` replica 0's value; call in a replica context.

    For variables that each replica writes with its own value: Keras creates
    BN moving statistics with aggregation "none", and each replica averages
    the statistics of its own batch into its own copy. An all-reduce of
    replica 0's value and zeros from the others is exact (x + 0 == x), lands
    identically on every replica and runs under every strategy. The
    variables must have aggregation "none" (a replica-context assign then
    writes only the local copy). Nothing to do on one replica.
    """
    ctx = tf.distribute.get_replica_context()
    if not variables or ctx is None or ctx.num_replicas_in_sync == 1:
        return
    first = tf.equal(ctx.replica_id_in_sync_group, 0)
    local = [tf.convert_to_tensor(v) for v in variables]
    shared = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                            [tf.where(first, x, tf.zeros_like(x)) for x in local])
    for v, x in zip(variables, shared, strict=True):
        v.assign(x)


# What MirroredStrategy's collective all-gather (CollectiveGatherV2) takes, on CPU and GPU.
_GATHER_DTYPES = (tf.float16, tf.float32, tf.float64, tf.int32, tf.int64)


def all_gather_in_own_bytes(ctx, x):
    """ctx.all_gather(x, axis=0), moving x's own bytes whatever its dtype.

    uint8 and bfloat16 tensors (key images handed as uint8 views, in the compute dtype)
    cross as int32 words they are bitcast into (each example padded to whole words),
    rather than being refused by the collective or widened to 4 bytes an element.
    """
    if x.dtype in _GATHER_DTYPES:
        return ctx.all_gather(x, axis=0)
    per_word = 4 // x.dtype.size
    count = x.shape[1:].num_elements()
    padded = -(-count // per_word) * per_word
    flat = tf.reshape(x, [-1, count])
    flat = tf.pad(flat, [[0, 0], [0, padded - count]])
    words = tf.bitcast(tf.reshape(flat, [-1, padded // per_word, per_word]), tf.int32)
    gathered = tf.bitcast(ctx.all_gather(words, axis=0), x.dtype)
    return tf.reshape(tf.reshape(gathered, [-1, padded])[:, :count],
                      tf.concat([[-1], x.shape[1:]], 0))


def pad_batch(replicas):
    """(images, labels) -> (images, labels, weights): a batch padded to a multiple of `replicas`.

    The padding has weight 0 (real examples 1). A batch smaller than the
    replicas leaves a replica no example, and Keras layers fail on an empty
    batch ("Incompatible shapes: [C] vs. [0,H,W,3]"); an even split also
    keeps each replica's share of the mean equal.
    """
    def pad(images, labels):
        n = tf.shape(labels)[0]
        extra = -n % replicas
        images = tf.pad(images, [[0, extra]] + [[0, 0]] * (len(images.shape) - 1))
        weights = tf.concat([tf.ones([n]), tf.zeros([extra])], 0)
        return images, tf.pad(labels, [[0, extra]]), weights
    return pad


def pad_to_size(size):
    """(images, labels) -> (images, labels, weights): a batch padded to exactly `size` examples.

    Evaluation pads every batch, the last one included, to one static shape
    (one trace, one XLA compilation on TPU); the padding has weight 0 (real
    examples 1) and counts nowhere. `size` must be a multiple of the
    replicas (see pad_batch for why).
    """
    def pad(images, labels):
        n = tf.shape(labels)[0]
        images = tf.pad(images, [[0, size - n]] + [[0, 0]] * (len(images.shape) - 1))
        weights = tf.concat([tf.ones([n]), tf.zeros([size - n])], 0)
        labels = tf.pad(labels, [[0, size - n]])
        images = tf.ensure_shape(images, [size, *images.shape[1:]])
        return images, tf.ensure_shape(labels, [size]), tf.ensure_shape(weights, [size])
    return pad


def xla_problem(strategy):
    """Why Keras's jit_compile cannot be used under `strategy`, or None if it can.

    Keras has no switch to compile only the per-replica step: with several
    replicas, jit_compile=True makes it compile `strategy.run` itself inside
    one XLA function, whatever the devices. On CPU devices that fails deep in
    TF (a replica reads variables placed on another device: "Trying to access
    resource ... located in device CPU:1 from device CPU:0"), and Keras's own
    jit_compile="auto" turns XLA off under every tf.distribute strategy. On
    several GPUs it is the same untested construct: co2_tf does not use it.
    TPUStrategy is not concerned (it compiles every step with XLA by itself).
    """
    if strategy.num_replicas_in_sync > 1:
        kinds = sorted({_device_kind(d) for d in strategy.extended.worker_devices})
        return (f"XLA would compile the whole step replicated over "
                f"{strategy.num_replicas_in_sync} replicas ({'/'.join(kinds)} devices), which "
                "Keras does not support")
    return None


def _device_kind(device):
    return tf.DeviceSpec.from_string(device).device_type or "CPU"


def resolve_jit_compile(requested, strategy):
    """The jit_compile to give Keras: False where XLA would fail, with one warning line.

    TPUStrategy compiles every step with XLA by itself: Keras's flag is not
    needed there (and is left off so that the step is not compiled twice).
    With several replicas on any other device, --jit_compile is refused with
    one line and the run goes on without XLA (see xla_problem).
    """
    if not requested:
        return False
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return False
    problem = xla_problem(strategy)
    if problem:
        logging.getLogger(__name__).warning(
            "--jit_compile ignored: %s; training without XLA (XLA works with one replica, "
            "e.g. one GPU, and TPUs compile every step by themselves)", problem)
        return False
    return True


def is_chief(strategy):
    """Whether this process writes checkpoints, summaries and reports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                            and "chief" not in resolver.cluster_spec().as_dict())
