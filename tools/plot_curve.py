"""Writes a PNG line chart of a scalar of a run's TensorBoard logs (default: the kNN monitor).

  python tools/plot_curve.py --model_dir=/tmp/co2_demo --out=knn.png
  python tools/plot_curve.py --model_dir=/tmp/co2_demo --tag=epoch_loss --out=loss.png

epoch_knn_top1 (the default --tag) is drawn per epoch with the random-init
baseline of summary.json as a dashed line; epoch_* tags against the epoch,
batch_* tags against the step. Drawn with Pillow, no plotting library.
"""

import common
from absl import app

from co2_tf.evaluation import drawing

common.define_flags(drawing.CurveConfig, drawing.HELP)


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    common.quiet_logs()
    config = common.config_from_flags(drawing.CurveConfig)
    result = common.run_guarded(drawing.write_curve, config)
    print(f"wrote {result['picture']} ({len(result['values'])} points of {config.tag})")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
