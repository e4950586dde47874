"""Pretrains a CO2 / MoCo model.

  python tools/train.py --model_dir=/tmp/co2_demo                 # built-in demo
  python tools/train.py --flagfile=flags/imagenet_mocov2_co2.cfg --model_dir=gs://...

Rerunning the same command resumes from the latest checkpoint in --model_dir.
Exit codes (0 done, 1 bad input, 3 non-finite, 4 save failed, 130 SIGINT, 143
SIGTERM): README.md, "Resume and preemption", lists them with their meaning.
"""

import json

import common

from co2_tf.config import TrainConfig


def train(config):
    from co2_tf import training  # after the flags' checks: a bad flag fails before TF loads
    summary = training.train(config)
    if "knn_top1" in summary:
        print(f"kNN top-1 (k={config.knn_k}) on the held-out split: "
              f"trained {100 * summary['knn_top1']:.1f}%, "
              f"random init {100 * summary['knn_top1_random_init']:.1f}%")
    print(f"done: {summary['steps']} steps; summary in {config.model_dir}/summary.json: "
          f"{json.dumps(summary)}")


main = common.tool(train, TrainConfig)

if __name__ == "__main__":
    common.run_tool(main)
