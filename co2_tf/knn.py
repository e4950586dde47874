"""kNN evaluation of a run or an export, as the pretraining monitor does it.

The weighted kNN classifier of `evaluation.knn_eval` (the memory bank is
the training split, the queries the held-out split, both centre-cropped),
from a run dir, a checkpoint or an exported backbone.keras. Optionally
writes the held-out embeddings for TensorBoard's projector.
"""

import dataclasses
import math

import numpy as np

from co2_tf import evaluation, runs
from co2_tf.errors import UserError

RESULTS_FILE = "knn_eval.json"


@dataclasses.dataclass
class KnnConfig(runs.EvalConfig):
    k: int = 200
    temperature: float = 0.1
    projector_dir: str = ""
    projector_points: int = 2000

    def check(self):
        super().check()
        if self.k <= 0:
            raise UserError(f"--k={self.k} must be > 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UserError(f"--temperature={self.temperature} must be > 0")
        if self.projector_points <= 0:
            raise UserError(f"--projector_points={self.projector_points} must be > 0")
        return self


HELP = dict(
    runs.EVAL_HELP,
    k="neighbours that vote",
    temperature="vote weight exp(cosine / temperature)",
    projector_dir="also write held-out embeddings for TensorBoard's projector here",
    projector_points="at most this many held-out examples in the projector (the first ones)",
)


def knn_eval(config: KnnConfig, verbose=1):
    """kNN top-1 / top-5 of the backbone `config` names; returns (and writes) the results."""
    config.check()
    out = runs.output_dir(config, "knn_eval")
    loaded = runs.load_backbone(config)
    d = runs.resolve_data(config, loaded)
    bank_f, bank_y = evaluation.extract_features(loaded.backbone, d.labelled(d.split),
                                                 verbose=verbose)
    query_f, query_y = evaluation.extract_features(loaded.backbone, d.labelled(d.eval_split),
                                                   verbose=verbose)
    scores = evaluation.knn_predict_scores(bank_f, bank_y, query_f, d.num_classes, config.k,
                                           config.temperature).numpy()
    truth = query_y.numpy()
    top5 = np.argsort(-scores, axis=1)[:, :min(5, d.num_classes)]
    results = {
        "top1": float(np.mean(np.argmax(scores, axis=1) == truth)),
        "top5": float(np.mean(np.any(top5 == truth[:, None], axis=1))),
        "k": config.k, "temperature": config.temperature,
        "backbone": loaded.as_dict(),
        "data": dict(d.as_dict(), image_size=d.image_size, bank_examples=int(bank_f.shape[0]),
                     query_examples=int(query_f.shape[0])),
    }
    if config.projector_dir:
        n = min(config.projector_points, int(query_f.shape[0]))
        images = np.concatenate([x.numpy() for x, _ in d.labelled(d.eval_split).take(
            math.ceil(n / d.batch_size))])[:n]
        evaluation.write_projector(config.projector_dir, query_f[:n].numpy(), truth[:n],
                                   d.class_names, images)
        results["projector_dir"] = config.projector_dir
    evaluation.write_results(out, RESULTS_FILE, results)
    return results
