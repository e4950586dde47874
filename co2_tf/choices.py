"""The choices of the top-level modules that import TF: optimizers, precision, distribute.

Defined here, TF-free and below everything, so that config.py offers them as flag choices and
a binary checks a flag before TF loads, while those modules check against the same tuples
without importing config. The packages' own choices are in their __init__.py (nets: the
backbones; method: heads, BN modes, consistency variants; data: augmentations, placements).
"""

SCHEDULES = ("step", "cosine", "constant")  # co2_tf.optimizers
OPTIMIZERS = ("sgd", "lars")  # co2_tf.optimizers
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")  # co2_tf.precision
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")  # co2_tf.distribute
