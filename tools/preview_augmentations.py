"""Writes a PNG grid of augmented view pairs: one row per source image.

Columns: the source (resized and centre-cropped as for evaluation), view 1,
view 2, exactly as the pretraining pipeline makes them.

  python tools/preview_augmentations.py --dataset=builtin --augment=mocov2 \\
      --image_size=96 --out=grid.png [--num_images=8 --seed=0 --data_dir= \\
      --split=train]
"""

import common
import preview


def write_preview(config):
    height, width = preview.write_preview(config)
    print(f"wrote {config.out} ({width}x{height})")


main = common.tool(write_preview, preview.PreviewConfig)

if __name__ == "__main__":
    common.run_tool(main)
