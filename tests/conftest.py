"""Test setup: two logical CPU devices, so tf.distribute runs real multi-replica code.

This must run before anything else touches TF devices, hence at conftest import.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As the tools do (tools/common.py): oneDNN's ops on every x86 CPU, so that
# the tests run the kernels training runs. Only before `import tensorflow`.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# Under pytest-xdist (CI: three workers on 2 cores) one intra-op thread per process, the
# tools' subprocesses included (they inherit it): TF's thread pools in three processes
# spinning against each other cost CPU (docs/performance.md, CI). Inter-op
# threads stay: collectives across the logical devices need one per device.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# research/ and benchmarks/ are folders of scripts, not packages: their tests import them by name,
# and their binaries import tools/common.py by name.
for _folder in ("tools", "research", "benchmarks"):
    sys.path.append(os.path.join(ROOT, _folder))

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 2
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)

import pytest  # noqa: E402
from helpers.image_folder import make_image_folder  # noqa: E402
from helpers.references import SMALL, split_arrays  # noqa: E402


@pytest.fixture(scope="session")
def two_replicas():
    """The one MirroredStrategy of the test session, over the 2 logical CPUs.

    A second MirroredStrategy in a process reuses collective instance keys and
    aborts on its first all-reduce of another shape ("Shape mismatch in the
    collective instance 100"): tests share this one.
    """
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(NUM_LOGICAL_CPUS)])


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Every supported image kind, nesting, non-images, and 3 broken files."""
    return make_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A small trained run (3 steps on the built-in data), shared by evaluation and export tests.

    Trained once per session; tests may add files to it but must not change what is there.
    With the end-of-run kNN: tests/test_knn.py compares the kNN tool with its summary.
    """
    from co2_tf import training  # noqa: PLC0415
    from co2_tf.config import TrainConfig  # noqa: PLC0415

    model_dir = str(tmp_path_factory.mktemp("trained") / "run")
    training.train(TrainConfig(model_dir=model_dir, **dict(SMALL, end_of_run_knn=True)), verbose=0)
    return model_dir


@pytest.fixture(scope="session")
def reference(run_dir):
    """The run's backbone and NumPy features of both builtin splits."""
    from co2_tf.run import trained  # noqa: PLC0415

    backbone = trained.load_run(run_dir).model.query_backbone
    out = {}
    for split in ("train", "test"):
        images, labels = split_arrays(split)
        out[split] = (images, labels, backbone.predict(images, batch_size=500, verbose=0))
    return backbone, out


# The modules that take longest, first: longest-first packs the pytest-xdist workers of
# `pytest -n 3 --dist loadscope` evenly (in file order, test_train and test_training_scale,
# among the longest, would start last). Order: total time per module in a full run's
# `--durations=0`, 2026-11-30.
HEAVY_MODULES = ["test_benchmark.py", "test_train.py", "test_faults.py",
                 "test_evaluation_scale.py", "test_convert.py", "test_remote_paths.py",
                 "test_export.py", "test_training_scale.py", "test_data.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(autouse=True)
def _op_determinism_stays_local():
    """train(deterministic=True) turns TF op determinism on for the whole process (what
    --deterministic means for a one-run binary); left on, every later unseeded random op
    (Keras's own fit shuffling among them) raises. Each test starts with it off."""
    from tensorflow.python.framework import config as tf_config  # noqa: PLC0415 (no public off)

    yield
    if tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()
