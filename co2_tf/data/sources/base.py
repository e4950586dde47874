"""What every data source answers: the interface the pipelines in co2_tf.data.pipelines use.

One class per dataset kind (builtin, folder, tfds, tfrecord), in the shape of
big_vision's `datasets/core.py` DataSource. A source knows its splits' sizes,
class names and labels, its usual held-out split, and how to read its images
as uint8 RGB [h, w, 3]; `co2_tf.data.pipelines` builds the pretraining and labelled
pipelines from that, never asking which kind it has.

Two ways of reading:

- indexed sources (``indexed = True``: builtin, folder) give example i of a
  split as a function of i: the pretraining pipeline's index contract (exact
  resume, replica-count independence) needs that;
- streaming sources (tfds, tfrecord) give a sharded, file-shuffled stream of
  ENCODED images (`stream`, `pretrain_stream`), decoded by `decode` after
  every shuffle: shuffle buffers hold bytes (~110 KB an ImageNet JPEG), not
  pixels (~0.5 MB decoded).
"""

import numpy as np
import tensorflow as tf

from co2_tf.data import image_files
from co2_tf.errors import UserError

# Examples in the shuffle buffer of streaming sources (encoded images).
SHUFFLE_BUFFER = 10_000


class Source:
    """A dataset of one kind; `spec` is its parsed `DatasetSpec`."""

    indexed = True
    # Everything in memory: the end-of-training kNN summary costs seconds, so
    # training reports it even with --knn_every=0.
    in_memory = False
    # Whether reading an example can fail at run time (a damaged file):
    # labelled pipelines then drop it.
    may_fail = False
    # Held-out split names tried, in order, by default_eval_split.
    eval_split_candidates = ()

    def __init__(self, spec, data_dir=None, max_image_pixels=None, progress=None, options=None):
        from co2_tf.data.sources import ReadOptions  # noqa: PLC0415 (the package imports us)

        self.spec = spec
        self.options = options or ReadOptions()
        self.progress = progress  # a co2_tf.progress.Reporter for long scans (None = silent)
        self.data_dir = data_dir or None
        # Image files over this many pixels: decoded smaller or skipped (co2_tf.data.image_files).
        self.max_image_pixels = (image_files.DEFAULT_MAX_PIXELS if max_image_pixels is None
                                 else max_image_pixels)

    def __str__(self):
        return str(self.spec)

    # ------------------------------------------------------------- queries
    def validate(self, split="train"):
        """Cheap checks that `split` can be read; raises UserError."""
        raise NotImplementedError

    def num_examples(self, split="train"):
        """Number of examples in `split`."""
        raise NotImplementedError

    def class_names(self, split="train"):
        """Class names, index = label; UserError for unlabelled data."""
        raise NotImplementedError

    def labels(self, split):
        """int32 labels of every example of `split`, in the order indices use. No decoding."""
        raise NotImplementedError

    def default_eval_split(self):
        """The dataset's usual labelled held-out split; UserError naming the fix if none."""
        for name in self.eval_split_candidates:
            try:
                self.validate(name)
                return name
            except UserError:
                continue
        raise UserError(f"--dataset={self.spec} has no {', '.join(self.eval_split_candidates)} "
                        "split: pass --eval_split")

    def standard_label_subset(self, split, fraction):
        """A Source of the published label subset for `fraction` of `split`, or None."""
        return None

    # ------------------------------------------------------- indexed reading
    def example_fn(self, split, image_size):
        """fn(position: int64 tensor) -> (uint8 RGB image [h, w, 3], int32 label)."""
        raise NotImplementedError

    def image_stream(self, split, source_of, image_size, num_parallel_calls):
        """(image, c) for c = 0, 1, 2, ...: example source_of(c), in order, never missing."""
        example = self.example_fn(split, image_size)
        return tf.data.Dataset.counter(0, 1, dtype=tf.int64).map(
            image_files.no_autograph(lambda c: (example(source_of(c))[0], c)),
            num_parallel_calls=num_parallel_calls, deterministic=True)

    def images(self, split, positions, image_size):
        """uint8 RGB images of these positions (eager, e.g. for a preview)."""
        example = self.example_fn(split, image_size)
        return [example(tf.constant(int(p), tf.int64))[0] for p in positions]

    # ----------------------------------------------------- streaming reading
    def stream(self, split, *, input_context=None, shuffle_files=False, seed=0,
               with_labels=True, options=None):
        """(encoded image, int32 label) examples, or encoded images alone (streaming sources).

        Every example once, in file order (the order `labels` lists), or
        with the files in an order chosen by `seed`; this pipeline's share
        of the files under an `input_context`.
        """
        raise NotImplementedError

    def decode(self, encoded):
        """An element of `stream` -> uint8 RGB [h, w, 3]."""
        raise NotImplementedError

    def pretrain_stream(self, split, *, input_context, seed, start):
        """Encoded images of this input pipeline, forever, from its element `start` on.

        Element c of a pipeline depends on (seed, pipeline, c) only where the
        source says so (`exact_resume`); otherwise a restart gives another order.
        """
        raise NotImplementedError

    # Whether pretrain_stream's element c is a function of (seed, pipeline, c).
    exact_resume = False


def as_int32(labels):
    return np.asarray(labels, np.int32)
