"""Writes a PNG grid of augmented view pairs: one row per source image.

Columns: the source (resized and centre-cropped as for evaluation), view 1,
view 2, exactly as the pretraining pipeline makes them.

  python tools/preview_augmentations.py --dataset=builtin --augment=mocov2 \\
      --image_size=96 --out=grid.png [--num_images=8 --seed=0 --data_dir= \\
      --split=train]
"""

import common
import preview
from absl import app

common.define_flags(preview.PreviewConfig, preview.HELP, choices=preview.CHOICES)


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    common.quiet_logs()
    config = common.config_from_flags(preview.PreviewConfig)
    height, width = common.run_guarded(preview.write_preview, config)
    print(f"wrote {config.out} ({width}x{height})")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
