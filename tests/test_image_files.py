"""Tests for co2_tf.image_files: folder listing, integrity checks, decoding."""
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from helpers.image_folder import GOOD
from PIL import Image

from co2_tf import image_files
from co2_tf.errors import UserError
from co2_tf.sources import make_source


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
    image_files._list_folder_cached.cache_clear()
    with caplog.at_level(logging.WARNING, logger="co2_tf.image_files"):
        listing = image_files.list_folder(str(image_folder))
        image_files.list_folder(str(image_folder))
        make_source(f"folder:{image_folder}").validate()
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
    assert make_source(f"folder:{image_folder}").class_names() == [
        "cats", "dogs", "zebras"]
    assert len(make_source(f"folder:{image_folder}").class_names()) == 3
    assert make_source(f"folder:{image_folder}").num_examples() == 14


def test_every_format_decodes_like_pil(image_folder):
    for cls, files in GOOD.items():
        for name in files:
            path = next(image_folder.glob(f"{cls}/**/{name}"))
            got = image_files.decode_image(tf.io.read_file(str(path))).numpy()
            ref = _pil_reference(path)
            assert got.shape == ref.shape and got.dtype == np.uint8, name
            # JPEG decoders may differ by a few levels; others are exact.
            tol = 3.0 if name.lower().endswith(("jpg", "jpeg")) else 1.0
            assert np.abs(got - ref).mean() < tol, name


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make_source(f"folder:{tmp_path / 'missing'}").validate()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        make_source(f"folder:{tmp_path / 'file.txt'}").validate()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        make_source(f"folder:{empty}").validate()
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "ok" / "a.png")
    (root / "texts").mkdir()
    (root / "texts" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="texts has no image files"):
        make_source(f"folder:{root}").validate()
    broken = tmp_path / "broken"
    (broken / "ok").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
        broken / "ok" / "a.png")
    (broken / "bad").mkdir()
    (broken / "bad" / "x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(UserError, match="bad has no readable image"):
        make_source(f"folder:{broken}").validate()
