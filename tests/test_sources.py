"""Tests for co2_tf.data.sources: dataset specs, sizes, labels and the held-out split per kind."""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from co2_tf import io
from co2_tf.data import folder_index, image_checks, image_files, pipelines
from co2_tf.data.sources import builtin, make_source, parse_dataset_spec
from co2_tf.errors import UserError

# Specs. -------------------------------------------------------------------

def test_parse_dataset_spec():
    assert parse_dataset_spec("builtin").kind == "builtin"
    spec = parse_dataset_spec("tfds:cifar10")
    assert (spec.kind, spec.name, spec.config) == ("tfds", "cifar10", "")
    spec = parse_dataset_spec("tfds:imagenet2012_subset/1pct")
    assert (spec.name, spec.config) == ("imagenet2012_subset", "1pct")
    assert spec.tfds_name == "imagenet2012_subset/1pct"
    spec = parse_dataset_spec("folder:/data/x/{split}")
    assert spec.kind == "folder" and spec.folder_root("val") == "/data/x/val"
    assert str(spec) == "folder:/data/x/{split}"


@pytest.mark.parametrize("text", ["", "cifar10", "hdf5:x", "tfds:",
                                  "folder:", "Builtin"])
def test_parse_dataset_spec_errors(text):
    with pytest.raises(UserError, match="tfds:NAME|folder:PATH"):
        parse_dataset_spec(text)


def test_folder_split_placeholder(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        d = tmp_path / split / "only"
        d.mkdir(parents=True)
        for k in range(n):
            Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(
                d / f"{k}.png")
    spec = f"folder:{tmp_path}/{{split}}"
    assert make_source(spec).num_examples("train") == 3
    assert make_source(spec).num_examples("val") == 2



# The held-out split: one definition, used by training's kNN monitor and evaluation. ------

def test_default_eval_split_per_kind(tmp_path):
    assert make_source("builtin").default_eval_split() == "test"
    for split in ("train", "val"):
        d = tmp_path / split / "only"
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "a.png")
    assert make_source(f"folder:{tmp_path}/{{split}}").default_eval_split() == "val"
    with pytest.raises(UserError, match="single folder"):
        make_source(f"folder:{tmp_path}/train").default_eval_split()
    with pytest.raises(UserError, match="--eval_split"):
        make_source(f"folder:{tmp_path}/{{split}}_x").default_eval_split()
    with tfds.testing.mock_data(num_examples=4):  # every split readable: the first candidate
        assert make_source("tfds:imagenet2012").default_eval_split() == "validation"


def test_labels_are_the_generators_and_the_listings(tmp_path):
    np.testing.assert_array_equal(make_source("builtin").labels("test"),
                                  builtin.load("test", 8)[1])
    for name, n in (("a", 2), ("b", 3)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / f"{i}.png")
    source = make_source(f"folder:{tmp_path}")
    assert source.labels("train").tolist() == [0, 0, 1, 1, 1]
    assert source.labels("train").dtype == np.int32


def test_only_imagenet_has_standard_label_subsets():
    assert make_source("builtin").standard_label_subset("train", 0.1) is None
    imagenet = make_source("tfds:imagenet2012")
    assert str(imagenet.standard_label_subset("train", 0.01)) == "tfds:imagenet2012_subset/1pct"
    assert imagenet.standard_label_subset("train", 0.2) is None
    assert imagenet.standard_label_subset("validation", 0.1) is None


# The folder index: one scan for every process. --------------------------------------------

def _count_listings(monkeypatch):
    calls = []
    # The gfile modules the library holds (tf.io.gfile may resolve to another module
    # object once other test modules' imports ran).
    modules = {id(m): m for m in (tf.io.gfile, image_files.gfile, folder_index.gfile, io.gfile)}
    for module in modules.values():
        for name in ("listdir", "glob", "walk"):
            real = getattr(module, name)

            def counted(*args, _real=real, **kwargs):
                calls.append(args[0])
                return _real(*args, **kwargs)
            monkeypatch.setattr(module, name, counted)
    return calls


def _new_process():
    """What a new process starts with: no listing in memory."""
    folder_index.listing.cache_clear()
    image_files._list_folder_cached.cache_clear()


def _small_folder(root):
    rng = np.random.RandomState(1)
    for rel in ("a", "b/nested"):
        (root / rel).mkdir(parents=True)
    for rel in ("a/0.png", "a/1.png", "b/2.png", "b/nested/3.png"):
        Image.fromarray(rng.randint(0, 256, (5, 6, 3)).astype(np.uint8)).save(root / rel)
    (root / "a" / "cut.png").write_bytes((root / "a" / "0.png").read_bytes()[:40])


def test_folder_index_second_start_lists_nothing(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _small_folder(root)
    calls = _count_listings(monkeypatch)
    _new_process()
    first = make_source(f"folder:{root}")
    files, labels = first.files("train"), first.labels("train").tolist()
    assert calls and (tmp_path / ".data.co2_tf_folder_index").exists()
    assert [os.path.basename(f) for f in first.listing("train").skipped] == ["cut.png"]
    calls.clear()
    _new_process()
    check = image_checks.check_file
    monkeypatch.setattr(image_checks, "check_file", lambda *a, **k: pytest.fail("checked"))
    second = make_source(f"folder:{root}")
    assert second.files("train") == files and second.labels("train").tolist() == labels
    assert second.listing("train").skipped == first.listing("train").skipped
    # The pipeline reads each path from the index file: the image of that file, its label.
    example = second.example_fn("train", 8)
    for i, path in enumerate(files):
        image, label = example(tf.constant(i, tf.int64))
        np.testing.assert_array_equal(image.numpy(), np.asarray(Image.open(path)))
        assert int(label) == labels[i] == (0 if "/a/" in path else 1)
    labelled = pipelines.labelled_dataset(second, split="train", image_size=4, batch_size=2)
    graph = labelled._as_serialized_graph(
        external_state_policy=tf.data.experimental.ExternalStatePolicy.WARN).numpy()
    assert b"nested/3.png" not in graph  # no path list in the graph
    assert calls == []
    # A file added in a nested folder changes that folder's time: the next start scans.
    monkeypatch.setattr(image_checks, "check_file", check)
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(root / "b" / "nested" / "4.png")
    _new_process()
    assert len(make_source(f"folder:{root}").files("train")) == len(files) + 1 and calls


def test_folder_index_dir_and_no_check(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _small_folder(root)
    _new_process()
    monkeypatch.setattr(image_checks, "check_file", lambda *a, **k: pytest.fail("checked"))
    options = {"index_dir": str(tmp_path / "index"), "check_image_files": False}
    source = make_source(f"folder:{root}", options=options)
    assert len(source.files("train")) == 5  # the truncated file too: it fails at decode time
    assert len(os.listdir(tmp_path / "index")) == 1
    assert not (tmp_path / ".data.co2_tf_folder_index").exists()
    # An index made without the check does not serve a start that asks for it.
    monkeypatch.undo()
    _new_process()
    checked = make_source(f"folder:{root}", options=dict(options, check_image_files=True))
    assert len(checked.files("train")) == 4
