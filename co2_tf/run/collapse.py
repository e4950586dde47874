"""Detecting a collapsed embedding during pretraining, from the step's logged metrics.

A collapsed embedding maps every image to (nearly) the same vector: the
positive and the negatives are then all alike, batch_pos_sim and
batch_neg_sim are both near 1 and InfoNCE sits at ln(1 + K), the loss of a
uniform guess among 1 + K keys. The detector also flags the partial form
seen with a large alpha: negatives far more alike than in any healthy run,
and the positive barely above them. The consistency term is minimised by exactly
that state (P = Q when every similarity is equal), which is why a large
--consistency_weight at a small --consistency_temperature can get there.

A healthy run has batch_neg_sim near 0 once the queue holds real keys, but
plain MoCo can pass through the same state early and recover: on the digits
study (docs/study.md) alpha = 0 sat at batch_neg_sim 0.66-0.89 with
batch_pos_sim 0.02-0.05 above it from step ~10 to ~80, and alpha = 0.1 (seed
2) for ~105 steps. So the detector fires only after the condition has held
for `patience` consecutive steps (200 by default), and the report also says
whether the run was still collapsed at its end.
"""

import dataclasses
import math

# The negatives this alike (mean cosine to the queue; a healthy run: near 0,
# MoCo's own first steps reach 0.46 while the queue fills with early keys) ...
NEG_SIMILARITY = 0.6
# ... and the positive no longer stands out: within this of the negatives, or
# InfoNCE at this fraction of ln(1 + K), the loss of a uniform guess.
MAX_GAP = 0.15
LOSS_FRACTION = 0.9

# What the measurements support (docs/study.md): the temperature scaling trained alpha = 1
# at tau_con 0.04 (3 seeds), as did tau_con 0.2; the warmup ramp only postponed the collapse.
ADVICE = ("add --consistency_temperature_scaling (alpha x (tau_con/tau)^2) or raise "
          "--consistency_temperature (both trained alpha = 1 without collapse in "
          "docs/study.md), or lower --consistency_weight; --consistency_warmup_epochs only "
          "postpones it")


def looks_collapsed(pos_sim, neg_sim, loss_ins, queue_size):
    """Whether one step's means look like a collapsed embedding (pure; floats in).

    Measured at alpha = 1, tau_con = 0.04 on the demo: from step ~25 on,
    batch_neg_sim 0.75-0.84 and batch_pos_sim 0.86-0.92 (InfoNCE 7.3-7.7 of
    ln 4097 = 8.3), where MoCo has 0.0-0.06 and 0.4-0.46 (docs/study.md).
    """
    return neg_sim >= NEG_SIMILARITY and (
        pos_sim - neg_sim <= MAX_GAP or loss_ins >= LOSS_FRACTION * math.log(1 + queue_size))


@dataclasses.dataclass
class CollapseDetector:
    """Feeds on every step's logs; reports the first collapse once.

    `update` returns the one-line message the first time the condition has
    held for `patience` consecutive steps (at the first update at or past
    them), None otherwise. `report()` is what
    goes into summary.json.
    """
    queue_size: int
    patience: int = 200
    run_length: int = 0
    detected: dict | None = None
    last: dict | None = None

    def update(self, step, pos_sim, neg_sim, loss_ins, steps=1):
        """`steps`: the steps since the previous update, which these logs (of
        the last of them) stand for: with --steps_per_execution=k the logs come
        once per k steps, and `patience` still counts steps."""
        self.last = {"step": int(step), "pos_sim": float(pos_sim), "neg_sim": float(neg_sim),
                     "loss_ins": float(loss_ins)}
        collapsed = looks_collapsed(pos_sim, neg_sim, loss_ins, self.queue_size)
        self.run_length = self.run_length + int(steps) if collapsed else 0
        if self.detected is not None or self.run_length < self.patience:
            return None
        self.detected = dict(self.last, ln_1_plus_k=math.log(1 + self.queue_size))
        self.detected["message"] = (
            f"collapse at step {int(step)}: batch_pos_sim {pos_sim:.3f} and batch_neg_sim "
            f"{neg_sim:.3f} (InfoNCE {loss_ins:.2f}, ln(1+K) = {math.log(1 + self.queue_size):.2f})"
            f" for {self.patience} steps: the embedding has collapsed (every image maps to "
            f"about the same vector). Training goes on; to prevent it: {ADVICE}")
        return self.detected["message"]

    def report(self):
        """{"detected": first collapse or None, "collapsed_at_end": bool, "final": last logs}."""
        final = self.last
        at_end = final is not None and looks_collapsed(
            final["pos_sim"], final["neg_sim"], final["loss_ins"], self.queue_size)
        return {"detected": self.detected, "collapsed_at_end": bool(at_end), "final": final}
