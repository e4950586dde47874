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

import common
from absl import app, flags

flags.DEFINE_string("dataset", "", "folder:PATH (one subfolder per class) or tfds:NAME; "
                    "tfrecord:GLOB only indexes existing shards")
flags.DEFINE_string("data_dir", "", "TFDS data_dir (tfds: datasets)")
flags.DEFINE_string("split", "train", "split to convert")
flags.DEFINE_string("output_split", "", "shard name prefix ('' = --split)")
flags.DEFINE_string("output_dir", "", "where the shards go (local or gs://)")
flags.DEFINE_integer("num_shards", 16, "shards of the split (at least the number of hosts "
                     "that read it: workers divide shards between them)")
flags.DEFINE_integer("label_offset", 1, "stored label = class index + offset (1: the TPU "
                     "ImageNet records' 1..1000)")
flags.DEFINE_integer("seed", 0, "seed of the record order")
flags.DEFINE_boolean("check_image_files", True, "folders: check each file's end marker "
                     "when listing (skips truncated files)")
FLAGS = flags.FLAGS


def convert():
    from co2_tf import progress
    from co2_tf.data import record_writer
    from co2_tf.data.sources import ReadOptions, make_source
    from co2_tf.errors import UserError

    reporter = progress.Reporter.for_stdout(30.0)
    source = make_source(FLAGS.dataset, FLAGS.data_dir or None, progress=reporter,
                         options=ReadOptions(check_image_files=FLAGS.check_image_files))
    kind = source.spec.kind
    if kind == "tfrecord":
        source.validate(FLAGS.split)  # counts the records once, into the index
        print(f"{len(source.shards(FLAGS.split))} shards of {source.num_examples(FLAGS.split)} "
              f"records indexed: {source.pattern(FLAGS.split)}")
        return
    if kind not in ("folder", "tfds"):
        raise UserError(f"--dataset={FLAGS.dataset}: make_tfrecords reads folder:PATH or "
                        "tfds:NAME (or indexes tfrecord:GLOB)")
    source.validate(FLAGS.split)
    write = record_writer.folder_to_shards if kind == "folder" else record_writer.tfds_to_shards
    paths = write(source, FLAGS.split, FLAGS.output_dir, num_shards=FLAGS.num_shards,
                  label_offset=FLAGS.label_offset, seed=FLAGS.seed,
                  output_split=FLAGS.output_split or FLAGS.split, progress=reporter)
    print(f"{len(paths)} shards of {source.num_examples(FLAGS.split)} images: "
          f"{paths[0]} ... (read with --dataset=tfrecord:"
          f"{paths[0].rsplit('-', 3)[0]}-*)")


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    if not FLAGS.dataset or not (FLAGS.output_dir or FLAGS.dataset.startswith("tfrecord:")):
        common.fail("--dataset and --output_dir are required: what to convert and where the "
                    "shards go")
    common.quiet_logs()
    common.run_guarded(convert)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
