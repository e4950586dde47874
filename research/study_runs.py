"""A grid of pretraining runs, each evaluated by kNN and a linear probe: one markdown table.

`run_study(StudyConfig)` is what `research/study.py` calls. The grid is a list of
cells, each a space-separated list of TrainConfig overrides of the base
config; a comma list expands to every value (a product within the cell):

    "consistency_weight=0"
    "consistency_weight=0.1,1 consistency_temperature=0.04,0.2"   # 4 settings
    "consistency_weight=1 consistency_warmup_epochs=2"

Every setting runs once per seed, all with the base's steps, in
STUDY_DIR/<setting>/seed<N> (a normal run dir). A run whose CELL_FILE exists
is reused, not rerun, so a grid can grow and an interrupted study resumes (a
run interrupted mid-training resumes from its checkpoint). A reused run must
have been made with the same config: otherwise a one-line error.

Per setting the table gives kNN and linear-probe top-1 (mean +- sample std
over seeds), the mean of the last steps' batch_pos_sim / batch_neg_sim, how
many seeds the collapse detector flagged during the run and how many were
still collapsed at its last step (co2_tf.run.collapse), and the median
ms per training step (wall clock: only comparable between runs made on the
same machine under the same load).
"""

import dataclasses
import itertools
import statistics
import time

import keras

from co2_tf import io, training
from co2_tf.config import TrainConfig, flag
from co2_tf.errors import UserError
from co2_tf.evaluation import knn, linear_probe

CELL_FILE = "study_cell.json"
TABLE_FILE = "study.md"
# Short names for the table and the run dirs.
SHORT = {"consistency_weight": "alpha", "consistency_temperature": "tau_con",
         "consistency_over": "over", "consistency_kl": "kl",
         "consistency_warmup_epochs": "warmup", "consistency_temperature_scaling": "scaled"}
LAST_STEPS = 20  # the similarities reported: the mean over the run's last steps


@dataclasses.dataclass
class StudyConfig:
    study_dir: str = flag("", "one run dir per cell and seed goes below it")
    # Flag --cell, repeated: one setting per flagfile line.
    cells: tuple = dataclasses.field(
        default=("consistency_weight=0", "consistency_weight=0.1"),
        metadata={"help": "a setting (or a product of settings): 'flag=value[,value...] ...'",
                  "flag": "cell", "multi": True})
    seeds: tuple = flag((0, 1, 2), "seeds each setting runs with")
    linear_epochs: int = flag(100, "epochs of the fast linear probe (cached centre-crop "
                              "features)")
    # The training flags every cell shares (the binary's other flags): no flag of its own.
    base: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def check(self):
        if not self.study_dir:
            raise UserError("--study_dir is required: one run dir per cell goes below it")
        if not self.cells:
            raise UserError("the grid is empty: give at least one --cell")
        if not self.seeds:
            raise UserError("--seeds is empty: give at least one seed")
        if self.linear_epochs <= 0:
            raise UserError(f"--linear_epochs={self.linear_epochs} must be > 0")
        settings(self.cells)  # parse errors now, before any training
        return self


def typed(name, text):
    """`text` as a value of TrainConfig's field `name` (bools: true/false/1/0)."""
    default = getattr(TrainConfig(), name)
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return type(default)(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not a {type(default).__name__}") from None


def settings(cells):
    """The grid's settings: a list of {field: value} dicts, in order, without repeats."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = []
    for cell in cells:
        axes = []
        for item in cell.split():
            name, sep, values = item.partition("=")
            if not sep or not values:
                raise UserError(f"--cell={cell!r}: write field=value[,value...] items")
            if name not in fields or name in ("model_dir", "seed"):
                raise UserError(f"--cell={cell!r}: {name!r} is not a training flag the grid "
                                "can vary (seeds go in --seeds)")
            axes.append([(name, typed(name, v)) for v in values.split(",")])
        for combo in itertools.product(*axes):
            setting = dict(combo)
            if setting not in out:
                out.append(setting)
    return out


def setting_name(setting):
    """'alpha=1_warmup=2': a run dir name and the table's label."""
    if not setting:
        return "base"
    return "_".join(f"{SHORT.get(k, k)}={v:g}" if isinstance(v, float)
                    else f"{SHORT.get(k, k)}={v}" for k, v in setting.items())


class _StepStats(keras.callbacks.Callback):
    """Wall time between step ends, and the last steps' similarities."""

    def __init__(self):
        super().__init__()
        self.times, self.sims = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())
        if logs and "pos_sim" in logs:
            self.sims = (self.sims + [(float(logs["pos_sim"]), float(logs["neg_sim"]))])[
                -LAST_STEPS:]


def _comparable(config):
    values = dataclasses.asdict(config)
    values.pop("model_dir")
    return values


def config_diffs(saved, config):
    """What differs between a finished cell's saved flags and `config` (a list of lines).

    A flag added after the cell ran is missing from `saved`: it ran with that flag's
    default (a new flag's default keeps the old behaviour), so a grid survives new flags.
    With alpha = 0 on both sides the consistency term's other flags change nothing trained
    (MoCo's cells inherit tau_con from the base flagfile, whose value may change), so they
    are not compared.
    """
    saved = {**_comparable(TrainConfig()), **saved}
    now = _comparable(config)
    if saved["consistency_weight"] == now["consistency_weight"] == 0:
        for values in (saved, now):
            for key in [k for k in values if k.startswith("consistency_")]:
                values.pop(key)
    return [f"--{k}={saved.get(k)!r} there, {now.get(k)!r} now"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def run_cell(config, linear_epochs, verbose=0):
    """Trains (or resumes) and evaluates one run; writes and returns its CELL_FILE."""
    path = io.join(config.model_dir, CELL_FILE)
    if io.exists(path):
        cell = io.read_json(path)
        diffs = config_diffs(cell["config"], config)
        if diffs:
            raise UserError(f"{config.model_dir} was run with other flags ({'; '.join(diffs)})"
                            ": use a new --study_dir or the same flags")
        return cell
    stats = _StepStats()
    summary = training.train(config, callbacks=[stats], verbose=verbose)
    gaps = [b - a for a, b in zip(stats.times[1:], stats.times[2:])]  # skip tracing
    knn_top1 = summary.get("knn_top1")
    if knn_top1 is None:  # not in-memory data: the end-of-run kNN was not computed
        knn_top1 = knn.knn_eval(knn.KnnConfig(
            model_dir=config.model_dir, eval_split=config.eval_split, k=config.knn_k,
            temperature=config.knn_temperature), verbose=0)["top1"]
    probe = linear_probe.linear_eval(linear_probe.LinearEvalConfig(
        model_dir=config.model_dir, eval_split=config.eval_split, protocol="fast",
        epochs=linear_epochs), verbose=0)
    cell = {
        "knn_top1": knn_top1,
        "linear_top1": probe["top1"],
        "pos_sim": statistics.fmean(p for p, _ in stats.sims) if stats.sims else None,
        "neg_sim": statistics.fmean(n for _, n in stats.sims) if stats.sims else None,
        "collapse": summary["collapse"],
        "ms_per_step": 1000 * statistics.median(gaps) if gaps else None,
        "steps": summary["steps"],
        "config": _comparable(config),
    }
    io.write_json_atomic(path, cell)
    return cell


def _mean_std(values, scale=100.0, digits=1):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def table(rows):
    """Markdown: one line per setting, from [(setting name, [cell dicts])]."""
    lines = ["| setting | seeds | kNN top-1 % | linear top-1 % | pos_sim | neg_sim | "
             "collapse: flagged / at end | ms/step |", "|---|---|---|---|---|---|---|---|"]
    for name, cells in rows:
        flagged = sum(1 for c in cells if c["collapse"]["detected"])
        at_end = sum(1 for c in cells if c["collapse"]["collapsed_at_end"])
        times = [c["ms_per_step"] for c in cells if c["ms_per_step"] is not None]
        ms = f"{statistics.median(times):.0f}" if times else "-"
        lines.append(
            f"| {name} | {len(cells)} | {_mean_std([c['knn_top1'] for c in cells])} | "
            f"{_mean_std([c['linear_top1'] for c in cells])} | "
            f"{_mean_std([c['pos_sim'] for c in cells], 1, 2)} | "
            f"{_mean_std([c['neg_sim'] for c in cells], 1, 2)} | "
            f"{flagged} / {at_end} of {len(cells)} | {ms} |")
    return "\n".join(lines)


def run_study(config: StudyConfig, verbose=0, log=print):
    """Runs (or reuses) every cell of the grid; returns the markdown table (also written)."""
    config.check()
    grid = settings(config.cells)
    results = {setting_name(s): [] for s in grid}
    # Seed by seed: a study cut short still has every setting for its first seeds.
    for seed in config.seeds:
        for setting in grid:
            name = setting_name(setting)
            run = dataclasses.replace(config.base, **setting, seed=seed,
                                      model_dir=io.join(config.study_dir, name, f"seed{seed}"))
            run.check()
            reused = io.exists(io.join(run.model_dir, CELL_FILE))
            cell = run_cell(run, config.linear_epochs, verbose)
            results[name].append(cell)
            log(f"{'reused' if reused else 'ran'} {name} seed {seed}: kNN "
                f"{100 * cell['knn_top1']:.1f}%, linear {100 * cell['linear_top1']:.1f}%")
    rows = list(results.items())
    text = table(rows)
    io.write_text_atomic(io.join(config.study_dir, TABLE_FILE), text + "\n")
    return text
