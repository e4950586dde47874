"""Where datasets' index files live: made once, kept beside the data, reused by every process.

An index (a folder's scanned listing, the record counts of TFRecord shards)
is kept beside the data it describes, as a hidden file (its name starts with
a dot, so listings never take it for data), or, when the data is read-only
(a public bucket), under ``--index_dir`` with the data's path hashed into
the name. Writes are atomic (a temporary name, then a rename: co2_tf.io), so
workers starting together may each write one, and a reader never sees half a
file. A failed write is a warning, not an error: the process then keeps its
scan in memory and the next start scans again.
"""

import hashlib
import logging

import tensorflow as tf

from co2_tf import io

log = logging.getLogger(__name__)


def index_path(data_path, name, index_dir=""):
    """The index file `name` of the data at `data_path` (a folder or a shard folder)."""
    data_path = io.absolute(str(data_path).rstrip("/"))
    if index_dir:
        digest = hashlib.sha1(data_path.encode("utf-8")).hexdigest()[:12]
        return io.join(io.absolute(index_dir), f"{name}-{digest}")
    return io.join(data_path, "." + name)


def read_text(path):
    """The index's text, or None if there is none (or it cannot be read)."""
    try:
        return io.read_text(path)
    except (tf.errors.OpError, UnicodeDecodeError):
        return None


def write_text(path, text):
    """Writes the index atomically; True if written, a warning if not."""
    try:
        io.write_text_atomic(path, text)
        return True
    except (tf.errors.OpError, OSError) as e:
        log.warning("could not write the dataset index %s (%s): it is kept in this process "
                    "only; pass --index_dir=DIR (a writable folder) to keep it",
                    path, type(e).__name__)
        return False
