"""Data sources, one class per dataset kind, made from a dataset spec string.

Dataset specs (`parse_dataset_spec`):

- ``builtin``: the procedurally generated textures of `co2_tf.data.sources.builtin`.
- ``tfds:NAME[/CONFIG]``: a TensorFlow Datasets dataset already prepared in
  `data_dir` (co2_tf never downloads: `tfds build NAME --data_dir=DIR` first).
- ``folder:PATH``: image folders ``PATH/<class>/**/<image files>``
  (``{split}`` in PATH is replaced by the split).
- ``tfrecord:GLOB``: TFRecord shards in the Model Garden / TPU ImageNet layout
  (GLOB names the training shards, e.g. ``/data/imagenet/train-*``).

`make_source(spec, data_dir)` returns the `Source` (see `base.py`) that reads
it. This package is the only place that asks which kind a dataset is; its
kind modules import TensorFlow and are loaded when a source is made.
"""

import dataclasses
import importlib

from co2_tf.errors import UserError

SPEC_FORMS = "'builtin', 'tfds:NAME[/CONFIG]', 'folder:PATH' or 'tfrecord:GLOB'"
# kind -> (module in this package, Source class).
_SOURCE_CLASSES = {"builtin": ("builtin", "BuiltinSource"), "tfds": ("tfds", "TfdsSource"),
                   "folder": ("folder", "FolderSource"),
                   "tfrecord": ("tfrecord", "TfrecordSource")}


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How sources read: the data fields of a run's config (their help says what each does)."""
    index_dir: str = ""  # where dataset indexes are kept ("" = beside the data)
    check_image_files: bool = True  # folder: the integrity check of every file at the scan
    tfrecord_image_key: str = "image/encoded"
    tfrecord_label_key: str = "image/class/label"
    tfrecord_label_offset: int = 1  # stored label - offset = class index
    input_threads: int = 0  # tf.data parallelism; 0 = the usable cores

    @classmethod
    def of(cls, config):
        """The options a config (TrainConfig, a dict, or None for the defaults) names."""
        values = config if isinstance(config, dict) else vars(config) if config else {}
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What to read: kind is "builtin", "tfds", "folder" or "tfrecord"."""
    kind: str
    name: str = ""
    config: str = ""
    path: str = ""

    def __str__(self):
        if self.kind == "builtin":
            return "builtin"
        if self.kind == "tfds":
            return "tfds:" + self.tfds_name
        return f"{self.kind}:{self.path}"

    @property
    def tfds_name(self):
        """NAME or NAME/CONFIG as tfds.builder takes it."""
        return f"{self.name}/{self.config}" if self.config else self.name

    def folder_root(self, split):
        """The folder for `split` ({split} in the path replaced; '~' is expanded on listing)."""
        return self.path.replace("{split}", split)


def parse_dataset_spec(text):
    """Parses 'builtin', 'tfds:NAME[/CONFIG]', 'folder:PATH' or 'tfrecord:GLOB'."""
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
    if sep and kind == "tfrecord":
        if not rest.strip():
            raise UserError(f"dataset spec {text!r} has no file pattern: use "
                            "tfrecord:GLOB, e.g. tfrecord:/data/imagenet/train-*")
        return DatasetSpec(kind="tfrecord", path=rest.strip())
    raise UserError(f"unknown dataset spec {text!r}: use {SPEC_FORMS}")


def make_source(spec, data_dir=None, max_image_pixels=None, progress=None, options=None):
    """The Source for a spec (string or DatasetSpec); a Source is returned as it is.

    max_image_pixels: the image-file pixel limit (None = co2_tf.data.image_files' default).
    progress: a co2_tf.progress.Reporter for the scan of image folders (None = silent).
    options: a ReadOptions, or a config whose fields of those names are taken (None = defaults).
    """
    from co2_tf.data.sources import base  # noqa: PLC0415 (imports TF)

    if isinstance(spec, base.Source):
        return spec
    spec = parse_dataset_spec(spec)
    module, cls = _SOURCE_CLASSES[spec.kind]
    if not isinstance(options, ReadOptions):
        options = ReadOptions.of(options)
    return getattr(importlib.import_module(f"co2_tf.data.sources.{module}"), cls)(
        spec, data_dir, max_image_pixels, progress, options)
