"""training.train under a MirroredStrategy over N logical CPUs, as a plain script.

  python tests/helpers/replicas_worker.py ARGS_JSON

ARGS_JSON: {"replicas": N, "config": TrainConfig fields}. One process holds one
MirroredStrategy (a second one breaks its collectives), so a test session that
has its 2-replica strategy runs other replica counts here. Prints the run's
summary as JSON on its last line.
"""
import json
import logging
import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]  # co2_tf and helpers, without installing
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the tools and tests/conftest.py

from co2_tf import distribute  # noqa: E402


def main(args):
    logging.getLogger().setLevel(logging.WARNING)
    spec = json.loads(args)
    distribute.split_cpu(spec["replicas"])  # before anything else touches TF's devices
    import tensorflow as tf  # noqa: PLC0415

    from co2_tf import training  # noqa: PLC0415
    from co2_tf.config import TrainConfig  # noqa: PLC0415

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(spec["replicas"])])
    summary = training.train(TrainConfig.from_dict(spec["config"]), strategy=strategy,
                             verbose=0)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
