"""TensorFlow Datasets: ``tfds:NAME[/CONFIG]``, already prepared in data_dir.

co2_tf never downloads: `tfds build NAME --data_dir=DIR` first. A streaming
source: sharded by the input context, file-shuffled; not exactly resumable
mid-epoch (see co2_tf.data.pipelines).
"""

import numpy as np
import tensorflow as tf

from co2_tf.data import image_files
from co2_tf.data.sources import base
from co2_tf.errors import UserError

# TFDS configs of the standard ImageNet label subsets (SimCLR's lists), by fraction.
IMAGENET_SUBSETS = {0.01: "1pct", 0.1: "10pct"}


def _tfds():
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy, optional)
    return tfds


class TfdsSource(base.Source):
    """A prepared TFDS image dataset."""

    indexed = False
    eval_split_candidates = ("validation", "test")

    @property
    def name(self):
        return self.spec.tfds_name

    def builder(self):
        try:
            return _tfds().builder(self.name, data_dir=self.data_dir)
        except Exception as e:  # noqa: BLE001 (tfds raises several types for unknown names)
            raise UserError(
                f"tfds dataset {self.name!r} not found ({type(e).__name__}): "
                "check the name with `tfds.list_builders()`") from None

    def info(self, split=None):
        builder = self.builder()
        info = builder.info
        if split is None:
            return info
        try:
            # Builds the reader only (no data read, never downloads); fails
            # at once if the data is not prepared. Works under tfds mock_data.
            builder.as_dataset(split=split)
        except Exception as e:  # noqa: BLE001 (AssertionError / ValueError / tfds errors)
            if split not in info.splits and info.splits:
                raise UserError(
                    f"tfds dataset {self.name} has no split {split!r}: use "
                    f"one of {', '.join(sorted(info.splits))}") from None
            raise UserError(
                f"tfds dataset {self.name} split {split!r} is not readable "
                f"in {builder.data_dir} ({type(e).__name__}): prepare it with "
                f"`tfds build {self.name} --data_dir=DIR` and pass "
                "--data_dir=DIR (co2_tf never downloads)") from None
        return info

    def _label_feature(self, info):
        feature = info.features["label"] if "label" in info.features else None
        if not isinstance(feature, _tfds().features.ClassLabel):
            raise UserError(
                f"tfds dataset {self.name} has no 'label' class feature: "
                "labelled evaluation needs a dataset with labels")
        return feature

    def _check_image(self, info):
        if "image" not in info.features:
            raise UserError(f"tfds dataset {self.name} has no 'image' "
                            "feature: use an image classification dataset")

    def validate(self, split="train"):
        self._check_image(self.info(split))

    def num_examples(self, split="train"):
        info = self.info(split)
        if split in info.splits:
            return int(info.splits[split].num_examples)
        # Split sizes unknown to the metadata (e.g. under tfds mock_data).
        n = int(self.builder().as_dataset(split=split).cardinality())
        if n < 0:
            raise UserError(f"cannot tell the size of tfds {self.name} "
                            f"split {split!r}: prepare the dataset with tfds")
        return n

    def class_names(self, split="train"):
        return list(self._label_feature(self.info()).names)

    def labels(self, split):
        self._label_feature(self.info(split))
        tfds = _tfds()
        ds = tfds.load(self.name, split=split, data_dir=self.data_dir,
                       shuffle_files=False, download=False,
                       read_config=tfds.ReadConfig(try_autocache=False),
                       decoders={"image": tfds.decode.SkipDecoding()})
        batches = ds.map(image_files.no_autograph(lambda ex: tf.cast(ex["label"], tf.int32)))
        batches = batches.batch(65536)
        return np.concatenate([np.zeros([0], np.int32)] + list(batches.as_numpy_iterator()))

    def stream(self, split, *, input_context=None, shuffle_files=False, seed=0,
               with_labels=True, options=None):
        """(encoded image[, int32 label]) in file order (shuffled files if asked).

        The images stay encoded (tfds's SkipDecoding): `decode` after any shuffle.
        """
        info = self.info(split)
        self._check_image(info)
        if with_labels:
            self._label_feature(info)
        tfds = _tfds()
        config = dict(shuffle_seed=seed, try_autocache=False)
        if input_context is not None:
            config["input_context"] = input_context
        if options is not None:
            config["options"] = options
        ds = tfds.load(self.name, split=split, data_dir=self.data_dir,
                       shuffle_files=shuffle_files, download=False,
                       read_config=tfds.ReadConfig(**config),
                       decoders={"image": tfds.decode.SkipDecoding()})
        if with_labels:
            return ds.map(image_files.no_autograph(
                lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32))))
        return ds.map(image_files.no_autograph(lambda ex: ex["image"]))

    def decode(self, encoded):
        return image_files.to_rgb(self.info().features["image"].decode_example(encoded))

    def pretrain_stream(self, split, *, input_context, seed, start):
        """Shuffled files, a shuffle buffer of encoded images; a restart reshuffles."""
        pid = input_context.input_pipeline_id
        ds = self.stream(split, input_context=input_context, shuffle_files=True,
                         seed=seed + start, with_labels=False)
        ds = ds.shuffle(base.SHUFFLE_BUFFER, seed=seed + 1000003 * pid + start,
                        reshuffle_each_iteration=True)
        return ds.repeat()

    def standard_label_subset(self, split, fraction):
        subset = IMAGENET_SUBSETS.get(fraction)
        if (self.spec.name == "imagenet2012" and not self.spec.config and subset
                and split == "train"):
            from co2_tf.data.sources import make_source  # noqa: PLC0415 (the package imports us)
            return make_source(f"tfds:imagenet2012_subset/{subset}", self.data_dir)
        return None

    def images(self, split, positions, image_size):
        """The first len(positions) images of the split (a stream has no positions)."""
        ds = self.stream(split, with_labels=False).take(len(positions))
        return [self.decode(encoded) for encoded in ds]
