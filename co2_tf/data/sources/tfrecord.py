"""TFRecord shards: ``tfrecord:GLOB``, the Model Garden / TPU ImageNet layout.

Each record is a tf.train.Example with the encoded image (JPEG, PNG, ...)
under ``image/encoded`` and an int64 label under ``image/class/label``
(other names: --tfrecord_image_key, --tfrecord_label_key). Class index =
stored label - --tfrecord_label_offset, default 1: the TPU ImageNet records
label 1..1000 (0 was "background"), and tools/make_tfrecords.py writes the
same. Local paths, file:// and gs:// (anything tf.io.gfile reads).

Splits: GLOB names the shards of the split its file name starts with
(train, validation, val or test; any other name: train), e.g.
``tfrecord:/data/imagenet/train-*``; another split replaces that name:
``validation`` reads ``/data/imagenet/validation-*``. ``{split}`` in GLOB
marks the place explicitly (``tfrecord:gs://b/{split}/part-*``). Shards are
read in sorted name order (``train-00000-of-01024`` ...).

Class names: ``classes.txt`` beside the shards (line k: the name of class k),
if there is one; else "0", "1", ...

The record index: sizes, kNN and exact resume need each shard's record
count (and the labels, for `labels`) without reading 140 GB at every start.
They are read once and kept in ``.co2_tf_records.json`` beside the shards
(or under --index_dir; co2_tf.data.index_files), keyed by shard name and size: a
shard of another size is read again. tools/make_tfrecords.py writes it as it
writes the shards.

Pretraining order (`pretrain_stream`): input pipeline p of P reads shards
p, p + P, ... (file level: needs at least P shards). Its epoch e reads them
in an order drawn from (seed, p, e), one after another, cut into blocks of
BLOCK consecutive records; each block is permuted by (seed, p, e, block).
That block is the shuffle buffer (encoded images: ~1.1 GB at ImageNet's
~110 KB; up to three in memory: the one served, the next, the one being
read). Unlike a shuffle buffer it makes element c of the stream a function
of (seed, p, c) alone, so a restart at element c skips whole shards by their
counts, reads again at most one shard's records before the block and the
block (it is permuted whole), and continues at the exact record. Records are
only mixed within a block: shards should hold records in random order (the TPU
conversion script and make_tfrecords shuffle before writing). A record whose
image fails to decode stops pretraining (labelled pipelines drop it). Each
pipeline reads its shards one after another (READ_BUFFER read-ahead): whether
one stream per host keeps up with an accelerator on gs:// is unmeasured.
"""

import concurrent.futures
import functools
import json
import logging
import os

import numpy as np
import tensorflow as tf

from co2_tf import io
from co2_tf import progress as progress_lib
from co2_tf.data import image_files, index_files
from co2_tf.data.sources import base
from co2_tf.errors import UserError

log = logging.getLogger(__name__)
gfile = tf.io.gfile

SPLIT_NAMES = ("train", "validation", "val", "test")
CLASSES_FILE = "classes.txt"
INDEX_NAME = "co2_tf_records.json"
INDEX_VERSION = 1
# Records permuted together in a pretraining stream (module docstring).
BLOCK = base.SHUFFLE_BUFFER
READ_BUFFER = 8 << 20  # bytes read ahead per open shard


def split_pattern(glob, split):
    """The shard pattern of `split` (module docstring); UserError if GLOB names one split only."""
    if "{split}" in glob:
        return glob.replace("{split}", split)
    folder, name = os.path.split(glob)  # string handling: right for URIs too
    own = next((s for s in sorted(SPLIT_NAMES, key=len, reverse=True)
                if name.startswith(s) and not name[len(s):][:1].isalpha()), None)
    if own is None:
        if split == "train":
            return glob
        raise UserError(f"tfrecord:{glob} names no split (its file name does not start with "
                        f"{', '.join(SPLIT_NAMES)}), so split {split!r} has no shards: use "
                        "{split} in the pattern, e.g. tfrecord:DIR/{split}-*")
    return os.path.join(folder, split + name[len(own):])


def _shard_sizes(files):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda f: int(gfile.stat(f).length), files))


def _read_labels(files, label_key, parallel, progress):
    """Raw labels of every record, one int64 array per shard (reads every record once)."""
    feature = {label_key: tf.io.FixedLenFeature([], tf.int64)}

    def read(k, path):
        return tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER).map(
            lambda r: (k, tf.io.parse_single_example(r, feature)[label_key]))
    ds = tf.data.Dataset.from_tensor_slices(list(files)).enumerate().interleave(
        image_files.no_autograph(read), cycle_length=parallel, num_parallel_calls=parallel,
        deterministic=True).batch(4096)
    task = progress_lib.reporter(progress).task(
        f"counting the records of {len(files)} shard(s)", unit="records")
    shard_ids, labels = [], []
    try:
        for k, lab in ds.as_numpy_iterator():
            shard_ids.append(k)
            labels.append(lab)
            task.add(len(k))
    except tf.errors.InvalidArgumentError as e:
        raise UserError(f"records of {files[0]} ... have no int64 feature {label_key!r} "
                        f"({str(e).splitlines()[0][:120]}): pass --tfrecord_label_key") from None
    except tf.errors.DataLossError as e:
        raise UserError(f"a shard among {files[0]} ... is damaged ({str(e).splitlines()[0]}): "
                        "write it again (tools/make_tfrecords.py resumes)") from None
    shard_ids = np.concatenate([np.zeros([0], np.int64)] + shard_ids)
    labels = np.concatenate([np.zeros([0], np.int64)] + labels)
    task.done(len(labels))
    order = np.argsort(shard_ids, kind="stable")  # each shard's records keep their order
    counts = np.bincount(shard_ids, minlength=len(files))
    return np.split(labels[order], np.cumsum(counts)[:-1])


def index_entry(size, labels, label_key):
    """One shard's entry in the record index."""
    return {"size": int(size), "count": len(labels), "label_key": label_key,
            "labels": [int(x) for x in labels]}


def update_index(folder, entries, index_dir=""):
    """Adds `entries` (shard name -> index_entry) to the record index of `folder`."""
    path = index_files.index_path(folder, INDEX_NAME, index_dir)
    index = _load_index(path)
    index["shards"].update(entries)
    index_files.write_text(path, json.dumps(index, separators=(",", ":")))


def _load_index(path):
    text = index_files.read_text(path)
    try:
        index = json.loads(text) if text else None
    except ValueError:
        index = None
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        return {"version": INDEX_VERSION, "shards": {}}
    return index


@functools.lru_cache(maxsize=16)
def _shard_labels(files, label_key, index_dir, parallel, progress=progress_lib.OFF):
    """Raw labels per shard, from the index where it is current, else read and indexed."""
    sizes = _shard_sizes(files)
    by_folder = {}
    for k, f in enumerate(files):
        by_folder.setdefault(io.parent(f), []).append(k)
    labels = [None] * len(files)
    for folder, ks in by_folder.items():
        shards = _load_index(index_files.index_path(folder, INDEX_NAME, index_dir))["shards"]
        for k in ks:
            entry = shards.get(io.basename(files[k]))
            if (isinstance(entry, dict) and entry.get("size") == sizes[k]
                    and entry.get("label_key") == label_key
                    and len(entry.get("labels", ())) == entry.get("count")):
                labels[k] = np.asarray(entry["labels"], np.int64)
        missing = [k for k in ks if labels[k] is None]
        if missing:
            read = _read_labels([files[k] for k in missing], label_key, parallel, progress)
            for k, lab in zip(missing, read):
                labels[k] = lab
            update_index(folder, {io.basename(files[k]): index_entry(sizes[k], labels[k],
                                                                     label_key)
                                  for k in missing}, index_dir)
    return tuple(labels)


class TfrecordSource(base.Source):
    """Sharded tf.train.Example records: streaming, exactly resumable pretraining."""

    indexed = False
    may_fail = True
    exact_resume = True
    eval_split_candidates = ("validation", "val", "test")

    # ------------------------------------------------------------- files
    def pattern(self, split):
        return io.absolute(split_pattern(self.spec.path, split))

    @functools.cache  # noqa: B019 (one source per run: its shard list is listed once)
    def shards(self, split):
        """The split's shard paths, sorted."""
        pattern = self.pattern(split)
        try:
            files = sorted(gfile.glob(pattern))
        except tf.errors.OpError:
            files = []
        if not files:
            raise UserError(f"no TFRecord shards match {pattern} (split {split!r}): check "
                            "the path in tfrecord:GLOB")
        return tuple(files)

    def shard_labels(self, split):
        """Raw stored labels, one array per shard (the record index)."""
        from co2_tf.data import pipelines  # noqa: PLC0415 (pipelines imports the sources)

        return _shard_labels(self.shards(split), self.options.tfrecord_label_key,
                             self.options.index_dir, pipelines.num_parallel_calls(self),
                             progress_lib.reporter(self.progress))

    def counts(self, split):
        return np.array([len(lab) for lab in self.shard_labels(split)], np.int64)

    def _features(self, with_labels=True):
        o = self.options
        features = {o.tfrecord_image_key: tf.io.FixedLenFeature([], tf.string)}
        if with_labels:
            features[o.tfrecord_label_key] = tf.io.FixedLenFeature([], tf.int64)
        return features

    def parse_fn(self, with_labels=True):
        """record -> encoded image, or (encoded image, int32 class index)."""
        o = self.options
        features = self._features(with_labels)

        def parse(record):
            ex = tf.io.parse_single_example(record, features)
            if not with_labels:
                return ex[o.tfrecord_image_key]
            label = ex[o.tfrecord_label_key] - o.tfrecord_label_offset
            return ex[o.tfrecord_image_key], tf.cast(label, tf.int32)
        return image_files.no_autograph(parse)

    # ------------------------------------------------------------- queries
    def validate(self, split="train"):
        first = self.shards(split)[0]
        try:
            for record in tf.data.TFRecordDataset(first).take(1):
                tf.io.parse_single_example(record, self._features())
        except tf.errors.InvalidArgumentError:
            o = self.options
            raise UserError(f"the records of {first} have no bytes feature "
                            f"{o.tfrecord_image_key!r} or int64 feature "
                            f"{o.tfrecord_label_key!r}: pass --tfrecord_image_key / "
                            "--tfrecord_label_key") from None
        except tf.errors.DataLossError:
            raise UserError(f"{first} is not a TFRecord file (or damaged): check "
                            "tfrecord:GLOB") from None
        self.labels(split)

    def num_examples(self, split="train"):
        return int(self.counts(split).sum())

    @functools.cache  # noqa: B019
    def labels(self, split):
        raw = np.concatenate([np.zeros([0], np.int64)] + list(self.shard_labels(split)))
        offset = self.options.tfrecord_label_offset
        if raw.size and raw.min() < offset:
            raise UserError(f"{self.pattern(split)} has label {raw.min()}, below "
                            f"--tfrecord_label_offset={offset} (class = label - offset): "
                            f"pass --tfrecord_label_offset={raw.min()}")
        return base.as_int32(raw - offset)

    def classes_file(self, split):
        return io.join(io.parent(self.shards(split)[0]), CLASSES_FILE)

    def class_names(self, split="train"):
        path = self.classes_file(split)
        labels = self.labels(split)
        if gfile.exists(path):
            names = [line.strip() for line in io.read_text(path).splitlines() if line.strip()]
            if labels.size and labels.max() >= len(names):
                raise UserError(f"{path} names {len(names)} classes but {self.pattern(split)} "
                                f"has class {labels.max()}: fix the file or "
                                "--tfrecord_label_offset")
            return names
        return [str(k) for k in range(int(labels.max()) + 1 if labels.size else 0)]

    # ------------------------------------------------------------- reading
    def _share(self, split, input_context):
        """(shard paths, record counts) of this input pipeline: shards p, p + P, ..."""
        files, counts = np.array(self.shards(split)), self.counts(split)
        if input_context is None:
            return files, counts
        p, n = input_context.input_pipeline_id, input_context.num_input_pipelines
        if len(files) < n:
            raise UserError(f"{self.pattern(split)} has {len(files)} shard(s) for {n} input "
                            "pipelines (workers), which divide shards between them: write at "
                            f"least {n} shards (tools/make_tfrecords.py --num_shards)")
        return files[p::n], counts[p::n]

    def stream(self, split, *, input_context=None, shuffle_files=False, seed=0,
               with_labels=True, options=None):
        files, _ = self._share(split, input_context)
        if shuffle_files:
            files = files[np.random.RandomState(seed % 2**32).permutation(len(files))]
        ds = tf.data.TFRecordDataset(list(files), buffer_size=READ_BUFFER)
        ds = ds.map(self.parse_fn(with_labels))
        return ds.with_options(options) if options is not None else ds

    def decode(self, encoded):
        return image_files.decode_image(encoded, self.max_image_pixels)

    def pretrain_stream(self, split, *, input_context, seed, start):
        """This pipeline's encoded images from element `start` on (module docstring)."""
        files, counts = self._share(split, input_context)
        n = int(counts.sum())
        if n == 0:
            raise UserError(f"the shards of input pipeline {input_context.input_pipeline_id} "
                            f"of {self.pattern(split)} hold no records: write more records "
                            "or fewer shards")
        key = (int(seed) * 1000003 + input_context.input_pipeline_id) % 2**62
        blocks_per_epoch = -(-n // BLOCK)
        files_t = tf.constant(files)
        counts_t = tf.constant(counts, tf.int64)
        last = tf.constant(len(files) - 1, tf.int64)
        parse = self.parse_fn(with_labels=False)

        def read(path, skip):
            return tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER).skip(skip).map(parse)

        def epoch(e, first_block):
            order = tf.random.experimental.index_shuffle(
                tf.range(len(files), dtype=tf.int64), tf.stack([tf.constant(key, tf.int64), e]),
                last)
            paths, sizes = tf.gather(files_t, order), tf.gather(counts_t, order)
            ends = tf.cumsum(sizes)
            first = first_block * BLOCK
            k = tf.searchsorted(ends, first[None], side="right")[0]
            skips = tf.tensor_scatter_nd_update(tf.zeros_like(sizes), [[k]],
                                                [first - (ends[k] - sizes[k])])
            records = tf.data.Dataset.from_tensor_slices((paths[k:], skips[k:])).flat_map(
                image_files.no_autograph(read))

            def permute(b, block):
                m = tf.shape(block, out_type=tf.int64)[0]
                perm = tf.random.experimental.index_shuffle(
                    tf.range(m), tf.stack([tf.constant(key, tf.int64),
                                           e * blocks_per_epoch + b]), m - 1)
                return tf.gather(block, perm)
            blocks = records.batch(BLOCK).enumerate(first_block).prefetch(1)
            return blocks.map(image_files.no_autograph(permute)).unbatch()

        e0, r0 = divmod(int(start), n)
        b0, skip = divmod(r0, BLOCK)
        head = epoch(tf.constant(e0, tf.int64), tf.constant(b0, tf.int64)).skip(skip)
        rest = tf.data.Dataset.counter(e0 + 1, 1, dtype=tf.int64).flat_map(
            image_files.no_autograph(lambda e: epoch(e, tf.constant(0, tf.int64))))
        return head.concatenate(rest)

    def images(self, split, positions, image_size):
        """The first len(positions) images of the split, in file order."""
        ds = self.stream(split, with_labels=False).take(len(positions))
        return [self.decode(encoded) for encoded in ds]
