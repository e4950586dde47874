"""Data sources, one class per dataset kind, made from a dataset spec string.

Dataset specs (`parse_dataset_spec`):

- ``builtin``: the procedurally generated textures of `co2_tf.sources.builtin`.
- ``tfds:NAME[/CONFIG]``: a TensorFlow Datasets dataset already prepared in
  `data_dir` (co2_tf never downloads: `tfds build NAME --data_dir=DIR` first).
- ``folder:PATH``: image folders ``PATH/<class>/**/<image files>``
  (``{split}`` in PATH is replaced by the split).

`make_source(spec, data_dir)` returns the `Source` (see `base.py`) that reads
it. This package is the only place that asks which kind a dataset is; its
kind modules import TensorFlow and are loaded when a source is made.
"""

import dataclasses
import importlib

from co2_tf.errors import UserError

KINDS = ("builtin", "tfds", "folder")
SPEC_FORMS = "'builtin', 'tfds:NAME[/CONFIG]' or 'folder:PATH'"
# kind -> (module in this package, Source class).
_SOURCE_CLASSES = {"builtin": ("builtin", "BuiltinSource"), "tfds": ("tfds", "TfdsSource"),
                   "folder": ("folder", "FolderSource")}


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
        """The folder for `split` ({split} in the path replaced; '~' is expanded on listing)."""
        return self.path.replace("{split}", split)


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


def make_source(spec, data_dir=None, max_image_pixels=None, progress=None):
    """The Source for a spec (string or DatasetSpec); a Source is returned as it is.

    max_image_pixels: the image-file pixel limit (None = co2_tf.image_files' default).
    progress: a co2_tf.progress.Reporter for the scan of image folders (None = silent).
    """
    from co2_tf.sources import base  # noqa: PLC0415 (imports TF)

    if isinstance(spec, base.Source):
        return spec
    spec = parse_dataset_spec(spec)
    module, cls = _SOURCE_CLASSES[spec.kind]
    return getattr(importlib.import_module(f"co2_tf.sources.{module}"), cls)(
        spec, data_dir, max_image_pixels, progress)
