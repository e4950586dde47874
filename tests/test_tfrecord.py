"""tfrecord: datasets and tools/make_tfrecords' writer: round trip, sharding, exact resume."""
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from co2_tf.data import pipelines, record_writer
from co2_tf.data.sources import make_source, tfrecord
from co2_tf.errors import UserError

CLASSES = ("ant", "bee", "cat")
PER_CLASS = {"train": 6, "val": 2}
SHARDS = {"train": 4, "val": 2}


def _make_folder(root):
    rng = np.random.RandomState(0)
    for split, n in PER_CLASS.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                image = Image.fromarray(rng.randint(0, 256, (10, 12, 3)).astype(np.uint8))
                image.save(root / split / name / f"{k}.{'png' if k % 2 else 'jpg'}")


def _records(paths):
    """{image/filename: (image bytes, label)} and the filenames in file order, parsed with
    the protobuf classes (not the code under test)."""
    found, order = {}, []
    for path in paths:
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            f = tf.train.Example.FromString(raw).features.feature
            name = f["image/filename"].bytes_list.value[0].decode()
            found[name] = (f["image/encoded"].bytes_list.value[0],
                           f["image/class/label"].int64_list.value[0])
            order.append(name)
    return found, order


def _write(root, out, split, **kwargs):
    source = make_source(f"folder:{root}/{{split}}")
    return record_writer.folder_to_shards(
        source, split, str(out), num_shards=SHARDS[split],
        output_split="validation" if split == "val" else None, **kwargs)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _make_folder(root)
    out = tmp_path_factory.mktemp("records")
    for split in PER_CLASS:
        _write(root, out, split)
    return root, out


def _source(out, **options):
    return make_source(f"tfrecord:{out}/train-*", options=options or None)


def test_round_trip_same_bytes_and_labels(shards):
    root, out = shards
    for split, prefix in (("train", "train"), ("val", "validation")):
        paths = sorted(tf.io.gfile.glob(f"{out}/{prefix}-*"))
        assert [os.path.basename(p) for p in paths] == [
            f"{prefix}-{k:05d}-of-{SHARDS[split]:05d}" for k in range(SHARDS[split])]
        found, order = _records(paths)
        files = {f"{c}/{f}": c for c in CLASSES for f in os.listdir(root / split / c)}
        assert sorted(found) == sorted(files) and len(order) == len(files)
        for name, (encoded, label) in found.items():
            assert encoded == (root / split / name).read_bytes()
            assert label == CLASSES.index(files[name]) + 1  # the TPU layout's 1-based labels
        # Records are shuffled across shards, not class after class.
        assert [name.split("/")[0] for name in order] != sorted(
            name.split("/")[0] for name in order)
    assert (out / "classes.txt").read_text() == "ant\nbee\ncat\n"


def test_writer_resumes_keeping_finished_shards(shards, tmp_path, monkeypatch):
    root, out = shards
    written = []
    real = record_writer._write_shard

    def fail_third(path, records):
        if len(written) == 2:
            raise OSError("disk full")
        written.append(path)
        real(path, records)
    monkeypatch.setattr(record_writer, "_write_shard", fail_third)
    with pytest.raises(OSError):
        _write(root, tmp_path, "train")
    # Two complete shards, nothing half-written (no temporary name left).
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("train")) == [
        "train-00000-of-00004", "train-00001-of-00004"]
    assert not [p for p in tmp_path.iterdir() if "tmp-" in p.name]
    monkeypatch.setattr(record_writer, "_write_shard", real)
    mtime = (tmp_path / "train-00000-of-00004").stat().st_mtime_ns
    _write(root, tmp_path, "train")
    assert (tmp_path / "train-00000-of-00004").stat().st_mtime_ns == mtime  # kept
    for k in range(4):  # the same shards as one uninterrupted run
        name = f"train-{k:05d}-of-00004"
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    with pytest.raises(UserError, match="other inputs"):
        _write(root, tmp_path, "train", seed=1)


def test_source_sizes_labels_classes_and_splits(shards, monkeypatch):
    _, out = shards
    # The writer's record index: nothing is read to count the records.
    monkeypatch.setattr(tfrecord, "_read_labels", lambda *a, **k: pytest.fail("read"))
    tfrecord._shard_labels.cache_clear()
    source = _source(out)
    source.validate("train")
    _, order = _records(sorted(tf.io.gfile.glob(f"{out}/train-*")))
    assert source.num_examples("train") == 18 and source.num_examples("validation") == 6
    assert source.labels("train").tolist() == [CLASSES.index(n.split("/")[0]) for n in order]
    assert source.class_names() == list(CLASSES)
    assert source.default_eval_split() == "validation"
    assert tfrecord.split_pattern("/d/train-*", "val") == "/d/val-*"
    assert tfrecord.split_pattern("/d/validation-*", "train") == "/d/train-*"
    assert tfrecord.split_pattern("gs://b/{split}/p-*", "test") == "gs://b/test/p-*"
    with pytest.raises(UserError, match="names no split"):
        tfrecord.split_pattern("/d/part-*", "validation")
    with pytest.raises(UserError, match="tfrecord_label_offset=1"):
        _source(out, tfrecord_label_offset=2).labels("train")
    with pytest.raises(UserError, match="tfrecord_label_key"):
        _source(out, tfrecord_label_key="label").validate("train")
    with pytest.raises(UserError, match="no TFRecord shards"):
        make_source(f"tfrecord:{out}/nothing-*").validate("train")


def test_record_index_made_once_when_missing(shards, tmp_path):
    _, out = shards
    for path in tf.io.gfile.glob(f"{out}/validation-*"):
        tf.io.gfile.copy(path, str(tmp_path / os.path.basename(path)))
    tfrecord._shard_labels.cache_clear()
    index_dir = tmp_path / "index"
    source = make_source(f"tfrecord:{tmp_path}/validation-*",
                         options={"index_dir": str(index_dir)})
    assert source.num_examples("validation") == 6
    assert len(os.listdir(index_dir)) == 1 and not (tmp_path / ".co2_tf_records.json").exists()


def test_pretrain_stream_file_level_shards_fresh_epochs_exact_restart(shards, monkeypatch):
    _, out = shards
    monkeypatch.setattr(tfrecord, "BLOCK", 4)  # blocks cross shards and epoch ends
    source = _source(out)
    found, order = _records(sorted(tf.io.gfile.glob(f"{out}/train-*")))
    by_bytes = {encoded: name for name, (encoded, _) in found.items()}
    per_shard = [_records([p])[1] for p in sorted(tf.io.gfile.glob(f"{out}/train-*"))]

    def stream(p, start, n, seed=0):
        ctx = tf.distribute.InputContext(2, p, 2)
        ds = source.pretrain_stream("train", input_context=ctx, seed=seed, start=start)
        return [by_bytes[x] for x in ds.take(n).as_numpy_iterator()]
    for p in range(2):
        mine = sorted(per_shard[p] + per_shard[p + 2])  # shards p, p + 2
        n = len(mine)
        full = stream(p, 0, 2 * n)
        epochs = [full[:n], full[n:]]
        assert all(sorted(e) == mine for e in epochs)  # every record once per epoch
        assert epochs[0] != epochs[1]  # a fresh order each epoch
    # A restart continues at the exact record (mid-block, in the second epoch).
    assert stream(1, n + 3, n - 3) == full[n + 3:]
    assert stream(1, 0, n, seed=1) != full[:n]  # another seed, another order
    with pytest.raises(UserError, match="at least 8 shards"):
        source.pretrain_stream("train", input_context=tf.distribute.InputContext(8, 0, 8),
                               seed=0, start=0)


def test_interrupted_and_uninterrupted_runs_see_the_same_batches(shards, monkeypatch):
    _, out = shards
    monkeypatch.setattr(tfrecord, "BLOCK", 5)

    def views(image, seed, recipe, size):  # the image and the augmentation seed, cheaply
        return (tf.image.resize(image, [size, size]),
                tf.fill([size, size, 3], tf.cast(seed[1], tf.float32)))
    monkeypatch.setattr(pipelines._augment, "two_views", views)

    def batches(start_step, n):
        fn = pipelines.pretrain_dataset_fn(_source(out), image_size=8, augment="mocov1", seed=3,
                                           global_batch_size=4, start_step=start_step)
        return [(a.numpy(), b.numpy()) for a, b in fn(tf.distribute.InputContext()).take(n)]
    full = batches(0, 7)  # 28 examples of 18 records: into the second epoch
    resumed = batches(4, 3)
    assert len({float(v) for _, b in full for v in b[:, 0, 0, 0]}) == 28  # a seed per example
    for (a, b), (c, d) in zip(full[4:], resumed, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_labelled_dataset_in_file_order_with_labels(shards):
    _, out = shards
    source = _source(out)
    ds = pipelines.labelled_dataset(source, split="validation", image_size=8, batch_size=4)
    labels = np.concatenate([y.numpy() for _, y in ds])
    np.testing.assert_array_equal(labels, source.labels("validation"))


def test_training_with_the_knn_monitor_on_tfrecords(shards, tmp_path):
    """Acceptance, in process: pretraining on tfrecord:DIR/train-* with the kNN monitor on
    the validation shards (the same run resumes and evaluates from the CLI: the report)."""
    from co2_tf import training  # noqa: PLC0415
    from co2_tf.config import TrainConfig  # noqa: PLC0415

    _, out = shards
    config = TrainConfig(model_dir=str(tmp_path / "run"), dataset=f"tfrecord:{out}/train-*",
                         image_size=8, batch_size=8, queue_size=16, dim=8, epochs=1,
                         knn_every=1, knn_k=5)
    monitored = []
    summary = training.train(config, verbose=0, callbacks=[_Logs(monitored)])
    assert summary["steps"] == 2  # 18 // 8 steps an epoch
    assert len(monitored) == 1 and 0 <= monitored[0] <= 1
    assert summary["knn_top1"] == monitored[-1] and 0 <= summary["knn_top1_random_init"] <= 1
    assert (tmp_path / "run" / "classes.txt").read_text().split() == list(CLASSES)


class _Logs(tf.keras.callbacks.Callback):
    def __init__(self, into):
        super().__init__()
        self.into = into

    def on_epoch_end(self, epoch, logs=None):
        self.into.append(float(logs["knn_top1"]))
