"""The kNN monitor of pretraining: the query backbone's weighted kNN top-1 on held-out data.

`knn_evaluator(config, source)` makes the function backbone -> top-1 (the
classifier of co2_tf.evaluation.knn); `KnnMonitor` calls it every N epochs
into the epoch logs (TensorBoard's epoch_knn_top1), and training calls it at
the end of the run (summary.json).
"""

import logging

import keras
import tensorflow as tf

from co2_tf import build
from co2_tf.data import pipelines
from co2_tf.errors import UserError
from co2_tf.evaluation import knn as knn_lib
from co2_tf.run.global_step import read_step

log = logging.getLogger(__name__)


def knn_evaluator(config, source, reporter=None):
    """A function backbone -> kNN top-1 on the held-out split, or None if there is none.

    The held-out split is --eval_split, else the dataset's usual one
    (`Source.default_eval_split`); without one the monitor is off (one log line).
    `reporter` (co2_tf.progress.Reporter): progress lines of the feature extraction.
    """
    try:
        eval_split = config.eval_split or source.default_eval_split()
    except UserError as e:
        log.warning("kNN monitor off: %s", e)
        return None
    batch_size = 256
    common = dict(image_size=config.image_size, batch_size=batch_size, transform="eval")
    bank = pipelines.labelled_dataset(source, split=config.split, **common)
    queries = pipelines.labelled_dataset(source, split=eval_split, **common)
    if source.in_memory:
        # Small data (the demo's 10k images: 123 MB at 32 px): the eval views are
        # computed once, not at every evaluation (half of each one's time).
        bank, queries = bank.cache(), queries.cache()
    classes = len(source.class_names(config.split))
    local_copy = []
    extractors = {}  # backbone -> its extractor: one trace per backbone and run

    def evaluate(backbone):
        if isinstance(backbone.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Under MultiWorkerMirroredStrategy each worker would see only its
            # shard of the data: evaluate a copy made outside the strategy, on
            # this worker's values.
            if not local_copy:
                local_copy.append(build.backbone_fn(config)("knn_backbone"))
            local_copy[0].set_weights(backbone.get_weights())
            backbone = local_copy[0]
        if backbone not in extractors:
            # Over the replicas of the strategy the backbone was built under.
            extractors[backbone] = knn_lib.FeatureExtractor(backbone)
        return knn_lib.knn_top1(extractors[backbone], bank, queries, classes, k=config.knn_k,
                                temperature=config.knn_temperature, progress=reporter,
                                batch_size=batch_size)
    return evaluate


class KnnMonitor(keras.callbacks.Callback):
    """Weighted kNN top-1 of the query backbone every N epochs, into the epoch logs."""

    def __init__(self, evaluate, every_epochs):
        super().__init__()
        self.evaluate = evaluate
        self.every_epochs = every_epochs
        self.last = None  # (step, top-1) of the latest evaluation

    def on_epoch_end(self, epoch, logs=None):
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0 and logs is not None:
            # Logs is the dict every callback sees: TensorBoard (later in the
            # list) writes it as epoch_knn_top1.
            logs["knn_top1"] = self.evaluate(self.model.query_backbone)
            self.last = (read_step(self.model), logs["knn_top1"])  # once per evaluation
