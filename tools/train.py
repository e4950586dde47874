"""Pretrains a CO2 / MoCo model.

  python tools/train.py --model_dir=/tmp/co2_demo                 # built-in demo
  python tools/train.py --flagfile=flags/imagenet_mocov2_co2.cfg --model_dir=gs://...

Rerunning the same command resumes from the latest checkpoint in --model_dir.
Exit codes (0 done, 1 bad input, 3 non-finite, 4 save failed, 130 SIGINT, 143
SIGTERM): README.md, "Resume and preemption", lists them with their meaning.
"""

import json

import common
from absl import app

from co2_tf import config as config_lib

common.define_flags(config_lib.TrainConfig, config_lib.HELP, choices=config_lib.CHOICES)


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    common.quiet_logs()
    config = common.config_from_flags(config_lib.TrainConfig)
    common.run_guarded(config.check)  # fail before importing TF for bad flags
    from co2_tf import training
    summary = common.run_guarded(training.train, config)
    if "knn_top1" in summary:
        print(f"kNN top-1 (k={config.knn_k}) on the held-out split: "
              f"trained {100 * summary['knn_top1']:.1f}%, "
              f"random init {100 * summary['knn_top1_random_init']:.1f}%")
    print(f"done: {summary['steps']} steps; summary in {config.model_dir}/summary.json: "
          f"{json.dumps(summary)}")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
