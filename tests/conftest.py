"""Test setup: two logical CPU devices, so tf.distribute runs real multi-replica code.

This must run before anything else touches TF devices, hence at conftest import.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As the tools do (tools/common.py): oneDNN's ops on every x86 CPU, so that
# the tests run the kernels training runs. Only before `import tensorflow`.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 2
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def two_replicas():
    """The one MirroredStrategy of the test session, over the 2 logical CPUs.

    A second MirroredStrategy in a process reuses collective instance keys and
    aborts on its first all-reduce of another shape ("Shape mismatch in the
    collective instance 100"): tests share this one.
    """
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(NUM_LOGICAL_CPUS)])
