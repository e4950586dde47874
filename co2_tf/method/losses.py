"""CO2's two loss terms, as pure functions of tensors.

Shapes: q, k are [B, D] (query and positive key), queue is [K, D]; all rows
are L2-normalised. Every function returns per-example values of shape [B], so
that callers divide by the *global* batch size under tf.distribute. Their
weighting into one loss is co2_tf.method.objective's.

Both terms are computed in float32 from log-softmax whatever the model's
compute dtype: with K = 65536 and a small tau_con the logits are large, a
float16 exp overflows and a bfloat16 log-sum-exp loses digits.
"""

import tensorflow as tf

# The variants (what P and Q range over, which KL): co2_tf/method/__init__.py says each.
from co2_tf.method import CONSISTENCY_KL, CONSISTENCY_OVER


def _similarities(q, k, queue, keys_vs_queue=True):
    """q.k [B], q.queue^T [B, K] and (if asked) k.queue^T [B, K], in float32."""
    q, k, queue = (tf.cast(t, tf.float32) for t in (q, k, queue))
    k = tf.stop_gradient(k)
    positive = tf.reduce_sum(q * k, axis=-1)
    # Two matmuls rather than one on concat([q, k]): the same ops as
    # info_nce_loss, so that alpha = 0 is MoCo to the last bit.
    q_neg = tf.matmul(q, queue, transpose_b=True)
    k_neg = tf.matmul(k, queue, transpose_b=True) if keys_vs_queue else None
    return positive, q_neg, k_neg


def _info_nce(positive, q_neg, temperature):
    logits = tf.concat([positive[:, None], q_neg], axis=-1) / temperature
    return -tf.nn.log_softmax(logits, axis=-1)[:, 0]


def _consistency(positive, q_neg, k_neg, temperature, over, kl):
    """Per-example KL between P (keys vs queue) and Q (queries vs queue).

    With over="positive_and_negatives" both distributions get q.k at index 0
    (lightly's variant): P then depends on q, and its gradient is kept, as lightly keeps it.
    """
    if over not in CONSISTENCY_OVER:
        raise ValueError(f"over must be one of {CONSISTENCY_OVER}, got {over!r}")
    if over == "positive_and_negatives":
        q_neg = tf.concat([positive[:, None], q_neg], axis=-1)
        k_neg = tf.concat([positive[:, None], k_neg], axis=-1)
    log_q = tf.nn.log_softmax(q_neg / temperature, axis=-1)
    log_p = tf.nn.log_softmax(k_neg / temperature, axis=-1)
    if kl == "one_sided":
        return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)
    if kl != "symmetric":
        raise ValueError(f"kl must be one of {CONSISTENCY_KL}, got {kl!r}")
    # KL(P||Q) + KL(Q||P) = sum_i (P_i - Q_i)(log P_i - log Q_i).
    return 0.5 * tf.reduce_sum((tf.exp(log_p) - tf.exp(log_q)) * (log_p - log_q), axis=-1)


def info_nce_loss(q, k, queue, temperature):
    """MoCo's InfoNCE: cross-entropy with the positive at index 0.

    L_ins = -log( exp(q.k/t) / (exp(q.k/t) + sum_j exp(q.n_j/t)) ), per example.
    No gradient reaches k (MoCo's key encoder is updated by EMA only).
    """
    positive, q_neg, _ = _similarities(q, k, queue, keys_vs_queue=False)
    return _info_nce(positive, q_neg, temperature)


def consistency_loss(q, k, queue, temperature, over="negatives", kl="symmetric"):
    """CO2's consistency term: symmetric KL between P and Q over the negatives.

    Q = softmax(q.queue^T / t) and P = softmax(k.queue^T / t) range over the K
    queue entries only (the positive is not in them). P is a pseudo label: no
    gradient reaches k through it, all of it reaches q through Q (both halves).

    L_con = 1/2 KL(P || Q) + 1/2 KL(Q || P), per example.

    Variants (CONSISTENCY_OVER, CONSISTENCY_KL): over="positive_and_negatives"
    puts q.k at index 0 of both P and Q (lightly's); kl="one_sided" is KL(P || Q).
    """
    positive, q_neg, k_neg = _similarities(q, k, queue)
    return _consistency(positive, q_neg, k_neg, temperature, over, kl)


def co2_terms(q, k, queue, temperature, consistency_temperature, over="negatives",
              kl="symmetric"):
    """Both terms from one set of similarities, and what the trainer logs.

    A dict of [B] tensors: loss_ins (info_nce_loss), loss_con (consistency_loss),
    acc (whether the positive beats every negative), pos_sim and neg_sim (mean over
    the negatives) cosine similarities.
    """
    positive, q_neg, k_neg = _similarities(q, k, queue)
    return {
        "loss_ins": _info_nce(positive, q_neg, temperature),
        "loss_con": _consistency(positive, q_neg, k_neg, consistency_temperature, over, kl),
        "acc": tf.cast(positive > tf.reduce_max(q_neg, axis=-1), tf.float32),
        "pos_sim": positive,
        "neg_sim": tf.reduce_mean(q_neg, axis=-1),
    }
