"""Learning-rate schedules and optimizers with MoCo's (PyTorch) semantics.

- `WarmupSchedule` / `make_lr_schedule`: step (MoCo v1), cosine (MoCo v2) or
  constant learning rate, each with optional linear warmup.
- `PyTorchSGD`: torch.optim.SGD exactly (coupled L2 weight decay, momentum
  buffer v = mu * v + g, w -= lr * v). Keras's SGD differs twice: its
  `weight_decay` is decoupled and its velocity holds lr * g, which gives a
  different trajectory whenever the learning rate changes.
- `LARS`: You et al. 2017 as in SimCLR's TF code; Keras 3 has no LARS.

Under tf.distribute the Keras optimizer SUMS gradients across replicas
before `update_step` runs: scale each replica's loss by 1 / num_replicas
(or divide by the global batch) as usual.

Replicas stay bit-identical: every replica runs `update_step` on its own
copy with the same all-reduced gradient, so the update must not depend on
the replica. TF's graph optimizer (Grappler) turns a sum of 3 or more terms
into one AddN whose operands it sorts by node name, and names differ per
replica ("replica_1/..."): `mu * v + (grad + wd * w)` was summed in another
order on each replica, and the copies drifted apart by an ulp. So the
momentum and weight updates run inside TF's fused training kernels
(ResourceApplyMomentum, ResourceApplyGradientDescent: one kernel, no graph
to rewrite; XLA and TPU have them too), and the little arithmetic left
outside them sums at most two terms, which any reordering keeps exact.
"""
import math
import numbers
import re

import keras
import tensorflow as tf

from co2_tf.choices import OPTIMIZERS, SCHEDULES
from co2_tf.errors import UserError

# Variables LARS leaves alone (no weight decay, trust ratio 1): biases and
# normalisation parameters, matched with re.search against variable paths
# such as "layer1_0_bn1/gamma" or "head_fc1/bias".
LARS_DEFAULT_EXCLUDE = (r"(^|/)bias$", r"(^|/)gamma$", r"(^|/)beta$")


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@keras.saving.register_keras_serializable(package="co2_tf")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Step / cosine / constant learning rate with linear warmup from 0.

    lr(step) = base_learning_rate * warmup(step) * decay(step), where
    warmup(step) = min(1, step / warmup_steps) (1 if warmup_steps == 0) and
    - "step":     decay ** (number of boundaries b with step >= b), the
                  boundaries being round(fraction * total_steps);
    - "cosine":   0.5 * (1 + cos(pi * t)), t = (step - warmup_steps) /
                  (total_steps - warmup_steps) clipped to [0, 1], so the rate
                  reaches 0 at total_steps;
    - "constant": 1.

    Keras optimizers evaluate the schedule at their iteration count before
    incrementing it, so the first update uses lr(0) (0 when warming up).
    Pure TF math on the step: works with a tf.Variable step inside
    tf.function and under XLA.
    """

    def __init__(self, kind, base_learning_rate, total_steps, warmup_steps=0,
                 boundaries=(0.6, 0.8), decay=0.1):
        if kind not in SCHEDULES:
            raise UserError(
                f"unknown learning-rate schedule {kind!r}: use one of "
                f"{', '.join(SCHEDULES)}")
        if not _is_number(base_learning_rate) or base_learning_rate < 0:
            raise UserError(
                f"base_learning_rate must be a number >= 0, got "
                f"{base_learning_rate!r}")
        if not _is_int(total_steps) or total_steps < 1:
            raise UserError(
                f"total_steps must be an int >= 1, got {total_steps!r}: pass "
                "epochs * steps_per_epoch")
        if not _is_int(warmup_steps) or not 0 <= warmup_steps <= total_steps:
            raise UserError(
                f"warmup_steps must be an int in [0, total_steps="
                f"{total_steps}], got {warmup_steps!r}")
        boundaries = tuple(boundaries)
        if (not all(_is_number(b) and 0 < b <= 1 for b in boundaries)
                or list(boundaries) != sorted(boundaries)):
            raise UserError(
                f"boundaries must be increasing fractions of total_steps in "
                f"(0, 1], got {boundaries!r}: e.g. (0.6, 0.8) for MoCo v1")
        if not _is_number(decay) or decay <= 0:
            raise UserError(f"decay must be a number > 0, got {decay!r}")
        self.schedule = kind
        self.base_learning_rate = float(base_learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = tuple(float(b) for b in boundaries)
        self.decay = float(decay)

    @property
    def boundary_steps(self):
        """The step boundaries, as ints: lr drops when step reaches one."""
        return tuple(int(round(b * self.total_steps)) for b in self.boundaries)

    def __call__(self, step):
        step = tf.cast(tf.convert_to_tensor(step), tf.float32)
        if self.schedule == "cosine":
            span = float(max(1, self.total_steps - self.warmup_steps))
            t = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            factor = 0.5 * (1.0 + tf.cos(math.pi * t))
        elif self.schedule == "step":
            drops = tf.zeros([], tf.float32)
            for b in self.boundary_steps:
                drops += tf.cast(step >= b, tf.float32)
            factor = tf.pow(tf.constant(self.decay, tf.float32), drops)
        else:
            factor = tf.ones([], tf.float32)
        if self.warmup_steps > 0:
            factor *= tf.minimum(1.0, step / float(self.warmup_steps))
        return self.base_learning_rate * factor

    def get_config(self):
        return {
            "kind": self.schedule,
            "base_learning_rate": self.base_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "boundaries": list(self.boundaries),
            "decay": self.decay,
        }


def make_lr_schedule(kind, *, base_learning_rate, total_steps, warmup_steps=0,
                     boundaries=(0.6, 0.8), decay=0.1):
    """Returns a `WarmupSchedule` (see there for the exact formula).

    kind: "step" (lr x decay at each boundary; MoCo v1's epochs 120 and 160
    of 200 are the defaults 0.6 and 0.8), "cosine" (to 0 at total_steps, MoCo
    v2) or "constant". Linear warmup from 0 over warmup_steps in all cases.
    """
    return WarmupSchedule(kind, base_learning_rate, total_steps,
                          warmup_steps=warmup_steps, boundaries=boundaries,
                          decay=decay)


def _apply_momentum(variable, slot, lr, grad, momentum, nesterov):
    """slot = momentum * slot + grad; variable -= lr * (grad + momentum * slot
    if nesterov else slot); variable -= lr * grad when there is no slot.

    TF's fused kernels, so that Grappler cannot reorder the sums differently
    on each replica (see the module docstring). Must run where Keras runs
    `update_step`: on one replica's copy (the slot's handle is then that
    replica's copy too).
    """
    grad = tf.convert_to_tensor(grad)  # IndexedSlices: densified, as before
    if slot is None:
        tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=lr, delta=grad)
    else:
        tf.raw_ops.ResourceApplyMomentum(
            var=variable.handle, accum=slot.handle, lr=lr, grad=grad,
            momentum=tf.cast(momentum, grad.dtype), use_nesterov=nesterov)


def _check_hyper(momentum, weight_decay):
    if not _is_number(momentum) or not 0 <= momentum < 1:
        raise UserError(f"momentum must be in [0, 1), got {momentum!r}")
    if not _is_number(weight_decay) or weight_decay < 0:
        raise UserError(
            f"weight_decay must be a number >= 0, got {weight_decay!r}")


class _CoupledDecayOptimizer(keras.optimizers.Optimizer):
    """Base for optimizers that add L2 weight decay to the gradient.

    Keras applies its own `weight_decay` decoupled, before `update_step`;
    these optimizers give Keras weight_decay=None and keep the coefficient
    as `l2_weight_decay`, used inside `update_step`.
    """

    def __init__(self, learning_rate, momentum, weight_decay, name,
                 **kwargs):
        if weight_decay is None:
            weight_decay = 0.0
        _check_hyper(momentum, weight_decay)
        super().__init__(learning_rate=learning_rate, weight_decay=None,
                         name=name, **kwargs)
        self.momentum = float(momentum)
        self.l2_weight_decay = float(weight_decay)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(variables,
                                                          "momentum")
        # Decided here, on the Keras variables: under tf.distribute,
        # update_step sees per-replica tf.Variables without a Keras path.
        self._decay_flags = [self._decays(v) for v in variables]

    def _decays(self, variable):
        raise NotImplementedError

    def _momentum_slot(self, variable):
        if self.momentum == 0:
            return None
        return self.momentums[self._get_variable_index(variable)]

    def _flag(self, variable):
        return self._decay_flags[self._get_variable_index(variable)]

    def get_config(self):
        config = super().get_config()
        config.update({
            "momentum": self.momentum,
            "weight_decay": self.l2_weight_decay,
        })
        return config


@keras.saving.register_keras_serializable(package="co2_tf")
class PyTorchSGD(_CoupledDecayOptimizer):
    """torch.optim.SGD (dampening 0) as a Keras optimizer; MoCo's optimizer.

    Per step, with learning rate lr:
        g = grad + weight_decay * w          (coupled L2, every variable)
        v = momentum * v + g                 (v = g at the first step)
        w = w - lr * (g + momentum * v if nesterov else v)

    Every trainable variable is decayed, BN and biases included, as MoCo
    does; `exclude_from_weight_decay()` (Keras's method, which matches
    variable names) is honoured if called before the first update.
    """

    def __init__(self, learning_rate=0.03, momentum=0.9, weight_decay=1e-4,
                 nesterov=False, name="pytorch_sgd", **kwargs):
        super().__init__(learning_rate, momentum, weight_decay, name,
                         **kwargs)
        self.nesterov = bool(nesterov)

    def _decays(self, variable):
        return self.l2_weight_decay > 0 and self._use_weight_decay(variable)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        g = tf.cast(gradient, dtype)
        if self._flag(variable):
            # Two terms: exact whatever order Grappler gives them.
            g = g + tf.cast(self.l2_weight_decay, dtype) * variable
        _apply_momentum(variable, self._momentum_slot(variable), lr, g,
                        self.momentum, self.nesterov)

    def get_config(self):
        config = super().get_config()
        config["nesterov"] = self.nesterov
        return config


@keras.saving.register_keras_serializable(package="co2_tf")
class LARS(_CoupledDecayOptimizer):
    """LARS (You et al. 2017) in the form of SimCLR's TF implementation.

    Per step, with learning rate lr, for a variable w that is not excluded:
        g = grad + weight_decay * w
        trust = eta * ||w|| / ||g||   (1 if ||w|| or ||g|| is 0)
        v = momentum * v + lr * trust * g
        w = w - (momentum * v + lr * trust * g if nesterov else v)
    Excluded variables (biases, BN gamma/beta by default) get neither weight
    decay nor the trust ratio: g = grad, trust = 1.

    Args:
        exclude: regular expressions searched (re.search) in each variable's
            path (its name for variables without a path); a match excludes
            the variable. Default `LARS_DEFAULT_EXCLUDE`. `is_excluded(v)`
            tells how a variable is treated.
    """

    def __init__(self, learning_rate=0.3, momentum=0.9, weight_decay=1e-6,
                 eta=0.001, nesterov=False, exclude=LARS_DEFAULT_EXCLUDE,
                 name="lars", **kwargs):
        super().__init__(learning_rate, momentum, weight_decay, name,
                         **kwargs)
        if not _is_number(eta) or eta <= 0:
            raise UserError(f"LARS eta must be a number > 0, got {eta!r}")
        self.eta = float(eta)
        self.nesterov = bool(nesterov)
        self.exclude = tuple(exclude or ())
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(
                    f"LARS exclude pattern {pattern!r} is not a valid "
                    f"regular expression ({e}): fix the pattern") from None

    def is_excluded(self, variable):
        """True if `variable` gets no weight decay and no trust ratio."""
        path = getattr(variable, "path", None) or variable.name
        return any(re.search(p, path) for p in self.exclude)

    def _decays(self, variable):
        return not self.is_excluded(variable)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        g = tf.cast(gradient, dtype)
        if self._flag(variable):
            g = g + tf.cast(self.l2_weight_decay, dtype) * variable
            w_norm = tf.norm(variable)
            g_norm = tf.norm(g)
            # Divide by a safe norm so the unused branch never holds inf/NaN.
            safe_g_norm = tf.where(g_norm > 0, g_norm, tf.ones([], dtype))
            trust = tf.where(
                tf.logical_and(w_norm > 0, g_norm > 0),
                tf.cast(self.eta, dtype) * w_norm / safe_g_norm,
                tf.ones([], dtype))
            lr = lr * trust
        # v = mu * v + lr * trust * g (the rate inside the momentum, as in
        # SimCLR), w -= v: the fused kernel with rate 1 on lr * trust * g.
        _apply_momentum(variable, self._momentum_slot(variable),
                        tf.ones([], dtype), lr * g, self.momentum,
                        self.nesterov)

    def get_config(self):
        config = super().get_config()
        config.update({"eta": self.eta, "nesterov": self.nesterov,
                       "exclude": list(self.exclude)})
        return config


def make_optimizer(name, learning_rate, *, momentum=0.9, weight_decay=1e-4):
    """Returns the optimizer `name` ("sgd" or "lars").

    learning_rate: a float or a LearningRateSchedule (see make_lr_schedule).
    "sgd" is `PyTorchSGD` (MoCo's optimizer: coupled weight decay on every
    variable). "lars" is `LARS` with eta 0.001, excluding biases and BN
    parameters from weight decay and adaptation.
    """
    if name == "sgd":
        return PyTorchSGD(learning_rate, momentum=momentum,
                          weight_decay=weight_decay)
    if name == "lars":
        return LARS(learning_rate, momentum=momentum,
                    weight_decay=weight_decay)
    raise UserError(
        f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
