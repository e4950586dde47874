"""tf.data input pipelines: pretraining (two views) and labelled (one view, a label).

The pipelines ask the dataset's `Source` (co2_tf.data.sources) for everything that
depends on its kind: sizes, labels, and how to read an image.

Pretraining input: the index contract
-------------------------------------
`pretrain_dataset_fn` returns a ``dataset_fn(input_context)`` for
`strategy.distribute_datasets_from_function`. For indexed sources (builtin,
folder) the pipeline is index based and fully deterministic:

- global example index ``i = step * B + r * b + j`` (B the global batch, b the
  per-replica batch, r the global replica id, j in [0, b));
- pipeline p (of P) serves replicas p*L .. p*L+L-1 (L = replicas / P) and
  yields their batches in turn: its k-th batch (k = t*L + l) is replica
  p*L+l's batch at step ``start_step + t``;
- epoch ``e = i // N``; the example is
  ``index_shuffle(i % N, seed=[seed, e], max_index=N-1)``: a fresh permutation
  each epoch, every example exactly once per epoch;
- the augmentation seed of element i is ``[seed, i]``; with
  ``augment_on="device"`` the pipeline does only the crops (uint8) and the
  train step the rest with the same seeds (co2_tf.data.augment_device).

So the global batch at step s does not depend on the number of replicas or
pipelines, and ``start_step=s`` resumes exactly where an uninterrupted run
would be. A damaged image file is replaced by a plain mid-gray image, so the
contract still holds (see co2_tf.data.image_files). For streaming sources (tfds,
tfrecord) each input pipeline reads its share of the files
(`Source.pretrain_stream`): its element c is augmented with seed
``[seed, c * 1024 + pipeline]``; tfrecord's stream is a function of
(seed, pipeline, c), so a restart at `start_step` continues at the exact
record (co2_tf.data.sources.tfrecord); tfds's is the standard one (file shuffling,
a shuffle buffer) and NOT exactly resumable mid-epoch: after a restart the
order differs. Streams carry encoded images through every shuffle buffer and
are decoded after it. With ``augment_on="device"`` there, the crops are
seeded by the stream's counter and the rest by the global index:
independent draws of the same distributions.

Performance: tf.data autotune is OFF (it was slower on a 2-core machine), so
parallelism is explicit (the usable cores, or the source's
``input_threads``) and prefetch is 2 batches. Maps are ordered
(deterministic=True), which the index contract needs; deterministic=False
was no faster. Measured: docs/performance.md.
"""
import logging
import os

import numpy as np
import tensorflow as tf

from co2_tf.data import augment as _augment
from co2_tf.data import augment_device
from co2_tf.data.image_files import no_autograph
from co2_tf.data.sources import base, make_source
from co2_tf.errors import UserError

log = logging.getLogger(__name__)

# Shuffle buffer (examples, encoded) of streaming sources.
STREAM_SHUFFLE_BUFFER = base.SHUFFLE_BUFFER
TRANSFORMS = ("eval", "classifier_train")


def num_parallel_calls(source=None):
    """Parallel calls of the maps: explicit, since autotune is disabled.

    The source's ``input_threads`` option if set, else the cores this process may use.
    """
    threads = getattr(getattr(source, "options", None), "input_threads", 0)
    if threads:
        return int(threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def pretraining_data_warnings(source, split, queue_size):
    """Logs (and returns) one line for each way the data makes the run degenerate.

    Legal, but worth a word: one class (contrastive pretraining is fine, but
    kNN / linear evaluation on it measure nothing), and a queue at least as
    large as the split (it then holds older keys of the very images in the
    batch: each query's negatives include stale keys of its own image).
    """
    warnings = []
    try:
        names = source.class_names(split)
    except UserError:  # unlabelled data
        names = None
    if names is not None and len(names) == 1:
        warnings.append(f"--dataset={source} has one class ({names[0]}): contrastive "
                        "pretraining works, but kNN accuracy and linear / semi-supervised "
                        "evaluation on it are meaningless (always 100%)")
    n = source.num_examples(split)
    if queue_size >= n:
        warnings.append(f"--queue_size={queue_size} >= the {n} images of split {split!r}: the "
                        "queue holds older keys of the same images as the batch, so each "
                        "query's negatives include stale keys of its own image (MoCo assumes "
                        "K << dataset size); lower --queue_size")
    for line in warnings:
        log.warning("%s", line)
    return warnings


def pipeline_options():
    """tf.data options: autotune OFF (slower with it; measured: docs/performance.md).

    With autotune off, parallelism and prefetch sizes must be explicit.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return options


def steps_per_epoch(source, split="train", data_dir=None, *, global_batch_size):
    """N // B: the last partial batch is dropped (never a short batch)."""
    source = make_source(source, data_dir)
    n = source.num_examples(split)
    if global_batch_size > n:
        raise UserError(
            f"global batch size {global_batch_size} is larger than the "
            f"{n} examples of {source} {split}: lower --batch_size")
    return n // global_batch_size


def _global_index_fn(input_context, global_batch_size, start_step):
    """Maps a pipeline's element counter c to the global example index."""
    b = input_context.get_per_replica_batch_size(global_batch_size)
    pipelines = input_context.num_input_pipelines
    replicas = input_context.num_replicas_in_sync
    if replicas % pipelines:
        raise UserError(f"{replicas} replicas cannot be split evenly over "
                        f"{pipelines} input pipelines")
    local = replicas // pipelines
    first_replica = input_context.input_pipeline_id * local

    def index(c):
        k, j = c // b, c % b
        t, l = k // local, k % local
        return ((start_step + t) * global_batch_size
                + (first_replica + l) * b + j)
    return b, index


def source_index(i, n, seed):
    """Example for global index i: a fresh permutation of [0, n) per epoch."""
    epoch = i // n
    return tf.random.experimental.index_shuffle(
        i % n, tf.stack([tf.cast(seed, tf.int64), epoch]),
        tf.constant(n - 1, tf.int64))


def _views_fn(augment_on):
    """The per-image map: whole views (host) or the crops only (device)."""
    if augment_on not in ("host", "device"):
        raise UserError(f"augment_on={augment_on!r}: the pipeline takes host or device "
                        "(resolve auto with co2_tf.data.augment_device.resolve_placement)")
    return _augment.two_views if augment_on == "host" else augment_device.two_crops


def pretrain_dataset_fn(source, *, split="train", data_dir=None, image_size,
                        augment, seed, global_batch_size, start_step=0, augment_on="host"):
    """Returns dataset_fn(input_context) for distribute_datasets_from_function.

    `source` is a Source or a dataset spec (then read from data_dir). The
    dataset yields (view1, view2), b the per-replica batch, forever (see the
    module docstring for the index contract): float32 [b, S, S, 3] in [0, 1]
    with augment_on="host", the uint8 crops co2_tf.data.augment_device.ViewTransform
    finishes with "device". Raises UserError for a bad spec, recipe or batch size.
    """
    source = make_source(source, data_dir)
    recipe = augment
    _augment.check_recipe(recipe)
    views = _views_fn(augment_on)
    seed = int(seed)
    start_step = int(start_step)
    if not source.indexed:
        return _stream_pretrain_fn(source, split, image_size, recipe, seed,
                                   global_batch_size, start_step, views)
    steps_per_epoch(source, split, global_batch_size=global_batch_size)  # checks the batch
    n = source.num_examples(split)

    def dataset_fn(input_context=None):
        input_context = input_context or tf.distribute.InputContext()
        b, index = _global_index_fn(input_context, global_batch_size, start_step)
        par = num_parallel_calls(source)

        def aug(image, c):
            i = index(c)
            aug_seed = tf.stack([tf.constant(seed, tf.int64), i])
            return views(image, aug_seed, recipe, image_size)

        ds = source.image_stream(split, lambda c: source_index(index(c), n, seed),
                                 image_size, par)
        ds = ds.map(no_autograph(aug), num_parallel_calls=par, deterministic=True)
        ds = ds.batch(b, drop_remainder=True)
        ds = ds.prefetch(2)
        return ds.with_options(pipeline_options())
    return dataset_fn


def _stream_pretrain_fn(source, split, image_size, recipe, seed, global_batch_size,
                        start_step, views=_augment.two_views):
    source.validate(split)

    def dataset_fn(input_context=None):
        input_context = input_context or tf.distribute.InputContext()
        b = input_context.get_per_replica_batch_size(global_batch_size)
        pid = input_context.input_pipeline_id
        par = num_parallel_calls(source)
        local = (input_context.num_replicas_in_sync
                 // input_context.num_input_pipelines)
        # This pipeline's element counter at start_step: fresh, never reused
        # augmentation seeds per (seed, pipeline, element).
        start = start_step * local * b
        ds = source.pretrain_stream(split, input_context=input_context, seed=seed, start=start)
        counter = tf.data.Dataset.counter(start, 1, dtype=tf.int64)
        ds = tf.data.Dataset.zip(ds, counter)

        def aug(encoded, k):
            aug_seed = tf.stack([tf.constant(seed, tf.int64),
                                 k * 1024 + pid])
            return views(source.decode(encoded), aug_seed, recipe, image_size)
        ds = ds.map(no_autograph(aug), num_parallel_calls=par, deterministic=True)
        ds = ds.batch(b, drop_remainder=True)
        ds = ds.prefetch(2)
        return ds.with_options(pipeline_options())
    return dataset_fn


def labelled_dataset(source, *, split, data_dir=None, image_size, batch_size,
                     transform="eval", seed=0, drop_remainder=False,
                     indices=None, skip_batches=0):
    """(image float32 [b, S, S, 3] in [0, 1], label int32 [b]), one pass.

    transform "eval": resize + centre crop, dataset order. "classifier_train"
    (linear probe and fine-tuning): RandomResizedCrop(0.08-1) + flip, in a
    permutation of the dataset chosen by `seed` (pass e.g. the epoch number
    for a fresh order each epoch). indices: only these examples (positions in
    the split's order, as `Source.labels` lists them), e.g. a semi-supervised
    label subset; "eval" keeps the given order. Damaged image files are dropped.
    skip_batches: start at that batch (a resumed epoch), with the very batches
    and augmentation a full pass gives from there on; skipped examples of
    indexed sources are not even read.
    """
    source = make_source(source, data_dir)
    if transform not in TRANSFORMS:
        raise UserError(f"unknown transform {transform!r}: use one of {', '.join(TRANSFORMS)}")
    par = num_parallel_calls(source)
    seed = int(seed)
    shuffle = transform == "classifier_train"

    def view(image, i):
        if transform == "eval":
            return _augment.eval_view(image, image_size)
        return _augment.classifier_train_view(
            image, tf.stack([tf.constant(seed, tf.int64), i]), image_size)

    if not source.indexed:
        # A subset names positions in the unshuffled file order.
        ds = source.stream(split, shuffle_files=shuffle and indices is None,
                           seed=seed).enumerate()
        if indices is not None:
            keep = np.zeros(source.num_examples(split), bool)
            keep[np.asarray(indices, np.int64)] = True
            keep = tf.constant(keep)
            ds = ds.filter(no_autograph(lambda i, ex: tf.gather(keep, i)))
        if shuffle:
            ds = ds.shuffle(STREAM_SHUFFLE_BUFFER, seed=seed)
        ds = ds.skip(skip_batches * batch_size)
        # Decoded after the shuffle: the buffer holds encoded images.
        ds = ds.map(no_autograph(lambda i, ex: (view(source.decode(ex[0]), i), ex[1])),
                    num_parallel_calls=par, deterministic=True)
        if source.may_fail:
            ds = ds.ignore_errors(log_warning=True)
    else:
        n = source.num_examples(split)
        chosen = None if indices is None else tf.constant(indices, tf.int64)
        if chosen is not None:
            n = len(indices)

        def pick(j):
            return j if chosen is None else tf.gather(chosen, j)
        # Positions, not examples, are skipped: the same i draws the same view.
        ds = tf.data.Dataset.range(min(skip_batches * batch_size, n), n)
        if shuffle:
            ds = ds.map(no_autograph(lambda i: (pick(source_index(i, n, seed)), i)))
        else:
            ds = ds.map(no_autograph(lambda i: (pick(i), i)))
        example = source.example_fn(split, image_size)

        def load(src, i):
            image, label = example(src)
            return view(image, i), label
        ds = ds.map(no_autograph(load), num_parallel_calls=par, deterministic=True)
        if source.may_fail:
            ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.prefetch(2)
    return ds.with_options(pipeline_options())
