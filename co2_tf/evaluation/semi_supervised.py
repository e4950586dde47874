"""Semi-supervised evaluation: fine-tune the whole network on a fraction of the labels.

The backbone (BN in training mode) and a new linear head are trained
together on a labelled subset of the training split, each with its own
learning rate, then top-1 / top-5 are measured on the held-out split.

The subset:
- ImageNet (--dataset=tfds:imagenet2012, fraction 0.01 or 0.1, split train):
  the standard lists published with SimCLR, which TFDS serves as
  `imagenet2012_subset/1pct` and `/10pct` (prepare them with `tfds build`).
- Otherwise: a class-balanced subset drawn with --seed (round(fraction *
  n_c) examples of each class c, at least one), written to
  OUTPUT_DIR/labels_<fraction>_seed<seed>.txt: a header comment naming the
  dataset, split, fraction and seed, then one example index (position in
  the split, see `Source.labels`) per line. Pass it back with
  --split_file to fine-tune on the very same examples.

Default hyper-parameters are SwAV's public semi-supervised recipe
(eval_semisup.py, 10% labels): 20 epochs, batch 256, SGD momentum 0.9, no
weight decay, backbone lr 0.01, head lr 0.2, both x0.2 at epochs 12 and 16;
its 1% recipe uses backbone lr 0.02 and head lr 5. Augmentation:
RandomResizedCrop + flip for training, resize + centre crop for classifier.
They are a starting point, not the CO2 paper's settings (not published in a
form checked here).

Fine-tuning checkpoints into OUTPUT_DIR/checkpoints and resumes
(co2_tf.evaluation.resume). Under a strategy of several replicas each global
batch is split across them; BN normalises with each replica's share of the
batch (as training's local BN) and its moving statistics are replica 0's.
The fine-tuned network is kept as OUTPUT_DIR/semi_supervised_classifier.keras.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from co2_tf import distribute, io
from co2_tf.config import flag, help_of
from co2_tf.errors import UserError
from co2_tf.evaluation import classifier, common, resume

RESULTS_FILE = "semi_supervised.json"
# images in (float32 [N, S, S, 3] in [0, 1], centre-cropped as the held-out images) -> logits
MODEL_FILE = "semi_supervised_classifier.keras"
_HEADER = "# co2_tf label subset:"


@dataclasses.dataclass
class SemiSupervisedConfig(classifier.SgdSchedule, common.EvalConfig):
    seed: int = flag(0, "seed of the subset draw, head init, data order and augmentation")
    label_fraction: float = flag(0.1, "fraction of the training labels to fine-tune on, in "
                                 "(0, 1]")
    split_file: str = flag("", "fine-tune on the examples listed in this file (written by an "
                           "earlier run) instead of drawing a subset")
    epochs: int = flag(20, "fine-tuning epochs")
    backbone_learning_rate: float = flag(0.01, "SGD learning rate of the backbone (SwAV: 0.01 "
                                         "for 10%, 0.02 for 1%)")
    head_learning_rate: float = flag(0.2, "SGD learning rate of the linear head (SwAV: 0.2 for "
                                     "10%, 5 for 1%)")
    lr_boundaries: str = flag("0.6,0.8", "fractions of the epochs where both lrs are multiplied "
                              "by --lr_decay")
    lr_decay: float = flag(0.2, help_of(classifier.SgdSchedule, "lr_decay"))

    def check(self):
        super().check()
        if not (0 < self.label_fraction <= 1):
            raise UserError(f"--label_fraction={self.label_fraction} must be in (0, 1]: "
                            "e.g. 0.01 for 1% or 0.1 for 10% of the labels")
        for name in ("backbone_learning_rate", "head_learning_rate"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"--{name}={value} must be >= 0 (0 freezes those weights)")
        classifier.check_sgd_schedule(self)
        return self


# ----------------------------------------------------------------- subsets
def balanced_subset(labels, fraction, seed):
    """Sorted indices: round(fraction * n_c) (at least 1) random examples of each class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(len(members), max(1, int(round(fraction * len(members)))))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros([0], np.int64)


def split_file_name(fraction, seed):
    return f"labels_{fraction:g}_seed{seed}.txt"


def write_split_file(path, indices, *, dataset, split, fraction, seed, total):
    """The subset as text: a header comment, then one example index per line."""
    header = (f"{_HEADER} dataset={dataset} split={split} fraction={fraction:g} "
              f"seed={seed} examples={len(indices)} of={total}\n")
    io.write_text_atomic(path, header + "".join(f"{int(i)}\n" for i in indices))


def read_split_file(path, *, dataset, split, total):
    """(indices, header fields) of a split file made for this dataset and split."""
    if not io.exists(path):
        raise UserError(f"--split_file={path} does not exist: pass a file an earlier "
                        "semi_supervised run wrote, or omit --split_file to draw a subset")
    lines = io.read_text(path).splitlines()
    header = {}
    if lines and lines[0].startswith(_HEADER):
        header = dict(field.split("=", 1) for field in lines[0][len(_HEADER):].split()
                      if "=" in field)
    made_for = (header.get("dataset"), header.get("split"))
    if made_for != (dataset, split):
        raise UserError(f"--split_file={path} lists examples of dataset={made_for[0]} "
                        f"split={made_for[1]}, not {dataset} {split}: pass a file written for "
                        "this dataset and split, or omit --split_file")
    indices = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.isdigit() or int(line) >= total:
            raise UserError(f"line {number} of {path} is {line!r}, not an example index in "
                            f"[0, {total}): pass an unmodified split file")
        indices.append(int(line))
    if not indices or len(set(indices)) != len(indices):
        raise UserError(f"{path} lists no examples or some twice: pass an unmodified split file")
    return np.asarray(indices, np.int64), header


def label_subset(config, d, out):
    """(training EvalData, indices or None, description) of the labelled subset."""
    if config.split_file:
        total = d.source.num_examples(d.split)
        indices, header = read_split_file(config.split_file, dataset=str(d.source),
                                          split=d.split, total=total)
        return d, indices, {"split_file": io.absolute(config.split_file),
                            "fraction": float(header.get("fraction", len(indices) / total)),
                            "seed": header.get("seed"), "examples": len(indices)}
    standard = d.source.standard_label_subset(d.split, config.label_fraction)
    if standard is not None:
        standard.validate("train")
        n = standard.num_examples("train")
        return (dataclasses.replace(d, source=standard, split="train"), None,
                {"standard_subset": str(standard), "fraction": config.label_fraction,
                 "examples": n})
    labels = d.source.labels(d.split)
    indices = balanced_subset(labels, config.label_fraction, config.seed)
    path = io.join(out, split_file_name(config.label_fraction, config.seed))
    write_split_file(path, indices, dataset=str(d.source), split=d.split,
                     fraction=config.label_fraction, seed=config.seed, total=len(labels))
    return d, indices, {"split_file": path, "fraction": config.label_fraction,
                        "seed": config.seed, "examples": len(indices)}


# -------------------------------------------------------------------- model
class FineTuner(keras.Model):
    """images -> logits: the backbone and a linear head, each with its own optimizer.

    The compiled optimizer trains the head; `backbone_optimizer` the
    backbone. The loss is the mean cross-entropy over the global batch.
    """

    def __init__(self, backbone, num_classes, image_size, seed, backbone_optimizer, **kwargs):
        inputs = keras.Input((image_size, image_size, 3), name="images")
        head = classifier.linear_layer(num_classes, seed, name="head")
        super().__init__(inputs, head(backbone(inputs)), **kwargs)
        self.backbone = backbone
        self.head = head
        self.backbone_optimizer = backbone_optimizer

    def train_step(self, batch):
        # (images, labels[, weights]): weight 0 marks the padding of a last batch
        # smaller than the replicas (classifier.train_classifier).
        images, labels, weights = (*batch, None)[:3]
        if weights is None:
            weights = tf.ones_like(labels, tf.float32)
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        with tf.GradientTape() as tape:
            logits = self(images, training=True)
            xent = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.math.divide_no_nan(tf.reduce_sum(xent * weights), tf.reduce_sum(weights))
            # Optimizers sum replicas' gradients: each replica's share of the mean.
            scaled = loss / replicas
        backbone_vars = self.backbone.trainable_variables
        head_vars = self.head.trainable_variables
        grads = tape.gradient(scaled, backbone_vars + head_vars)
        self.backbone_optimizer.apply_gradients(zip(grads[:len(backbone_vars)], backbone_vars))
        self.optimizer.apply_gradients(zip(grads[len(backbone_vars):], head_vars))
        # BN moving statistics: each replica averages its own batches into its own copy.
        distribute.copy_first_replica([v for v in self.backbone.non_trainable_weights
                                       if v.aggregation == "none"])
        # Keras's documented pattern: the metric named "loss" tracks the loss.
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(labels, logits, sample_weight=weights)
        return self.get_metrics_result()


def fine_tune(config: SemiSupervisedConfig, verbose=1, strategy=None, callbacks=()):
    """Runs the semi-supervised fine-tuning `config` describes; returns (and writes) results.

    strategy: None for the one config.strategy names (tests pass theirs).
    """
    out = common.output_dir(config.check(), f"semi_supervised_{config.label_fraction:g}")
    strategy, loaded, d = common.prepare(config, strategy)
    train_d, indices, subset = label_subset(config, d, out)
    n = subset["examples"]
    if n < 1:
        raise UserError("the label subset is empty: raise --label_fraction")
    steps = config.epochs * math.ceil(n / config.batch_size)

    def optimizer(lr):
        return classifier.step_optimizer(
            lr, boundaries=classifier.parse_boundaries(config.lr_boundaries),
            decay=config.lr_decay, total_steps=steps, momentum=config.momentum,
            weight_decay=config.weight_decay)

    backbone = loaded.backbone
    backbone.trainable = True
    with strategy.scope():
        model = FineTuner(backbone, d.num_classes, d.image_size, config.seed,
                          optimizer(config.backbone_learning_rate), name="fine_tuner")
        classifier.compile_classifier(model, optimizer(config.head_learning_rate),
                                      d.num_classes)
        # Slots now, eagerly, and each optimizer only for its own variables.
        model.optimizer.build(model.head.trainable_variables)
        model.backbone_optimizer.build(backbone.trainable_variables)

    def train_data(epoch, skip_batches):
        return train_d.labelled(train_d.split, "classifier_train",
                                seed=config.seed * 1_000_003 + epoch, indices=indices,
                                skip_batches=skip_batches)
    key = resume.key_of(config, loaded, d)
    key["subset"] = subset
    with resume.Resumable(out, key, config.checkpoint_every, model=model,
                          optimizer=model.optimizer,
                          backbone_optimizer=model.backbone_optimizer) as checkpoints:
        metrics = classifier.train_classifier(
            model, train_data, d.labelled(d.eval_split), epochs=config.epochs,
            eval_every=config.eval_every, log_dir=io.join(out, common.LOG_SUBDIR),
            verbose=verbose, resumable=checkpoints, callbacks=callbacks,
            progress=config.reporter(), eval_batch_size=config.batch_size)
    model_file = common.save_model(model, io.join(out, MODEL_FILE),
                                   "semi_supervised_classifier")
    results = dict(metrics, backbone=loaded.as_dict(),
                   replicas=strategy.num_replicas_in_sync,
                   data=dict(d.as_dict(), image_size=d.image_size), subset=subset,
                   model_file=model_file,
                   hyper_parameters={name: getattr(config, name) for name in (
                       "epochs", "batch_size", "backbone_learning_rate", "head_learning_rate",
                       "momentum", "weight_decay", "lr_boundaries", "lr_decay", "seed")})
    common.write_results(out, RESULTS_FILE, results)
    return results
