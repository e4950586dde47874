"""The scan of an image folder, made once and reused by every worker and tool.

Listing and checking ``folder:gs://...`` costs one request per folder page
and two per file: for ImageNet's 1.28M files an hour or more at every start
of every process. The first scan (co2_tf.data.image_files.list_folder) is saved
as an index file; later starts of any process (every worker, every
evaluation tool) read it and list nothing.

Where: beside the folder, ``PARENT/.NAME.co2_tf_folder_index`` (beside, not
inside, so that writing it does not change the folder it describes), or
under --index_dir when the data's place is read-only (co2_tf.data.index_files).

Format: a text file, first line a JSON header (settings, class names, the
skipped files, the stamps below), then one line per usable image,
``LABEL<TAB>PATH`` with PATH relative to the folder (the folder may move).
Pipelines read the paths from this file with graph ops (a lookup table
initialized from its lines, `path_table`): no Python, and no path list as a
graph constant (ImageNet's 1.28M paths would put ~100 MB in every pipeline's graph).

Invalidation, what is cheap to detect: the modification time of every
folder that was listed (one stat each: ~1,000 for ImageNet) changes when a
file or subfolder is added, removed or renamed in it; a changed time, a
missing folder or other settings (--max_image_pixels, a check where the
index has none) mean a new scan. Not detected: a file rewritten in place
under the same name (damaged files are handled at decode time anyway), and
any change on object stores, whose folders have no modification time
(gs://: delete the index file, or use a new --index_dir, after changing the
data).
"""

import concurrent.futures
import functools
import json
import os

import tensorflow as tf

from co2_tf import io
from co2_tf import progress as progress_lib
from co2_tf.data import image_files, index_files

gfile = tf.io.gfile
INDEX_NAME = "co2_tf_folder_index"
VERSION = 1


def index_path(root, index_dir=""):
    root = io.absolute(root).rstrip("/")
    if index_dir or not io.basename(root) or io.parent(root).endswith(":"):
        return index_files.index_path(root, INDEX_NAME, index_dir)  # a bucket's root: inside
    return io.join(io.parent(root), f".{io.basename(root)}.{INDEX_NAME}")


def _mtime(folder):
    """A folder's modification time in ns; None where the file system keeps none."""
    local = io.local_path(folder)
    try:
        if local is not None:  # local-only: gfile's stat rounds local times to the second
            return os.stat(local).st_mtime_ns
        return int(gfile.stat(folder).mtime_nsec) or None
    except (tf.errors.OpError, OSError):
        return "missing"


def _stamps(root, folders):
    """Relative folder -> modification time (None where the file system has none)."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        times = list(pool.map(_mtime, folders))
    return {_relative(root, f): t for f, t in zip(folders, times)}


def _relative(root, path):
    return path[len(root):].lstrip("/")


def _header(listing, stamps):
    return {"version": VERSION, "max_pixels": listing.max_pixels, "checked": listing.checked,
            "class_names": list(listing.class_names), "count": len(listing.files),
            "skipped": [_relative(listing.root, f) for f in listing.skipped],
            "too_large": [_relative(listing.root, f) for f in listing.too_large],
            "stamps": stamps}


def _text(listing, stamps):
    lines = [json.dumps(_header(listing, stamps), separators=(",", ":"))]
    lines.extend(f"{label}\t{_relative(listing.root, f)}"
                 for f, label in zip(listing.files, listing.labels))
    return "\n".join(lines) + "\n"


def _from_text(root, text, max_pixels, check):
    """The listing the index text holds, or None if it is not current."""
    first, _, body = text.partition("\n")
    try:
        header = json.loads(first)
    except ValueError:
        return None
    if (not isinstance(header, dict) or header.get("version") != VERSION
            or header.get("max_pixels") != max_pixels or (check and not header.get("checked"))):
        return None
    stamps = header.get("stamps") or {}
    folders = [io.join(root, rel) if rel else root for rel in stamps]
    if "missing" in stamps.values() or _stamps(root, folders) != stamps:
        return None
    rows = [line.split("\t", 1) for line in body.splitlines()]
    if len(rows) != header.get("count"):
        return None
    return image_files.FolderListing(
        root=root, class_names=tuple(header["class_names"]),
        files=tuple(io.join(root, rel) for _, rel in rows),
        labels=tuple(int(label) for label, _ in rows),
        skipped=tuple(io.join(root, rel) for rel in header.get("skipped", ())),
        too_large=tuple(io.join(root, rel) for rel in header.get("too_large", ())),
        max_pixels=max_pixels, folders=tuple(folders), checked=bool(header.get("checked")))


@functools.lru_cache(maxsize=16)
def listing(root, max_pixels, check=True, index_dir="", progress=progress_lib.OFF):
    """The folder's listing: from its index if current, else scanned and indexed.

    Returns (FolderListing, index file path or None if it could not be written).
    """
    root = io.absolute(root).rstrip("/")
    max_pixels = int(max_pixels or 0)
    path = index_path(root, index_dir)
    text = index_files.read_text(path)
    found = _from_text(root, text, max_pixels, check) if text else None
    if found is not None:
        return found, path
    scanned = image_files.list_folder(root, max_pixels, progress, check)
    stamps = _stamps(root, scanned.folders)
    if any(rel.find("\n") >= 0 or rel.find("\t") >= 0 for rel in stamps) or any(
            "\n" in f for f in scanned.files):
        return scanned, None  # names a line-based file cannot hold: kept in memory only
    written = index_files.write_text(path, _text(scanned, stamps))
    return scanned, path if written else None


def path_table(index_file, root):
    """A graph function i -> (path of image i, label), read from the index file.

    A tf.lookup table initialized from the file's lines (line i + 1 is image
    i): TensorFlow reads the file, on whichever host builds the pipeline.
    """
    table = tf.lookup.StaticHashTable(
        tf.lookup.TextFileInitializer(
            index_file, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
            tf.string, tf.lookup.TextFileIndex.WHOLE_LINE), default_value="")
    prefix = tf.constant(root.rstrip("/") + "/")

    def lookup(i):
        line = table.lookup(tf.cast(i, tf.int64) + 1)
        parts = tf.strings.split(line, "\t", maxsplit=1)
        return prefix + parts[1], tf.strings.to_number(parts[0], tf.int32)
    return lookup
