"""References tests share: the small trained run's settings, NumPy kNN, float64 NumPy losses."""
import numpy as np

from co2_tf.data import pipelines

# The small run the evaluation and export tests share (tests/conftest.py trains it once).
# end_of_run_knn off: its two kNN evaluations cost seconds, and only the runs whose summary
# a test reads turn it on.
SMALL = dict(image_size=16, batch_size=16, queue_size=64, dim=16, train_steps=3, knn_every=0,
             seed=7, end_of_run_knn=False)


def split_arrays(split, image_size=16):
    """Centre-cropped images and labels of a builtin split, as NumPy."""
    batches = list(pipelines.labelled_dataset("builtin", split=split, image_size=image_size,
                                              batch_size=500))
    return (np.concatenate([x.numpy() for x, _ in batches]),
            np.concatenate([y.numpy() for _, y in batches]))


def unit(f):
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def numpy_knn(bank_f, bank_y, query_f, classes, k, t):
    """InstDisc's weighted kNN, written out: class scores [Q, C]."""
    sims = unit(query_f) @ unit(bank_f).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    weights = np.exp(np.take_along_axis(sims, top, 1) / t)
    scores = np.zeros((len(query_f), classes))
    for c in range(classes):
        scores[:, c] = (weights * (bank_y[top] == c)).sum(1)
    return scores


def topk(scores, labels, k):
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(best == np.asarray(labels)[:, None], axis=1)))


# ---------------------------------------------------- CO2's losses, float64 NumPy
def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def ref_info_nce(q, k, queue, t):
    """MoCo's InfoNCE per example: the positive q.k at index 0 of [q.k, q.queue^T] / t."""
    logits = np.concatenate([(q * k).sum(-1, keepdims=True), q @ queue.T], -1) / t
    return -log_softmax(logits)[:, 0]


def ref_consistency(q, k, queue, t):
    """The paper's term per example: 1/2 KL(P||Q) + 1/2 KL(Q||P) over the K negatives."""
    log_q = log_softmax(q @ queue.T / t)
    log_p = log_softmax(k @ queue.T / t)
    kl_pq = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    kl_qp = (np.exp(log_q) * (log_q - log_p)).sum(-1)
    return 0.5 * kl_pq + 0.5 * kl_qp


def ref_consistency_variant(q, k, queue, t, over, kl):
    """NumPy: P and Q over the K negatives or over 1 + K with q.k at index 0 in both."""
    s_q, s_k = q @ queue.T, k @ queue.T
    if over == "positive_and_negatives":
        pos = (q * k).sum(-1, keepdims=True)
        s_q, s_k = np.concatenate([pos, s_q], -1), np.concatenate([pos, s_k], -1)
    log_q, log_p = log_softmax(s_q / t), log_softmax(s_k / t)
    kl_pq = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    if kl == "one_sided":
        return kl_pq
    return 0.5 * kl_pq + 0.5 * (np.exp(log_q) * (log_q - log_p)).sum(-1)
