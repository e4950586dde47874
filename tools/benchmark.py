"""Times the real CO2 train step (or the input pipeline) and prints one JSON line.

  python tools/benchmark.py --backbone=resnet18_cifar --image_size=32 --batch_size=256 \\
      --queue_size=4096                                   # step vs this machine's matmul ceiling
  python tools/benchmark.py ... --ablate                  # + bare encoders and convs-only steps
  python tools/benchmark.py ... --precision=mixed_bfloat16 --jit_compile --steps_per_execution=4
  python tools/benchmark.py --input_only --image_size=224 # two-crop MoCo v2 input pipeline

The step is `CO2Model.train_step` inside Keras's train function, built by
co2_tf.training exactly as the trainer builds it, on synthetic inputs in
memory. Fields: images_per_sec, step_ms (median of --repeats timed
executions / steps_per_execution), gflop_per_image (TF profiler count of the
step's graph, see flop_count_method), gflops_per_sec, matmul_gflops_per_sec
(float32 --matmul_size^2 matmuls, timed for about a step's duration just
before and after each timed step) and utilisation = gflops_per_sec /
matmul_gflops_per_sec. --ablate adds step_ms_bare / overhead_fraction (the
CO2 term, EMA and queue priced against the two encoders alone) and
utilisation_convs_only (the backbones' convs without BN: this machine's
conv-kernel ceiling for the step).
"""

import json

import common
from absl import app, flags

from co2_tf import benchmark

common.define_flags(benchmark.BenchmarkConfig, benchmark.HELP)
flags.DEFINE_integer("cpu_devices", 0, "split the CPU into this many logical devices "
                     "(e.g. 2 for --strategy=mirrored without GPUs); 0 = leave as is")


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    common.quiet_logs()
    config = common.config_from_flags(benchmark.BenchmarkConfig)
    common.run_guarded(config.check)
    if flags.FLAGS.cpu_devices > 0:
        import tensorflow as tf  # before anything else touches devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * flags.FLAGS.cpu_devices)
    benchmark.set_threads(config.intra_op_threads, config.inter_op_threads)
    result = common.run_guarded(benchmark.run, config)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
