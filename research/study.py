"""Runs a grid of pretraining runs, evaluates each (kNN, fast linear probe), prints one table.

  python research/study.py --flagfile=research/flags/study_demo.cfg --study_dir=/tmp/co2_study

The grid: one --cell per line of the flagfile, each a space-separated list of
training flags (comma lists expand to every value); --seeds runs each setting
once per seed; every other training flag (--train_steps, --dataset, ...) is
the base all cells share. Cells already run in --study_dir are reused, so a
grid can grow and an interrupted study resumes. The table (markdown) is
printed and written to STUDY_DIR/study.md; research/study_runs.py says what its
columns mean.
"""

import dataclasses
import os
import sys

# tools/common.py, the runner every binary shares, also puts the checkout on sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import common  # noqa: E402  (first: it sets TF's environment before TF is imported)
import study_runs as study

from co2_tf.config import TrainConfig


def run_study(base, config):
    config = dataclasses.replace(config, base=dataclasses.replace(base, model_dir="")).check()
    print(study.run_study(config, verbose=1 if sys.stdout.isatty() else 0,
                          log=lambda line: print(line, flush=True)))


# Every training flag but --model_dir and --seed (the study sets them per run) is the base.
main = common.tool(run_study, TrainConfig, study.StudyConfig, skip=("model_dir", "seed"),
                   overrides={"model_dir": "unset"}, check=False)

if __name__ == "__main__":
    common.run_tool(main)
