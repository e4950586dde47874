"""CO2Model: EMA, queue, gradients of a real train step, shuffle-BN, replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from co2_tf.method import losses
from co2_tf.method.model import CO2Model
from co2_tf.method.objective import CO2Objective
from co2_tf.nets.backbones import build_backbone
from co2_tf.nets.fused_batchnorm import fuse_batch_norm
from co2_tf.optimizers import make_optimizer

SIZE = 8


def flat_backbone(name, with_bn=False):
    """A small backbone; without BN its outputs do not depend on the batch."""
    init = keras.initializers.GlorotUniform(seed=11)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(6, 3, kernel_initializer=init, name="conv")(inputs)
    if with_bn:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name=name)


def make_model(strategy=None, with_bn=False, optimizer=None, alpha=1.0, **kwargs):
    """optimizer: a factory, called under the strategy's scope."""
    strategy = strategy or tf.distribute.get_strategy()
    args = dict(head="mlp", dim=4, queue_size=16, ema_momentum=0.9, bn="shuffle", bn_groups=1,
                seed=5)
    args.update(kwargs)
    objective = CO2Objective(temperature=0.2, consistency_temperature=0.1, weight=alpha)
    with strategy.scope():
        model = CO2Model(lambda name: flat_backbone(name, with_bn), objective, **args)
        opt = optimizer() if optimizer else keras.optimizers.SGD(0.5)
        model.compile(optimizer=opt)
        opt.build(model.query_variables)
    return model


def images(n, seed):
    rng = np.random.RandomState(seed)
    return rng.rand(n, SIZE, SIZE, 3).astype("float32")


def values(variables):
    return [v.numpy().copy() for v in variables]


def test_key_encoder_starts_as_query_and_follows_by_ema():
    model = make_model()
    q0, k0 = values(model.query_variables), values(model.key_variables)
    for a, b in zip(q0, k0):
        np.testing.assert_array_equal(a, b)
    model.train_step((tf.constant(images(4, 0)), tf.constant(images(4, 1))))
    q1, k1 = values(model.query_variables), values(model.key_variables)
    assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(q0, q1)), "query did not train"
    for kk0, qq1, kk1 in zip(k0, q1, k1):
        np.testing.assert_allclose(kk1, 0.9 * kk0 + 0.1 * qq1, rtol=1e-6, atol=1e-7)


def test_queue_gets_the_batch_keys_at_the_pointer():
    model = make_model()
    x_q, x_k = tf.constant(images(4, 2)), tf.constant(images(4, 3))
    queue0 = model.queue.numpy().copy()
    np.testing.assert_allclose(np.linalg.norm(queue0, axis=1), 1.0, rtol=1e-5)
    step = model.optimizer.iterations
    _, expected_keys = model.encode_keys(x_k, step)  # key weights before the step's EMA
    model.train_step((x_q, x_k))
    queue1 = model.queue.numpy()
    np.testing.assert_allclose(queue1[:4], expected_keys.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(queue1[4:], queue0[4:])
    assert int(model.queue_ptr.numpy()) == 4
    for _ in range(3):  # 4 more batches of 4 wrap the pointer of a 16-queue
        model.train_step((x_q, x_k))
    assert int(model.queue_ptr.numpy()) == 0


def test_consistency_gradient_reaches_the_query_encoder():
    """One SGD step with alpha=1 minus one with alpha=0 moves the query weights by
    exactly -lr * d(mean L_con)/d(theta_q), computed independently here.

    (A public implementation detached this term; its tests never noticed.)
    """
    lr, alpha = 0.5, 1.0
    x_q, x_k = tf.constant(images(4, 4)), tf.constant(images(4, 5))
    with_con = make_model(alpha=alpha, optimizer=lambda: keras.optimizers.SGD(lr))
    without = make_model(alpha=0.0, optimizer=lambda: keras.optimizers.SGD(lr))
    theta0 = values(with_con.query_variables)
    for a, b in zip(theta0, values(without.query_variables)):
        np.testing.assert_array_equal(a, b)

    keys, _ = with_con.encode_keys(x_k, with_con.optimizer.iterations)
    queue = tf.constant(with_con.queue.numpy())
    with tf.GradientTape() as tape:
        q = with_con.encode_query(x_q)
        l_con = tf.reduce_mean(losses.consistency_loss(q, keys, queue, 0.1))
    grads = tape.gradient(l_con, with_con.query_variables)

    with_con.train_step((x_q, x_k))
    without.train_step((x_q, x_k))
    total = 0.0
    for w1, w0, g in zip(values(with_con.query_variables), values(without.query_variables), grads):
        np.testing.assert_allclose(w1 - w0, -lr * alpha * g.numpy(), rtol=2e-3, atol=1e-6)
        total += float(np.abs(g.numpy()).sum())
    assert total > 1e-3, "the consistency gradient is zero: the test would prove nothing"


def test_shuffle_bn_keys_equal_plain_keys_without_bn():
    """Batch-independent layers: shuffle, grouping and un-shuffle give the plain keys."""
    shuffled = make_model(bn="shuffle", bn_groups=4)
    plain = make_model(bn="local")
    x = tf.constant(images(8, 6))
    for step in (0, 1, 7):
        local_s, all_s = shuffled.encode_keys(x, tf.constant(step, tf.int64))
        local_p, all_p = plain.encode_keys(x, tf.constant(step, tf.int64))
        np.testing.assert_allclose(all_s.numpy(), all_p.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(local_s.numpy(), local_p.numpy(), rtol=1e-6, atol=1e-7)


def test_shuffle_bn_key_depends_on_its_group_only():
    model = make_model(with_bn=True, bn="shuffle", bn_groups=2)
    x = images(8, 7)
    step = tf.constant(3, tf.int64)
    # The permutation the model draws at this step (stateless, seeded by seed and step).
    noise = tf.random.stateless_uniform([8], seed=tf.constant([5, 3], tf.int64))
    perm = tf.argsort(noise, stable=True).numpy()
    group_of = np.empty(8, int)
    group_of[perm] = np.arange(8) // 4  # shuffled position j holds example perm[j]
    base = model.encode_keys(tf.constant(x), step)[1].numpy()
    target = 0
    same = [i for i in range(8) if i != target and group_of[i] == group_of[target]]
    other = [i for i in range(8) if group_of[i] != group_of[target]]
    assert same and other
    for i, should_change in ((other[0], False), (same[0], True)):
        x2 = x.copy()
        x2[i] = 1.0 - x2[i]
        keys = model.encode_keys(tf.constant(x2), step)[1].numpy()
        delta = np.abs(keys[target] - base[target]).max()
        if should_change:
            assert delta > 1e-4, "a key ignored a change in its own BN group"
        else:
            assert delta < 1e-6, "a key saw an image of another BN group"
    # Plain (local) BN: every key sees every image.
    local = make_model(with_bn=True, bn="local")
    base = local.encode_keys(tf.constant(x), step)[1].numpy()
    x2 = x.copy()
    x2[other[0]] = 1.0 - x2[other[0]]
    assert np.abs(local.encode_keys(tf.constant(x2), step)[1].numpy()[target]
                  - base[target]).max() > 1e-4


def _fit(strategy, data, steps):
    model = make_model(strategy, bn="shuffle", bn_groups=1,
                       optimizer=lambda: keras.optimizers.SGD(0.3, momentum=0.9))
    global_batch = data[0].shape[0] // steps

    def dataset_fn(context):
        # One input pipeline: tf.distribute hands consecutive per-replica
        # batches to replicas 0, 1, ...; so this is the same global batch.
        b = context.get_per_replica_batch_size(global_batch)
        return tf.data.Dataset.from_tensor_slices(data).batch(b).repeat()

    dist = strategy.distribute_datasets_from_function(dataset_fn)
    history = model.fit(dist, epochs=1, steps_per_epoch=steps, verbose=0).history
    return model, history


def test_two_replicas_match_one_replica(two_replicas):
    steps, batch = 3, 8
    data = (images(steps * batch, 8), images(steps * batch, 9))
    one, h1 = _fit(tf.distribute.OneDeviceStrategy("/cpu:0"), data, steps)
    two, h2 = _fit(two_replicas, data, steps)
    for name in ("loss", "loss_ins", "loss_con", "acc"):
        np.testing.assert_allclose(h1[name], h2[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(one.weights, two.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5, err_msg=a.path)
    assert int(two.queue_ptr.numpy()) == steps * batch % 16
    # Every replica holds the identical queue, equal to the 1-replica queue.
    replicas = [v.numpy() for v in two.queue.value.values]
    assert len(replicas) == 2
    np.testing.assert_array_equal(replicas[0], replicas[1])
    np.testing.assert_allclose(replicas[0], one.queue.numpy(), rtol=1e-5, atol=1e-5)
    # The training moved something: the comparison is not between two initial states.
    assert h1["loss"][0] > 0
    assert not np.allclose(one.queue.numpy()[:8], make_model().queue.numpy()[:8])


class _CompareReplicaCopies(keras.callbacks.Callback):
    """After every step: every mirrored copy bit-equal to replica 0's."""

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        for v in self.model.weights + self.model.optimizer.variables:
            copies = [t.numpy() for t in self.strategy.experimental_local_results(v.value)]
            assert len(copies) == 2, v.path
            np.testing.assert_array_equal(
                copies[1], copies[0], err_msg=f"{v.path}: replicas differ after step {self.steps}")


@pytest.mark.parametrize("bn", ["shuffle", "local", "sync"])
def test_mirrored_copies_stay_bit_identical(two_replicas, bn):
    """The guarantee under tf.distribute: after every step, every copy of every
    variable (query and key encoders, BN moving statistics, queue and pointer,
    optimizer state) is bit-identical on all replicas, on any CPU kind.

    The real backbone (BN layers fused as in training) and MoCo's optimizer.
    With "local" and "shuffle", each replica's BN moving statistics average its
    own batch: before they were set to replica 0's, every element differed
    after step 1. Update arithmetic that depends on the replica is caught by
    test_optimizers' bit-identity tests. Against one device the numbers agree
    only within a tolerance (test_two_replicas_match_one_replica).
    """
    steps, batch = 5, 8

    def backbone(name):
        return fuse_batch_norm(build_backbone("tiny", SIZE, bn="sync" if bn == "sync" else "local",
                                              model_name=name, seed=3))

    with two_replicas.scope():
        model = CO2Model(backbone, CO2Objective(), head="mlp", dim=4, queue_size=16,
                         ema_momentum=0.9, bn=bn, bn_groups=1, seed=5)
        opt = make_optimizer("sgd", 0.1, momentum=0.9, weight_decay=0.05)
        model.compile(optimizer=opt)
        opt.build(model.query_variables)
    initial = {id(w): w.numpy().copy() for w in model.weights}
    data = (images(steps * batch, 10), images(steps * batch, 11))

    def dataset_fn(context):
        b = context.get_per_replica_batch_size(batch)
        return tf.data.Dataset.from_tensor_slices(data).batch(b).repeat()

    compare = _CompareReplicaCopies(two_replicas)
    model.fit(two_replicas.distribute_datasets_from_function(dataset_fn), epochs=1,
              steps_per_epoch=steps, verbose=0, callbacks=[compare])
    assert compare.steps == steps

    def moved(variables):
        return any(not np.array_equal(v.numpy(), initial[id(v)]) for v in variables)

    # Not a comparison of untouched copies: all of these changed.
    def stats(m):
        return [w for w in m.non_trainable_weights if "moving_" in w.path]
    assert moved(model.query_variables) and moved(model.key_variables)
    assert moved(stats(model.query_backbone)) and moved(stats(model.key_backbone))
    assert moved([model.queue])


@pytest.mark.parametrize("bad", [dict(bn="ghost"), dict(head="deep")])
def test_bad_model_options_are_refused(bad):
    with pytest.raises(ValueError):
        make_model(**bad)
