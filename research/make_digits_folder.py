"""Writes scikit-learn's bundled digits as PNG class folders, for --dataset=folder:PATH/{split}.

  pip install scikit-learn      # not a co2_tf requirement: only this tool needs it
  python research/make_digits_folder.py --output_dir=/tmp/digits
  python tools/train.py --dataset='folder:/tmp/digits/{split}' --eval_split=test ...

The data: 1797 real handwritten digits (UCI optdigits, 8x8 pixels, 17 grey
levels, 10 classes), shipped inside scikit-learn, so no download. The split:
a stratified 80/20 split with a fixed seed (sklearn's train_test_split,
random_state=0): 1437 train, 360 test images, PATH/train/<digit>/<index>.png
and PATH/test/<digit>/<index>.png (index = row of load_digits). Grey levels
0..16 become 0..255, written as RGB PNGs through tf.io.gfile (gs:// works).
"""

import os
import sys

# tools/common.py, the runner every binary shares, also puts the checkout on sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))

import common  # noqa: E402  (first: it sets TF's environment before TF is imported)
from absl import app, flags  # noqa: E402

flags.DEFINE_string("output_dir", "", "where train/ and test/ go (local or gs://)")
flags.DEFINE_float("test_fraction", 0.2, "held-out fraction (stratified)")
flags.DEFINE_integer("split_seed", 0, "seed of the stratified split")
FLAGS = flags.FLAGS


def digits_split(test_fraction=0.2, seed=0):
    """{"train": (images uint8 [n, 8, 8], labels, row indices), "test": ...}."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        common.fail("scikit-learn is not installed: pip install scikit-learn")
    import numpy as np

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rows = np.arange(len(images))
    train, test = train_test_split(rows, test_size=test_fraction, random_state=seed,
                                   stratify=digits.target)
    return {name: (images[idx], digits.target[idx], idx)
            for name, idx in (("train", np.sort(train)), ("test", np.sort(test)))}


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    if not FLAGS.output_dir:
        common.fail("--output_dir is required: where the train/ and test/ folders go")
    if not 0 < FLAGS.test_fraction < 1:
        common.fail(f"--test_fraction={FLAGS.test_fraction} must be in (0, 1)")
    import tensorflow as tf

    from co2_tf import io

    for split, (images, labels, rows) in digits_split(FLAGS.test_fraction,
                                                      FLAGS.split_seed).items():
        for image, label, row in zip(images, labels, rows, strict=True):
            rgb = tf.repeat(tf.constant(image)[:, :, None], 3, axis=-1)
            path = io.join(FLAGS.output_dir, split, str(label), f"{row:04d}.png")
            io.makedirs(io.join(FLAGS.output_dir, split, str(label)))
            io.write_bytes_atomic(path, tf.io.encode_png(rgb).numpy())
        print(f"{split}: {len(labels)} images in {io.join(FLAGS.output_dir, split)}")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
