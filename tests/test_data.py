"""co2_tf.data.pipelines: the index contract and the labelled pipeline, per source kind."""
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers.image_folder import GOOD
from helpers.references import split_arrays

from co2_tf.data import augment, pipelines
from co2_tf.data.sources import builtin, make_source
from co2_tf.errors import UserError

SIZE = 16
SEED = 5


def _ctx(pipelines=1, pipeline_id=0, replicas=1):
    return tf.distribute.InputContext(pipelines, pipeline_id, replicas)


def _views(dataset, n):
    """First n elements as numpy (view1, view2) pairs."""
    return [(a.numpy(), b.numpy()) for a, b in dataset.take(n)]


# The index contract, on the builtin data. ------------------------------------

def _builtin_fn(global_batch_size=8, start_step=0, recipe="mocov2"):
    return pipelines.pretrain_dataset_fn(
        "builtin", split="train", data_dir=None, image_size=SIZE,
        augment=recipe, seed=SEED, global_batch_size=global_batch_size,
        start_step=start_step)


@pytest.fixture(scope="module")
def one_replica():
    """Global batches at steps 0..3 with one replica."""
    return _views(_builtin_fn()(_ctx()), 4)


def test_builtin_batches_shape_and_range(one_replica):
    v1, v2 = one_replica[0]
    assert v1.shape == v2.shape == (8, SIZE, SIZE, 3)
    assert v1.dtype == np.float32
    for v in (v1, v2):
        assert v.min() >= 0.0 and v.max() <= 1.0
    assert not np.allclose(v1, v2)


def test_batch_is_what_the_index_contract_says(one_replica):
    images, _ = builtin.load("train", SIZE)
    n = len(images)
    step = 2
    for j in range(8):
        i = step * 8 + j
        src = int(pipelines.source_index(tf.constant(i, tf.int64), n, SEED))
        v1, v2 = augment.two_views(images[src],
                                   tf.constant([SEED, i], tf.int64),
                                   "mocov2", SIZE)
        np.testing.assert_array_equal(one_replica[step][0][j], v1)
        np.testing.assert_array_equal(one_replica[step][1][j], v2)


@pytest.mark.parametrize("pipelines,replicas", [(1, 2), (2, 2), (1, 4),
                                                (2, 4)])
def test_global_batch_independent_of_replicas(one_replica, pipelines,
                                              replicas):
    fn = _builtin_fn()
    local = replicas // pipelines
    per_pipeline = [_views(fn(_ctx(pipelines, p, replicas)), 4 * local)
                    for p in range(pipelines)]
    for step in range(4):
        # Replica r = p * local + l holds pipeline p's batch step*local + l.
        parts = [per_pipeline[p][step * local + l]
                 for p in range(pipelines) for l in range(local)]
        for k in range(2):
            got = np.concatenate([part[k] for part in parts])
            np.testing.assert_array_equal(got, one_replica[step][k])


def test_start_step_resumes_exactly(one_replica):
    resumed = _views(_builtin_fn(start_step=2)(_ctx()), 2)
    for t in range(2):
        np.testing.assert_array_equal(resumed[t][0], one_replica[2 + t][0])
        np.testing.assert_array_equal(resumed[t][1], one_replica[2 + t][1])


def test_under_mirrored_strategy(one_replica, two_replicas):
    strategy = two_replicas
    dist = strategy.distribute_datasets_from_function(_builtin_fn())
    v1, _ = next(iter(dist))
    got = np.concatenate([t.numpy() for t in
                          strategy.experimental_local_results(v1)])
    np.testing.assert_array_equal(got, one_replica[0][0])


def test_each_epoch_is_a_fresh_permutation():
    n = 1000
    idx = tf.data.Dataset.range(3 * n).map(
        lambda i: pipelines.source_index(i, n, SEED)).batch(3 * n)
    idx = next(iter(idx)).numpy()
    for e in range(3):
        assert sorted(idx[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(idx[:n], idx[n:2 * n])
    assert not np.array_equal(idx[:n], np.arange(n))


def test_sizes_and_errors_builtin():
    assert make_source("builtin").num_examples() == builtin.num_examples("train")
    assert pipelines.steps_per_epoch("builtin", global_batch_size=256) == (
        builtin.num_examples("train") // 256)
    assert len(make_source("builtin").class_names()) == builtin.NUM_CLASSES
    assert make_source("builtin").class_names() == list(builtin.CLASS_NAMES)
    make_source("builtin").validate()
    with pytest.raises(UserError, match="batch"):
        pipelines.pretrain_dataset_fn("builtin", image_size=SIZE,
                                      augment="mocov2", seed=0,
                                      global_batch_size=10 ** 6)
    with pytest.raises(UserError, match="mocov2"):
        pipelines.pretrain_dataset_fn("builtin", image_size=SIZE,
                                      augment="v3", seed=0, global_batch_size=8)


def test_builtin_labelled_dataset():
    ds = pipelines.labelled_dataset("builtin", split="test", image_size=SIZE,
                                    batch_size=512)
    batches = list(ds)
    n = builtin.num_examples("test")
    assert sum(len(y) for _, y in batches) == n
    x, y = batches[0]
    assert x.shape == (512, SIZE, SIZE, 3) and x.dtype == tf.float32
    assert y.dtype == tf.int32
    np.testing.assert_array_equal(
        np.concatenate([y.numpy() for _, y in batches]),
        builtin.load("test", SIZE)[1])
    lin = pipelines.labelled_dataset("builtin", split="test", image_size=SIZE,
                                     batch_size=512, transform="classifier_train",
                                     seed=1)
    labels = np.concatenate([y.numpy() for _, y in lin])
    assert sorted(labels) == sorted(builtin.load("test", SIZE)[1])
    with pytest.raises(UserError, match="transform"):
        pipelines.labelled_dataset("builtin", split="test", image_size=SIZE,
                                   batch_size=8, transform="center")


def test_folder_labelled_dataset_uses_all_decodable(image_folder):
    ds = pipelines.labelled_dataset(f"folder:{image_folder}", split="train",
                                    image_size=SIZE, batch_size=5)
    labels = np.concatenate([y.numpy() for _, y in ds])
    # Every good image once; the damaged PNG dropped at run time.
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 5 + [2] * 4


def test_folder_pretraining_survives_damaged_file(image_folder, capfd):
    fn = pipelines.pretrain_dataset_fn(
        f"folder:{image_folder}", split="train", image_size=SIZE,
        augment="mocov1", seed=0, global_batch_size=4)
    # 44 examples: 3 epochs of 14 and 2 of the 4th; where the damaged PNG comes up
    # is what the per-epoch permutation (index_shuffle) says, 3 or 4 times.
    batches = _views(fn(_ctx()), 11)
    assert all(v.shape == (4, SIZE, SIZE, 3) for b in batches for v in b)
    assert 'damaged.png" failed to decode' in capfd.readouterr().err  # tf.print's line
    # Graph ops only (no py_function): the pipeline's graph can be shipped to a remote worker.
    fn(_ctx())._as_serialized_graph(
        external_state_policy=tf.data.experimental.ExternalStatePolicy.FAIL)
    files = make_source(f"folder:{image_folder}").listing("train").files
    n = len(files)
    # Example i is file index_shuffle(i % n, (seed, epoch)) of the listing.
    damaged_at = [i for i in range(44) if files[int(tf.random.experimental.index_shuffle(
        i % n, tf.constant([0, i // n], tf.int64), n - 1))].endswith("damaged.png")]
    assert 3 <= len(damaged_at) <= 4
    # Its stand-in, a plain gray image, gives constant views; every other image varies.
    views = np.concatenate([b[0] for b in batches])
    constant_at = [i for i, v in enumerate(views) if np.ptp(v) < 1e-6]
    assert constant_at == damaged_at
    # The index contract still holds: same global batches with 2 pipelines.
    per_pipeline = [_views(fn(_ctx(2, p, 2)), 11) for p in range(2)]
    for step in range(11):
        np.testing.assert_array_equal(
            np.concatenate([per_pipeline[0][step][0],
                            per_pipeline[1][step][0]]), batches[step][0])


# TFDS, mocked: never downloads. ---------------------------------------------

def test_tfds_pretrain_and_labelled():
    with tfds.testing.mock_data(num_examples=24):
        make_source("tfds:cifar10").validate("train")
        assert make_source("tfds:cifar10").num_examples("train") == 24
        assert len(make_source("tfds:cifar10").class_names()) == 10
        fn = pipelines.pretrain_dataset_fn(
            "tfds:cifar10", split="train", image_size=SIZE,
            augment="mocov2", seed=0, global_batch_size=8)
        batches = _views(fn(_ctx(1, 0, 2)), 8)  # > 1 epoch: repeats
        for v1, v2 in batches:
            assert v1.shape == v2.shape == (4, SIZE, SIZE, 3)
            assert v1.dtype == np.float32
            assert 0.0 <= v1.min() and v1.max() <= 1.0
        ds = pipelines.labelled_dataset("tfds:cifar10", split="test",
                                        image_size=SIZE, batch_size=10)
        sizes = [(x.shape, y.dtype) for x, y in ds]
        assert [s[0][0] for s in sizes] == [10, 10, 4]
        assert sizes[0][0][1:] == (SIZE, SIZE, 3)
        assert sizes[0][1] == tf.int32


def _below(ds):
    """A pipeline and every dataset it is built from."""
    yield ds
    for d in ds._inputs():
        yield from _below(d)


def test_shuffle_buffers_hold_encoded_images(monkeypatch):
    """What a shuffle buffer holds is the element spec of its input: encoded bytes, not
    decoded pixels (10,000 ImageNet JPEGs: ~1.1 GB encoded, ~5 GB decoded)."""
    # The graph is the subject: a cheap stand-in for the augmentation's (seconds to build).
    monkeypatch.setattr(augment, "two_views", lambda image, *args: (image, image))
    monkeypatch.setattr(augment, "classifier_train_view", lambda image, *args: image)
    with tfds.testing.mock_data(num_examples=8):
        datasets = [
            pipelines.pretrain_dataset_fn("tfds:cifar10", split="train", image_size=SIZE,
                                          augment="mocov1", seed=0, global_batch_size=4)(_ctx()),
            pipelines.labelled_dataset("tfds:cifar10", split="test", image_size=SIZE,
                                       batch_size=4, transform="classifier_train")]
        for pipeline in datasets:
            shuffles = [d for d in _below(pipeline) if type(d).__name__ == "_ShuffleDataset"]
            assert len(shuffles) == 1
            held = tf.nest.flatten(shuffles[0].element_spec)
            assert tf.TensorSpec([], tf.string) in held
            assert all(spec.dtype in (tf.string, tf.int32, tf.int64) and spec.shape.rank == 0
                       for spec in held)


def test_tfds_errors():
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(UserError, match="not found"):
            make_source("tfds:no_such_dataset_xyz").validate()
        # lsun has images but no labels.
        with pytest.raises(UserError, match="no 'label'"):
            pipelines.labelled_dataset("tfds:lsun/classroom", split="train",
                                       image_size=SIZE, batch_size=2)


def test_training_runs_on_the_messy_folder(image_folder, tmp_path, caplog):
    """Issue acceptance: a few real training steps on a folder mixing every file
    kind with non-images and corrupt files; nothing crashes, classes are kept."""
    from co2_tf import training
    from co2_tf.config import TrainConfig
    config = TrainConfig(model_dir=str(tmp_path / "run"), dataset=f"folder:{image_folder}",
                         image_size=16, batch_size=4, queue_size=8, dim=8, train_steps=6,
                         knn_every=0, log_every=1)
    with caplog.at_level(logging.WARNING):
        summary = training.train(config, verbose=0)
    assert summary["steps"] == 6
    names = (tmp_path / "run" / "classes.txt").read_text(encoding="utf-8").split()
    assert names == sorted(GOOD)
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    queue = [k for k in reader.get_variable_to_shape_map()
             if "queue/" in k and "ptr" not in k and "OPTIMIZER" not in k]
    rows = reader.get_tensor(queue[0])
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)


def test_labelled_dataset_indices_select_those_examples():
    images, labels = split_arrays("test")
    chosen = [1999, 3, 17, 500]
    subset = list(pipelines.labelled_dataset("builtin", split="test", image_size=16, batch_size=3,
                                             indices=chosen))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in subset]), images[chosen])
    np.testing.assert_array_equal(np.concatenate([y for _, y in subset]), labels[chosen])
    np.testing.assert_array_equal(make_source("builtin").labels("test"), labels)
    augmented = pipelines.labelled_dataset("builtin", split="test", image_size=16, batch_size=8,
                                           indices=chosen, transform="classifier_train", seed=1)
    assert sorted(np.concatenate([y for _, y in augmented])) == sorted(labels[chosen])


def test_labelled_dataset_indices_with_tfds():
    import tensorflow_datasets as tfds  # noqa: PLC0415
    with tfds.testing.mock_data(num_examples=12):
        full = list(pipelines.labelled_dataset("tfds:mnist", split="test", image_size=16,
                                               batch_size=12))
        images, labels = full[0][0].numpy(), full[0][1].numpy()
        np.testing.assert_array_equal(make_source("tfds:mnist").labels("test"), labels)
        subset = list(pipelines.labelled_dataset("tfds:mnist", split="test", image_size=16,
                                                 batch_size=12, indices=[2, 5, 11]))
        np.testing.assert_array_equal(subset[0][0].numpy(), images[[2, 5, 11]])
        np.testing.assert_array_equal(subset[0][1].numpy(), labels[[2, 5, 11]])


def test_input_threads_overrides_the_cores_rule():
    assert pipelines.num_parallel_calls(make_source("builtin", options={"input_threads": 7})) == 7
    assert pipelines.num_parallel_calls(make_source("builtin")) == len(os.sched_getaffinity(0))
