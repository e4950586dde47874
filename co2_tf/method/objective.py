"""The training objective L = L_ins + alpha(step) L_con, built from the config.

The one place alpha is assembled (the weight, its temperature scaling and its
warmup ramp) and the consistency term's variant is chosen: CO2Model calls the
objective once per step and knows none of these.
"""

import dataclasses

import tensorflow as tf

from co2_tf.method import losses


def consistency_ramp(step, warmup_steps):
    """The factor of alpha at `step` (float32 tensor): exp(-5 (1 - t)^2), t = step / warmup.

    The sigmoid-shaped ramp-up of the semi-supervised consistency methods CO2
    borrows from (Laine & Aila 2017, Mean Teacher): it starts at exp(-5) and
    stays small while every similarity is still alike (exp(-1.25) at half the
    warmup, where a linear ramp is at 1/2), then reaches 1 at `warmup_steps`.
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
    At a fixed tau_con it is a rescaled alpha (docs/study.md).
    """
    return (float(consistency_temperature) / float(temperature)) ** 2


@dataclasses.dataclass(frozen=True)
class CO2Objective:
    """Called as `objective(q, k, queue, step) -> (loss, logs)`.

    loss: per-example L [B]; logs: the per-example terms [B] the step logs as
    global-batch means (loss, loss_ins, loss_con, acc, pos_sim, neg_sim) and the
    scalar alpha of this step, logged as it is.

    Args:
      temperature: tau of InfoNCE.
      consistency_temperature: tau_con of the consistency term.
      weight: alpha at full strength; 0 is exactly MoCo (L_con is measured for
        the logs but has no part in the loss or its gradient).
      over, kl: the consistency term's variant (losses.consistency_loss).
      warmup_steps: alpha ramps up over these steps (consistency_ramp);
        0 = the full alpha from step 0.
    """

    temperature: float = 0.2
    consistency_temperature: float = 0.04
    weight: float = 1.0
    over: str = "negatives"
    kl: str = "symmetric"
    warmup_steps: int = 0

    def alpha(self, step):
        """The weight of L_con at `step`: a Python number, or a float32 tensor while ramping."""
        if self.weight and self.warmup_steps:
            return self.weight * consistency_ramp(step, self.warmup_steps)
        return self.weight

    def __call__(self, q, k, queue, step):
        terms = losses.co2_terms(q, k, queue, self.temperature, self.consistency_temperature,
                                 self.over, self.kl)
        alpha = self.alpha(step)
        if self.weight == 0:  # MoCo: no consistency graph in the loss
            total = terms["loss_ins"]
            terms["loss_con"] = tf.stop_gradient(terms["loss_con"])
        else:
            total = terms["loss_ins"] + alpha * terms["loss_con"]
        return total, {"loss": total, **terms, "alpha": tf.cast(alpha, tf.float32)}


def co2_objective(config, steps_per_epoch=1):
    """The CO2Objective of a TrainConfig; `steps_per_epoch` turns the warmup's epochs into steps.

    --consistency_temperature_scaling multiplies alpha by (tau_con / tau)^2
    (consistency_scale); without it alpha is --consistency_weight itself.
    """
    weight = config.consistency_weight
    if config.consistency_temperature_scaling:
        weight = weight * consistency_scale(config.consistency_temperature, config.temperature)
    return CO2Objective(
        temperature=config.temperature, consistency_temperature=config.consistency_temperature,
        weight=weight, over=config.consistency_over, kl=config.consistency_kl,
        warmup_steps=int(round(config.consistency_warmup_epochs * steps_per_epoch)))
