"""CO2Model's step against an independent computation: shuffle-BN across replicas, the key
path, InfoNCE, the consistency term and the logged metrics.

The references call the encoders by hand (tests/helpers/step_reference.py) and compute the
losses and metrics in float64 NumPy (tests/helpers/references.py); nothing here compares the
model with its own encode or loss code.
"""
import numpy as np
import pytest
import tensorflow as tf
from helpers import models
from helpers.references import ref_info_nce
from helpers.step_reference import encode, recorded_steps, state_kept, terms

BATCH = 16


# ---------------------------------------------------------------- shuffle-BN, 2 replicas
def _shuffle_bn_reference(model, images, step, replicas):
    """Keys (float64) as MoCo's shuffle-BN defines them: one permutation of the global batch
    shared by all replicas, each replica's shard of the permuted batch through the key encoder
    in training mode (its own BN statistics), the keys un-permuted.

    The permutation is the model's documented draw (stateless, seeded by (seed, step)): the
    reference must use the same one to give the same BN groups.
    """
    total = len(images)
    noise = tf.random.stateless_uniform([total], seed=tf.constant([model.seed, step], tf.int64))
    perm = tf.argsort(noise, stable=True).numpy()
    with state_kept(model):
        shards = np.split(images[perm], replicas)
        shuffled = np.concatenate([encode(model.key_backbone, model.key_head, s) for s in shards])
        local_bn = np.concatenate([encode(model.key_backbone, model.key_head, s)
                                   for s in np.split(images, replicas)])
    keys = np.empty_like(shuffled)
    keys[perm] = shuffled
    return keys, local_bn, perm


def test_shuffle_bn_across_two_replicas_matches_the_reference(two_replicas):
    """encode_keys on 2 replicas, with BN in the key encoder (the tiny backbone, fused BN as in
    training): every replica's keys and the gathered global keys equal the reference of
    `_shuffle_bn_reference`.

    Measured (AVX-512): the keys agree within 5.5e-8 (unit vectors); local BN's keys (each
    replica encoding its own unshuffled shard, what `perm = range` gives) differ from the
    reference by 0.31-0.35, every key by 0.11 or more. atol 1e-5 is 180x the agreement and 3e-5
    of the effect; the test asserts that the permutation moves examples across replicas and that
    the effect exceeds 0.05.
    """
    model, strategy = models.build(two_replicas)
    assert model.bn == "shuffle" and model.bn_groups == 1
    rng = np.random.RandomState(21)
    images = rng.rand(BATCH, 16, 16, 3).astype("float32")
    b = BATCH // 2
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(images[ctx.replica_id_in_sync_group * b:
                                       (ctx.replica_id_in_sync_group + 1) * b]))

    @tf.function
    def keys_at(step):
        return strategy.run(model.encode_keys, args=(values, step))

    for step in (0, 1):
        local, everyone = keys_at(tf.constant(step, tf.int64))
        ref, local_bn, perm = _shuffle_bn_reference(model, images, step, 2)
        moved = np.sum(perm[:b] >= b)
        assert 0 < moved < b, f"step {step}: the permutation keeps every example on its replica"
        assert np.abs(ref - local_bn).max() > 0.05, "BN has no effect: the test proves nothing"
        for r, (got_local, got_all) in enumerate(zip(
                strategy.experimental_local_results(local),
                strategy.experimental_local_results(everyone), strict=True)):
            np.testing.assert_allclose(got_all.numpy(), ref, rtol=0, atol=1e-5,
                                       err_msg=f"global keys on replica {r}, step {step}")
            np.testing.assert_allclose(got_local.numpy(), ref[r * b:(r + 1) * b], rtol=0,
                                       atol=1e-5, err_msg=f"local keys of replica {r}, step {step}")


# ------------------------------------------------- the step on one device: keys, InfoNCE, metrics
@pytest.fixture(scope="module")
def recorded():
    """3 steps of the tiny model (fused BN, MLP head, SGD with momentum, EMA m = 0.99) on one
    device, each recorded with its hand-encoded reference. One BN group for the keys: with one
    replica the key encoder's batch statistics are then the whole batch's whatever the shuffle,
    so the hand-written key path needs no permutation (shuffle-BN is the test above's subject)."""
    model, strategy = models.build(bn_groups=1)
    steps = recorded_steps(model, strategy, models.batches(3, batch=BATCH, seed=4), BATCH)
    return model, steps


def _reference_terms(model, step):
    objective = model.objective
    return terms(step["q"], step["k"], step["queue"], temperature=objective.temperature,
                 consistency_temperature=objective.consistency_temperature,
                 alpha=objective.weight)


def test_train_step_losses_match_the_numpy_reference(recorded):
    """The logged loss, InfoNCE and consistency term of each step against float64 NumPy on the
    hand-encoded q and k and the queue before the step.

    Measured (AVX-512): relative differences 9e-8 to 2.6e-7. rtol 1e-5 is 40x that; InfoNCE at
    tau_con instead of tau changes loss_ins by 3.4-11% here (asserted above 100x rtol), and keys
    through the query head (0.32 from the key head's in some element after 3 steps) change
    every term.
    """
    model, steps = recorded
    objective = model.objective
    assert objective.temperature != objective.consistency_temperature
    for i, step in enumerate(steps):
        ref = _reference_terms(model, step)
        for name in ("loss", "loss_ins", "loss_con"):
            np.testing.assert_allclose(step["logs"][name], ref[name], rtol=1e-5,
                                       err_msg=f"{name} at step {i}")
        # The test has teeth: the other temperature gives another InfoNCE, far outside rtol.
        other = ref_info_nce(step["q"], step["k"], step["queue"],
                             objective.consistency_temperature).mean()
        assert abs(other - ref["loss_ins"]) > 1e-3 * ref["loss_ins"]


def test_train_step_enqueues_the_keys_of_the_hand_written_key_path(recorded):
    """After each step the queue holds, at the pointer, the keys of key_backbone -> key_head
    (training mode, weights before the step's EMA); every other row is unchanged.

    Measured (AVX-512): rows agree within 1.1e-6 (unit vectors); atol 3e-5 is 27x that (the
    model's graph and the eager reference may pick other kernels on an AVX2 CPU). After the
    steps, keys made through the query head differ from the key head's by 0.32 in some element
    (asserted above 0.05, 1700x atol).
    """
    model, steps = recorded
    for i, step in enumerate(steps):
        ptr, after = step["ptr"], step["queue_after"]
        rows = np.arange(ptr, ptr + BATCH)
        np.testing.assert_allclose(after[rows], step["k"], rtol=0, atol=3e-5,
                                   err_msg=f"enqueued keys at step {i}")
        np.testing.assert_array_equal(np.delete(after, rows, 0), np.delete(step["queue"], rows, 0))
        assert step["ptr_after"] == (ptr + BATCH) % model.queue_size
    # Teeth: with the weights of the last step, the query head gives other keys.
    images = models.batches(3, batch=BATCH, seed=4)[1][:BATCH]
    with state_kept(model):
        through_key_head = encode(model.key_backbone, model.key_head, images)
        through_query_head = encode(model.key_backbone, model.query_head, images)
    assert np.abs(through_key_head - through_query_head).max() > 0.05


def test_logged_similarities_and_accuracy_match_numpy(recorded):
    """pos_sim (mean q.k), neg_sim (mean of q.queue^T over the K negatives) and acc (share of
    examples whose positive beats every negative) against NumPy.

    Measured (AVX-512): pos_sim and neg_sim within 7.5e-8 relative; acc exactly (each example's
    positive is 0.005 or more from its best negative here; asserted above 1e-4, so float32
    rounding cannot flip one); acc is 0.31, 0, 0.19. rtol 1e-5 is 130x the agreement; the mean
    of the best negatives (0.59-0.92) is 2.5x to 14x the mean over all of them (0.04-0.37).
    """
    model, steps = recorded
    accs = []
    for i, step in enumerate(steps):
        ref = _reference_terms(model, step)
        for name in ("pos_sim", "neg_sim"):
            np.testing.assert_allclose(step["logs"][name], ref[name], rtol=1e-5,
                                       err_msg=f"{name} at step {i}")
        negatives = step["q"] @ step["queue"].T
        margin = np.abs((step["q"] * step["k"]).sum(-1) - negatives.max(-1)).min()
        assert margin > 1e-4, "a positive ties its best negative: acc is ill-posed here"
        assert step["logs"]["acc"] == ref["acc"], f"acc at step {i}"
        assert negatives.max(-1).mean() > 2 * ref["neg_sim"], "max and mean alike: no teeth"
        accs.append(ref["acc"])
    assert any(0 < a < 1 for a in accs), "acc is all 0 or all 1: the test proves nothing"
