"""Measures why a large --consistency_weight collapses: the two terms' gradients, step by step.

  python research/collapse_probe.py --steps=150 --every=10 \\
      --runs="consistency_weight=1;consistency_weight=1 consistency_warmup_epochs=2"

Each run (';'-separated, each a space-separated list of TrainConfig overrides
of the demo's defaults) trains in memory (no run dir) for --steps steps; every
--every steps, before the step, it measures on that batch the norm of the
gradient of InfoNCE and of L_con (unweighted, i.e. at alpha = 1)
with respect to the query encoder's weights, their cosine, and the spread
(std) of the query's similarities to the queue. One JSON line per
measurement on stdout; docs/study.md reads them.
"""

import dataclasses
import json
import os
import sys
import time

# tools/common.py, the runner every binary shares, also puts the checkout on sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import common  # noqa: E402  (first: it sets TF's environment before TF is imported)
import study_runs as study

from co2_tf import config as config_lib
from co2_tf.config import flag
from co2_tf.errors import UserError


@dataclasses.dataclass
class ProbeConfig:
    steps: int = flag(150, "training steps per run")
    every: int = flag(10, "steps between measurements")
    runs: str = flag("consistency_weight=1", "';'-separated runs of 'field=value ...'")
    dataset: str = flag("builtin", "dataset of every run")


def parse_overrides(text):
    """'a=1 b=x' -> {"a": 1.0, "b": "x"}, typed by TrainConfig's defaults."""
    defaults = config_lib.TrainConfig()
    out = {}
    for item in text.split():
        name, _, value = item.partition("=")
        if not hasattr(defaults, name):
            raise UserError(f"unknown TrainConfig field {name!r} in --runs")
        out[name] = study.typed(name, value)
    return out


def probe(config, steps, every):
    import tensorflow as tf

    from co2_tf import build
    from co2_tf.data import pipelines
    from co2_tf.data.sources import make_source
    from co2_tf.method import losses

    source = make_source(config.dataset, None, config.max_image_pixels)
    spe = pipelines.steps_per_epoch(source, split=config.split, global_batch_size=config.batch_size)
    # The probe encodes the views itself: the whole augmentation on the host.
    config = dataclasses.replace(config, augment_on="host")
    model = build.build_model(config, bn_groups=4, steps_per_epoch=spe)
    build.compile_model(model, build.build_optimizer(config, spe, steps), config)
    batches = iter(pipelines.pretrain_dataset_fn(
        source, split=config.split, image_size=config.image_size, augment=config.augment,
        seed=config.seed, global_batch_size=config.batch_size)(tf.distribute.InputContext()))

    @tf.function
    def measure(x_q, x_k):
        keys, _ = model.encode_keys(x_k, model.step_counter)
        with tf.GradientTape(persistent=True) as tape:
            q = model.encode_query(x_q, training=True)
            ins = tf.reduce_mean(losses.info_nce_loss(q, keys, model.queue, config.temperature))
            # Unweighted: alpha = 1 (the runs that collapse), also measured when alpha = 0.
            con = tf.reduce_mean(losses.consistency_loss(
                q, keys, model.queue, config.consistency_temperature,
                config.consistency_over, config.consistency_kl))
        flat = [tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(t, model.query_variables)],
                          0) for t in (ins, con)]
        norms = [tf.norm(g) for g in flat]
        sims = tf.matmul(q, model.queue, transpose_b=True)
        return {"grad_ins": norms[0], "grad_con": norms[1],
                "cos": tf.reduce_sum(flat[0] * flat[1]) / (norms[0] * norms[1] + 1e-12),
                "loss_ins": ins, "loss_con": con,
                "neg_sim_std": tf.reduce_mean(tf.math.reduce_std(sims, axis=-1))}

    step_fn = tf.function(model.train_step)
    start = time.time()
    for step in range(steps):
        x_q, x_k = next(batches)
        if step % every == 0 or step == steps - 1:
            m = {k: round(float(v), 4) for k, v in measure(x_q, x_k).items()}
        logs = step_fn((x_q, x_k))
        if step % every == 0 or step == steps - 1:
            m.update({k: round(float(logs[k]), 4) for k in ("pos_sim", "neg_sim", "alpha")})
            print(json.dumps(dict(step=step, **m)), flush=True)
    return time.time() - start


def run_probes(probe_config):
    for text in probe_config.runs.split(";"):
        overrides = parse_overrides(text)
        config = config_lib.TrainConfig(model_dir="unused", dataset=probe_config.dataset,
                                        **overrides).check()
        print(json.dumps({"run": overrides}), flush=True)
        seconds = probe(config, probe_config.steps, probe_config.every)
        print(json.dumps({"run_done": overrides, "seconds": round(seconds, 1)}), flush=True)


main = common.tool(run_probes, ProbeConfig)

if __name__ == "__main__":
    common.run_tool(main)
