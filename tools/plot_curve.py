"""Writes a PNG line chart of a scalar of a run's TensorBoard logs (default: the kNN monitor).

  python tools/plot_curve.py --model_dir=/tmp/co2_demo --out=knn.png
  python tools/plot_curve.py --model_dir=/tmp/co2_demo --tag=epoch_loss --out=loss.png

epoch_knn_top1 (the default --tag) is drawn per epoch with the random-init
baseline of summary.json as a dashed line; epoch_* tags against the epoch,
batch_* tags against the step. Drawn with Pillow, no plotting library.
"""

import common

from co2_tf.evaluation import drawing


def plot_curve(config):
    result = drawing.write_curve(config)
    print(f"wrote {result['picture']} ({len(result['values'])} points of {config.tag})")


main = common.tool(plot_curve, drawing.CurveConfig)

if __name__ == "__main__":
    common.run_tool(main)
