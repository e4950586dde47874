"""Tests for co2_tf.sources: dataset specs, sizes, labels and the held-out split per kind."""
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from co2_tf.errors import UserError
from co2_tf.sources import builtin, make_source, parse_dataset_spec

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
