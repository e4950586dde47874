"""Linear evaluation of a pretrained backbone (frozen): top-1 / top-5 on the held-out split.

  # MoCo's ImageNet protocol (SGD lr 30, 100 epochs, lr x0.1 at 60% and 80%):
  python tools/linear_eval.py --model_dir=RUN_DIR --dataset=tfds:imagenet2012 \\
      --data_dir=DIR --image_size=224 --output_dir=OUT
  # a quick check on cached centre-crop features:
  python tools/linear_eval.py --model_dir=/tmp/co2_demo --protocol=fast
  # the same architecture with random weights, as a baseline:
  python tools/linear_eval.py --model_dir=/tmp/co2_demo --protocol=fast --random_init

The backbone comes from --model_dir (latest checkpoint), --checkpoint or
--keras_model (an export). Results: OUTPUT_DIR/linear_eval.json, the classifier
OUTPUT_DIR/linear_classifier.keras (images in, logits out) and TensorBoard in
OUTPUT_DIR/logs (default OUTPUT_DIR: RUN_DIR/linear_eval_<protocol>).
--strategy / --tpu as in tools/train.py (--cpu_devices=2 --strategy=mirrored
without GPUs). --protocol=moco checkpoints every --checkpoint_every steps and on
SIGTERM (exit 143) / SIGINT (130): rerunning the same command resumes.
"""

import sys

import common

from co2_tf.evaluation import linear_probe


def linear_eval(config):
    results = linear_probe.linear_eval(config, verbose=1 if sys.stdout.isatty() else 2)
    print(f"linear eval ({results['protocol']}) of {results['backbone']['source']}"
          f"{' (random init)' if config.random_init else ''}: "
          f"top-1 {100 * results['top1']:.2f}%, top-5 {100 * results['top5']:.2f}% on "
          f"{results['data']['dataset']} {results['data']['eval_split']}; "
          f"results in {results['results_file']}")


main = common.tool(linear_eval, linear_probe.LinearEvalConfig)

if __name__ == "__main__":
    common.run_tool(main)
