"""Dataset specs and tf.data input pipelines.

Dataset specs (`parse_dataset_spec`):

- ``builtin``: the procedurally generated textures of `co2_tf.builtin`.
- ``tfds:NAME[/CONFIG]``: a TensorFlow Datasets dataset already prepared in
  `data_dir` (co2_tf never downloads: `tfds build NAME --data_dir=DIR` first).
- ``folder:PATH``: image folders ``PATH/<class>/**/<image files>``. Files
  nested at any depth below a class folder belong to that class; classes are
  the sorted class-folder names. ``{split}`` in PATH is replaced by the split
  (``folder:/data/imagenet/{split}``); without it every split reads PATH.

Image folders
-------------
Files are recognised by extension (case-insensitive): .jpg .jpeg .jpe .jfif
.png .gif .bmp; anything else (.txt, .svg, audio, ...) is not listed.
JPEG (RGB, gray, CMYK, progressive), PNG (RGB, RGBA, gray, gray+alpha,
palette, 16-bit), GIF (first frame) and BMP decode to RGB uint8. Transparent
pixels are composited onto WHITE (255): what viewers and browsers show, and
what most images with transparency (icons, product shots) were made for.

Corrupt files, the design: listing checks each file cheaply, without
decoding: the magic number must match a supported format and the file must
end as that format ends (JPEG: an EOI marker in its last KiB; PNG: an IEND
chunk; GIF: the 0x3B trailer; BMP: at least the size its header declares).
This costs two small reads per file, done by a thread pool, once per folder
and process (measured here: 1.4 s for 20k page-cached files, so ~1.5 min
for ImageNet's 1.28M; more on a cold or network file system). It catches
what usually happens to image collections: empty and truncated files
(interrupted copies or downloads) and non-images with an image extension.
Files that fail are skipped, counted and reported ONCE per folder
and process (one logging warning: the count and up to 3 example paths).
A file that passes the check but still fails to decode (a damaged body) is
handled at run time without a crash: in pretraining it is replaced by a
plain mid-gray image (augmented as usual), so the index contract below still
holds; a warning names the first such file and
`runtime_decode_failures()` lists them all. In `labelled_dataset` it is
dropped (`ignore_errors`). A full decode of every file up front would catch
everything but costs a whole epoch of decoding on ImageNet-size folders.

Pretraining input: the index contract
-------------------------------------
`pretrain_dataset_fn` returns a ``dataset_fn(input_context)`` for
`strategy.distribute_datasets_from_function`. For builtin and folder data the
pipeline is index based and fully deterministic:

- global example index ``i = step * B + r * b + j`` (B the global batch, b the
  per-replica batch, r the global replica id, j in [0, b));
- pipeline p (of P) serves replicas p*L .. p*L+L-1 (L = replicas / P) and
  yields their batches in turn: its k-th batch (k = t*L + l) is replica
  p*L+l's batch at step ``start_step + t``;
- epoch ``e = i // N``; the example is
  ``index_shuffle(i % N, seed=[seed, e], max_index=N-1)``: a fresh permutation
  each epoch, every example exactly once per epoch;
- the augmentation seed of element i is ``[seed, i]``.

So the global batch at step s does not depend on the number of replicas or
pipelines, and ``start_step=s`` resumes exactly where an uninterrupted run
would be. For tfds the pipeline is the standard one (sharded by input
context, file shuffling, a shuffle buffer) and is NOT exactly resumable
mid-epoch: after a restart the order differs (augmentation seeds continue
from the global example count of `start_step`).

Performance (2 cores, MoCo v2 two views): tf.data autotune is OFF (STACK.md:
~270 vs ~190 img/s), so parallelism is explicit (the usable cores) and
prefetch is 2 batches. Maps are ordered (deterministic=True), which the
index contract needs; deterministic=False measured no faster here.
"""
import concurrent.futures
import dataclasses
import functools
import logging
import os

import numpy as np
import tensorflow as tf

from co2_tf import augment as _augment
from co2_tf import builtin
from co2_tf.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("builtin", "tfds", "folder")
SPEC_FORMS = "'builtin', 'tfds:NAME[/CONFIG]' or 'folder:PATH'"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp")
# Composited under transparent pixels (see the module docstring).
ALPHA_BACKGROUND = 255
# Largest side at which builtin images are generated; larger image sizes
# upscale them (keeps memory ~0.4 GB and generation ~10 s at 224 px).
BUILTIN_MAX_SOURCE = 128
# tfds shuffle buffer (examples) for pretraining.
TFDS_SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What to read: kind is "builtin", "tfds" or "folder"."""
    kind: str
    name: str = ""
    config: str = ""
    path: str = ""

    def __str__(self):
        if self.kind == "builtin":
            return "builtin"
        if self.kind == "tfds":
            return "tfds:" + self.tfds_name
        return "folder:" + self.path

    @property
    def tfds_name(self):
        """NAME or NAME/CONFIG as tfds.builder takes it."""
        return f"{self.name}/{self.config}" if self.config else self.name

    def folder_root(self, split):
        """The folder for `split` ({split} in the path replaced)."""
        return os.path.expanduser(self.path.replace("{split}", split))


def parse_dataset_spec(text):
    """Parses 'builtin', 'tfds:NAME[/CONFIG]' or 'folder:PATH'."""
    if isinstance(text, DatasetSpec):
        return text
    text = (text or "").strip()
    if text == "builtin":
        return DatasetSpec(kind="builtin", name="builtin")
    kind, sep, rest = text.partition(":")
    if sep and kind == "tfds":
        name, _, config = rest.strip().partition("/")
        if not name:
            raise UserError(f"dataset spec {text!r} has no dataset name: use "
                            "tfds:NAME[/CONFIG], e.g. tfds:cifar10")
        return DatasetSpec(kind="tfds", name=name, config=config)
    if sep and kind == "folder":
        if not rest.strip():
            raise UserError(f"dataset spec {text!r} has no path: use "
                            "folder:PATH with PATH/<class>/<images>")
        return DatasetSpec(kind="folder", path=rest.strip())
    raise UserError(f"unknown dataset spec {text!r}: use {SPEC_FORMS}")


# --------------------------------------------------------------------------
# Image folders.

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _file_looks_complete(path):
    """Cheap header/trailer check (see module docstring). Never raises."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError:
        return False
    if head.startswith(_JPEG_MAGIC):
        return b"\xff\xd9" in tail
    if head.startswith(_PNG_MAGIC):
        return b"IEND" in tail[-64:]
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return b"\x3b" in tail[-16:]
    if head[:2] == b"BM" and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return size >= declared and size > 26
    return False


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """A scanned image folder: sorted files, their labels, class names."""
    root: str
    class_names: tuple
    files: tuple
    labels: tuple
    skipped: tuple


def _is_image_name(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_folder(root):
    """Scans and checks `root/<class>/**/<images>` (cached per process).

    Raises UserError if the folder is missing, has no class folders, or a
    class folder has no image files.
    """
    return _list_folder_cached(os.path.abspath(root))


@functools.lru_cache(maxsize=16)
def _list_folder_cached(root):
    if not os.path.exists(root):
        raise UserError(f"image folder {root} does not exist: check the path "
                        "in folder:PATH")
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a directory: folder:PATH needs a "
                        "directory with one subfolder per class")
    classes = sorted(e.name for e in os.scandir(root)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {root} has no class subfolders: put "
                        "images in PATH/<class_name>/")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(
                os.path.join(root, name), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(os.path.join(dirpath, f) for f in filenames
                         if _is_image_name(f) and not f.startswith("."))
        if not found:
            raise UserError(
                f"class folder {os.path.join(root, name)} has no image files "
                f"({'/'.join(IMAGE_EXTENSIONS)}): add images or remove it")
        found.sort()
        files.extend(found)
        labels.extend([label] * len(found))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ok = list(pool.map(_file_looks_complete, files, chunksize=256))
    skipped = tuple(f for f, good in zip(files, ok) if not good)
    if skipped:
        log.warning(
            "%s: skipping %d corrupt or truncated image file(s), e.g. %s",
            root, len(skipped), ", ".join(skipped[:3]))
    kept = [(f, lab) for f, lab, good in zip(files, labels, ok) if good]
    present = {lab for _, lab in kept}
    for label, name in enumerate(classes):
        if label not in present:
            raise UserError(
                f"class folder {os.path.join(root, name)} has no readable "
                "image (all are corrupt or truncated): fix or remove it")
    return FolderListing(root=root, class_names=tuple(classes),
                         files=tuple(f for f, _ in kept),
                         labels=tuple(lab for _, lab in kept),
                         skipped=skipped)


def _nc(fn):
    """Skips AutoGraph for a tf.data function.

    The pipeline functions use explicit tf.cond / tf.switch_case, so
    conversion only costs time: it made building a pipeline ~3x slower.
    """
    return tf.autograph.experimental.do_not_convert(fn)


def _composite(rgb, alpha):
    a = tf.cast(alpha, tf.float32) / 255.0
    out = tf.cast(rgb, tf.float32) * a + ALPHA_BACKGROUND * (1.0 - a)
    return tf.cast(tf.round(out), tf.uint8)


def decode_image(contents):
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, 3] RGB.

    JPEG always decodes to 3 channels (libjpeg converts gray and CMYK);
    other formats decode as stored, 16-bit scaled to 8, alpha composited.
    """
    def jpeg():
        return tf.io.decode_jpeg(contents, channels=3)

    def other():
        img = tf.io.decode_image(contents, channels=0, dtype=tf.uint8,
                                 expand_animations=False)
        img = tf.ensure_shape(img, [None, None, None])
        return tf.switch_case(tf.shape(img)[-1] - 1, [
            lambda: tf.tile(img[..., :1], [1, 1, 3]),
            lambda: _composite(tf.tile(img[..., :1], [1, 1, 3]),
                               img[..., 1:2]),
            lambda: img[..., :3],
            lambda: _composite(img[..., :3], img[..., 3:4]),
        ])

    image = tf.cond(tf.io.is_jpeg(contents), jpeg, other)
    return tf.ensure_shape(image, [None, None, 3])


def _read_decode(path):
    return decode_image(tf.io.read_file(path))


_runtime_failures = set()


def _note_runtime_failures(paths):
    """py_function body: warns once per process, remembers every path."""
    paths = [p.decode("utf-8", "replace") for p in paths.numpy()]
    if not _runtime_failures:
        log.warning("%s failed to decode: replaced by a plain gray image "
                    "(later failures are not logged; see "
                    "co2_tf.data.runtime_decode_failures())", paths[0])
    _runtime_failures.update(paths)
    return True


def runtime_decode_failures():
    """Paths that failed to decode at run time in this process (a copy)."""
    return sorted(_runtime_failures)


def _decoded_stream(paths, source_of, par):
    """(uint8 image, c) for c = 0, 1, 2, ...: file source_of(c), decoded.

    Decode errors cannot be caught inside a map function, so the decode map
    is followed by `ignore_errors` (a failed element disappears) and a scan
    finds the gaps, refilled with a plain mid-gray (128) image of the same
    size. A constant stand-in keeps every element a function of its index
    alone, so the index contract holds exactly. The scan + unbatch cost is
    lost in the noise; a nested one-element dataset per image (the other
    way to catch errors) measured ~1 CPU-ms/image more (~14% at 224 px).
    """
    def decode(c):
        return _read_decode(tf.gather(paths, source_of(c))), c

    ds = tf.data.Dataset.counter(0, 1, dtype=tf.int64).map(
        _nc(decode), num_parallel_calls=par, deterministic=True)
    ds = ds.ignore_errors()
    # Pairs each element with the previous surviving counter value.
    ds = ds.scan(tf.constant(-1, tf.int64),
                 _nc(lambda prev, elem: (elem[1], (elem[0], prev, elem[1]))))

    def refill(image, prev, c):
        missing = tf.range(prev + 1, c, dtype=tf.int64)
        noted = tf.cond(
            tf.size(missing) > 0,
            lambda: tf.py_function(
                _note_runtime_failures,
                [tf.gather(paths, tf.map_fn(source_of, missing))], tf.bool),
            lambda: tf.constant(True))
        with tf.control_dependencies([noted]):
            count = tf.cast(c - prev, tf.int32)

            def with_stand_ins():
                gray = tf.fill(tf.shape(image), tf.constant(128, tf.uint8))
                return tf.concat(
                    [tf.tile(gray[None], [count - 1, 1, 1, 1]), image[None]],
                    axis=0)
            images = tf.cond(count > 1, with_stand_ins, lambda: image[None])
        return images, tf.range(prev + 1, c + 1, dtype=tf.int64)

    return ds.map(_nc(refill)).unbatch()


# --------------------------------------------------------------------------
# Sizes, classes, validation.

def _tfds():
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy, optional)
    return tfds


def _tfds_builder(spec, data_dir):
    tfds = _tfds()
    try:
        return tfds.builder(spec.tfds_name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for unknown names
        raise UserError(
            f"tfds dataset {spec.tfds_name!r} not found ({type(e).__name__}): "
            "check the name with `tfds.list_builders()`") from None


def _tfds_info(spec, data_dir, split=None):
    builder = _tfds_builder(spec, data_dir)
    info = builder.info
    if split is None:
        return info
    try:
        # Builds the reader only (no data read, never downloads); fails
        # at once if the data is not prepared. Works under tfds mock_data.
        builder.as_dataset(split=split)
    except Exception as e:  # AssertionError / ValueError / tfds errors
        if split not in info.splits and info.splits:
            raise UserError(
                f"tfds dataset {spec.tfds_name} has no split {split!r}: use "
                f"one of {', '.join(sorted(info.splits))}") from None
        raise UserError(
            f"tfds dataset {spec.tfds_name} split {split!r} is not readable "
            f"in {builder.data_dir} ({type(e).__name__}): prepare it with "
            f"`tfds build {spec.tfds_name} --data_dir=DIR` and pass "
            "--data_dir=DIR (co2_tf never downloads)") from None
    return info


def _tfds_label_feature(spec, info):
    tfds = _tfds()
    feature = (info.features["label"] if "label" in info.features
               else None)
    if not isinstance(feature, tfds.features.ClassLabel):
        raise UserError(
            f"tfds dataset {spec.tfds_name} has no 'label' class feature: "
            "labelled evaluation needs a dataset with labels")
    return feature


def _check_tfds_image(spec, info):
    if "image" not in info.features:
        raise UserError(f"tfds dataset {spec.tfds_name} has no 'image' "
                        "feature: use an image classification dataset")


def validate(spec, data_dir=None, split="train"):
    """Cheap checks before training starts; raises UserError on problems."""
    spec = parse_dataset_spec(spec)
    if spec.kind == "builtin":
        builtin.num_examples(split)
    elif spec.kind == "folder":
        list_folder(spec.folder_root(split))
    else:
        _check_tfds_image(spec, _tfds_info(spec, data_dir, split))


def class_names(spec, data_dir=None, split="train"):
    """Class names, index = label."""
    spec = parse_dataset_spec(spec)
    if spec.kind == "builtin":
        return list(builtin.CLASS_NAMES)
    if spec.kind == "folder":
        return list(list_folder(spec.folder_root(split)).class_names)
    info = _tfds_info(spec, data_dir)
    return list(_tfds_label_feature(spec, info).names)


def num_classes(spec, data_dir=None):
    """Number of classes; UserError for datasets without labels."""
    return len(class_names(spec, data_dir))


def write_class_names(path, names):
    """Writes one class name per line (UTF-8), line index = label."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{n}\n" for n in names)


def train_examples(spec, split="train", data_dir=None):
    """Number of examples in `split`."""
    spec = parse_dataset_spec(spec)
    if spec.kind == "builtin":
        return builtin.num_examples(split)
    if spec.kind == "folder":
        return len(list_folder(spec.folder_root(split)).files)
    info = _tfds_info(spec, data_dir, split)
    if split in info.splits:
        return int(info.splits[split].num_examples)
    # Split sizes unknown to the metadata (e.g. under tfds mock_data).
    builder = _tfds_builder(spec, data_dir)
    n = int(builder.as_dataset(split=split).cardinality())
    if n < 0:
        raise UserError(f"cannot tell the size of tfds {spec.tfds_name} "
                        f"split {split!r}: prepare the dataset with tfds")
    return n


def steps_per_epoch(spec, split="train", data_dir=None, *,
                    global_batch_size):
    """N // B: the last partial batch is dropped (never a short batch)."""
    n = train_examples(spec, split, data_dir)
    if global_batch_size > n:
        raise UserError(
            f"global batch size {global_batch_size} is larger than the "
            f"{n} examples of {spec} {split}: lower --batch_size")
    return n // global_batch_size


# --------------------------------------------------------------------------
# Pipelines.

def num_parallel_calls():
    """Cores this process may use: explicit, since autotune is disabled."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def pipeline_options():
    """tf.data options: autotune OFF (measured: ~270 vs ~190 img/s here).

    With autotune off, parallelism and prefetch sizes must be explicit.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return options


def _builtin_images(split, image_size, seed):
    images, labels = builtin.load(split, min(image_size, BUILTIN_MAX_SOURCE),
                                  seed)
    return images, labels


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


def _source_index(i, n, seed):
    """Example for global index i: a fresh permutation of [0, n) per epoch."""
    epoch = i // n
    return tf.random.experimental.index_shuffle(
        i % n, tf.stack([tf.cast(seed, tf.int64), epoch]),
        tf.constant(n - 1, tf.int64))


def pretrain_dataset_fn(spec, *, split="train", data_dir=None, image_size,
                        augment, seed, global_batch_size, start_step=0):
    """Returns dataset_fn(input_context) for distribute_datasets_from_function.

    The dataset yields (view1, view2), float32 [b, S, S, 3] in [0, 1], b the
    per-replica batch, forever (see the module docstring for the index
    contract). Raises UserError for a bad spec, recipe or batch size.
    """
    spec = parse_dataset_spec(spec)
    augment_recipe = augment
    _augment.check_recipe(augment_recipe)
    seed = int(seed)
    start_step = int(start_step)
    if spec.kind == "tfds":
        return _tfds_pretrain_fn(spec, split, data_dir, image_size,
                                 augment_recipe, seed, global_batch_size,
                                 start_step)
    n = train_examples(spec, split, data_dir)
    if global_batch_size > n:
        raise UserError(
            f"global batch size {global_batch_size} is larger than the "
            f"{n} examples of {spec} {split}: lower --batch_size")

    if spec.kind == "builtin":
        images_np, _ = _builtin_images(split, image_size, seed=0)
    else:
        listing = list_folder(spec.folder_root(split))
        files = list(listing.files)

    def dataset_fn(input_context=None):
        input_context = input_context or tf.distribute.InputContext()
        b, index = _global_index_fn(input_context, global_batch_size,
                                    start_step)
        par = num_parallel_calls()

        def aug(image, i):
            aug_seed = tf.stack([tf.constant(seed, tf.int64), i])
            return _augment.two_views(image, aug_seed, augment_recipe,
                                      image_size)

        if spec.kind == "builtin":
            images = tf.constant(images_np)
            ds = tf.data.Dataset.counter(0, 1, dtype=tf.int64).map(
                _nc(lambda c: aug(tf.gather(
                    images, _source_index(index(c), n, seed)), index(c))),
                num_parallel_calls=par, deterministic=True)
        else:
            ds = _decoded_stream(
                tf.constant(files),
                lambda c: _source_index(index(c), n, seed), par)
            ds = ds.map(_nc(lambda image, c: aug(image, index(c))),
                        num_parallel_calls=par, deterministic=True)
        ds = ds.batch(b, drop_remainder=True)
        ds = ds.prefetch(2)
        return ds.with_options(pipeline_options())
    return dataset_fn


def _tfds_pretrain_fn(spec, split, data_dir, image_size, recipe, seed,
                      global_batch_size, start_step):
    info = _tfds_info(spec, data_dir, split)
    _check_tfds_image(spec, info)
    tfds = _tfds()

    def dataset_fn(input_context=None):
        input_context = input_context or tf.distribute.InputContext()
        b = input_context.get_per_replica_batch_size(global_batch_size)
        pid = input_context.input_pipeline_id
        par = num_parallel_calls()
        local = (input_context.num_replicas_in_sync
                 // input_context.num_input_pipelines)
        read_config = tfds.ReadConfig(
            input_context=input_context, shuffle_seed=seed + start_step,
            options=pipeline_options(), try_autocache=False)
        ds = tfds.load(spec.tfds_name, split=split, data_dir=data_dir,
                       shuffle_files=True, download=False,
                       read_config=read_config)
        ds = ds.map(_nc(lambda ex: ex["image"]), num_parallel_calls=par)
        ds = ds.shuffle(TFDS_SHUFFLE_BUFFER, seed=seed + 1000003 * pid
                        + start_step, reshuffle_each_iteration=True)
        ds = ds.repeat()
        # Per-pipeline counter continuing from start_step: fresh, never
        # reused augmentation seeds per (seed, pipeline, element).
        counter = tf.data.Dataset.counter(start_step * local * b, 1,
                                          dtype=tf.int64)
        ds = tf.data.Dataset.zip(ds, counter)

        def aug(image, k):
            aug_seed = tf.stack([tf.constant(seed, tf.int64),
                                 k * 1024 + pid])
            image = tf.ensure_shape(image, [None, None, None])
            image = tf.cond(tf.shape(image)[-1] == 1,
                            lambda: tf.tile(image, [1, 1, 3]),
                            lambda: image[..., :3])
            return _augment.two_views(image, aug_seed, recipe, image_size)
        ds = ds.map(_nc(aug), num_parallel_calls=par, deterministic=True)
        ds = ds.batch(b, drop_remainder=True)
        ds = ds.prefetch(2)
        return ds.with_options(pipeline_options())
    return dataset_fn


def labelled_dataset(spec, *, split, data_dir=None, image_size, batch_size,
                     transform="eval", seed=0, drop_remainder=False,
                     indices=None):
    """(image float32 [b, S, S, 3] in [0, 1], label int32 [b]), one pass.

    transform "eval": resize + centre crop, dataset order. "linear_train":
    RandomResizedCrop(0.08-1) + flip, in a permutation of the dataset chosen
    by `seed` (pass e.g. the epoch number for a fresh order each epoch).
    indices: only these examples (positions in the split's order, as
    `split_labels` lists them), e.g. a semi-supervised label subset; "eval"
    keeps the given order. Corrupt folder images are dropped.
    """
    spec = parse_dataset_spec(spec)
    if transform not in ("eval", "linear_train"):
        raise UserError(f"unknown transform {transform!r}: use 'eval' or "
                        "'linear_train'")
    par = num_parallel_calls()
    seed = int(seed)
    shuffle = transform == "linear_train"

    def view(image, i):
        if transform == "eval":
            return _augment.eval_view(image, image_size)
        return _augment.linear_train_view(
            image, tf.stack([tf.constant(seed, tf.int64), i]), image_size)

    if spec.kind == "tfds":
        info = _tfds_info(spec, data_dir, split)
        _check_tfds_image(spec, info)
        _tfds_label_feature(spec, info)
        tfds = _tfds()
        read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
        # A subset names positions in the unshuffled file order.
        ds = tfds.load(spec.tfds_name, split=split, data_dir=data_dir,
                       shuffle_files=shuffle and indices is None,
                       download=False, read_config=read_config)
        ds = ds.enumerate()
        if indices is not None:
            keep = np.zeros(train_examples(spec, split, data_dir), bool)
            keep[np.asarray(indices, np.int64)] = True
            keep = tf.constant(keep)
            ds = ds.filter(_nc(lambda i, ex: tf.gather(keep, i)))
        if shuffle:
            ds = ds.shuffle(TFDS_SHUFFLE_BUFFER, seed=seed)

        def tfds_map(i, ex):
            image = tf.ensure_shape(ex["image"], [None, None, None])
            image = tf.cond(tf.shape(image)[-1] == 1,
                            lambda: tf.tile(image, [1, 1, 3]),
                            lambda: image[..., :3])
            return view(image, i), tf.cast(ex["label"], tf.int32)
        ds = ds.map(_nc(tfds_map), num_parallel_calls=par,
                    deterministic=True)
    else:
        n = train_examples(spec, split, data_dir)
        chosen = None if indices is None else tf.constant(indices, tf.int64)
        if chosen is not None:
            n = len(indices)

        def pick(j):
            return j if chosen is None else tf.gather(chosen, j)
        ds = tf.data.Dataset.range(n)
        if shuffle:
            ds = ds.map(_nc(lambda i: (pick(_source_index(i, n, seed)), i)))
        else:
            ds = ds.map(_nc(lambda i: (pick(i), i)))
        if spec.kind == "builtin":
            images_np, labels_np = _builtin_images(split, image_size, seed=0)
            images = tf.constant(images_np)
            labels = tf.constant(labels_np, tf.int32)

            def load(src, i):
                return view(tf.gather(images, src), i), tf.gather(labels, src)
            ds = ds.map(_nc(load), num_parallel_calls=par, deterministic=True)
        else:
            listing = list_folder(spec.folder_root(split))
            paths = tf.constant(list(listing.files))
            labels = tf.constant(listing.labels, tf.int32)

            def load_file(src, i):
                image = _read_decode(tf.gather(paths, src))
                return view(image, i), tf.gather(labels, src)
            ds = ds.map(_nc(load_file), num_parallel_calls=par,
                        deterministic=True)
            ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.prefetch(2)
    return ds.with_options(pipeline_options())


def split_labels(spec, split, data_dir=None):
    """int32 labels of every example of `split`, in the order `indices` use.

    Decodes no image: builtin and folder labels come from the generator
    and the listing, tfds images are skipped undecoded.
    """
    spec = parse_dataset_spec(spec)
    if spec.kind == "builtin":
        return np.asarray(builtin.load(split, 8)[1], np.int32)
    if spec.kind == "folder":
        return np.asarray(list_folder(spec.folder_root(split)).labels,
                          np.int32)
    info = _tfds_info(spec, data_dir, split)
    _tfds_label_feature(spec, info)
    tfds = _tfds()
    ds = tfds.load(spec.tfds_name, split=split, data_dir=data_dir,
                   shuffle_files=False, download=False,
                   read_config=tfds.ReadConfig(try_autocache=False),
                   decoders={"image": tfds.decode.SkipDecoding()})
    batches = ds.map(_nc(lambda ex: tf.cast(ex["label"], tf.int32)))
    batches = batches.batch(65536)
    return np.concatenate([np.zeros([0], np.int32)]
                          + list(batches.as_numpy_iterator()))


def preview_grid(spec, *, split="train", data_dir=None, image_size, augment,
                 num_images=8, seed=0):
    """uint8 preview grid (see `augment.view_pair_grid`) of view pairs.

    For builtin and folder data, row j shows global example j of the
    pretraining stream with this `seed` (its source, and the very views
    `pretrain_dataset_fn` makes for it). For tfds, the first examples of the
    split, augmented with seeds [seed, j].
    """
    spec = parse_dataset_spec(spec)
    _augment.check_recipe(augment)
    if num_images < 1:
        raise UserError(f"num_images must be at least 1, got {num_images}")
    if image_size < 8:
        raise UserError(f"image_size must be at least 8, got {image_size}")
    if spec.kind == "tfds":
        info = _tfds_info(spec, data_dir, split)
        _check_tfds_image(spec, info)
        ds = _tfds().load(spec.tfds_name, split=split, data_dir=data_dir,
                          download=False).take(num_images)
        sources = [ex["image"] for ex in ds]
        sources = [tf.tile(s, [1, 1, 3]) if s.shape[-1] == 1 else s[..., :3]
                   for s in sources]
    else:
        n = train_examples(spec, split, data_dir)
        idx = [int(_source_index(tf.constant(j, tf.int64), n, seed))
               for j in range(num_images)]
        if spec.kind == "builtin":
            images, _ = _builtin_images(split, image_size, seed=0)
            sources = [images[k] for k in idx]
        else:
            files = list_folder(spec.folder_root(split)).files
            sources = [_read_decode(tf.constant(files[k])) for k in idx]
    originals, views1, views2 = [], [], []
    for j, image in enumerate(sources):
        v1, v2 = _augment.two_views(image, tf.constant([seed, j], tf.int64),
                                    augment, image_size)
        originals.append(_augment.eval_view(image, image_size).numpy())
        views1.append(v1.numpy())
        views2.append(v2.numpy())
    return _augment.view_pair_grid(np.stack(originals), np.stack(views1),
                                   np.stack(views2))
