"""The whole chain on URIs: train, resume, export, kNN, linear probe, semi-supervised.

Every path is a URI (file:///abs/... in subprocesses, ram:// in one process),
run from an empty working directory, which must stay empty: a path handled
with open/os.* instead of tf.io.gfile would create ./file:/... or ./ram:/...
there (what gs:// run dirs used to get).
"""

import os
import uuid

import keras
import numpy as np
import tensorflow as tf
from helpers.image_folder import write_split_folders
from helpers.tools_in_one_process import run_tools

from co2_tf import training
from co2_tf.config import TrainConfig
from co2_tf.evaluation import knn, linear_probe, semi_supervised
from co2_tf.interop import export

# Tiny convnet, 16 px, 3 classes x 8 images per split, a queue of 2 batches.
SMALL = dict(image_size=16, batch_size=8, queue_size=16, dim=16, knn_every=0, log_every=1,
             seed=3)
RUN_FILES = ["checkpoints", "classes.txt", "config.json", "logs", "summary.json"]
EXPORT_FILES = ["backbone.keras", "export.json", "feature_maps.keras", "saved_model"]


class StartAndSteps(keras.callbacks.Callback):
    """The model's step counter when fit starts, and how many batches it runs."""

    def __init__(self):
        super().__init__()
        self.start, self.batches = None, 0

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = int(self.model.step_counter.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


def _tools(cwd, *runs):
    """Each (tool, flags) in turn, all in one subprocess run in `cwd`; returns its stdout."""
    report, result = run_tools([[name] + [f"--{k}={v}" for k, v in flags.items()]
                                for name, flags in runs], cwd=cwd)
    assert report["exit"] == [0] * len(runs), (report["exit"], result.stderr[-3000:])
    return result.stdout


def _listdir(uri):
    return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(uri))


def test_tools_on_file_uris_write_nothing_in_the_working_directory(tmp_path):
    cwd = tmp_path / "scratch"
    cwd.mkdir()
    base = f"file://{tmp_path}"
    data = write_split_folders(f"{base}/data")
    run, out = f"{base}/run", f"{base}/out"
    flags = dict(SMALL, model_dir=run, dataset=f"folder:{data}/{{split}}")
    # Resume and a reused split file on URIs: test_library_chain_on_ram_uris (in-process,
    # the same library code the tools call). The five tools share one subprocess: each
    # process costs a TF import, and the working directory is the same for all.
    stdout = _tools(cwd, ("train", dict(train_steps=4, **flags)),
                    ("export", dict(model_dir=run, export_dir=f"{out}/export")),
                    ("knn_eval", dict(keras_model=f"{out}/export/backbone.keras",
                                      output_dir=f"{out}/knn", k=5)),
                    ("linear_eval", dict(model_dir=run, protocol="fast", epochs=2,
                                         output_dir=f"{out}/linear")),
                    ("semi_supervised", dict(model_dir=run, label_fraction=0.5, epochs=1,
                                             output_dir=f"{out}/semi")))
    assert "done: 4 steps" in stdout
    assert _listdir(run) == RUN_FILES
    assert tf.train.latest_checkpoint(f"{run}/checkpoints").endswith("ckpt-4")
    assert _listdir(f"{out}/export") == EXPORT_FILES
    assert _listdir(f"{out}/knn") == ["knn_eval.json", "logs"]  # logs: TensorBoard scalars
    assert {"linear_eval.json", "linear_classifier.keras"} <= set(_listdir(f"{out}/linear"))
    assert {"semi_supervised_classifier.keras", "labels_0.5_seed0.txt", "semi_supervised.json",
            "checkpoints"} <= set(_listdir(f"{out}/semi"))
    assert os.listdir(cwd) == []


def test_library_chain_on_ram_uris(tmp_path, monkeypatch):
    """ram:// is TF's in-memory file system: one process, nothing on any disk."""
    monkeypatch.chdir(tmp_path)
    base = f"ram://chain_{uuid.uuid4().hex[:8]}"
    data = write_split_folders(f"{base}/data")
    run, out = f"{base}/run", f"{base}/out"
    config = TrainConfig(model_dir=run, dataset=f"folder:{data}/{{split}}", train_steps=2,
                         **SMALL)
    training.train(config, verbose=0)
    config.train_steps = 4
    resumed = StartAndSteps()
    assert training.train(config, callbacks=[resumed], verbose=0)["steps"] == 4
    # Resumed, not restarted: it began at the checkpoint's step 2 and ran the 2 left.
    assert (resumed.start, resumed.batches) == (2, 2)
    assert _listdir(run) == RUN_FILES
    assert tf.io.gfile.glob(f"{run}/logs/train/events.out.tfevents.*")  # TensorBoard too
    info = export.export(export.ExportConfig(model_dir=run, export_dir=f"{out}/export"))
    assert info["run_dir"] == run and info["checkpoint"] == f"{run}/checkpoints/ckpt-4"
    assert _listdir(f"{out}/export") == EXPORT_FILES
    reloaded = tf.saved_model.load(f"{out}/export/saved_model")
    assert reloaded.serve(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 256)
    knn.knn_eval(knn.KnnConfig(keras_model=f"{out}/export/backbone.keras",
                               output_dir=f"{out}/knn", k=5), verbose=0)
    linear_probe.linear_eval(linear_probe.LinearEvalConfig(
        model_dir=run, protocol="fast", epochs=2), verbose=0)
    first = semi_supervised.fine_tune(semi_supervised.SemiSupervisedConfig(
        model_dir=run, label_fraction=0.5, epochs=1), verbose=0)
    split_file = first["subset"]["split_file"]
    assert split_file.startswith(f"{run}/semi_supervised_0.5/")
    again = semi_supervised.fine_tune(semi_supervised.SemiSupervisedConfig(
        model_dir=run, label_fraction=0.5, epochs=1, split_file=split_file,
        output_dir=f"{out}/semi"), verbose=0)
    assert again["subset"]["split_file"] == split_file
    assert again["subset"]["examples"] == first["subset"]["examples"]
    assert _listdir(f"{out}/knn") == ["knn_eval.json", "logs"]  # logs: TensorBoard scalars
    assert {"linear_eval_fast", "semi_supervised_0.5"} <= set(_listdir(run))
    assert {"semi_supervised_classifier.keras", "checkpoints"} <= set(_listdir(f"{out}/semi"))
    assert "linear_classifier.keras" in _listdir(f"{run}/linear_eval_fast")
    assert os.listdir(tmp_path) == []
