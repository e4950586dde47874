"""Tests for co2_tf.data.image_files: folder listing, integrity checks, decoding."""
import io
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from helpers.image_folder import GOOD
from PIL import Image

from co2_tf.config import TrainConfig
from co2_tf.data import image_files, pipelines
from co2_tf.data.sources import make_source
from co2_tf.errors import UserError, user_error_in

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                     "train.py")


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
    with caplog.at_level(logging.WARNING, logger="co2_tf.data.image_files"):
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


# ------------------------------------------------------------ production faults
def _encoded(fmt, size=64, seed=0):
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def test_nothing_decodes_is_one_line_not_a_hang(tmp_path):
    """Header and trailer valid, bodies garbage: every file passes listing, none decodes."""
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for k in range(2):
            folder = tmp_path / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(4):
                body = rng.randint(0, 256, 300).astype(np.uint8).tobytes()
                (folder / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + body + b"\xff\xd9")
                (folder / f"{i}.png").write_bytes(
                    b"\x89PNG\r\n\x1a\n" + body + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    assert len(image_files.list_folder(str(tmp_path / "train")).files) == 16
    result = subprocess.run(
        [sys.executable, TRAIN, f"--model_dir={tmp_path / 'run'}",
         f"--dataset=folder:{tmp_path}/{{split}}", "--image_size=16", "--batch_size=8",
         "--queue_size=8", "--dim=8", "--train_steps=2", "--knn_every=0"],
        capture_output=True, text=True, timeout=300)  # a hang fails here, not forever
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    # libjpeg's own "Unsupported marker" lines (TF prints them from its decode threads,
    # possibly after ours) aside, the run ends with our one line.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith(f"error: {tmp_path / 'train'}: 32 images in a row failed to "
                                "decode (e.g. "), errors[0]
    assert ".jpg" in errors[0] or ".png" in errors[0]


def test_a_few_bad_files_still_flow_and_the_error_names_them():
    """The bound counts failures in a row: good files between bad ones reset it."""
    ram = f"ram://stream_{os.getpid()}"
    tf.io.write_file(f"{ram}/good", tf.constant(_encoded("PNG", 8)))
    tf.io.write_file(f"{ram}/bad", tf.constant(b"\xff\xd8\xff garbage \xff\xd9"))
    paths = tf.constant([f"{ram}/good", f"{ram}/bad"] * 3)
    stream = image_files.decoded_stream(paths, lambda c: c % 6, 1, folder=ram)
    got = [(int(c), int(tf.reduce_max(img))) for img, c in stream.take(30)]
    assert [c for c, _ in got] == list(range(30))
    assert all(peak == 128 for c, peak in got if c % 2)  # the gray stand-ins
    all_bad = tf.constant([f"{ram}/bad"] * 5)
    with pytest.raises(tf.errors.OpError, match=r"UserError: .*10 images in a row failed .*"
                                                 r"e\.g\. ram://stream_\d+/bad"):
        next(iter(image_files.decoded_stream(all_bad, lambda c: c % 5, 1, folder=ram)))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_trailing_bytes_are_accepted_and_truncation_is_not(tmp_path, fmt):
    ext = ".jpg" if fmt == "JPEG" else ".png"
    encoded = _encoded(fmt)
    junk = np.random.RandomState(1).randint(0, 256, 300_000).astype(np.uint8).tobytes()
    junk = junk.replace(b"\xff\xd9", b"\x00\x00").replace(b"IEND", b"iend")
    cls = tmp_path / "root" / "only"
    cls.mkdir(parents=True)
    (cls / f"plain{ext}").write_bytes(encoded)
    (cls / f"trailing_5k{ext}").write_bytes(encoded + junk[:5000])
    (cls / f"trailing_300k{ext}").write_bytes(encoded + junk)  # e.g. a motion photo's video
    (cls / f"truncated{ext}").write_bytes(encoded[:len(encoded) * 2 // 3])
    (cls / f"truncated_padded{ext}").write_bytes(encoded[:len(encoded) * 2 // 3] + junk)
    listing = image_files.list_folder(str(tmp_path / "root"))
    assert {os.path.basename(f) for f in listing.files} == {
        f"plain{ext}", f"trailing_300k{ext}", f"trailing_5k{ext}"}
    assert {os.path.basename(f) for f in listing.skipped} == {
        f"truncated_padded{ext}", f"truncated{ext}"}
    plain = image_files.read_and_decode(str(cls / f"plain{ext}")).numpy()
    reference = _pil_reference(cls / f"trailing_5k{ext}")
    tol = 3.0 if fmt == "JPEG" else 0.0
    for name in (f"trailing_5k{ext}", f"trailing_300k{ext}"):
        got = image_files.read_and_decode(str(cls / name)).numpy()
        np.testing.assert_array_equal(got, plain)
        assert np.abs(got - reference).mean() <= tol


def test_pixel_limit_reduces_jpegs_and_skips_other_formats(tmp_path, caplog):
    for k, name in enumerate(("a", "b")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "big.jpg").write_bytes(_encoded("JPEG", 64, k))
        (folder / "big.png").write_bytes(_encoded("PNG", 64, k))
        (folder / "small.png").write_bytes(_encoded("PNG", 16, k))
    with caplog.at_level(logging.WARNING, logger="co2_tf.data.image_files"):
        source = make_source(f"folder:{tmp_path}", max_image_pixels=1000)
        listing = source.listing("train")
    assert sorted(os.path.relpath(f, tmp_path) for f in listing.files) == [
        "a/big.jpg", "a/small.png", "b/big.jpg", "b/small.png"]
    assert sorted(os.path.relpath(f, tmp_path) for f in listing.too_large) == [
        "a/big.png", "b/big.png"]
    warning = [r.getMessage() for r in caplog.records if "pixel limit" in r.getMessage()]
    assert len(warning) == 1 and "skipping 2 PNG/GIF/BMP" in warning[0]
    example = source.example_fn("train", 16)
    # 64 x 64 = 4096 px > 1000; at 1/2 still 1024 > 1000; at 1/4 16 x 16 = 256 fits.
    big = example(tf.constant(0, tf.int64))[0].numpy()
    assert big.shape == (16, 16, 3)
    full = image_files.read_and_decode(listing.files[0]).numpy()
    assert full.shape == (64, 64, 3)
    # libjpeg's 1/4 scaling averages 4 x 4 blocks (up to rounding and its filtering)
    assert np.abs(big - full.reshape(16, 4, 16, 4, 3).mean((1, 3))).mean() < 12
    assert example(tf.constant(1, tf.int64))[0].shape == (16, 16, 3)  # small.png, as is
    stream = source.image_stream("train", lambda c: c % 4, 16, 1)
    assert [tuple(img.shape) for img, _ in stream.take(4)] == [(16, 16, 3)] * 4
    unlimited = make_source(f"folder:{tmp_path}", max_image_pixels=0).listing("train")
    assert len(unlimited.files) == 6 and unlimited.too_large == ()


@pytest.mark.parametrize("uri", [False, True])
def test_symlink_loops_are_listed_once(tmp_path, uri):
    root = tmp_path / "root"
    for name in ("cats", "dogs"):
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / "x.png").write_bytes(_encoded("PNG", 8))
        (root / name / "y.png").write_bytes(_encoded("PNG", 8))
    (root / "cats" / "sub" / "loop").symlink_to(root / "cats")  # to its parent
    (root / "cats" / "up").symlink_to(root)  # to the dataset root
    (root / "dogs" / "also_cats").symlink_to(root / "cats" / "sub")
    where = f"file://{root}" if uri else str(root)  # file:// URIs have symlinks too
    result = []
    # In a thread, so that a listing that follows the loops fails here instead of hanging.
    worker = threading.Thread(target=lambda: result.append(image_files.list_folder(where)),
                              daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert result, "the listing did not end"
    listing = result[0]
    assert sorted(os.path.relpath(f, where) for f in listing.files) == [
        "cats/sub/x.png", "cats/y.png", "dogs/sub/x.png", "dogs/y.png"]


def test_degenerate_pretraining_data_is_named(tmp_path, caplog):
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    for i in range(4):
        (one / f"{i}.png").write_bytes(_encoded("PNG", 8, i))
    with caplog.at_level(logging.WARNING, logger="co2_tf.data.pipelines"):
        lines = pipelines.pretraining_data_warnings(make_source(f"folder:{one.parent}"), "train", 2)
    assert len(lines) == 1 and "one class (only)" in lines[0] and "meaningless" in lines[0]
    assert [r.getMessage() for r in caplog.records if r.name == "co2_tf.data.pipelines"] == lines
    builtin = make_source("builtin")
    n = builtin.num_examples("train")
    assert pipelines.pretraining_data_warnings(builtin, "train", n - 1) == []
    lines = pipelines.pretraining_data_warnings(builtin, "train", n)
    assert len(lines) == 1 and f"--queue_size={n} >= the {n} images" in lines[0]
    assert "stale keys of its own image" in lines[0]


def test_pixel_limit_flag():
    assert TrainConfig().max_image_pixels == 40_000_000
    assert make_source("folder:/x").max_image_pixels == image_files.DEFAULT_MAX_PIXELS
    with pytest.raises(UserError, match="--max_image_pixels=-1 must be >= 0"):
        TrainConfig(model_dir="/tmp/x", max_image_pixels=-1).check()


def test_user_errors_raised_in_the_pipeline_are_found_in_tf_errors():
    def fail(x):
        raise UserError("folder /d: the fix")

    ds = tf.data.Dataset.range(2).map(lambda x: tf.py_function(fail, [x], tf.int64))
    with pytest.raises(tf.errors.OpError) as caught:
        next(iter(ds))
    assert user_error_in(caught.value) == "folder /d: the fix"
    assert user_error_in(UserError("plain")) == "plain"
    assert user_error_in(ValueError("other")) is None
