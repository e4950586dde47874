"""One worker of the two-worker test (tests/test_training_scale.py), as a plain script.

  TF_CONFIG=... python tests/helpers/train_worker.py ARGS_JSON

ARGS_JSON: {"config": TrainConfig fields, "dump": .npz path}. Runs
training.train under the TF_CONFIG cluster and dumps every weight at the end.
"""
import json
import logging
import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]  # co2_tf and helpers, without installing

import keras  # noqa: E402
from helpers.models import DumpWeights  # noqa: E402

from co2_tf import training  # noqa: E402
from co2_tf.config import TrainConfig  # noqa: E402


def main(args):
    logging.getLogger().setLevel(logging.WARNING)
    spec = json.loads(args)
    config = TrainConfig.from_dict(spec["config"])
    try:
        training.train(config, callbacks=[DumpWeights(spec["dump"])], verbose=0)
    except training.Preempted as e:  # as tools/train.py does
        print(f"error: {e}", flush=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    keras.config.disable_traceback_filtering()
    main(sys.argv[1])
