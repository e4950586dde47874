"""co2_tf.io: paths and atomic small-file writes on local paths, file:// and ram:// URIs."""

import os
import uuid

import pytest
import tensorflow as tf

from co2_tf import io


def _ram():
    return f"ram://test_io_{uuid.uuid4().hex[:8]}"


def test_path_helpers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert io.absolute("rel/x") == os.path.join(str(tmp_path), "rel", "x")
    assert io.absolute("~/x") == os.path.join(os.path.expanduser("~"), "x")
    for uri in ("gs://b/run", "file:///abs/run", "ram://run/x"):
        assert io.absolute(uri) == uri  # never turned into ./gs:/b/run
    assert io.parent("gs://b/run/config.json") == "gs://b/run"
    assert io.parent("gs://b/run/") == "gs://b"
    assert io.basename("gs://b/run/") == "run"
    assert io.join("gs://b", "run", "x.json") == "gs://b/run/x.json"
    assert io.local_path("file:///abs/run") == "/abs/run"
    assert io.local_path("/abs/run") == "/abs/run"
    assert io.local_path("gs://b/run") is None and io.local_path("ram://x") is None
    assert io.temporary_name("gs://b/run/a.json").startswith("gs://b/run/.a.json.tmp-")
    assert io.temporary_name("gs://b/run/a.json") != io.temporary_name("gs://b/run/a.json")


@pytest.mark.parametrize("kind", ["local", "file", "ram"])
def test_atomic_writes_and_reads(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    root = {"local": str(tmp_path / "out"), "file": f"file://{tmp_path}/out",
            "ram": _ram()}[kind]
    path = io.join(root, "deep", "x.json")  # missing folders are made
    io.write_json_atomic(path, {"a": [1, 2], "é": "ü"})
    assert io.read_json(path) == {"a": [1, 2], "é": "ü"}
    io.write_json_atomic(path, {"b": 3})  # replaces
    assert io.read_json(path) == {"b": 3}
    io.write_text_atomic(io.join(root, "t.txt"), "line\n")
    assert io.read_text(io.join(root, "t.txt")) == "line\n"
    io.write_bytes_atomic(io.join(root, "b.bin"), b"\x00\xff")
    assert io.read_bytes(io.join(root, "b.bin")) == b"\x00\xff"
    assert io.size(io.join(root, "b.bin")) == 2
    assert sorted(io.listdir(io.join(root, "deep"))) == ["x.json"]  # no temp file left
    io.remove(io.join(root, "deep"))
    assert not io.exists(path)
    io.remove(io.join(root, "missing"))  # fine
    if kind == "ram":
        assert os.listdir(tmp_path) == []  # nothing local
    else:
        assert os.listdir(tmp_path) == ["out"]  # and no `file:` folder in the cwd


def test_a_failed_write_leaves_neither_file_nor_temporary(monkeypatch):
    root = _ram()
    io.write_text_atomic(io.join(root, "a.txt"), "old")

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        io.write_json_atomic(io.join(root, "b.json"), {"x": Unserialisable()})

    def failing_rename(*args, **kwargs):
        raise tf.errors.PermissionDeniedError(None, None, "denied")

    monkeypatch.setattr(io.gfile, "rename", failing_rename)
    with pytest.raises(tf.errors.PermissionDeniedError):
        io.write_text_atomic(io.join(root, "a.txt"), "new")
    assert io.listdir(root) == ["a.txt"]
    assert io.read_text(io.join(root, "a.txt")) == "old"


@pytest.mark.parametrize("kind", ["file", "ram"])
def test_move_tree_moves_every_file(tmp_path, kind):
    root = f"file://{tmp_path}" if kind == "file" else _ram()
    for rel in ("a.txt", "sub/b.txt", "sub/deeper/c.txt"):
        io.write_text_atomic(io.join(root, "src", rel), rel)
    io.move_tree(io.join(root, "src"), io.join(root, "dst"))
    assert not io.exists(io.join(root, "src", "a.txt"))
    for rel in ("a.txt", "sub/b.txt", "sub/deeper/c.txt"):
        assert io.read_text(io.join(root, "dst", rel)) == rel
