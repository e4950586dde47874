"""Writes an image folder or a TFDS split as TFRecord shards that ``tfrecord:`` reads.

The layout is the Model Garden / TPU ImageNet one (co2_tf.data.sources.tfrecord):
shards ``SPLIT-00000-of-00042`` of tf.train.Example records with the image
file's bytes unchanged under ``image/encoded``, ``image/class/label`` =
class index + label_offset (1 by default, as the TPU ImageNet records),
``image/format`` and ``image/filename``; ``classes.txt`` (one class name a
line) and the record index beside them, so the first ``tfrecord:`` start
reads no record to count them.

Records are in a random order drawn from `seed` (a shuffle across the whole
split for folders; TFDS splits are already shuffled when prepared, and each
shard's records are permuted again), since the reader only mixes records
within blocks of consecutive ones. Resumable: a shard is written to a
temporary name and renamed when complete, finished shards are kept, and a
manifest (``.SPLIT.make_tfrecords.json``) of what is written refuses to
continue over shards of other inputs. Everything goes through tf.io.gfile.
"""

import concurrent.futures
import hashlib

import numpy as np
import tensorflow as tf

from co2_tf import io
from co2_tf import progress as progress_lib
from co2_tf.data.sources import tfrecord
from co2_tf.errors import UserError

gfile = tf.io.gfile
IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"


def shard_name(split, k, num_shards):
    return f"{split}-{k:05d}-of-{num_shards:05d}"


def example(encoded, label, filename=""):
    """A serialized tf.train.Example of the layout."""
    fmt = b"jpeg" if encoded[:3] == b"\xff\xd8\xff" else b"png" if encoded[:4] == b"\x89PNG" \
        else b""

    def feature(**kind):
        return tf.train.Feature(**kind)
    features = {
        IMAGE_KEY: feature(bytes_list=tf.train.BytesList(value=[encoded])),
        LABEL_KEY: feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "image/format": feature(bytes_list=tf.train.BytesList(value=[fmt])),
        "image/filename": feature(bytes_list=tf.train.BytesList(
            value=[filename.encode("utf-8")])),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _write_shard(path, records):
    """Writes the shard under a temporary name, then renames it: a shard either is complete
    or is not there."""
    tmp = io.temporary_name(path)
    try:
        with tf.io.TFRecordWriter(tmp) as writer:
            for record in records:
                writer.write(record)
        gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        if gfile.exists(tmp):
            gfile.remove(tmp)
        raise


def _check_manifest(output_dir, split, manifest):
    """Records what the shards in output_dir are of; UserError if they are of other inputs."""
    path = io.join(output_dir, f".{split}.make_tfrecords.json")
    if gfile.exists(path):
        old = io.read_json(path)
        if old != manifest:
            raise UserError(f"{output_dir} holds {split} shards of other inputs or settings "
                            f"({path}): use another --output_dir, or delete them to start over")
    else:
        io.write_json_atomic(path, manifest)


def write_split(output_dir, split, num_examples, class_names, shard_records, *, num_shards,
                manifest, progress=None):
    """Writes the shards of `split` (their name prefix) not yet written; returns all their paths.

    shard_records(k) -> (records, labels) of shard k, labels as written.
    """
    if num_shards < 1 or num_shards > max(1, num_examples):
        raise UserError(f"--num_shards={num_shards} must be in [1, {num_examples}] (the "
                        "number of images)")
    gfile.makedirs(output_dir)
    _check_manifest(output_dir, split, dict(manifest, num_shards=num_shards,
                                            num_examples=num_examples))
    io.write_text_atomic(io.join(output_dir, tfrecord.CLASSES_FILE),
                         "".join(name + "\n" for name in class_names))
    paths = [io.join(output_dir, shard_name(split, k, num_shards)) for k in range(num_shards)]
    task = progress_lib.reporter(progress).task(f"writing {split} shards", num_shards,
                                                unit="shards")
    entries = {}
    for k, path in enumerate(paths):
        if gfile.exists(path):
            task.update(k + 1)
            continue  # finished before: its index entry is made below
        records, labels = shard_records(k)
        _write_shard(path, records)
        entries[io.basename(path)] = tfrecord.index_entry(io.size(path), labels, LABEL_KEY)
        task.update(k + 1)
    task.done(num_shards)
    for k, path in enumerate(paths):
        if io.basename(path) not in entries:
            _, labels = shard_records(k, labels_only=True)
            entries[io.basename(path)] = tfrecord.index_entry(io.size(path), labels, LABEL_KEY)
    tfrecord.update_index(output_dir, entries)
    return paths


def _digest(items):
    return hashlib.sha1("\n".join(items).encode("utf-8")).hexdigest()


def folder_to_shards(source, split, output_dir, *, num_shards, label_offset=1, seed=0,
                     output_split=None, progress=None):
    """The images of a folder: Source's split (co2_tf.data.sources.folder) as shards."""
    files, labels = source.files(split), source.labels(split)
    order = np.random.RandomState(seed).permutation(len(files))
    parts = np.array_split(order, num_shards)
    root = source.root(split)

    def shard_records(k, labels_only=False):
        written = [int(labels[i]) + label_offset for i in parts[k]]
        if labels_only:
            return None, written
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            contents = list(pool.map(io.read_bytes, [files[i] for i in parts[k]]))
        names = [files[i][len(root):].lstrip("/") for i in parts[k]]
        return [example(c, lab, name) for c, lab, name in zip(contents, written, names)], written
    manifest = {"source": f"folder:{root}", "files": _digest(files), "seed": seed,
                "label_offset": label_offset}
    return write_split(output_dir, output_split or split, len(files),
                       source.class_names(split), shard_records, num_shards=num_shards,
                       manifest=manifest, progress=progress)


def tfds_to_shards(source, split, output_dir, *, num_shards, label_offset=1, seed=0,
                   output_split=None, progress=None):
    """A TFDS split (already shuffled when prepared) as shards of contiguous slices."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy, optional)

    n = source.num_examples(split)
    bounds = np.linspace(0, n, num_shards + 1).round().astype(int)

    def shard_records(k, labels_only=False):
        ds = tfds.load(source.name, split=f"{split}[{bounds[k]}:{bounds[k + 1]}]",
                       data_dir=source.data_dir, download=False, shuffle_files=False,
                       decoders={"image": tfds.decode.SkipDecoding()})
        pairs = [(ex["image"], int(ex["label"]) + label_offset)
                 for ex in ds.as_numpy_iterator()]
        perm = np.random.RandomState([seed, k]).permutation(len(pairs))
        pairs = [pairs[i] for i in perm]
        written = [lab for _, lab in pairs]
        if labels_only:
            return None, written
        return [example(c, lab) for c, lab in pairs], written
    manifest = {"source": f"tfds:{source.name}", "seed": seed, "label_offset": label_offset}
    return write_split(output_dir, output_split or split, n, source.class_names(split),
                       shard_records, num_shards=num_shards, manifest=manifest, progress=progress)

