"""Reloads saved classifiers in a fresh process, with plain Keras (no co2_tf import).

  python tests/helpers/reload_classifiers.py IMAGES.npz MODEL.keras [MODEL.keras ...]

IMAGES.npz: "images" (float32 [N, S, S, 3] in [0, 1], centre-cropped) and
"labels". Prints {model path: top-1 of its logits} as JSON.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def main(images_path, *models):
    with np.load(images_path) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    top1 = {}
    for path in models:
        logits = keras.models.load_model(path).predict(images, batch_size=500, verbose=0)
        top1[path] = float(np.mean(np.argmax(logits, axis=1) == labels))
    print(json.dumps(top1))


if __name__ == "__main__":
    assert "co2_tf" not in sys.modules
    main(*sys.argv[1:])
