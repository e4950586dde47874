"""Writes a PNG of a dataset's classes: a row per class, its name and examples drawn at random.

  python tools/preview_classes.py --dataset=builtin --out=classes.png [--image_size=48 \\
      --per_class=8 --seed=0 --data_dir= --split=train]

Any labelled dataset (builtin, tfds:NAME, folder:PATH); images are resized and
centre-cropped as for evaluation.
"""

import common
import preview
from absl import app

common.define_flags(preview.ClassesConfig, preview.CLASSES_HELP)


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    common.quiet_logs()
    config = common.config_from_flags(preview.ClassesConfig)
    height, width = common.run_guarded(preview.write_class_grid, config)
    print(f"wrote {config.out} ({width}x{height})")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
