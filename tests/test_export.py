"""Export: backbone.keras and the SavedModel reload in a fresh process, exactly, and fine-tune."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

from co2_tf import build
from co2_tf.errors import UserError
from co2_tf.interop import export
from co2_tf.nets import backbones
from co2_tf.run import rundir, trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT_TOOL = os.path.join(ROOT, "tools", "export.py")
# run_dir: the small trained run of tests/conftest.py.


def assert_close(got, want, rtol=1e-5, what=""):
    """Every |got - want| within rtol of the largest |want|: relative to the output's
    magnitude (activations have any scale), not per element (ReLU zeros)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    scale = np.abs(want).max()
    assert scale > 0, f"{what}: degenerate reference"
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=what)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """An export, plus the in-memory model's outputs on test images."""
    out = str(tmp_path_factory.mktemp("exported") / "out")
    info = export.export(export.ExportConfig(model_dir=run_dir, export_dir=out))
    run = trained.load_run(run_dir)
    rng = np.random.default_rng(1)
    images = {"16": rng.random((6, 16, 16, 3), np.float32),
              "24": rng.random((3, 24, 24, 3), np.float32)}  # any input size works
    for size, x in images.items():
        np.save(os.path.join(out, f"x{size}.npy"), x)
    refs = {"features16": run.model(images["16"], training=False).numpy(),
            "projection16": run.model.encode_query(images["16"], training=False).numpy()}
    # The run's model takes 16 px only: the same weights in a 24 px build.
    at24 = backbones.build_backbone("tiny", 24)
    at24.set_weights(run.model.query_backbone.get_weights())
    refs["features24"] = at24(images["24"], training=False).numpy()
    return out, info, run, refs


# Runs in a fresh Python: nothing of co2_tf imported, only Keras / TF.
FRESH = textwrap.dedent(r"""
    import json, sys
    import numpy as np, keras, tensorflow as tf

    out = sys.argv[1]
    x16, x24 = np.load(f"{out}/x16.npy"), np.load(f"{out}/x24.npy")
    labels = np.array([0, 1, 2, 0, 1, 2])
    report = {}

    def changed(before, variables):
        return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]

    def fine_tune_step(model, tf_variable_slots=False):
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        if tf_variable_slots:
            # The README's workaround: Keras 3.15 names optimizer slots of TFSMLayer
            # weights after TF's "kernel:0" and fails; built on the tf.Variables, it
            # names them "kernel_0_momentum".
            optimizer.build([w.value for w in model.trainable_weights])
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x16, labels, batch_size=6, epochs=1, verbose=0)

    # ---- backbone.keras
    backbone = keras.models.load_model(f"{out}/backbone.keras")
    report["keras_features16"] = backbone(x16, training=False).numpy().tolist()
    report["keras_features24"] = backbone(x24, training=False).numpy().tolist()
    report["keras_all_trainable"] = all(w.trainable for w in backbone.weights
                                        if "moving" not in w.path)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(backbone(x16, training=True) ** 2)
    grads = tape.gradient(loss, backbone.trainable_weights)
    report["keras_grads"] = [g is not None and float(tf.reduce_max(tf.abs(g))) > 0
                             for g in grads]
    inputs = keras.Input((None, None, 3))
    classifier = keras.Model(inputs, keras.layers.Dense(3)(backbone(inputs)))
    trainable = [w.numpy() for w in backbone.trainable_weights]
    moving = [w.numpy() for w in backbone.non_trainable_weights]
    fine_tune_step(classifier)
    report["keras_trained"] = changed(trainable, backbone.trainable_weights)
    report["keras_bn_stats_moved"] = changed(moving, backbone.non_trainable_weights)
    classifier.save("fine_tuned.keras")
    reloaded = keras.models.load_model("fine_tuned.keras")
    want = classifier(x16).numpy()
    report["keras_resave_diff"] = float(np.abs(reloaded(x16) - want).max() / np.abs(want).max())

    # ---- SavedModel, raw
    loaded = tf.saved_model.load(f"{out}/saved_model")
    report["sm_features16"] = loaded.serve(x16).numpy().tolist()
    report["sm_features24"] = loaded.serve(x24).numpy().tolist()
    report["sm_projection16"] = loaded.projection(x16).numpy().tolist()
    report["sm_signatures"] = sorted(loaded.signatures)
    report["sm_trainable"] = len(loaded.trainable_variables)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(loaded.serve(x16) ** 2)
    grads = tape.gradient(loss, loaded.trainable_variables)
    report["sm_grads"] = [g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads]

    # ---- SavedModel through TFSMLayer: fine-tune, BN in training mode, re-export
    layer = keras.layers.TFSMLayer(f"{out}/saved_model", call_endpoint="serve",
                                   call_training_endpoint="serve_training", trainable=True)
    report["tfsm_features16"] = layer(x16).numpy().tolist()
    inputs = keras.Input((16, 16, 3))
    classifier = keras.Model(inputs, keras.layers.Dense(3)(layer(inputs)))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(classifier(x16, training=True) ** 2)
    grads = tape.gradient(loss, layer.trainable_weights)
    report["tfsm_trainable"] = len(layer.trainable_weights)
    report["tfsm_grads"] = [g is not None and float(tf.reduce_max(tf.abs(g))) > 0
                            for g in grads]
    trainable = [w.numpy() for w in layer.trainable_weights]
    moving = [w.numpy() for w in layer.non_trainable_weights]
    fine_tune_step(classifier, tf_variable_slots=True)
    report["tfsm_trained"] = changed(trainable, layer.trainable_weights)
    report["tfsm_bn_stats_moved"] = changed(moving, layer.non_trainable_weights)
    classifier.export("fine_tuned_saved_model", verbose=False)
    again = tf.saved_model.load("fine_tuned_saved_model")
    want = classifier(x16).numpy()
    report["tfsm_resave_diff"] = float(np.abs(again.serve(x16) - want).max() / np.abs(want).max())
    report["co2_tf_imported"] = any(m.startswith("co2_tf") for m in sys.modules)
    print("REPORT" + json.dumps(report))
""")


def test_fresh_process_round_trip_and_fine_tuning(exported, tmp_path):
    out, info, run, refs = exported
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    env = dict(os.environ, PYTHONPATH="")  # co2_tf must not be needed (nor importable)
    result = subprocess.run([sys.executable, str(script), out], capture_output=True, text=True,
                            cwd=str(tmp_path), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    assert not report["co2_tf_imported"]

    for key in ("keras_features16", "sm_features16", "tfsm_features16"):
        assert_close(report[key], refs["features16"], what=key)
    for key in ("keras_features24", "sm_features24"):
        assert_close(report[key], refs["features24"], what=key)
    assert_close(report["sm_projection16"], refs["projection16"])
    np.testing.assert_allclose(np.linalg.norm(report["sm_projection16"], axis=1), 1.0, rtol=1e-5)

    n_weights = len(run.model.query_backbone.trainable_weights)
    assert report["keras_all_trainable"]
    assert report["sm_trainable"] == report["tfsm_trainable"] == n_weights
    for key in ("keras_grads", "sm_grads", "tfsm_grads", "keras_trained", "tfsm_trained",
                "keras_bn_stats_moved", "tfsm_bn_stats_moved"):
        assert len(report[key]) > 0 and all(report[key]), (key, report[key])
    assert len(report["keras_grads"]) == n_weights
    # Relative to the classifier's largest output.
    assert report["keras_resave_diff"] <= 1e-6 and report["tfsm_resave_diff"] <= 1e-6
    assert {"serve", "serve_training", "projection", "serving_default"} <= set(
        report["sm_signatures"])


def test_export_json_describes_the_export(exported, run_dir):
    out, _, _, refs = exported
    # What the file says, against the run dir and the exported model (not against
    # the dict export() returned: that would only test json.dump).
    with open(os.path.join(out, "export.json")) as f:
        on_disk = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
        trained = json.load(f)
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    assert on_disk["checkpoint"] == os.path.abspath(latest)
    reader = tf.train.load_checkpoint(latest)
    (iterations,) = [k for k in reader.get_variable_to_shape_map()
                     if k.startswith("optimizer/") and "iterations" in k]
    step = int(reader.get_tensor(iterations))
    assert on_disk["step"] == step == trained["train_steps"]
    assert on_disk["run_dir"] == os.path.abspath(run_dir)
    for name in ("backbone", "head", "image_size"):
        assert on_disk[name] == trained[name], name
    assert on_disk["projection_dim"] == trained["dim"] == refs["projection16"].shape[1]
    assert on_disk["feature_dim"] == refs["features16"].shape[1] == 256
    assert on_disk["pretraining"] == {name: trained[name] for name in on_disk["pretraining"]}
    assert set(on_disk["pretraining"]) >= {"dataset", "split", "augment", "temperature",
                                           "consistency_weight", "consistency_temperature"}
    assert on_disk["input"]["range"] == [0.0, 1.0]
    checked = {"keras", "serve", "projection", "feature_maps_keras", "feature_maps"}
    assert set(on_disk["verified_max_abs_diff"]) == checked
    assert set(on_disk["verified_relative_diff"]) == checked
    assert max(on_disk["verified_relative_diff"].values()) <= 1e-5
    assert on_disk["verified_relative_tolerance"] == export.RELATIVE_TOLERANCE
    assert sorted(os.listdir(out)) == sorted(
        ["backbone.keras", "feature_maps.keras", "saved_model", "export.json", "x16.npy",
         "x24.npy"])


def test_feature_maps_are_the_backbones_stage_outputs(exported):
    """feature_maps.keras and the feature_maps endpoint equal backbone.keras's own activations."""
    import keras
    import tensorflow as tf
    out, info, _, _ = exported
    pyramid = info["feature_pyramid"]
    assert pyramid["file"] == "feature_maps.keras" and pyramid["endpoint"] == "feature_maps"
    assert {k: (v["stride"], v["channels"]) for k, v in pyramid["levels"].items()} == {
        "C2": (2, 32), "C3": (4, 64), "C4": (8, 128), "C5": (16, 256)}  # tiny's four convs
    assert "note" in pyramid  # not the 4..32 strides of an ImageNet ResNet
    assert max(v for k, v in info["verified_relative_diff"].items() if "feature" in k) <= 1e-5

    x = np.random.default_rng(3).random((2, 32, 48, 3), np.float32)  # any size, not square
    backbone = keras.models.load_model(os.path.join(out, "backbone.keras"))
    maps = keras.models.load_model(os.path.join(out, "feature_maps.keras"))(x, training=False)
    loaded = tf.saved_model.load(os.path.join(out, "saved_model"))  # keep: owns the variables
    saved = loaded.feature_maps(x)
    assert sorted(maps) == sorted(saved) == ["C2", "C3", "C4", "C5"]
    for level, spec in pyramid["levels"].items():
        stage = keras.Model(backbone.input, backbone.get_layer(spec["layer"]).output)
        want = stage(x, training=False).numpy()
        assert want.shape == (2, 32 // spec["stride"], 48 // spec["stride"], spec["channels"])
        assert_close(maps[level].numpy(), want, rtol=1e-6, what=level)
        assert_close(saved[level].numpy(), want, what=level)
    # The last stage, pooled, is the backbone's output.
    assert_close(maps["C5"].numpy().mean(axis=(1, 2)), backbone(x, training=False).numpy())


def test_verify_rejects_an_export_that_differs_from_the_model(exported):
    """The relative check still fails a wrong export: one BN shift of the last layer moved
    by 1e-3 of the largest pooled feature (10x the tolerance, and far less than a wrong
    layer or tensor moves outputs) is reported; the unchanged model passes."""
    out, _, run, _ = exported
    backbone = run.model.query_backbone
    x = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)  # _verify's images
    pooled = backbone(x, training=False).numpy()
    layer = backbone.get_layer("bn4")  # tiny's last BN, before its ReLU and the pooling
    original = layer.beta.numpy()
    wrong = original.copy()
    wrong[int(np.argmax(pooled.max(axis=0)))] += 1e-3 * np.abs(pooled).max()
    layer.beta.assign(wrong)
    try:
        with pytest.raises(RuntimeError, match=r"does not reproduce the model.*'serve'"):
            export._verify(out, run.model, 16, "tiny")
    finally:
        layer.beta.assign(original)
    _, relative = export._verify(out, run.model, 16, "tiny")
    assert max(relative.values()) <= 1e-5


def _listing(path):
    return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
                  for d, _, files in os.walk(path) for f in files)


def test_refuses_a_non_empty_dir_and_overwrites_on_request(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = _listing(out)
    with pytest.raises(UserError, match="--overwrite"):
        export.export(export.ExportConfig(model_dir=run_dir, export_dir=str(out)))
    assert _listing(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp dir left

    export.export(export.ExportConfig(model_dir=run_dir, export_dir=str(out), overwrite=True))
    assert sorted(os.listdir(out)) == ["backbone.keras", "export.json", "feature_maps.keras",
                                       "saved_model"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failure_leaves_nothing_written(run_dir, tmp_path, monkeypatch):
    def broken(*args):
        raise OSError("disk full")
    monkeypatch.setattr(export, "_export_archive", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export(export.ExportConfig(model_dir=run_dir, export_dir=str(tmp_path / "out")))
    assert os.listdir(tmp_path) == []


def test_checkpoints_by_path_or_name(run_dir):
    path = os.path.join(run_dir, "checkpoints", "ckpt-3")
    assert rundir.resolve_checkpoint(run_dir) == (run_dir, path)
    assert rundir.resolve_checkpoint(run_dir, "ckpt-3") == (run_dir, path)
    assert rundir.resolve_checkpoint("", path) == (os.path.abspath(run_dir), path)
    assert rundir.checkpoint_step(path) == 3


def test_missing_and_incompatible_checkpoints_are_user_errors(run_dir, tmp_path):
    with pytest.raises(UserError, match="ckpt-3"):  # names what exists
        export.export(export.ExportConfig(model_dir=run_dir, checkpoint="ckpt-999",
                                          export_dir=str(tmp_path / "a")))
    empty = tmp_path / "fresh_run"
    empty.mkdir()
    shutil.copy(os.path.join(run_dir, "config.json"), empty)
    with pytest.raises(UserError, match="has no checkpoint"):
        export.export(export.ExportConfig(model_dir=str(empty), export_dir=str(tmp_path / "b")))
    # --random_init needs no checkpoint: the run's architecture at its seeded initial weights.
    info = export.export(export.ExportConfig(model_dir=str(empty), random_init=True,
                                             export_dir=str(tmp_path / "r")))
    assert info["random_init"] and info["checkpoint"] is None and info["step"] is None
    fresh = build.backbone_fn(rundir.run_config(str(empty)))("fresh")
    x = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)
    reloaded = keras.models.load_model(str(tmp_path / "r" / "backbone.keras"))
    assert_close(reloaded(x).numpy(), fresh(x).numpy())
    with pytest.raises(UserError, match="not a co2_tf run dir"):
        export.export(export.ExportConfig(model_dir=str(tmp_path), export_dir=str(tmp_path / "c")))

    other = tmp_path / "other_dim"
    shutil.copytree(run_dir, other)
    with open(other / "config.json") as f:
        config = json.load(f)
    config["dim"] = 32
    with open(other / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(UserError, match="does not fit"):
        export.export(export.ExportConfig(model_dir=str(other), export_dir=str(tmp_path / "d")))
    assert not any(name in os.listdir(tmp_path) for name in "abcd")


def test_tool_errors_are_one_line(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    result = subprocess.run([sys.executable, EXPORT_TOOL, f"--model_dir={run_dir}",
                             f"--export_dir={out}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--overwrite" in last, result.stderr
    assert os.listdir(out) == ["x"]


def test_export_to_a_uri_and_a_failure_there(run_dir, tmp_path, monkeypatch):
    """ram:// (TF's in-memory file system) stands in for gs://: no local staging anywhere."""
    monkeypatch.chdir(tmp_path)
    out = f"ram://export_{uuid.uuid4().hex[:8]}/out"
    export.export(export.ExportConfig(model_dir=run_dir, export_dir=out))
    assert sorted(tf.io.gfile.listdir(out)) == [
        "backbone.keras", "export.json", "feature_maps.keras", "saved_model"]
    first = tf.io.gfile.GFile(f"{out}/export.json").read()
    monkeypatch.setattr(export, "_export_archive",
                        lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export.export(export.ExportConfig(model_dir=run_dir, export_dir=out, overwrite=True))
    parent = out.rsplit("/", 1)[0]
    assert tf.io.gfile.listdir(parent) == ["out"]  # no temp dir left
    assert tf.io.gfile.GFile(f"{out}/export.json").read() == first  # the old export intact
    saved = tf.saved_model.load(f"{out}/saved_model")  # kept: .serve needs its variables
    assert saved.serve(np.zeros((1, 16, 16, 3), np.float32)).shape[0] == 1
    assert os.listdir(tmp_path) == []
