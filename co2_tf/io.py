"""File I/O for every path a user gives: through `tf.io.gfile`, never the local OS.

Users' run dirs, exports and data live in buckets (gs://, s3://) as often as on
a local disk; `open`/`os.*` on such a string silently make a local folder
named `gs:`. Everything here works on local paths, `file:///abs/path` URIs,
TF's in-memory `ram://` and every file system TF has.

Small files (JSON, class lists, split files) are written to a temporary name
beside the target and renamed over it, so a reader never sees half a file.
(On object stores the rename is a copy + delete, still all-or-nothing for
the reader.) `.keras` files need nothing special: Keras's own saving layer
already stages remote paths locally and copies them with gfile.
"""

import json
import os
import uuid

import tensorflow as tf

gfile = tf.io.gfile


def is_remote(path):
    """True for URIs (gs://, s3://, file://, ram://, ...), False for plain paths."""
    return "://" in str(path)


def absolute(path):
    """A path made absolute if local; URIs are already absolute."""
    path = str(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(*parts):
    """os.path.join, which is plain string handling and right for URIs too."""
    return os.path.join(*parts)


def parent(path):
    """The folder that holds `path` (URI-safe: 'gs://b/run/x' -> 'gs://b/run')."""
    return os.path.dirname(str(path).rstrip("/"))


def local_path(path):
    """The OS path behind a plain path or a file:// URI; None on other file systems."""
    path = str(path)
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if is_remote(path) else path


def basename(path):
    return os.path.basename(str(path).rstrip("/"))


def exists(path):
    return gfile.exists(path)


def isdir(path):
    return gfile.isdir(path)


def size(path):
    """A file's size in bytes."""
    return gfile.stat(path).length


def makedirs(path):
    gfile.makedirs(path)


def listdir(path):
    return gfile.listdir(path)


def remove(path):
    """Deletes a file or a whole tree; missing is fine."""
    if gfile.isdir(path):
        gfile.rmtree(path)
    elif gfile.exists(path):
        gfile.remove(path)


def move_tree(src, dst):
    """Moves folder src to dst (which must not exist).

    On a local disk (plain paths, file://) one rename, atomic. Elsewhere a
    copy of every file, then a delete: object stores (gs://, s3://) have no
    folder rename (TF's own gs:// rename is such a copy), and ram:// renames
    only an entry of that exact name, not the files below it.
    """
    if local_path(src) is not None:
        gfile.rename(src, dst)
        return
    pending = [(str(src).rstrip("/"), str(dst).rstrip("/"))]
    while pending:
        source, target = pending.pop()
        gfile.makedirs(target)
        for name in gfile.listdir(source):
            name = name.rstrip("/")
            if gfile.isdir(join(source, name)):
                pending.append((join(source, name), join(target, name)))
            else:
                gfile.copy(join(source, name), join(target, name))
    remove(src)


def read_bytes(path):
    with gfile.GFile(path, "rb") as f:
        return f.read()


def read_text(path):
    with gfile.GFile(path, "r") as f:
        return f.read()


def read_json(path):
    return json.loads(read_text(path))


def temporary_name(path, kind="tmp"):
    """A fresh hidden name beside `path` (same folder, so a rename stays on one file system)."""
    return join(parent(path), f".{basename(path)}.{kind}-{uuid.uuid4().hex[:8]}")


def write_atomic(path, write):
    """Calls write(tmp) for a temporary name beside `path`, then renames it over `path`.

    The temporary name ends like `path` (writers such as Keras's `.keras` save
    check the extension). A failed write leaves nothing behind.
    """
    folder = parent(path)
    if folder:
        gfile.makedirs(folder)
    tmp = temporary_name(path) + os.path.splitext(str(path))[1]
    try:
        write(tmp)
        gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        if gfile.exists(tmp):
            gfile.remove(tmp)
        raise


def write_bytes_atomic(path, content):
    """Writes `content` to `path` through a temporary name and a rename."""
    def write(tmp):
        with gfile.GFile(tmp, "wb") as f:
            f.write(content)
    write_atomic(path, write)


def write_text_atomic(path, text):
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, value, indent=2, **kwargs):
    write_text_atomic(path, json.dumps(value, indent=indent, **kwargs) + "\n")
