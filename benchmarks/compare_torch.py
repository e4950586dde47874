"""Our train step against the same step in PyTorch, back to back: one JSON line.

  pip install -r requirements-torch.txt
  python benchmarks/compare_torch.py --backbone=resnet18_cifar --image_size=32 --batch_size=256 \\
      --queue_size=4096 --alternations=3 --output=compare.json

Runs benchmarks/benchmark.py (co2_tf's step, as training runs it) and
benchmarks/torch_step.py (the same MoCo + CO2 step in PyTorch, torch.compile,
channels_last) one after the other, --alternations times (TF, torch, TF,
torch, ...), each in its own process so that the two runtimes never share
thread pools. Each run reports the median of its --repeats timed steps; the
ratio is taken within each alternation (the two runs minutes apart) and its
median reported: on a shared machine only back-to-back ratios mean much.
Progress goes to stderr; stdout gets one JSON line (and --output a file).
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys

# tools/common.py, the runner every binary shares, also puts the checkout on sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import common  # noqa: E402  (first: it sets TF's environment before TF is imported)

# isort: split
import benchmark_lib

from co2_tf.config import TrainConfig, flag
from co2_tf.errors import UserError

TOOLS = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class CompareConfig:
    alternations: int = flag(3, "TF run + PyTorch run pairs, back to back (the median ratio is "
                                "reported)")
    warmup: int = flag(2, "untimed steps of each run")
    repeats: int = flag(5, "timed steps of each run (each run reports their median)")
    torch_compile: bool = flag(True, "torch.compile the PyTorch step (off: eager, only to check the"
                                     " tool)")
    matmul_size: int = flag(4096, "N of the N x N matmuls of the TF run's ceiling (benchmark.py "
                                  "--matmul_size); the ratio does not use it")
    output: str = flag("", "also write the JSON here (local path or URI)")

    def check(self):
        if self.alternations <= 0 or self.repeats <= 0 or self.warmup < 0:
            raise UserError("--alternations and --repeats must be > 0, --warmup >= 0")
        if self.matmul_size <= 0:
            raise UserError("--matmul_size must be > 0")
        return self


def step_flags(config):
    """--name=value for every TrainConfig field the two tools share."""
    skip = set(benchmark_lib.UNUSED_TRAIN_FIELDS)
    return [f"--{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
            if f.name not in skip]


def run_tool(script, args):
    """The JSON line of one tool run; UserError with its last stderr line on failure."""
    result = subprocess.run([sys.executable, os.path.join(TOOLS, script)] + args,
                            capture_output=True, text=True)
    if result.returncode:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        raise UserError(f"{script} failed: {lines[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(config, compare_config):
    import torch_step  # a UserError naming requirements-torch.txt without torch
    torch_step.check_supported(config.check())
    compare_config.check()
    flags = step_flags(config)
    timing = [f"--warmup={compare_config.warmup}", f"--repeats={compare_config.repeats}"]
    runs = []
    for i in range(compare_config.alternations):
        tf_run = run_tool("benchmark.py", flags + timing + [
            f"--matmul_size={compare_config.matmul_size}"])
        torch_run = run_tool("torch_step.py", flags + timing + [
            f"--torch_compile={compare_config.torch_compile}"])
        runs.append({"tf": tf_run, "torch": torch_run})
        print(f"alternation {i + 1}: co2_tf {tf_run['images_per_sec']:.2f} img/s, "
              f"PyTorch {torch_run['images_per_sec']:.2f} img/s, ratio "
              f"{tf_run['images_per_sec'] / torch_run['images_per_sec']:.3f}",
              file=sys.stderr, flush=True)
    tf_rates = [r["tf"]["images_per_sec"] for r in runs]
    torch_rates = [r["torch"]["images_per_sec"] for r in runs]
    ratios = [a / b for a, b in zip(tf_rates, torch_rates)]
    last_tf = runs[-1]["tf"]
    return {
        "benchmark": "compare_torch", "backbone": config.backbone,
        "image_size": config.image_size, "batch_size": config.batch_size,
        "queue_size": config.queue_size, "alternations": compare_config.alternations,
        "tf_images_per_sec": statistics.median(tf_rates),
        "torch_images_per_sec": statistics.median(torch_rates),
        "ratio_median": round(statistics.median(ratios), 4),
        "ratios": [round(r, 4) for r in ratios],
        "tf_images_per_sec_runs": tf_rates, "torch_images_per_sec_runs": torch_rates,
        "onednn_opts": last_tf["onednn_opts"], "jit_compile": last_tf["jit_compile"],
        "tensorflow": last_tf["tensorflow"], "torch": runs[-1]["torch"]["torch"],
        "torch_compile": runs[-1]["torch"]["torch_compile"],
        "channels_last": runs[-1]["torch"]["channels_last"],
        "cpu": last_tf["cpu"], "cores": last_tf["cores"],
        "load_average_1min": [r["tf"]["load_average_1min_before"] for r in runs],
        "runs": runs}


def compare_and_print(config, compare_config):
    result = compare(config, compare_config)
    print(f"co2_tf {result['tf_images_per_sec']:.2f} img/s, PyTorch "
          f"{result['torch_images_per_sec']:.2f} img/s, ratio (median of "
          f"{compare_config.alternations}) {result['ratio_median']:.3f}",
          file=sys.stderr, flush=True)
    line = json.dumps(result)
    if compare_config.output:
        from co2_tf import io
        io.write_json_atomic(compare_config.output, result)
    print(line, flush=True)


def make_main():
    """Defines the flags (not at import: tests import this module beside torch_step)."""
    return common.tool(compare_and_print, TrainConfig, CompareConfig,
                       skip=benchmark_lib.UNUSED_TRAIN_FIELDS, overrides=benchmark_lib.NOT_A_RUN,
                       check=False)


if __name__ == "__main__":
    common.run_tool(make_main())
