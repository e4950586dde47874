"""CO2Model: MoCo's query encoder, EMA key encoder, queue and shuffle-BN, trained on an objective.

One Keras model holds what MoCo's `builder.py` holds: the query encoder
(backbone + projection head), the key encoder (same architecture, an
exponential moving average of the query encoder) and the queue of keys with
its pointer, as tracked Keras weights so that `.weights.h5`,
`tf.train.Checkpoint` and tf.distribute all see them. The loss is the
objective's (co2_tf.method.objective): train_step calls it once per step.

Under tf.distribute (docs/accelerators.md has the traffic this costs):
- each replica's loss is its sum of per-example losses over the *global*
  batch; Keras's optimizer sums the gradients over replicas;
- the keys of all replicas are all-gathered and enqueued in global order, so
  each replica computes the identical queue, pointer and step counter itself:
  aggregation "none", no merge call, no broadcast of the queue;
- key images cross replicas in the dtype they arrive in (distribute.all_gather_in_own_bytes);
- the EMA runs in a merge call through `strategy.extended.update`, as Keras's
  optimizer applies its updates;
- every copy of every variable stays bit-identical on all replicas: the
  updates compute the same thing from the same inputs everywhere (see
  co2_tf.optimizers), and the BN moving statistics are set to replica 0's
  at the end of the step (what a checkpoint saves, as DDP broadcasts rank 0's).
"""

import keras
import tensorflow as tf

from co2_tf import compat, distribute, precision
from co2_tf.method import BN_MODES, HEADS


def projection_head(head_type, in_dim, dim, name, seed=0):
    """MoCo v1's linear head or MoCo v2's 2-layer MLP (hidden = backbone width).

    Weights start as PyTorch's nn.Linear does, U(+-1/sqrt(fan_in)), seeded so
    that two builds with the same seed are identical.
    """
    def init(offset):
        return keras.initializers.VarianceScaling(
            1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed * 1009 + offset)

    inputs = keras.Input((in_dim,))
    x = inputs
    if head_type == "mlp":
        x = keras.layers.Dense(in_dim, activation="relu", kernel_initializer=init(1),
                               name="hidden")(x)
    x = keras.layers.Dense(dim, kernel_initializer=init(2), name="projection")(x)
    return keras.Model(inputs, x, name=name)


def _unit_rows(seed):
    """MoCo's initial queue: random unit vectors (randn, normalised per key)."""
    def init(shape, dtype=None):
        rows = tf.random.stateless_normal(shape, seed=[seed, 0x51EE], dtype=tf.float32)
        return tf.cast(tf.math.l2_normalize(rows, axis=-1), dtype or tf.float32)
    return init


def _keras_reduces_logs_along_axis_0(strategy):
    """Whether Keras reduces the step's logs with strategy.reduce("MEAN", v, axis=0).

    Keras does so for MultiWorkerMirroredStrategy across several workers,
    which fails on scalars; logs of shape [1] come out of it as scalars.
    """
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and compat.in_multi_worker_mode(strategy))


class CO2Model(compat.SkipSymbolicBuildWhenBuilt, keras.Model):
    """MoCo's model, trained on `objective`.

    Args:
      backbone_fn: callable(model_name) -> keras.Model mapping images to pooled
        features [B, F]. Called twice (query and key encoder); it must build
        the same architecture each time.
      objective: callable (q, k, queue, step) -> (per-example loss [B], logs),
        e.g. co2_tf.method.objective.CO2Objective (InfoNCE + alpha L_con).
      head: "linear" (MoCo v1) or "mlp" (MoCo v2).
      dim: projection dimension D.
      queue_size: K, a multiple of the global batch size.
      ema_momentum: m in theta_k <- m theta_k + (1 - m) theta_q.
      bn: how the key encoder's batch statistics are formed: "shuffle"
        (MoCo's shuffle-BN), "sync" (the backbone has synchronized BN) or
        "local" (plain per-replica BN).
      bn_groups: with bn="shuffle", each replica encodes its shard of
        shuffled keys in this many groups with their own BN statistics; on one
        device this is what gives shuffle-BN its effect.
      seed: seeds the queue and the shuffle permutation of every step.
      view_transform: None (the views come augmented) or the device part of
        the augmentation (co2_tf.data.augment_device.ViewTransform): train_step
        applies its view 0 to the query images, encode_keys its view 1 to
        the key shard, each with the examples' global indices.
    """

    def __init__(self, backbone_fn, objective, *, head="mlp", dim=128, queue_size=65536,
                 ema_momentum=0.999, bn="shuffle", bn_groups=1, seed=0, view_transform=None,
                 **kwargs):
        super().__init__(**kwargs)
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.objective = objective
        self.dim = dim
        self.queue_size = queue_size
        self.ema_momentum = ema_momentum
        self.bn = bn
        self.bn_groups = bn_groups
        self.seed = seed
        self.view_transform = view_transform

        self.query_backbone = backbone_fn("query_backbone")
        self.key_backbone = backbone_fn("key_backbone")
        feat = self.query_backbone.output_shape[-1]
        self.query_head = projection_head(head, feat, dim, "query_head", seed)
        self.key_head = projection_head(head, feat, dim, "key_head", seed)
        # Tracked weights (not raw tf.Variables) so .weights.h5 saves them too;
        # aggregation "none": each replica writes its own, identical, copy.
        self.queue = self.add_weight(
            name="queue", shape=(queue_size, dim), dtype="float32",
            initializer=_unit_rows(seed), trainable=False, aggregation="none")
        self.queue_ptr = self.add_weight(
            name="queue_ptr", shape=(), dtype="int64", initializer="zeros",
            trainable=False, aggregation="none")
        # Every step taken, skipped or not (mixed_float16's loss scaling skips
        # steps optimizer.iterations does not count; the data position must).
        # Untracked (object.__setattr__) so the model's checkpoint layout stays;
        # the trainer's checkpoint holds it at its root (co2_tf.run.checkpoints).
        object.__setattr__(self, "step_counter", tf.Variable(
            0, dtype=tf.int64, trainable=False, name="step",
            aggregation=tf.VariableAggregation.NONE))  # +1 on every replica: no merge call
        # The key encoder stays trainable=True: Keras 3 BN with trainable=False
        # runs in inference mode, and MoCo's keys use batch statistics. It is
        # excluded from gradients by construction instead.
        self._copy_query_to_key()
        self.built = True

    # ----------------------------------------------------------------- weights
    @property
    def query_variables(self):
        """What the optimizer trains: the query backbone and head."""
        return self.query_backbone.trainable_weights + self.query_head.trainable_weights

    @property
    def key_variables(self):
        """The EMA targets, in the same order as `query_variables`."""
        return self.key_backbone.trainable_weights + self.key_head.trainable_weights

    @property
    def replica_local_variables(self):
        """Encoder variables each replica writes with its own value: BN moving statistics."""
        return [v for part in (self.query_backbone, self.query_head, self.key_backbone,
                               self.key_head)
                for v in part.non_trainable_weights if v.aggregation == "none"]

    def _copy_query_to_key(self):
        for k, q in zip(self.key_variables, self.query_variables, strict=True):
            if k.shape != q.shape:
                raise ValueError(
                    f"key/query encoder mismatch: {k.path} {k.shape} vs {q.path} {q.shape}")
            k.assign(q)

    # ---------------------------------------------------------------- encoders
    def call(self, images, training=False):
        """Pooled query-backbone features: what evaluation and export use."""
        return self.query_backbone(images, training=training)

    def encode_query(self, images, training=True):
        z = self.query_head(self.query_backbone(images, training=training), training=training)
        return tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)

    def encode_key_groups(self, images, groups=1):
        """Unit keys of `images` in order, each of `groups` consecutive parts with its own
        BN statistics: the key encoder alone (no shuffle, no gather, no gradient stop)."""
        parts = tf.split(images, groups, axis=0) if groups > 1 else [images]
        z = [self.key_head(self.key_backbone(p, training=True), training=True) for p in parts]
        z = tf.concat(z, axis=0) if groups > 1 else z[0]
        return tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)

    def encode_keys(self, images, step, transform=None):
        """(this replica's keys [b, D], the global batch's keys [B, D]), without gradient.

        The global keys are in global batch order (replica 0's examples first)
        whatever the shuffle. Runs in a replica context (the default one is fine).
        `transform`, if given, is called as `transform(shard, example_ids, step)`
        on the images this replica encodes, after the gather and the shuffle:
        example_ids (int64 [b]) are their global indices, step * B + position
        in the global batch; it returns the key encoder's input.
        """
        ctx = tf.distribute.get_replica_context()
        n = ctx.num_replicas_in_sync
        images = tf.stop_gradient(images)
        # Static where the batch is (TPU, the lowering tests): the keys keep their shape.
        b = images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]
        global_b = tf.cast(b * n, tf.int64)
        first = tf.cast(step, tf.int64) * global_b
        if self.bn != "shuffle":
            if transform is not None:
                offset = tf.cast(ctx.replica_id_in_sync_group * b, tf.int64)
                images = transform(images, first + offset + tf.range(tf.cast(b, tf.int64)), step)
            local = self.encode_key_groups(images)
            everyone = ctx.all_gather(local, axis=0) if n > 1 else local
            everyone.set_shape([None if images.shape[0] is None else n * images.shape[0],
                                self.dim])
            return tf.stop_gradient(local), tf.stop_gradient(everyone)

        # MoCo's shuffle-BN: gather all key images, apply one permutation that
        # every replica draws identically (stateless, seeded by the step),
        # encode this replica's shard in `bn_groups` BN groups, gather the
        # keys and undo the permutation.
        all_images = distribute.all_gather_in_own_bytes(ctx, images) if n > 1 else images
        noise = tf.random.stateless_uniform(
            [b * n], seed=tf.stack([tf.cast(self.seed, tf.int64), tf.cast(step, tf.int64)]))
        perm = tf.argsort(noise, stable=True)
        if n > 1:
            mine = tf.reshape(perm, [n, b])[ctx.replica_id_in_sync_group]
            shard = tf.ensure_shape(tf.gather(all_images, mine), images.shape)
        else:
            mine, shard = perm, tf.gather(all_images, perm)
        if transform is not None:
            shard = transform(shard, first + tf.cast(mine, tf.int64), step)
        keys = self.encode_key_groups(shard, self.bn_groups)
        all_keys = ctx.all_gather(keys, axis=0) if n > 1 else keys
        all_keys.set_shape([None if images.shape[0] is None else n * images.shape[0], self.dim])
        all_keys = tf.gather(all_keys, tf.math.invert_permutation(perm))
        if n > 1:
            local = tf.gather(tf.reshape(all_keys, [n, b, self.dim]), ctx.replica_id_in_sync_group)
        else:
            local = all_keys
        return tf.stop_gradient(local), tf.stop_gradient(all_keys)

    # ------------------------------------------------------------------- train
    def train_step(self, data):
        x_q, x_k = data
        ctx = tf.distribute.get_replica_context()
        n = ctx.num_replicas_in_sync
        step = tf.convert_to_tensor(self.step_counter)
        lr = self.optimizer.learning_rate
        local_b = tf.shape(x_q)[0]
        global_b = tf.cast(local_b * n, tf.float32)

        key_transform = None
        if self.view_transform is not None:  # the device part of the augmentation
            # Global example ids (the index contract, co2_tf.data.pipelines); static per batch.
            b = x_q.shape[0] if x_q.shape[0] is not None else local_b
            ids = (step * tf.cast(b * n, tf.int64)
                   + tf.cast(ctx.replica_id_in_sync_group * b, tf.int64)
                   + tf.range(b, dtype=tf.int64))
            x_q = self.view_transform.for_view(0)(x_q, ids, step)
            key_transform = self.view_transform.for_view(1)
        keys, all_keys = self.encode_keys(x_k, step, transform=key_transform)
        qvars = self.query_variables
        with tf.GradientTape() as tape:
            q = self.encode_query(x_q, training=True)
            loss, terms = self.objective(q, keys, self.queue, step)
            # Per-replica share of the global mean: the optimizer sums over replicas.
            loss = tf.reduce_sum(loss) / global_b
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, qvars)
        if n > 1 and isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            grads = precision.agree_on_overflow(grads, ctx)  # all replicas skip, or none
        self.optimizer.apply_gradients(zip(grads, qvars))
        self._momentum_update()
        self._enqueue(all_keys)
        distribute.copy_first_replica(self.replica_local_variables)
        self.step_counter.assign_add(1)

        # Per-example terms are logged as this step's global means (not running
        # averages), identical on every replica, in one all-reduce; scalars as they are.
        means = {name: v for name, v in terms.items() if v.shape.rank}
        sums = ctx.all_reduce("sum", [tf.reduce_sum(v) for v in means.values()])
        logs = {name: total / global_b for name, total in zip(means, sums, strict=True)}
        logs["lr"] = tf.cast(lr, tf.float32)
        logs.update({name: v for name, v in terms.items() if not v.shape.rank})
        if _keras_reduces_logs_along_axis_0(tf.distribute.get_strategy()):
            logs = {name: v[None] for name, v in logs.items()}
        return logs

    def _momentum_update(self):
        m = self.ema_momentum
        pairs = [(k.value, q.value) for k, q in zip(self.key_variables, self.query_variables)]

        def ema(key_var, query_var):
            # A sum of two terms: any order Grappler gives it is exact, so the
            # replicas' copies stay identical (see co2_tf.optimizers).
            return key_var.assign(m * key_var + (1.0 - m) * tf.cast(query_var, key_var.dtype))

        def merge_fn(strategy, pairs):
            for key_var, query_var in pairs:
                strategy.extended.update(key_var, ema, args=(query_var,), group=False)

        compat.maybe_merge_call(merge_fn, tf.distribute.get_strategy(), pairs)

    def _enqueue(self, all_keys):
        """Write the global batch of keys at the pointer (K % B == 0: never wraps).

        Only the B new rows are written (a scatter, in place), each replica
        into its own copy (aggregation "none", see the module docstring).
        """
        batch = tf.shape(all_keys, out_type=tf.int64)[0]
        ptr = tf.convert_to_tensor(self.queue_ptr)
        rows = ptr + tf.range(batch, dtype=tf.int64)
        self.queue.value.scatter_update(tf.IndexedSlices(tf.cast(all_keys, tf.float32), rows))
        self.queue_ptr.assign((ptr + batch) % self.queue_size)
