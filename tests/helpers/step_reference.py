"""A CO2 train step recomputed independently: encoders called by hand, losses in NumPy.

The model's own step (Keras's train function, what fit runs) is compared with
a reference built from its public parts only: the query and key encoders
called layer by layer (`query_backbone` / `query_head`, `key_backbone` /
`key_head`, training mode, L2 normalisation in NumPy), the queue as it was
before the step, and the float64 NumPy losses of helpers.references. Nothing
here calls CO2Model's encode/loss code.
"""
import contextlib

import numpy as np
import tensorflow as tf
from helpers.references import ref_consistency_variant, ref_info_nce, unit


@contextlib.contextmanager
def state_kept(model):
    """Restores every weight of `model` on exit: a training-mode forward pass updates the
    BN moving statistics, which the reference must not leave changed."""
    saved = [w.numpy().copy() for w in model.weights]
    try:
        yield
    finally:
        for w, value in zip(model.weights, saved, strict=True):
            w.assign(value)


def encode(backbone, head, images, groups=1):
    """Unit rows (float64) of head(backbone(x)) in training mode, each of `groups`
    consecutive parts of `images` with its own BN batch statistics."""
    parts = np.split(np.asarray(images), groups)
    z = np.concatenate([head(backbone(tf.constant(p), training=True), training=True).numpy()
                        for p in parts])
    return unit(z.astype(np.float64))


def terms(q, k, queue, *, temperature, consistency_temperature, alpha,
          over="negatives", kl="symmetric"):
    """The step's logged values (means over the batch) from float64 q, k and queue."""
    l_ins = ref_info_nce(q, k, queue, temperature)
    l_con = ref_consistency_variant(q, k, queue, consistency_temperature, over, kl)
    positive = (q * k).sum(-1)
    negatives = q @ queue.T
    return {"loss_ins": l_ins.mean(), "loss_con": l_con.mean(),
            "loss": (l_ins + alpha * l_con).mean(), "pos_sim": positive.mean(),
            "neg_sim": negatives.mean(), "acc": (positive > negatives.max(-1)).mean()}


def recorded_steps(model, strategy, data, batch):
    """Runs one train-function call per batch of `data` (one device, no shuffle) and
    records, for each step, what the reference needs and what the step did.

    Returns a list of dicts: q, k (hand-encoded with the weights before the step, keys in
    one BN group), queue / ptr / key and query weights before and after, and the logs.
    """
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(batch)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    model.make_train_function()
    steps = []
    for i in range(len(data[0]) // batch):
        x_q, x_k = (d[i * batch:(i + 1) * batch] for d in data)
        with state_kept(model):
            q = encode(model.query_backbone, model.query_head, x_q)
            k = encode(model.key_backbone, model.key_head, x_k)
        record = {"q": q, "k": k, "queue": model.queue.numpy().astype(np.float64),
                  "ptr": int(model.queue_ptr.numpy()),
                  "key_vars": [v.numpy().copy() for v in model.key_variables]}
        logs = model.train_function(iterator)
        record.update({"logs": {name: float(v) for name, v in logs.items()},
                       "queue_after": model.queue.numpy().astype(np.float64),
                       "ptr_after": int(model.queue_ptr.numpy()),
                       "key_vars_after": [v.numpy().copy() for v in model.key_variables],
                       "query_vars_after": [v.numpy().copy() for v in model.query_variables]})
        steps.append(record)
    return steps
