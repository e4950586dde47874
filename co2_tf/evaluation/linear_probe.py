"""Linear evaluation: a linear classifier on the pooled features of a frozen backbone.

Protocols (`LinearEvalConfig.protocol`):

- "moco": MoCo's ImageNet linear protocol (main_lincls.py): SGD lr 30,
  momentum 0.9, weight decay 0, batch 256, 100 epochs, lr x0.1 at 60% and
  80% of the epochs (epochs 60 and 80 of 100); training images get
  RandomResizedCrop + flip, held-out images resize + centre crop. The
  backbone's BN runs in inference mode (frozen statistics, as MoCo's
  `model.eval()`), only the classifier trains. Every flag is adjustable.
- "fast": features computed once (centre crop, no augmentation), kept in
  memory and cached in OUTPUT_DIR/features.npz (reused when source, data
  and image size match), then the classifier trained on them, with the same
  optimizer and schedule. The features are first standardised with the
  training split's per-dimension mean and std (MAE's BatchNorm without
  affine parameters before the linear probe): one learning rate (default
  0.1) then suits any backbone, where MoCo's lr 30 only suits features of
  MoCo's ResNet-50 scale. For small datasets and quick checks: it trains in
  seconds, and the features of both splits must fit in memory.

Results (top-1 / top-5 on the held-out split, as fractions) go to
OUTPUT_DIR/linear_eval.json and TensorBoard (OUTPUT_DIR/logs); the classifier
to OUTPUT_DIR/linear_classifier.keras: backbone + (standardisation +) linear
layer, float32 images in [0, 1] of [N, S, S, 3] (resized and centre-cropped as
the evaluation's held-out images, S = data.image_size of the JSON) -> logits.
The "moco" protocol checkpoints into OUTPUT_DIR/checkpoints and resumes
(co2_tf.evaluation.resume). Under a strategy of several replicas the
classifier trains on each global batch split across them, and features are
extracted the same way.
"""

import contextlib
import dataclasses
import io as stdio
import json
import math

import keras
import numpy as np
import tensorflow as tf

from co2_tf import io
from co2_tf.config import flag
from co2_tf.errors import UserError
from co2_tf.evaluation import classifier, common, knn, resume

PROTOCOLS = ("moco", "fast")
# MoCo's lr for its protocol; the fast protocol's standardised features want less.
DEFAULT_LEARNING_RATES = {"moco": 30.0, "fast": 0.1}
RESULTS_FILE = "linear_eval.json"
MODEL_FILE = "linear_classifier.keras"
FEATURES_FILE = "features.npz"


@dataclasses.dataclass
class LinearEvalConfig(classifier.SgdSchedule, common.EvalConfig):
    protocol: str = flag("moco", "moco (MoCo's ImageNet protocol: augmented images, frozen "
                         "backbone) | fast (cached centre-crop features)", choices=PROTOCOLS)
    epochs: int = flag(100, "classifier training epochs")
    learning_rate: float = flag(0.0, "SGD learning rate (0 = the protocol's: moco 30, fast 0.1)")
    cache_features: bool = flag(True, "fast protocol: keep features in OUTPUT_DIR/features.npz "
                                "and reuse them")

    def check(self):
        super().check()
        if self.protocol not in PROTOCOLS:
            raise UserError(f"unknown --protocol={self.protocol!r}: use one of "
                            f"{', '.join(PROTOCOLS)}")
        if not (self.learning_rate >= 0 and math.isfinite(self.learning_rate)):
            raise UserError(f"--learning_rate={self.learning_rate} must be > 0 (0 = the "
                            "protocol's default)")
        classifier.check_sgd_schedule(self)
        return self


def learning_rate(config):
    return config.learning_rate or DEFAULT_LEARNING_RATES[config.protocol]


def _optimizer(config, steps_per_epoch):
    return classifier.step_optimizer(
        learning_rate(config), boundaries=classifier.parse_boundaries(config.lr_boundaries),
        decay=config.lr_decay, total_steps=config.epochs * steps_per_epoch,
        momentum=config.momentum, weight_decay=config.weight_decay)


def _compile(model, config, steps_per_epoch, num_classes):
    classifier.compile_classifier(model, _optimizer(config, steps_per_epoch), num_classes)
    model.optimizer.build(model.trainable_variables)  # slots now: a checkpoint restores them


def frozen_classifier(backbone, image_size, num_classes, seed):
    """images -> logits: the backbone frozen (BN in inference mode), a linear layer on top."""
    backbone.trainable = False  # Keras 3: also runs its BN in inference mode
    inputs = keras.Input((image_size, image_size, 3), name="images")
    features = backbone(inputs, training=False)
    return keras.Model(inputs, classifier.linear_layer(num_classes, seed)(features),
                       name="linear_probe")


def cached_features(loaded, d, cache_path=None, verbose=0, strategy=None, progress=None):
    """(train features, train labels, eval features, eval labels), numpy, not normalised.

    Reuses cache_path when it holds the features of the same source, data and
    image size; otherwise computes them (centre crops) and writes it.
    """
    key = json.dumps({"source": loaded.as_dict(), "data": d.as_dict(),
                      "image_size": d.image_size}, sort_keys=True)
    if cache_path and io.exists(cache_path):
        with np.load(stdio.BytesIO(io.read_bytes(cache_path))) as cached:
            if str(cached["key"]) == key:
                return tuple(cached[n] for n in ("train_f", "train_y", "eval_f", "eval_y"))
    arrays = {}
    extractor = knn.FeatureExtractor(loaded.backbone, strategy)  # one trace for both splits
    for name, split in (("train", d.split), ("eval", d.eval_split)):
        f, y = knn.extract_features(extractor, d.labelled(split), normalize=False,
                                    verbose=verbose, progress=progress,
                                    what=f"features ({split})", batch_size=d.batch_size)
        arrays[f"{name}_f"], arrays[f"{name}_y"] = f.numpy(), y.numpy()
    if cache_path:
        buffer = stdio.BytesIO()
        np.savez(buffer, key=np.array(key), **arrays)
        io.write_bytes_atomic(cache_path, buffer.getvalue())
    return arrays["train_f"], arrays["train_y"], arrays["eval_f"], arrays["eval_y"]


def _fast(config, loaded, d, out, verbose, strategy):
    cache = io.join(out, FEATURES_FILE) if config.cache_features else None
    train_f, train_y, eval_f, eval_y = cached_features(loaded, d, cache, verbose, strategy,
                                                       config.reporter())
    n = len(train_y)
    with strategy.scope():
        inputs = keras.Input((train_f.shape[1],), name="features")
        standardize = keras.layers.Normalization(
            mean=train_f.mean(0), variance=train_f.var(0) + 1e-6, name="standardize")
        linear = classifier.linear_layer(d.num_classes, config.seed)
        model = keras.Model(inputs, linear(standardize(inputs)), name="linear_classifier")
        _compile(model, config, math.ceil(n / config.batch_size), d.num_classes)
    images = keras.Input((d.image_size, d.image_size, 3), name="images")
    # What is kept: the same layers on the backbone's features, images in.
    whole = keras.Model(images, linear(standardize(loaded.backbone(images, training=False))),
                        name="linear_classifier")

    def train_data(epoch, skip_batches):
        return (tf.data.Dataset.from_tensor_slices((train_f, train_y))
                .shuffle(n, seed=config.seed * 1_000_003 + epoch).batch(config.batch_size)
                .skip(skip_batches))
    eval_data = tf.data.Dataset.from_tensor_slices((eval_f, eval_y)).batch(config.batch_size)
    return model, whole, train_data, eval_data, n


def _moco(config, loaded, d, strategy):
    n = d.source.num_examples(d.split)
    with strategy.scope():
        model = frozen_classifier(loaded.backbone, d.image_size, d.num_classes, config.seed)
        _compile(model, config, math.ceil(n / config.batch_size), d.num_classes)

    def train_data(epoch, skip_batches):
        return d.labelled(d.split, "classifier_train", seed=config.seed * 1_000_003 + epoch,
                          skip_batches=skip_batches)
    return model, model, train_data, d.labelled(d.eval_split), n


def linear_eval(config: LinearEvalConfig, verbose=1, strategy=None, callbacks=()):
    """Runs the linear evaluation `config` describes; returns (and writes) the results.

    strategy: None for the one config.strategy names (tests pass theirs).
    """
    out = common.output_dir(config.check(), f"linear_eval_{config.protocol}")
    strategy, loaded, d = common.prepare(config, strategy)
    if config.protocol == "fast":
        model, whole, train_data, eval_data, n = _fast(config, loaded, d, out, verbose,
                                                       strategy)
        resumable = contextlib.nullcontext()
    else:
        model, whole, train_data, eval_data, n = _moco(config, loaded, d, strategy)
        resumable = resume.Resumable(out, resume.key_of(config, loaded, d),
                                     config.checkpoint_every, model=model,
                                     optimizer=model.optimizer)
    with resumable as checkpoints:
        metrics = classifier.train_classifier(
            model, train_data, eval_data, epochs=config.epochs, eval_every=config.eval_every,
            log_dir=io.join(out, common.LOG_SUBDIR), verbose=verbose, resumable=checkpoints,
            callbacks=callbacks, progress=config.reporter(), eval_batch_size=config.batch_size)
    results = dict(metrics, protocol=config.protocol, backbone=loaded.as_dict(),
                   replicas=strategy.num_replicas_in_sync,
                   data=dict(d.as_dict(), train_examples=n, image_size=d.image_size),
                   hyper_parameters=dict(
                       {name: getattr(config, name) for name in (
                           "epochs", "batch_size", "momentum", "weight_decay",
                           "lr_boundaries", "lr_decay", "seed")},
                       learning_rate=learning_rate(config)),
                   model_file=common.save_model(whole, io.join(out, MODEL_FILE),
                                                     "linear_classifier"))
    results["results_file"] = common.write_results(out, RESULTS_FILE, results)
    return results
