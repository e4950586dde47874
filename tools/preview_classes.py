"""Writes a PNG of a dataset's classes: a row per class, its name and examples drawn at random.

  python tools/preview_classes.py --dataset=builtin --out=classes.png [--image_size=48 \\
      --per_class=8 --seed=0 --data_dir= --split=train]

Any labelled dataset (builtin, tfds:NAME, folder:PATH); images are resized and
centre-cropped as for evaluation.
"""

import common
import preview


def write_class_grid(config):
    height, width = preview.write_class_grid(config)
    print(f"wrote {config.out} ({width}x{height})")


main = common.tool(write_class_grid, preview.ClassesConfig)

if __name__ == "__main__":
    common.run_tool(main)
