"""Features and the weighted kNN classifier; the kNN evaluation tool.

The kNN classifier is InstDisc's (Wu et al. 2018), the usual monitor of
MoCo-style pretraining: cosine similarity to a memory bank of training
features, the k nearest neighbours vote for their class with weight
exp(similarity / t). `knn_top1` is what the pretraining monitor reports;
`knn_eval(KnnConfig)` is tools/knn_eval.py: the same classifier (memory
bank: the training split, queries: the held-out split, both centre-cropped)
from a run dir, a checkpoint or an exported backbone.keras, with top-1 and
top-5 in OUTPUT_DIR/knn_eval.json and as TensorBoard scalars knn_top1 /
knn_top5 (OUTPUT_DIR/logs, at the checkpoint's step), optionally with the
held-out embeddings for TensorBoard's projector.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from co2_tf import distribute, io
from co2_tf import progress as progress_lib
from co2_tf.config import flag
from co2_tf.errors import UserError
from co2_tf.evaluation import common, projector


class FeatureExtractor:
    """backbone features of (images, labels) batches, on every replica of the backbone's strategy.

    `strategy`: None for the one the backbone was built under (Keras's
    `distribute_strategy`: a MirroredStrategy or TPUStrategy of training, or
    the default one-device strategy). Each global batch is padded to one
    static shape (`batch_size`, rounded up to a multiple of the replicas) with
    weight-0 examples, split across the replicas and gathered back in order
    without the padding: one trace of one device function, whatever the
    dataset's last batch (on TPU, one compilation), and the features of a
    model run on N replicas are those of one device. (Keras's
    `predict_on_batch` on a model built under a strategy of N replicas gives
    every replica the whole batch and returns N copies.) Keep one extractor
    to reuse its traced function across datasets and evaluations.
    """

    def __init__(self, backbone, strategy=None):
        self.backbone = backbone
        self.strategy = strategy or backbone.distribute_strategy
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Its datasets are sharded across hosts: each host would see part of the features.
            raise ValueError("feature extraction runs on one host: pass a backbone built "
                             "outside the MultiWorkerMirroredStrategy")
        self.replicas = self.strategy.num_replicas_in_sync
        self.step = tf.function(self._step)

    def _step(self, batch):
        def replica_fn(images, labels, weights):
            return self.backbone(images, training=False), labels, weights
        return self.strategy.run(replica_fn, args=batch)

    def padded_size(self, batch_size):
        """The static global batch every batch is padded to."""
        return -(-batch_size // self.replicas) * self.replicas

    def batches(self, dataset, batch_size):
        """The distributed dataset of padded (images, labels, weights) global batches."""
        padded = dataset.map(distribute.pad_to_size(self.padded_size(batch_size)))
        return self.strategy.experimental_distribute_dataset(padded)

    def __call__(self, batch):
        """A distributed batch -> (features, labels) of its real examples, in order."""
        f, y, w = (tf.concat(self.strategy.experimental_local_results(t), 0)
                   for t in self.step(batch))
        return tf.boolean_mask(f, w > 0), tf.boolean_mask(y, w > 0)


def extract_features(backbone, dataset, normalize=True, verbose=0, strategy=None,
                     progress=None, what="features", batch_size=None):
    """Features (L2-normalised unless normalize=False) and labels of a finite dataset.

    `backbone`: a Keras model, or a FeatureExtractor (reused across calls).
    `dataset` yields (images, labels) global batches of at most `batch_size`
    (None: its first batch's size); verbose=1 shows a progress bar;
    `progress` (a co2_tf.progress.Reporter) prints lines `what: N/M images,
    ...`. `strategy`: see FeatureExtractor; the result keeps the dataset's
    order and does not depend on the replicas.
    """
    extractor = (backbone if isinstance(backbone, FeatureExtractor)
                 else FeatureExtractor(backbone, strategy))
    batch_size = batch_size or common.batch_size_of(dataset)
    features, labels = [], []
    steps = int(dataset.cardinality())
    bar = keras.utils.Progbar(steps if steps >= 0 else None, verbose=verbose,
                              unit_name="batch")
    lines = progress_lib.reporter(progress).task(
        what, steps * batch_size if steps > 0 else None, unit="images")
    for batch in extractor.batches(dataset, batch_size):
        bar.add(1)
        f, y = extractor(batch)
        lines.add(int(y.shape[0]))
        f = tf.cast(f, tf.float32)
        features.append(tf.math.l2_normalize(f, -1) if normalize else f)
        labels.append(tf.cast(y, tf.int32))
    lines.done(lines.count)
    if not features:
        raise ValueError("no examples to extract features of")
    return tf.concat(features, 0), tf.concat(labels, 0)


def knn_predict_scores(train_features, train_labels, test_features, num_classes, k=200,
                       temperature=0.1, chunk=512):
    """Class scores [N_test, C] of the weighted kNN vote.

    Features must be L2-normalised. Test examples are processed in chunks so
    that the [chunk, N_train] similarity matrix stays small.
    """
    k = min(k, int(train_features.shape[0]))
    scores = []
    for start in range(0, int(test_features.shape[0]), chunk):
        sims = tf.matmul(test_features[start:start + chunk], train_features, transpose_b=True)
        top_sims, top_idx = tf.math.top_k(sims, k=k)
        weights = tf.exp(top_sims / temperature)
        votes = tf.one_hot(tf.gather(train_labels, top_idx), num_classes) * weights[..., None]
        scores.append(tf.reduce_sum(votes, axis=1))
    return tf.concat(scores, 0)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=200,
                 temperature=0.1):
    """Top-1 accuracy (a fraction) of the weighted kNN classifier."""
    scores = knn_predict_scores(train_features, train_labels, test_features, num_classes, k,
                                temperature)
    predicted = np.argmax(scores.numpy(), axis=-1)
    return float(np.mean(predicted == np.asarray(test_labels)))


def knn_top1(backbone, train_dataset, test_dataset, num_classes, k=200, temperature=0.1,
             progress=None, batch_size=None):
    """kNN top-1 of `backbone` features: memory bank from train, queries from test.

    `backbone`: a Keras model or a FeatureExtractor (see extract_features).
    """
    extractor = (backbone if isinstance(backbone, FeatureExtractor)
                 else FeatureExtractor(backbone))
    train_f, train_y = extract_features(extractor, train_dataset, progress=progress,
                                        what="kNN features (memory bank)",
                                        batch_size=batch_size)
    test_f, test_y = extract_features(extractor, test_dataset, progress=progress,
                                      what="kNN features (queries)", batch_size=batch_size)
    return knn_accuracy(train_f, train_y, test_f, test_y, num_classes, k, temperature)


RESULTS_FILE = "knn_eval.json"


@dataclasses.dataclass
class KnnConfig(common.EvalConfig):
    k: int = flag(200, "neighbours that vote")
    temperature: float = flag(0.1, "vote weight exp(cosine / temperature)")
    projector_dir: str = flag("", "also write held-out embeddings for TensorBoard's projector "
                              "here")
    projector_points: int = flag(2000, "at most this many held-out examples in the projector "
                                 "(the first ones)")

    def check(self):
        super().check()
        if self.k <= 0:
            raise UserError(f"--k={self.k} must be > 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UserError(f"--temperature={self.temperature} must be > 0")
        if self.projector_points <= 0:
            raise UserError(f"--projector_points={self.projector_points} must be > 0")
        return self


def knn_eval(config: KnnConfig, verbose=1, strategy=None):
    """kNN top-1 / top-5 of the backbone `config` names; returns (and writes) the results.

    strategy: None for the one config.strategy names (tests pass theirs).
    """
    out = common.output_dir(config.check(), "knn_eval")
    strategy, loaded, d = common.prepare(config, strategy)
    extractor = FeatureExtractor(loaded.backbone, strategy)  # one trace for both splits
    bank_f, bank_y = extract_features(extractor, d.labelled(d.split), verbose=verbose,
                                      progress=config.reporter(), batch_size=d.batch_size,
                                      what=f"kNN features ({d.split})")
    query_f, query_y = extract_features(extractor, d.labelled(d.eval_split),
                                        verbose=verbose, progress=config.reporter(),
                                        batch_size=d.batch_size,
                                        what=f"kNN features ({d.eval_split})")
    scores = knn_predict_scores(bank_f, bank_y, query_f, d.num_classes, config.k,
                                           config.temperature).numpy()
    truth = query_y.numpy()
    top5 = np.argsort(-scores, axis=1)[:, :min(5, d.num_classes)]
    results = {
        "top1": float(np.mean(np.argmax(scores, axis=1) == truth)),
        "top5": float(np.mean(np.any(top5 == truth[:, None], axis=1))),
        "k": config.k, "temperature": config.temperature,
        "replicas": strategy.num_replicas_in_sync,
        "backbone": loaded.as_dict(),
        "data": dict(d.as_dict(), image_size=d.image_size, bank_examples=int(bank_f.shape[0]),
                     query_examples=int(query_f.shape[0])),
    }
    if config.projector_dir:
        n = min(config.projector_points, int(query_f.shape[0]))
        images = np.concatenate([x.numpy() for x, _ in d.labelled(d.eval_split).take(
            math.ceil(n / d.batch_size))])[:n]
        projector.write_projector(config.projector_dir, query_f[:n].numpy(), truth[:n],
                                   d.class_names, images)
        results["projector_dir"] = config.projector_dir
    # At the checkpoint's step: evaluating several checkpoints into one dir draws a curve.
    with tf.summary.create_file_writer(io.join(out, common.LOG_SUBDIR)).as_default():
        for name in ("top1", "top5"):
            tf.summary.scalar(f"knn_{name}", results[name], step=loaded.step or 0)
    results["log_dir"] = io.join(out, common.LOG_SUBDIR)
    common.write_results(out, RESULTS_FILE, results)
    return results
