"""Writes an image folder (or a TFDS split) as TFRecord shards for --dataset=tfrecord:GLOB.

  python tools/make_tfrecords.py --dataset='folder:/data/imagenet/{split}' --split=train \\
      --output_dir=gs://bucket/imagenet-tfrecords --num_shards=1024
  python tools/make_tfrecords.py --dataset='folder:/data/imagenet/{split}' --split=val \\
      --output_split=validation --output_dir=gs://bucket/imagenet-tfrecords --num_shards=128
  python tools/train.py --dataset=tfrecord:gs://bucket/imagenet-tfrecords/train-* ...

With --dataset=tfrecord:GLOB (shards made elsewhere, e.g. by the TPU ImageNet script) it
writes nothing but their record index: it counts the records of --split once, so that the
hosts of a multi-host run do not each read every shard at their first start.

The Model Garden / TPU ImageNet layout (co2_tf.data.record_writer): shards
OUTPUT_SPLIT-00000-of-01024 with `image/encoded` (the file's bytes, not
re-encoded) and `image/class/label` (class index + --label_offset), plus
classes.txt and the record index. Rerunning the command resumes: finished
shards are kept. Local paths, file:// and gs:// (tf.io.gfile).
"""

import dataclasses

import common

from co2_tf.config import flag
from co2_tf.errors import UserError


@dataclasses.dataclass
class RecordsConfig:
    dataset: str = flag("", "folder:PATH (one subfolder per class) or tfds:NAME; tfrecord:GLOB "
                        "only indexes existing shards")
    data_dir: str = flag("", "TFDS data_dir (tfds: datasets)")
    split: str = flag("train", "split to convert")
    output_split: str = flag("", "shard name prefix ('' = --split)")
    output_dir: str = flag("", "where the shards go (local or gs://)")
    num_shards: int = flag(16, "shards of the split (at least the number of hosts that read it: "
                           "workers divide shards between them)")
    label_offset: int = flag(1, "stored label = class index + offset (1: the TPU ImageNet "
                             "records' 1..1000)")
    seed: int = flag(0, "seed of the record order")
    check_image_files: bool = flag(True, "folders: check each file's end marker when listing "
                                   "(skips truncated files)")

    def check(self):
        if not self.dataset or not (self.output_dir or self.dataset.startswith("tfrecord:")):
            raise UserError("--dataset and --output_dir are required: what to convert and where "
                            "the shards go")
        return self


def convert(config):
    from co2_tf import progress
    from co2_tf.data import record_writer
    from co2_tf.data.sources import ReadOptions, make_source

    reporter = progress.Reporter.for_stdout(30.0)
    source = make_source(config.dataset, config.data_dir or None, progress=reporter,
                         options=ReadOptions(check_image_files=config.check_image_files))
    kind = source.spec.kind
    split = config.split
    if kind == "tfrecord":
        source.validate(split)  # counts the records once, into the index
        print(f"{len(source.shards(split))} shards of {source.num_examples(split)} "
              f"records indexed: {source.pattern(split)}")
        return
    if kind not in ("folder", "tfds"):
        raise UserError(f"--dataset={config.dataset}: make_tfrecords reads folder:PATH or "
                        "tfds:NAME (or indexes tfrecord:GLOB)")
    source.validate(split)
    write = record_writer.folder_to_shards if kind == "folder" else record_writer.tfds_to_shards
    paths = write(source, split, config.output_dir, num_shards=config.num_shards,
                  label_offset=config.label_offset, seed=config.seed,
                  output_split=config.output_split or split, progress=reporter)
    print(f"{len(paths)} shards of {source.num_examples(split)} images: "
          f"{paths[0]} ... (read with --dataset=tfrecord:"
          f"{paths[0].rsplit('-', 3)[0]}-*)")


main = common.tool(convert, RecordsConfig)

if __name__ == "__main__":
    common.run_tool(main)
