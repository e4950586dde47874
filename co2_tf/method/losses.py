"""CO2's two loss terms, as pure functions of tensors.

Shapes: q, k are [B, D] (query and positive key), queue is [K, D]; all rows
are L2-normalised. Every function returns per-example losses of shape [B], so
that callers divide by the *global* batch size under tf.distribute.

Both terms are computed in float32 from log-softmax whatever the model's
compute dtype: with K = 65536 and tau_con = 0.04 the logits reach 25 and a
float16 exp would overflow, a bfloat16 log-sum-exp loses digits.
"""

import tensorflow as tf

# The variants (what P and Q range over, which KL): co2_tf/method/__init__.py says each.
from co2_tf.method import CONSISTENCY_KL, CONSISTENCY_OVER


def _f32(*tensors):
    return [tf.cast(t, tf.float32) for t in tensors]


def _similarities(q, k, queue, keys_vs_queue=True):
    """q.k [B], q.queue^T [B, K] and (if asked) k.queue^T [B, K], in float32."""
    q, k, queue = _f32(q, k, queue)
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


def _consistency(q_neg, k_neg, temperature, positive=None, kl="symmetric"):
    """Per-example KL between P (keys vs queue) and Q (queries vs queue).

    With `positive` ([B], q.k), both distributions get it at index 0 (lightly's
    variant): P then depends on q, and its gradient is kept, as lightly keeps it.
    """
    if positive is not None:
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


def _consistency_terms(positive, q_neg, k_neg, temperature, over, kl):
    if over not in CONSISTENCY_OVER:
        raise ValueError(f"over must be one of {CONSISTENCY_OVER}, got {over!r}")
    with_positive = positive if over == "positive_and_negatives" else None
    return _consistency(q_neg, k_neg, temperature, with_positive, kl)


def consistency_ramp(step, warmup_steps):
    """The factor of alpha at `step` (float32 tensor): exp(-5 (1 - t)^2), t = step / warmup.

    The sigmoid-shaped ramp-up of the semi-supervised consistency methods CO2
    borrows from (Laine & Aila 2017, Mean Teacher): it starts at exp(-5) = 0.7%
    and stays small while every similarity is still alike (29% at half the
    warmup, where a linear ramp is at 50%), then reaches 1 at `warmup_steps`.
    """
    t = tf.minimum(tf.cast(step, tf.float32) / float(max(warmup_steps, 1)), 1.0)
    return tf.exp(-5.0 * tf.square(1.0 - t))


def consistency_scale(consistency_temperature, temperature):
    """(tau_con / tau)^2: the factor --consistency_temperature_scaling puts on alpha.

    The consistency term's gradient grows as tau_con falls (the KL of two
    softmaxes at tau_con, ~1/tau_con here), so one alpha means a different
    weight at each tau_con. Knowledge distillation multiplies its soft-target KL
    by T^2 for the same reason (Hinton et al. 2015); here the reference is
    InfoNCE's tau, so alpha means the same at tau_con = tau with or without it.
    At a fixed tau_con it is a rescaled alpha: alpha 1 at 0.04 (tau 0.1) trains
    as alpha 0.16 does without it (docs/study.md).
    """
    return (float(consistency_temperature) / float(temperature)) ** 2


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
    return _consistency_terms(positive, q_neg, k_neg, temperature, over, kl)


def co2_loss(q, k, queue, temperature, consistency_temperature, consistency_weight,
             consistency_over="negatives", consistency_kl="symmetric"):
    """Per-example L = L_ins + alpha * L_con, plus what the trainer logs.

    Returns a dict of [B] tensors: loss, loss_ins, loss_con, and positive /
    negative (mean) cosine similarities and whether the positive wins (acc).
    With alpha == 0 the consistency term is still measured (for monitoring) but
    kept out of the loss, so the loss and its gradient are exactly MoCo's.
    `consistency_weight` may be a scalar tensor (a warmup ramp); only a Python
    0 means MoCo.
    """
    positive, q_neg, k_neg = _similarities(q, k, queue)
    l_ins = _info_nce(positive, q_neg, temperature)
    l_con = _consistency_terms(positive, q_neg, k_neg, consistency_temperature,
                               consistency_over, consistency_kl)
    if isinstance(consistency_weight, (int, float)) and consistency_weight == 0:
        total = l_ins
        l_con = tf.stop_gradient(l_con)
    else:
        total = l_ins + consistency_weight * l_con
    return {
        "loss": total,
        "loss_ins": l_ins,
        "loss_con": l_con,
        "acc": tf.cast(positive > tf.reduce_max(q_neg, axis=-1), tf.float32),
        "pos_sim": positive,
        "neg_sim": tf.reduce_mean(q_neg, axis=-1),
    }
