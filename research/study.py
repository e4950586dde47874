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
from absl import app, flags

from co2_tf import config as config_lib

common.define_flags(config_lib.TrainConfig, config_lib.HELP, skip=("model_dir", "seed"),
                    choices=config_lib.CHOICES)
flags.DEFINE_string("study_dir", "", "one run dir per cell and seed goes below it")
flags.DEFINE_multi_string("cell", list(study.StudyConfig.cells),
                          "a setting (or a product of settings): 'flag=value[,value...] ...'")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds each setting runs with")
flags.DEFINE_integer("linear_epochs", study.StudyConfig.linear_epochs,
                     "epochs of the fast linear probe")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    common.quiet_logs()
    try:
        seeds = tuple(int(s) for s in FLAGS.seeds)
    except ValueError:
        common.fail(f"--seeds={','.join(FLAGS.seeds)}: give integers, e.g. --seeds=0,1,2")
    base = common.config_from_flags(config_lib.TrainConfig, model_dir="unset")
    config = study.StudyConfig(study_dir=FLAGS.study_dir, cells=tuple(FLAGS.cell), seeds=seeds,
                               linear_epochs=FLAGS.linear_epochs,
                               base=dataclasses.replace(base, model_dir=""))
    common.run_guarded(config.check)
    text = common.run_guarded(study.run_study, config, verbose=1 if sys.stdout.isatty() else 0,
                              log=lambda line: print(line, flush=True))
    print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
