"""Tests for co2_tf.data: specs, the index contract, folders, tfds (mocked)."""
import io
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from co2_tf import augment
from co2_tf import builtin
from co2_tf import data
from co2_tf.errors import UserError

SIZE = 16
SEED = 5


def _ctx(pipelines=1, pipeline_id=0, replicas=1):
    return tf.distribute.InputContext(pipelines, pipeline_id, replicas)


def _views(dataset, n):
    """First n elements as numpy (view1, view2) pairs."""
    return [(a.numpy(), b.numpy()) for a, b in dataset.take(n)]


# Specs. -------------------------------------------------------------------

def test_parse_dataset_spec():
    assert data.parse_dataset_spec("builtin").kind == "builtin"
    spec = data.parse_dataset_spec("tfds:cifar10")
    assert (spec.kind, spec.name, spec.config) == ("tfds", "cifar10", "")
    spec = data.parse_dataset_spec("tfds:imagenet2012_subset/1pct")
    assert (spec.name, spec.config) == ("imagenet2012_subset", "1pct")
    assert spec.tfds_name == "imagenet2012_subset/1pct"
    spec = data.parse_dataset_spec("folder:/data/x/{split}")
    assert spec.kind == "folder" and spec.folder_root("val") == "/data/x/val"
    assert str(spec) == "folder:/data/x/{split}"


@pytest.mark.parametrize("text", ["", "cifar10", "hdf5:x", "tfds:",
                                  "folder:", "Builtin"])
def test_parse_dataset_spec_errors(text):
    with pytest.raises(UserError, match="tfds:NAME|folder:PATH"):
        data.parse_dataset_spec(text)


# The index contract, on the builtin data. ------------------------------------

def _builtin_fn(global_batch_size=8, start_step=0, recipe="mocov2"):
    return data.pretrain_dataset_fn(
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
        src = int(data._source_index(tf.constant(i, tf.int64), n, SEED))
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
        lambda i: data._source_index(i, n, SEED)).batch(3 * n)
    idx = next(iter(idx)).numpy()
    for e in range(3):
        assert sorted(idx[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(idx[:n], idx[n:2 * n])
    assert not np.array_equal(idx[:n], np.arange(n))


def test_sizes_and_errors_builtin():
    assert data.train_examples("builtin") == builtin.num_examples("train")
    assert data.steps_per_epoch("builtin", global_batch_size=256) == (
        builtin.num_examples("train") // 256)
    assert data.num_classes("builtin") == builtin.NUM_CLASSES
    assert data.class_names("builtin") == list(builtin.CLASS_NAMES)
    data.validate("builtin")
    with pytest.raises(UserError, match="batch"):
        data.pretrain_dataset_fn("builtin", image_size=SIZE,
                                 augment="mocov2", seed=0,
                                 global_batch_size=10 ** 6)
    with pytest.raises(UserError, match="mocov2"):
        data.pretrain_dataset_fn("builtin", image_size=SIZE,
                                 augment="v3", seed=0, global_batch_size=8)


def test_builtin_labelled_dataset():
    ds = data.labelled_dataset("builtin", split="test", image_size=SIZE,
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
    lin = data.labelled_dataset("builtin", split="test", image_size=SIZE,
                                batch_size=512, transform="linear_train",
                                seed=1)
    labels = np.concatenate([y.numpy() for _, y in lin])
    assert sorted(labels) == sorted(builtin.load("test", SIZE)[1])
    with pytest.raises(UserError, match="transform"):
        data.labelled_dataset("builtin", split="test", image_size=SIZE,
                              batch_size=8, transform="center")


# Image folders. -------------------------------------------------------------

def _rand(rng, h=20, w=24):
    return rng.randint(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Every supported kind, nesting, non-images, and 3 broken files."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.RandomState(0)
    a, b, c = root / "cats", root / "dogs" / "deep" / "er", root / "zebras"
    for d in (a, b, c):
        d.mkdir(parents=True)
    Image.fromarray(_rand(rng)).save(a / "rgb.jpg")
    Image.fromarray(_rand(rng)).convert("L").save(a / "gray.JPG")
    Image.fromarray(_rand(rng)).convert("CMYK").save(a / "cmyk.jpeg")
    Image.fromarray(_rand(rng, 48, 40)).save(a / "prog.jpg",
                                             progressive=True)
    Image.fromarray(_rand(rng)).save(b / "rgb.png")
    rgba = np.concatenate([_rand(rng), np.zeros((20, 24, 1), np.uint8)], -1)
    rgba[:10, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(b / "rgba.png")
    Image.fromarray(_rand(rng)).convert("L").save(b / "l.png")
    la = np.stack([_rand(rng)[..., 0], np.full((20, 24), 100, np.uint8)], -1)
    Image.fromarray(la, "LA").save(b / "la.PNG")
    Image.fromarray(_rand(rng)).convert("P").save(b / "palette.png")
    Image.fromarray(rng.randint(0, 65536, (20, 24)).astype(np.uint16)).save(
        c / "sixteen.png")
    Image.fromarray(_rand(rng)).save(
        c / "anim.gif", save_all=True, append_images=[
            Image.fromarray(_rand(rng))])
    Image.fromarray(_rand(rng)).save(c / "pic.bmp")
    Image.fromarray(_rand(rng)).save(c / "ünïcødé 猫.jpg")
    (c / "notes.txt").write_text("not an image")
    (c / "drawing.svg").write_text("<svg/>")
    (c / "sound.wav").write_bytes(b"RIFF\0\0\0\0WAVE")
    (c / "garbage.png").write_bytes(b"this is not a png")
    buf = io.BytesIO()
    Image.fromarray(_rand(rng, 64, 64)).save(buf, "JPEG")
    (c / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue())
                                                     // 2])
    # Valid header and trailer, damaged body: only decoding can tell.
    buf = io.BytesIO()
    Image.fromarray(_rand(rng, 64, 64)).save(buf, "PNG")
    body = bytearray(buf.getvalue())
    body[60:80] = bytes(20)
    (c / "damaged.png").write_bytes(bytes(body))
    return root


GOOD = {"cats": ["cmyk.jpeg", "gray.JPG", "prog.jpg", "rgb.jpg"],
        "dogs": ["la.PNG", "l.png", "palette.png", "rgb.png", "rgba.png"],
        "zebras": ["anim.gif", "pic.bmp", "sixteen.png", "ünïcødé 猫.jpg"]}


def _pil_reference(path):
    """What the decoded RGB should be: PIL, alpha over white, 16 -> 8 bit."""
    img = Image.open(path)
    img.seek(0)
    if img.mode == "I;16" or img.mode == "I":
        arr = np.asarray(img).astype(np.float64) / 65535.0 * 255.0
        return np.repeat(np.round(arr)[..., None], 3, -1)
    rgba = np.asarray(img.convert("RGBA")).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    return rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)


def test_folder_listing_and_report(image_folder, caplog):
    data._list_folder_cached.cache_clear()
    with caplog.at_level(logging.WARNING, logger="co2_tf.data"):
        listing = data.list_folder(str(image_folder))
        data.list_folder(str(image_folder))
        data.validate(f"folder:{image_folder}")
    reports = [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(reports) == 1, "reported once"
    assert "2 corrupt" in reports[0].getMessage()
    assert listing.class_names == ("cats", "dogs", "zebras")
    assert sorted(os.path.basename(p) for p in listing.skipped) == [
        "garbage.png", "truncated.jpg"]
    names = {}
    for path, label in zip(listing.files, listing.labels):
        names.setdefault(listing.class_names[label], []).append(
            os.path.basename(path))
    expected = {k: sorted(v) for k, v in GOOD.items()}
    expected["zebras"] = sorted(expected["zebras"] + ["damaged.png"])
    assert {k: sorted(v) for k, v in names.items()} == expected
    assert data.class_names(f"folder:{image_folder}") == [
        "cats", "dogs", "zebras"]
    assert data.num_classes(f"folder:{image_folder}") == 3
    assert data.train_examples(f"folder:{image_folder}") == 14


def test_every_format_decodes_like_pil(image_folder):
    for cls, files in GOOD.items():
        for name in files:
            path = next(image_folder.glob(f"{cls}/**/{name}"))
            got = data.decode_image(tf.io.read_file(str(path))).numpy()
            ref = _pil_reference(path)
            assert got.shape == ref.shape and got.dtype == np.uint8, name
            # JPEG decoders may differ by a few levels; others are exact.
            tol = 3.0 if name.lower().endswith(("jpg", "jpeg")) else 1.0
            assert np.abs(got - ref).mean() < tol, name


def test_folder_labelled_dataset_uses_all_decodable(image_folder):
    ds = data.labelled_dataset(f"folder:{image_folder}", split="train",
                               image_size=SIZE, batch_size=5)
    labels = np.concatenate([y.numpy() for _, y in ds])
    # Every good image once; the damaged PNG dropped at run time.
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 5 + [2] * 4


def test_folder_pretraining_survives_damaged_file(image_folder):
    fn = data.pretrain_dataset_fn(
        f"folder:{image_folder}", split="train", image_size=SIZE,
        augment="mocov1", seed=0, global_batch_size=4)
    # 3 epochs of 14 examples: the damaged PNG comes up 3 times.
    batches = _views(fn(_ctx()), 11)
    assert all(v.shape == (4, SIZE, SIZE, 3) for b in batches for v in b)
    assert any(p.endswith("damaged.png")
               for p in data.runtime_decode_failures())
    # Its stand-in, a plain gray image, gives constant views.
    views = np.concatenate([b[0] for b in batches])
    constant = [v for v in views if np.ptp(v) < 1e-6]
    assert len(constant) == 3
    # The index contract still holds: same global batches with 2 pipelines.
    per_pipeline = [_views(fn(_ctx(2, p, 2)), 11) for p in range(2)]
    for step in range(11):
        np.testing.assert_array_equal(
            np.concatenate([per_pipeline[0][step][0],
                            per_pipeline[1][step][0]]), batches[step][0])


def test_preview_grid(image_folder):
    grid = data.preview_grid(f"folder:{image_folder}", image_size=SIZE,
                             augment="mocov2", num_images=3, seed=0)
    assert grid.shape == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)
    grid = data.preview_grid("builtin", image_size=SIZE, augment="mocov2",
                             num_images=2, seed=SEED)
    # Row 0's views are the pipeline's global example 0.
    first = _views(_builtin_fn()(_ctx()), 1)[0]
    view1 = grid[2:2 + SIZE, 4 + SIZE:4 + 2 * SIZE]
    np.testing.assert_array_equal(
        view1, np.round(first[0][0] * 255).astype(np.uint8))


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.validate(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        data.validate(f"folder:{tmp_path / 'file.txt'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        data.validate(f"folder:{empty}")
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "ok" / "a.png")
    (root / "texts").mkdir()
    (root / "texts" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="texts has no image files"):
        data.validate(f"folder:{root}")
    broken = tmp_path / "broken"
    (broken / "ok").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
        broken / "ok" / "a.png")
    (broken / "bad").mkdir()
    (broken / "bad" / "x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(UserError, match="bad has no readable image"):
        data.validate(f"folder:{broken}")


def test_folder_split_placeholder(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        d = tmp_path / split / "only"
        d.mkdir(parents=True)
        for k in range(n):
            Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(
                d / f"{k}.png")
    spec = f"folder:{tmp_path}/{{split}}"
    assert data.train_examples(spec, "train") == 3
    assert data.train_examples(spec, "val") == 2


def test_write_class_names(tmp_path):
    path = tmp_path / "classes.txt"
    data.write_class_names(str(path), ["a", "ünï"])
    assert path.read_text(encoding="utf-8") == "a\nünï\n"


# TFDS, mocked: never downloads. ---------------------------------------------

def test_tfds_pretrain_and_labelled():
    with tfds.testing.mock_data(num_examples=24):
        data.validate("tfds:cifar10", split="train")
        assert data.train_examples("tfds:cifar10", "train") == 24
        assert data.num_classes("tfds:cifar10") == 10
        fn = data.pretrain_dataset_fn(
            "tfds:cifar10", split="train", image_size=SIZE,
            augment="mocov2", seed=0, global_batch_size=8)
        batches = _views(fn(_ctx(1, 0, 2)), 8)  # > 1 epoch: repeats
        for v1, v2 in batches:
            assert v1.shape == v2.shape == (4, SIZE, SIZE, 3)
            assert v1.dtype == np.float32
            assert 0.0 <= v1.min() and v1.max() <= 1.0
        ds = data.labelled_dataset("tfds:cifar10", split="test",
                                   image_size=SIZE, batch_size=10)
        sizes = [(x.shape, y.dtype) for x, y in ds]
        assert [s[0][0] for s in sizes] == [10, 10, 4]
        assert sizes[0][0][1:] == (SIZE, SIZE, 3)
        assert sizes[0][1] == tf.int32


def test_tfds_errors():
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(UserError, match="not found"):
            data.validate("tfds:no_such_dataset_xyz")
        # lsun has images but no labels.
        with pytest.raises(UserError, match="no 'label'"):
            data.labelled_dataset("tfds:lsun/classroom", split="train",
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
