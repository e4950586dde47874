"""Writes a PNG grid of augmented view pairs: one row per source image.

Columns: the source (resized and centre-cropped as for evaluation), view 1,
view 2, exactly as the pretraining pipeline makes them.

  python tools/preview_augmentations.py --dataset=builtin --augment=mocov2 \\
      --image_size=96 --out=grid.png [--num_images=8 --seed=0 --data_dir= \\
      --split=train]
"""
import os
import sys

# Runnable from a clean checkout: the package is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "builtin",
                    "builtin | tfds:NAME[/CONFIG] | folder:PATH")
flags.DEFINE_string("augment", "mocov2", "mocov1 | mocov2")
flags.DEFINE_integer("image_size", 96, "side of the views, in pixels")
flags.DEFINE_string("out", "augmentations.png", "PNG file to write")
flags.DEFINE_integer("num_images", 8, "rows: how many source images")
flags.DEFINE_integer("seed", 0, "seed of the example order and views")
flags.DEFINE_string("data_dir", None, "tfds data directory")
flags.DEFINE_string("split", "train", "dataset split")


def main(argv):
    del argv
    from co2_tf import data  # noqa: PLC0415 (after sys.path setup)
    from co2_tf.errors import UserError  # noqa: PLC0415
    try:
        grid = data.preview_grid(
            FLAGS.dataset, split=FLAGS.split, data_dir=FLAGS.data_dir,
            image_size=FLAGS.image_size, augment=FLAGS.augment,
            num_images=FLAGS.num_images, seed=FLAGS.seed)
        from PIL import Image  # noqa: PLC0415
        try:
            Image.fromarray(grid).save(FLAGS.out)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot write {FLAGS.out}: {e}: pass a "
                            "writable --out path ending in .png") from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {FLAGS.out} ({grid.shape[1]}x{grid.shape[0]})")
    return 0


if __name__ == "__main__":
    app.run(main)
