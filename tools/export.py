"""Exports a pretrained backbone: backbone.keras, feature_maps.keras, a SavedModel, export.json.

  python tools/export.py --model_dir=/tmp/co2_demo --export_dir=/tmp/co2_demo_export
  python tools/export.py --checkpoint=/tmp/co2_demo/checkpoints/ckpt-200 \\
      --export_dir=/tmp/export --overwrite
  # the same architecture with fresh weights, a baseline for evaluations outside co2_tf:
  python tools/export.py --model_dir=/tmp/co2_demo --random_init --export_dir=/tmp/random_export

Fine-tune with `keras.models.load_model(".../backbone.keras")` or
`keras.layers.TFSMLayer(".../saved_model", call_endpoint="serve",
call_training_endpoint="serve_training", trainable=True)` (see co2_tf/interop/export.py);
feature_maps.keras (and the SavedModel endpoint feature_maps) gives the pyramid C2..C5 for
detection and segmentation heads.
"""

import common

from co2_tf.interop import export as export_lib


def export(config):
    info = export_lib.export(config)
    what, origin = (("random initial weights", "") if info["random_init"]
                    else (f"step {info['step']}", f" from {info['checkpoint']}"))
    print(f"exported {info['backbone']} (features {info['feature_dim']}, {what}){origin} "
          f"to {config.export_dir}: backbone.keras, "
          "feature_maps.keras, saved_model/ (endpoints serve, serve_training, projection, "
          "feature_maps), export.json")


main = common.tool(export, export_lib.ExportConfig)

if __name__ == "__main__":
    common.run_tool(main)
