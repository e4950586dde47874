"""Building a run's networks and optimizer from its TrainConfig.

Training, evaluation, export and the benchmark all build through here, so a
model rebuilt for evaluation is exactly the one that was trained. Nothing
here trains, checkpoints or touches files.
"""

import dataclasses

import tensorflow as tf

from co2_tf import distribute, optimizers, precision
from co2_tf.data import augment_device
from co2_tf.method import objective
from co2_tf.method.model import CO2Model
from co2_tf.nets import backbones, fused_batchnorm


def in_float32(config):
    """The run's config computing in float32 (evaluation and export compute exactly)."""
    return dataclasses.replace(config, precision="float32")


def backbone_fn(config, conv_filter_grad="tf"):
    """The builder the model calls for its query and key backbones.

    conv_filter_grad: the convs' filter-gradient kernel (co2_tf.nets.conv_grad). Training
    and the benchmark pass config.conv_filter_grad; evaluation, export and the kNN
    monitor keep TF's kernel, the default.
    """
    bn = "sync" if config.bn == "sync" else "local"

    def build(model_name):
        with precision.policy_scope(config.precision):
            backbone = backbones.build_backbone(config.backbone, config.image_size, bn=bn,
                                                model_name=model_name, seed=config.seed,
                                                conv_filter_grad=conv_filter_grad)
        # Same BN semantics, one fused op per BN layer (the step's main cost otherwise).
        fused_batchnorm.fuse_batch_norm(backbone)
        return backbone
    return build


def augment_placement(config, strategy=None):
    """"host" or "device": where the augmentation's steps after the crop run (--augment_on).

    auto: the device when the step runs on GPUs or TPUs, else what measured
    faster on CPUs (co2_tf.data.augment_device.CPU_PLACEMENT).
    """
    strategy = strategy or tf.distribute.get_strategy()
    accelerated = (isinstance(strategy, tf.distribute.TPUStrategy)
                   or bool(tf.config.list_logical_devices("GPU")))
    return augment_device.resolve_placement(config.augment_on, accelerated)


def view_transform(config, strategy=None):
    """The train step's part of the augmentation, or None (the host does it all)."""
    if augment_placement(config, strategy) != "device":
        return None
    # On GPUs as one XLA cluster (its element-wise ops fused) even without --jit_compile.
    return augment_device.ViewTransform(config.augment, config.seed,
                                        jit_compile=bool(tf.config.list_logical_devices("GPU")))


def build_model(config, bn_groups, steps_per_epoch=1, conv_filter_grad="tf"):
    """A CO2Model for `config`, trained on its CO2Objective; call under the strategy's scope.

    `steps_per_epoch` turns --consistency_warmup_epochs into steps. `conv_filter_grad`:
    see `backbone_fn` (training passes config.conv_filter_grad, a loaded run keeps TF's).

    The encoders compute in `config.precision` (see co2_tf.precision); the
    queue, the losses and all variables stay float32.
    """
    with precision.policy_scope(config.precision):
        return CO2Model(
            backbone_fn(config, conv_filter_grad), objective.co2_objective(config, steps_per_epoch),
            head=config.head, dim=config.dim,
            queue_size=config.queue_size, ema_momentum=config.ema_momentum,
            bn=config.bn, bn_groups=bn_groups, seed=config.seed,
            view_transform=view_transform(config), name="co2")


def build_optimizer(config, steps_per_epoch, total_steps):
    """The pretraining optimizer and its learning-rate schedule."""
    schedule = optimizers.make_lr_schedule(
        config.schedule, base_learning_rate=config.learning_rate, total_steps=total_steps,
        warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)))
    optimizer = optimizers.make_optimizer(config.optimizer, schedule, momentum=config.momentum,
                                          weight_decay=config.weight_decay)
    # mixed_float16: dynamic loss scaling (train_step calls optimizer.scale_loss).
    return precision.wrap_optimizer(optimizer, config.precision)


def compile_model(model, optimizer, config):
    """Compiles for our custom train_step and creates the optimizer's slots now.

    The optimizer is built on the query encoder only: the key encoder is
    trainable (for BN batch statistics) but never receives gradients.
    --jit_compile where XLA cannot work (several replicas on CPU devices)
    falls back to no XLA with a one-line warning (distribute.resolve_jit_compile).
    """
    jit_compile = distribute.resolve_jit_compile(config.jit_compile, model.distribute_strategy)
    model.compile(optimizer=optimizer, jit_compile=jit_compile,
                  steps_per_execution=config.steps_per_execution)
    optimizer.build(model.query_variables)


def any_size_copy(run_config, backbone):
    """A float32 copy of a run's backbone with local BN that takes any image size.

    Rebuilt rather than reused: the copy depends neither on the training's
    strategy, BN mode or precision nor on its input size, and is named after
    its architecture.
    """
    copy = backbones.build_backbone(run_config.backbone, None, bn="local",
                                    model_name=run_config.backbone)
    copy.set_weights(backbone.get_weights())
    return copy
