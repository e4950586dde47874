"""Tests for co2_tf.optimizers against NumPy re-implementations."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from co2_tf.errors import UserError
from co2_tf.optimizers import LARS, PyTorchSGD, WarmupSchedule, make_lr_schedule, make_optimizer

# ---------------------------------------------------------------- schedules

def _np_lr(kind, step, base, total, warmup, boundaries, decay):
    """Independent NumPy statement of the documented schedules."""
    if kind == "cosine":
        t = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
        factor = 0.5 * (1 + math.cos(math.pi * t))
    elif kind == "step":
        factor = decay ** sum(step >= round(b * total) for b in boundaries)
    else:
        factor = 1.0
    if warmup:
        factor *= min(1.0, step / warmup)
    return base * factor


@pytest.mark.parametrize("kind", ["step", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_schedule_matches_numpy_under_xla_with_variable_step(kind, warmup):
    total, base = 50, 0.03
    sched = make_lr_schedule(kind, base_learning_rate=base, total_steps=total,
                             warmup_steps=warmup)
    step = tf.Variable(0, dtype=tf.int64)

    @tf.function(jit_compile=True)
    def lr_and_advance():
        lr = sched(step)
        step.assign_add(1)
        return lr

    got = np.array([lr_and_advance().numpy() for _ in range(total + 3)])
    want = np.array([_np_lr(kind, s, base, total, warmup, (0.6, 0.8), 0.1)
                     for s in range(total + 3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_schedule_landmarks():
    # MoCo v1: 200 epochs, x0.1 at 120 and 160.
    s = make_lr_schedule("step", base_learning_rate=0.03, total_steps=200)
    assert s.boundary_steps == (120, 160)
    np.testing.assert_allclose(
        [float(s(119)), float(s(120)), float(s(159)), float(s(160))],
        [0.03, 0.003, 0.003, 0.0003], rtol=1e-6)
    c = make_lr_schedule("cosine", base_learning_rate=0.1, total_steps=100,
                         warmup_steps=10)
    np.testing.assert_allclose(
        [float(c(0)), float(c(5)), float(c(10)), float(c(55)),
         float(c(100)), float(c(1000))],
        [0.0, 0.05, 0.1, 0.05, 0.0, 0.0], atol=1e-7)


def test_schedule_serialization_round_trip():
    s = make_lr_schedule("step", base_learning_rate=0.5, total_steps=30,
                         warmup_steps=3, boundaries=(0.5,), decay=0.2)
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(s))
    assert isinstance(again, WarmupSchedule)
    assert again.get_config() == s.get_config()
    for step in (0, 2, 3, 14, 15, 29):
        assert float(again(step)) == float(s(step))


@pytest.mark.parametrize("kwargs", [
    dict(kind="linear"),
    dict(total_steps=0),
    dict(warmup_steps=11),
    dict(boundaries=(0.8, 0.6)),
    dict(boundaries=(1.5,)),
    dict(base_learning_rate=-1.0),
])
def test_schedule_bad_input(kwargs):
    args = dict(kind="step", base_learning_rate=0.1, total_steps=10)
    args.update(kwargs)
    with pytest.raises(UserError):
        make_lr_schedule(args.pop("kind"), **args)


# ------------------------------------------------------ NumPy references

def _np_torch_sgd(params, grads_seq, lrs, mu, wd, nesterov=False):
    """torch.optim.SGD(momentum=mu, weight_decay=wd, dampening=0)."""
    params = [p.astype(np.float64).copy() for p in params]
    bufs = [None] * len(params)
    for grads, lr in zip(grads_seq, lrs):
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g + wd * p
            bufs[i] = d.copy() if bufs[i] is None else mu * bufs[i] + d
            d = d + mu * bufs[i] if nesterov else bufs[i]
            params[i] = p - lr * d
    return params, bufs


def _np_lars(params, grads_seq, lrs, excluded, mu, wd, eta):
    """SimCLR's LARSOptimizer update."""
    params = [p.astype(np.float64).copy() for p in params]
    vs = [np.zeros_like(p) for p in params]
    for grads, lr in zip(grads_seq, lrs):
        for i, (p, g) in enumerate(zip(params, grads)):
            trust = 1.0
            if not excluded[i]:
                g = g + wd * p
                wn, gn = np.linalg.norm(p), np.linalg.norm(g)
                if wn > 0 and gn > 0:
                    trust = eta * wn / gn
            vs[i] = mu * vs[i] + lr * trust * g
            params[i] = p - vs[i]
    return params, vs


def _model(seed=0):
    """Dense (one zero kernel: LARS's ||w|| = 0 branch) + BN: real paths."""
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, name="fc1", bias_initializer=keras.initializers
                           .RandomNormal(seed=seed + 1),
                           kernel_initializer=keras.initializers
                           .RandomNormal(seed=seed)),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(2, name="fc2", kernel_initializer="zeros"),
    ], name="net")


def _grad_seq(model, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=v.shape).astype(np.float32)
             for v in model.trainable_variables] for _ in range(steps)]


def test_pytorch_sgd_matches_numpy_with_changing_lr():
    model = _model()
    init = [v.numpy() for v in model.trainable_variables]
    sched = make_lr_schedule("cosine", base_learning_rate=0.5, total_steps=6,
                             warmup_steps=2)
    opt = make_optimizer("sgd", sched, momentum=0.9, weight_decay=0.01)
    assert isinstance(opt, PyTorchSGD)
    grads_seq = _grad_seq(model, 5)
    for grads in grads_seq:
        opt.apply(grads, model.trainable_variables)
    lrs = [float(sched(s)) for s in range(5)]
    assert len(set(lrs)) == 5  # the lr really changes every step
    want, bufs = _np_torch_sgd(init, grads_seq, lrs, 0.9, 0.01)
    for v, w in zip(model.trainable_variables, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-6)
    for m, b in zip(opt.momentums, bufs):
        np.testing.assert_allclose(m.numpy(), b, rtol=1e-5, atol=1e-6)
    # Keras's own SGD follows a different trajectory when lr changes.
    ref = _model()
    kopt = keras.optimizers.SGD(sched, momentum=0.9)
    for grads in grads_seq:
        kopt.apply([g + 0.01 * v.numpy() for g, v in
                    zip(grads, ref.trainable_variables)],
                   ref.trainable_variables)
    assert not np.allclose(ref.trainable_variables[0].numpy(), want[0],
                           atol=1e-4)


def test_pytorch_sgd_nesterov_and_no_momentum():
    for nesterov, mu in ((True, 0.8), (False, 0.0)):
        model = _model()
        init = [v.numpy() for v in model.trainable_variables]
        opt = PyTorchSGD(0.1, momentum=mu, weight_decay=0.05,
                         nesterov=nesterov)
        grads_seq = _grad_seq(model, 3, seed=1)
        for grads in grads_seq:
            opt.apply(grads, model.trainable_variables)
        want, _ = _np_torch_sgd(init, grads_seq, [0.1] * 3, mu, 0.05,
                                nesterov)
        for v, w in zip(model.trainable_variables, want):
            np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-6)


def test_lars_matches_numpy_with_exclusions():
    model = _model()
    tv = model.trainable_variables
    opt = make_optimizer("lars", make_lr_schedule(
        "step", base_learning_rate=0.8, total_steps=4, boundaries=(0.5,)),
        momentum=0.9, weight_decay=0.01)
    assert isinstance(opt, LARS)
    excluded = [opt.is_excluded(v) for v in tv]
    # fc1/kernel, fc1/bias, bn/gamma, bn/beta, fc2/kernel, fc2/bias
    assert [v.path.split("/", 1)[1] for v in tv] == [
        "fc1/kernel", "fc1/bias", "bn/gamma", "bn/beta", "fc2/kernel",
        "fc2/bias"]
    assert excluded == [False, True, True, True, False, True]
    init = [v.numpy() for v in tv]
    grads_seq = _grad_seq(model, 4, seed=2)
    for grads in grads_seq:
        opt.apply(grads, tv)
    lrs = [0.8, 0.8, 0.08, 0.08]
    want, vs = _np_lars(init, grads_seq, lrs, excluded, 0.9, 0.01, 0.001)
    for v, w in zip(tv, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-7)
    for m, ref in zip(opt.momentums, vs):
        np.testing.assert_allclose(m.numpy(), ref, rtol=1e-5, atol=1e-7)
    # The trust ratio matters: an excluded kernel would move much further.
    assert np.abs(want[0] - init[0]).max() < 0.05
    assert np.abs(want[1] - init[1]).max() > 0.5


def test_lars_custom_exclusion():
    model = _model()
    opt = LARS(0.1, exclude=[r"fc2/"])
    assert [opt.is_excluded(v) for v in model.trainable_variables] == [
        False, False, False, False, True, True]
    with pytest.raises(UserError):
        LARS(0.1, exclude=["("])


def test_make_optimizer_bad_input():
    with pytest.raises(UserError):
        make_optimizer("adam", 0.1)
    with pytest.raises(UserError):
        make_optimizer("sgd", 0.1, momentum=1.5)
    with pytest.raises(UserError):
        make_optimizer("lars", 0.1, weight_decay=-1.0)


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_get_config_round_trip(name):
    sched = make_lr_schedule("cosine", base_learning_rate=0.2, total_steps=9)
    opt = make_optimizer(name, sched, momentum=0.8, weight_decay=3e-4)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is type(opt)
    assert again.get_config() == opt.get_config()
    assert again.l2_weight_decay == 3e-4 and again.momentum == 0.8
    # Keras's decoupled decay stays off: ours is inside update_step.
    assert again.weight_decay is None


# ------------------------------------------- distribution, XLA, checkpoints

# What holds under tf.distribute, and what these tests assert:
# - every mirrored copy of a weight and of its slots is BIT-identical to the
#   others after every step, on any CPU. Each replica runs update_step on the
#   same all-reduced gradient; nothing in the update may depend on the
#   replica. It did: Grappler turned PyTorchSGD's `mu * v + (grad + wd * w)`
#   into one AddN with its operands sorted by node name, and names differ
#   per replica ("replica_1/..."), so each replica summed in another order
#   (62 of 512 elements 1 ulp apart after step 2 in the first test below,
#   before the fix). Float addition rounds the same (IEEE) on AVX2 and
#   AVX-512 and the rewrite does not look at the CPU, so this fails or passes
#   alike on both kinds; the old 3-step model test passed on the AVX-512
#   machine only because its values, from other matmul kernels, happened to
#   round alike in both orders.
# - 2 replicas against 1 device: equal within a tolerance only, since the
#   gradient is summed in another order (two half-batch sums, then theirs).

_DIST_STEPS = 6


def _wide_range(rng, shape):
    """Values over 4 decades, both signs: sums of them round in many ways."""
    return (rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 1, size=shape)
            ).astype(np.float32)


def _local_copies(strategy, variable):
    variable = getattr(variable, "value", variable)
    return [t.numpy() for t in strategy.experimental_local_results(variable)]


def _assert_copies_identical(strategy, variables, when):
    for v in variables:
        copies = _local_copies(strategy, v)
        assert len(copies) == strategy.num_replicas_in_sync
        for i, c in enumerate(copies[1:], 1):
            np.testing.assert_array_equal(
                c, copies[0], err_msg=f"{v.path}: replica {i} != replica 0 {when}")


_OPTIMIZERS = {
    "sgd": lambda: PyTorchSGD(0.1, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov": lambda: PyTorchSGD(0.1, momentum=0.9, weight_decay=0.1,
                                       nesterov=True),
    "sgd_no_momentum": lambda: PyTorchSGD(0.1, momentum=0.0,
                                          weight_decay=0.1),
    "lars": lambda: LARS(0.5, momentum=0.9, weight_decay=0.1, eta=0.01),
}


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_mirrored_copies_stay_bit_identical(name, two_replicas):
    """Distinct gradients per replica, weights/slots compared after each step."""
    strategy = two_replicas
    rng = np.random.default_rng(7)
    shapes = [(16, 32), (32,)]  # several variables: the all-reduce packs them
    init = [_wide_range(rng, s) for s in shapes]
    per_replica = [[[_wide_range(rng, s) for s in shapes] for _ in range(2)]
                   for _ in range(_DIST_STEPS)]
    with strategy.scope():
        tv = [keras.Variable(init[0], name="kernel"),
              keras.Variable(init[1], name="bias")]
        opt = _OPTIMIZERS[name]()
        opt.build(tv)

    @tf.function
    def step(grads):
        def replica_step(grads):
            # From a tape, as in a train step; the gradients are `grads`.
            with tf.GradientTape() as tape:
                loss = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(tv, grads)])
            opt.apply_gradients(zip(tape.gradient(loss, tv), tv))
        strategy.run(replica_step, args=(grads,))

    for s, grads in enumerate(per_replica):
        step(strategy.experimental_distribute_values_from_function(
            lambda ctx, grads=grads: grads[ctx.replica_id_in_sync_group]))
        _assert_copies_identical(strategy, tv + list(opt.momentums),
                                 f"after step {s + 1}")

    # And the numbers are the optimizer's, on the summed gradient.
    summed = [[a.astype(np.float64) + b for a, b in zip(*g)] for g in per_replica]
    if name == "lars":
        assert [opt.is_excluded(v) for v in tv] == [False, True]
        want, _ = _np_lars(init, summed, [0.5] * _DIST_STEPS, [False, True],
                           0.9, 0.1, 0.01)
    else:
        want, _ = _np_torch_sgd(init, summed, [0.1] * _DIST_STEPS,
                                0.0 if name == "sgd_no_momentum" else 0.9, 0.1,
                                nesterov=name == "sgd_nesterov")
    for v, w in zip(tv, want):
        np.testing.assert_allclose(_local_copies(strategy, v)[0], w,
                                   rtol=1e-5, atol=1e-5, err_msg=v.path)


def _xy(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3)).astype(np.float32),
            rng.normal(size=(n, 2)).astype(np.float32))


def _small_dense(seed=3):
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", name="d1",
                           kernel_initializer=keras.initializers
                           .GlorotUniform(seed=seed),
                           bias_initializer="ones"),
        keras.layers.Dense(2, name="d2", kernel_initializer=keras.initializers
                           .GlorotUniform(seed=seed + 1)),
    ])


def _make_opt(name, total_steps=5):
    sched = make_lr_schedule("cosine", base_learning_rate=0.5,
                             total_steps=total_steps, warmup_steps=1)
    return make_optimizer(name, sched, momentum=0.9, weight_decay=0.01)


def _train_xla(name, x, y, steps, total_steps=5):
    model, opt = _small_dense(), _make_opt(name, total_steps)

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    for _ in range(steps):
        step(x, y)
    return model, opt


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_mirrored_two_replicas_equals_single_device_xla(name, two_replicas):
    """A model trained on 2 replicas: copies identical, close to 1 device."""
    x, y = _xy()
    steps = _DIST_STEPS
    ref_model, ref_opt = _train_xla(name, x, y, steps, total_steps=steps)

    strategy = two_replicas
    with strategy.scope():
        model, opt = _small_dense(), _make_opt(name, total_steps=steps)
        opt.build(model.trainable_variables)

    def shard(arr):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: arr[4 * ctx.replica_id_in_sync_group:
                            4 * (ctx.replica_id_in_sync_group + 1)])

    @tf.function
    def dist_step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                # Per-replica mean / replicas: the optimizer sums grads.
                loss = tf.reduce_mean(tf.square(model(x) - y)) / 2.0
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
        strategy.run(replica_step, args=(x, y))

    xs, ys = shard(x), shard(y)
    for s in range(steps):
        dist_step(xs, ys)
        _assert_copies_identical(
            strategy, list(model.trainable_variables) + list(opt.momentums),
            f"after step {s + 1}")
    assert int(opt.iterations.numpy()) == steps
    # 1 device vs 2: another summation order of the gradient; measured here
    # after 6 steps: at most 2.4e-7 apart. The tolerance leaves room for
    # other CPUs' kernels.
    for v, r in zip(model.trainable_variables, ref_model.trainable_variables):
        np.testing.assert_allclose(v.numpy(), r.numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=v.path)
    for m, r in zip(opt.momentums, ref_opt.momentums):
        np.testing.assert_allclose(m.numpy(), r.numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=m.path)


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_checkpoint_restores_momentum_slots(name, tmp_path):
    x, y = _xy()
    model, opt = _train_xla(name, x, y, 2)
    assert all(np.abs(m.numpy()).max() > 0 for m in opt.momentums)
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(
        str(tmp_path / "ckpt"))

    # Built before restore, and built lazily after restore (deferred).
    for build_first in (True, False):
        model2, opt2 = _small_dense(seed=11), _make_opt(name)
        if build_first:
            opt2.build(model2.trainable_variables)
        status = tf.train.Checkpoint(model=model2, optimizer=opt2).restore(
            path)
        if not build_first:
            opt2.build(model2.trainable_variables)
        status.assert_existing_objects_matched()
        assert int(opt2.iterations.numpy()) == 2
        for m, m2 in zip(opt.momentums, opt2.momentums):
            np.testing.assert_array_equal(m.numpy(), m2.numpy())
        for v, v2 in zip(model.trainable_variables,
                         model2.trainable_variables):
            np.testing.assert_array_equal(v.numpy(), v2.numpy())


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_compiled_model_keras_file_keeps_optimizer_state(name, tmp_path):
    x, y = _xy()
    model = _small_dense()
    model.compile(optimizer=_make_opt(name), loss="mse")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
