"""Exporting the pretrained query backbone for use outside co2_tf.

`export(ExportConfig(model_dir=..., export_dir=...))` writes, from a run's
latest (or a named) checkpoint (or, with random_init, the run's architecture
with its fresh initial weights, a baseline):

- ``backbone.keras``: the query backbone as a plain functional Keras model
  (built-in layers only: `keras.models.load_model` needs no co2_tf code). Its
  weights are trainable and its BatchNormalization trains normally when
  fine-tuned.
- ``saved_model/``: a SavedModel written with `keras.export.ExportArchive`,
  with endpoints (also signatures)
    - ``serve``: float32 images [N, H, W, 3] in [0, 1] -> pooled features
      [N, F], BN in inference mode (also ``serving_default``);
    - ``serve_training``: the same with BN in training mode (batch statistics,
      moving averages updated), for fine-tuning with
      ``keras.layers.TFSMLayer(..., call_training_endpoint="serve_training")``;
    - ``projection``: the L2-normalised query projection [N, D].
  The model normalises its input itself (ImageNet mean / std). Any H, W
  works; the backbone was pretrained at export.json's ``image_size``. The
  loaded object's ``trainable_variables`` are exactly the backbone's.
  Keras 3.15 caveat: an optimizer with slots (momentum, Adam) fails on
  TFSMLayer weights ("'conv1_kernel:0_momentum' is not a valid scope name":
  the layer keeps TF's ":0" in weight names). Build the optimizer on the
  underlying tf.Variables first: ``optimizer.build([w.value for w in
  model.trainable_weights])``, then compile and fit.
- ``feature_maps.keras``: the backbone's feature pyramid for detection and
  segmentation heads: the same images -> a dict of the four stages' maps
  ``C2``..``C5`` (ResNet's layer1..layer4 outputs, NHWC; strides 4, 8, 16,
  32 for the ImageNet ResNets, 1, 2, 4, 8 for resnet18_cifar, 2, 4, 8, 16
  for tiny: export.json lists each level's stride, channels and layer). The
  SavedModel has it too, as the endpoint ``feature_maps``.
- ``export.json``: what the export is (backbone, sizes, preprocessing, step,
  source checkpoint, endpoints, pyramid).

Writes go to a temporary directory beside the target, renamed into place at
the end: a failure leaves nothing half-written. Every path goes through
tf.io.gfile, so --export_dir may be a gs:// (or file://, ram://) URI: Keras's
`.keras` saving and SavedModel writing both take such URIs themselves.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

import co2_tf
from co2_tf import build, io
from co2_tf.config import flag
from co2_tf.errors import UserError
from co2_tf.nets import backbones
from co2_tf.run import rundir, trained

KERAS_FILE = "backbone.keras"
FEATURE_MAPS_FILE = "feature_maps.keras"
SAVED_MODEL_DIR = "saved_model"
EXPORT_FILE = rundir.EXPORT_FILE
# The post-write check compares each output of the reloaded export with the
# in-memory model's: its largest difference relative to the largest magnitude of
# that output (per pyramid level), since activations have any scale (a ResNet-50's
# pooled features can reach hundreds, its maps more). Float32 round-off between the
# eager model and the reloaded graphs stays orders of magnitude below this; a wrong
# weight or wiring moves outputs by more (tests/test_convert.py, tests/test_export.py).
RELATIVE_TOLERANCE = 1e-4


@dataclasses.dataclass
class ExportConfig:
    model_dir: str = flag("", "pretraining run dir: exports its latest checkpoint")
    checkpoint: str = flag("", "export this checkpoint instead: RUN_DIR/checkpoints/ckpt-N (or "
                               "ckpt-N)")
    export_dir: str = flag("", "output directory (backbone.keras, feature_maps.keras, saved_model/,"
                               " export.json)")
    overwrite: bool = flag(False, "replace a non-empty --export_dir")
    random_init: bool = flag(False, "export the run's architecture with fresh random weights (its "
                                    "step 0): a baseline for evaluations outside co2_tf; needs only"
                                    " the run's config.json")

    def check(self):
        if not (self.model_dir or self.checkpoint):
            raise UserError("--model_dir is required: the pretraining run to export "
                            "(or --checkpoint=RUN_DIR/checkpoints/ckpt-N)")
        if not self.export_dir:
            raise UserError("--export_dir is required: the directory to write the export to")
        if self.random_init and self.checkpoint:
            raise UserError("--random_init exports fresh weights: pass --model_dir, not "
                            "--checkpoint")
        return self


def check_target(export_dir, overwrite=False):
    """UserError if export_dir cannot or must not be written (before any work)."""
    if io.exists(export_dir):
        if not io.isdir(export_dir):
            raise UserError(f"--export_dir={export_dir} is a file: pass a directory path")
        if io.listdir(export_dir) and not overwrite:
            raise UserError(f"--export_dir={export_dir} is not empty: pass --overwrite to "
                            "replace it, or another --export_dir")


def feature_maps_model(backbone, architecture):
    """The backbone's pyramid: images -> {"C2": ..., "C5": ...}, sharing its layers."""
    outputs = {level: backbone.get_layer(layer).output
               for level, layer, _ in backbones.feature_pyramid(architecture)}
    return keras.Model(backbone.input, outputs, name="feature_maps")


def pyramid_info(architecture, backbone):
    """export.json's description of the pyramid: per level its stride, channels and layer."""
    levels = {level: {"stride": stride, "layer": layer,
                      "channels": int(backbone.get_layer(layer).output.shape[-1])}
              for level, layer, stride in backbones.feature_pyramid(architecture)}
    info = {"file": FEATURE_MAPS_FILE, "endpoint": "feature_maps", "levels": levels}
    if architecture == "tiny" or architecture.endswith("_cifar"):
        info["note"] = ("levels are the four stages; their strides are not the 4, 8, 16, 32 "
                        "that C2..C5 have in ImageNet ResNets")
    return info


def _export_archive(backbone, head, path, feature_maps=None):
    """Writes the SavedModel with its endpoints."""
    images = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
    archive = keras.export.ExportArchive()
    # Tracking only the backbone makes the loaded object's trainable_variables
    # the backbone's; the head's weights are saved with the endpoint using them.
    archive.track(backbone)
    archive.add_endpoint("serve", lambda x: backbone(x, training=False),
                         input_signature=[images])
    archive.add_endpoint("serve_training", lambda x: backbone(x, training=True),
                         input_signature=[images])
    archive.add_endpoint(
        "projection",
        lambda x: tf.math.l2_normalize(head(backbone(x, training=False)), axis=-1),
        input_signature=[images])
    if feature_maps is not None:
        archive.add_endpoint("feature_maps", lambda x: feature_maps(x, training=False),
                             input_signature=[images])
    archive.write_out(path, verbose=False)


def relative_difference(got, want):
    """max |got - want| / max |want|: 0 when equal, inf when the shapes differ or want is 0."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    diff, scale = np.abs(got - want).max(initial=0.0), np.abs(want).max(initial=0.0)
    if diff == 0:
        return 0.0
    return float(diff / scale) if scale > 0 else float("inf")


def _verify(tmp, model, image_size, architecture):
    """Reloads the artifacts and compares them with the in-memory model.

    Returns ({output: max abs difference}, {output: relative difference}); raises
    RuntimeError if a relative difference exceeds RELATIVE_TOLERANCE.
    """
    # Two images: enough to see wrong weights or wiring; each costs eight forward passes.
    x = np.random.default_rng(0).random((2, image_size, image_size, 3), np.float32)
    features = model.query_backbone(x, training=False).numpy()
    projection = model.encode_query(x, training=False).numpy()
    maps = feature_maps_model(model.query_backbone, architecture)(x, training=False)
    maps = {k: v.numpy() for k, v in maps.items()}
    reloaded = keras.models.load_model(io.join(tmp, KERAS_FILE))
    reloaded_maps = keras.models.load_model(io.join(tmp, FEATURE_MAPS_FILE))(
        x, training=False)
    saved = tf.saved_model.load(io.join(tmp, SAVED_MODEL_DIR))
    saved_maps = saved.feature_maps(x)
    pairs = {  # output -> [(export's, model's)], one pair per pyramid level for the maps
        "keras": [(reloaded(x, training=False), features)],
        "serve": [(saved.serve(x), features)],
        "projection": [(saved.projection(x), projection)],
        "feature_maps_keras": [(reloaded_maps[k], maps[k]) for k in maps],
        "feature_maps": [(saved_maps[k], maps[k]) for k in maps],
    }
    absolute, relative = {}, {}
    for name, outputs in pairs.items():
        outputs = [(np.asarray(got), want) for got, want in outputs]
        relative[name] = max(relative_difference(got, want) for got, want in outputs)
        absolute[name] = max(float(np.abs(got - want).max()) if got.shape == want.shape
                             else float("inf") for got, want in outputs)
    bad = {k: v for k, v in relative.items() if not v <= RELATIVE_TOLERANCE}
    if bad:  # a bug, not bad input
        raise RuntimeError(
            "the export does not reproduce the model: largest differences relative to the "
            f"outputs' magnitudes {bad} exceed {RELATIVE_TOLERANCE}")
    return absolute, relative


def export_info(run, feature_dim):
    """The contents of export.json."""
    config = run.config
    return {
        "format": "co2_tf backbone export",
        "co2_tf_version": co2_tf.__version__,
        "backbone": config.backbone,
        "feature_dim": feature_dim,
        "head": config.head,
        "projection_dim": config.dim,
        "image_size": config.image_size,
        "input": {
            "dtype": "float32", "shape": ["N", "H", "W", 3], "layout": "NHWC, RGB",
            "range": [0.0, 1.0],
            "normalization": {"where": "inside the model", "mean": list(backbones.IMAGENET_MEAN),
                              "std": list(backbones.IMAGENET_STD)},
        },
        "preprocessing": {
            "eval": f"resize the shorter side to round({config.image_size} * 256 / 224) "
                    f"(bilinear, antialiased), centre crop {config.image_size}, scale to [0, 1]",
            "fine_tune_train": f"random resized crop (scale 0.08-1) to {config.image_size} "
                               "+ horizontal flip, scale to [0, 1]",
        },
        "step": run.step,
        "checkpoint": io.absolute(run.checkpoint) if run.checkpoint else None,
        "random_init": run.checkpoint is None,
        "run_dir": io.absolute(run.run_dir),
        "pretraining": {name: getattr(config, name)
                        for name in ("dataset", "data_dir", "split", "eval_split", "augment",
                                     "consistency_weight", "consistency_temperature",
                                     "consistency_temperature_scaling",
                                     "temperature", "bn")},
        "files": {"keras": KERAS_FILE, "saved_model": SAVED_MODEL_DIR,
                  "feature_maps": FEATURE_MAPS_FILE},
        "endpoints": {
            "serve": "images -> pooled features [N, feature_dim], BN inference",
            "serve_training": "images -> pooled features, BN training mode (batch statistics, "
                              "moving averages updated)",
            "projection": "images -> L2-normalised query projection [N, projection_dim]",
            "feature_maps": "images -> {C2, C3, C4, C5}: the stages' maps [N, H/s, W/s, C] "
                            "(see feature_pyramid), BN inference",
        },
    }


def _publish(tmp, export_dir):
    """Moves the finished tmp dir to export_dir, replacing what was there.

    Local disks rename a directory at once. On object stores (gs://, s3://)
    a "directory" rename is a copy of every object and a delete (io.move_tree):
    a reader may see a partial export while it runs, but a failure before it
    (the export itself, its check) still leaves export_dir as it was.
    """
    old = None
    if io.exists(export_dir):
        old = io.temporary_name(export_dir, "old")
        io.move_tree(export_dir, old)
    try:
        io.move_tree(tmp, export_dir)
    except BaseException:
        if old:  # put the previous export back
            io.remove(export_dir)
            io.move_tree(old, export_dir)
        raise
    if old:
        io.remove(old)


def export_run(run, export_dir, *, overwrite=False):
    """Writes the export of a loaded `trained.Run` to export_dir; returns export.json's dict."""
    export_dir = io.absolute(export_dir)
    check_target(export_dir, overwrite)
    tmp = io.temporary_name(export_dir)
    try:
        io.makedirs(tmp)
        backbone = build.any_size_copy(run.config, run.model.query_backbone)
        head = keras.models.clone_model(run.model.query_head)
        head.set_weights(run.model.query_head.get_weights())
        pyramid = feature_maps_model(backbone, run.config.backbone)
        backbone.save(io.join(tmp, KERAS_FILE))
        pyramid.save(io.join(tmp, FEATURE_MAPS_FILE))
        _export_archive(backbone, head, io.join(tmp, SAVED_MODEL_DIR), pyramid)
        info = export_info(run, backbone.output_shape[-1])
        info["feature_pyramid"] = pyramid_info(run.config.backbone, backbone)
        absolute, relative = _verify(tmp, run.model, run.config.image_size,
                                     run.config.backbone)
        info["verified_max_abs_diff"] = absolute
        # Each difference over the largest magnitude of the output it compares.
        info["verified_relative_diff"] = relative
        info["verified_relative_tolerance"] = RELATIVE_TOLERANCE
        io.write_json_atomic(io.join(tmp, EXPORT_FILE), info)
        _publish(tmp, export_dir)
    except BaseException:
        io.remove(tmp)
        raise
    return info


def export(config: ExportConfig):
    """tools/export.py: checks, loads the run's checkpoint, writes the export."""
    config.check()
    check_target(io.absolute(config.export_dir), config.overwrite)  # before loading
    run = trained.load_run(config.model_dir, config.checkpoint,
                           restore_weights=not config.random_init)
    return export_run(run, config.export_dir, overwrite=config.overwrite)
