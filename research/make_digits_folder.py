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

import dataclasses
import os
import sys

# tools/common.py, the runner every binary shares, also puts the checkout on sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))

import common  # noqa: E402  (first: it sets TF's environment before TF is imported)

from co2_tf.config import flag  # noqa: E402
from co2_tf.errors import UserError  # noqa: E402


@dataclasses.dataclass
class DigitsConfig:
    output_dir: str = flag("", "where train/ and test/ go (local or gs://)")
    test_fraction: float = flag(0.2, "held-out fraction (stratified)")
    split_seed: int = flag(0, "seed of the stratified split")

    def check(self):
        if not self.output_dir:
            raise UserError("--output_dir is required: where the train/ and test/ folders go")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"--test_fraction={self.test_fraction} must be in (0, 1)")
        return self


def digits_split(test_fraction=0.2, seed=0):
    """{"train": (images uint8 [n, 8, 8], labels, row indices), "test": ...}."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise UserError("scikit-learn is not installed: pip install scikit-learn") from None
    import numpy as np

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rows = np.arange(len(images))
    train, test = train_test_split(rows, test_size=test_fraction, random_state=seed,
                                   stratify=digits.target)
    return {name: (images[idx], digits.target[idx], idx)
            for name, idx in (("train", np.sort(train)), ("test", np.sort(test)))}


def write_digits(config):
    import tensorflow as tf

    from co2_tf import io

    for split, (images, labels, rows) in digits_split(config.test_fraction,
                                                      config.split_seed).items():
        for image, label, row in zip(images, labels, rows, strict=True):
            rgb = tf.repeat(tf.constant(image)[:, :, None], 3, axis=-1)
            path = io.join(config.output_dir, split, str(label), f"{row:04d}.png")
            io.makedirs(io.join(config.output_dir, split, str(label)))
            io.write_bytes_atomic(path, tf.io.encode_png(rgb).numpy())
        print(f"{split}: {len(labels)} images in {io.join(config.output_dir, split)}")


main = common.tool(write_digits, DigitsConfig)

if __name__ == "__main__":
    common.run_tool(main)
