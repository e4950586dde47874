"""Times the real CO2 train step (or the input pipeline) and prints one JSON line.

  python benchmarks/benchmark.py --backbone=resnet18_cifar --image_size=32 --batch_size=256 \\
      --queue_size=4096                                   # step vs this machine's matmul ceiling
  python benchmarks/benchmark.py ... --ablate             # + bare encoders and convs-only steps
  python benchmarks/benchmark.py ... --conv_kernels       # each conv's kernels alone, GFLOP/s
  python benchmarks/benchmark.py ... --precision=mixed_bfloat16 --jit_compile \\
      --steps_per_execution=4
  python benchmarks/benchmark.py --input_only --image_size=224 # two-crop MoCo v2 input pipeline:
      # host CPU-ms per image, both --augment_on placements, vs PyTorch's DataLoader

The step's flags are the trainer's (tools/train.py: same names, same
defaults), the timing flags are this tool's. The step is `CO2Model.train_step`
inside Keras's train function, built exactly as the trainer builds it, on
synthetic inputs in memory. Fields: images_per_sec, step_ms (median of
--repeats timed executions / steps_per_execution), gflop_per_image (TF
profiler count of the step's graph, see flop_count_method), gflops_per_sec,
ceiling_gflops_per_sec (the best of TF's and NumPy's float32
--matmul_size^2 matmul, timed for about a step's duration just before and
after each timed step; ceiling_source says whose) and utilisation =
gflops_per_sec / ceiling_gflops_per_sec; cpu (instruction sets), onednn_opts
and jit_compile (what ran). --ablate adds step_ms_bare / overhead_fraction
(the CO2 term, EMA and queue priced against the two encoders alone) and
utilisation_convs_only (the backbones' convs without BN: this machine's
conv-kernel ceiling for the step). With --augment_on=device (or auto on
a GPU / TPU) the step takes uint8 crops and augments them itself.
--conv_kernels times, instead of the step,
each distinct conv of the backbone alone at the step's batch (forward, input
gradient, filter gradient: TF's op and, where co2_tf.nets.conv_grad applies, the
matmul one) and adds up what the step's convs cost at those rates
(conv_seconds_per_step), with the filter gradient --conv_filter_grad gives the step
(auto|tf|matmul, as in training).
"""

import json
import os
import sys

# tools/common.py, the runner every binary shares, also puts the checkout on sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import common  # noqa: E402  (first: it sets TF's environment before TF is imported)

# isort: split
import benchmark_lib

from co2_tf.config import TrainConfig


def benchmark(config, timing):
    from co2_tf import distribute  # before anything else touches devices
    distribute.split_cpu(timing.cpu_devices)
    benchmark_lib.set_threads(timing.intra_op_threads, timing.inter_op_threads)
    print(json.dumps(benchmark_lib.run(config, timing)), flush=True)


# The step is a TrainConfig's (without the fields of a run), the timing a BenchmarkConfig's.
main = common.tool(benchmark, TrainConfig, benchmark_lib.BenchmarkConfig,
                   skip=benchmark_lib.UNUSED_TRAIN_FIELDS, overrides=benchmark_lib.NOT_A_RUN)

if __name__ == "__main__":
    common.run_tool(main)
