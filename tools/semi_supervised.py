"""Semi-supervised evaluation: fine-tune backbone + linear head on a fraction of the labels.

  # ImageNet 1% / 10%: the standard subsets (tfds imagenet2012_subset/1pct, /10pct)
  python tools/semi_supervised.py --model_dir=RUN_DIR --dataset=tfds:imagenet2012 \\
      --data_dir=DIR --image_size=224 --label_fraction=0.01 \\
      --backbone_learning_rate=0.02 --head_learning_rate=5 --output_dir=OUT
  # any other dataset: a class-balanced subset drawn with --seed, saved as a split file
  python tools/semi_supervised.py --model_dir=/tmp/co2_demo --label_fraction=0.1
  # ... and reused for a comparable run (here: the random-init baseline)
  python tools/semi_supervised.py --model_dir=/tmp/co2_demo --random_init \\
      --split_file=/tmp/co2_demo/semi_supervised_0.1/labels_0.1_seed0.txt

Results: OUTPUT_DIR/semi_supervised.json, TensorBoard in OUTPUT_DIR/logs and the
fine-tuned model OUTPUT_DIR/semi_supervised_classifier.keras (images in, logits
out; default OUTPUT_DIR: RUN_DIR/semi_supervised_<fraction>). --strategy / --tpu
as in tools/train.py. Checkpoints every --checkpoint_every steps and on SIGTERM
(exit 143) / SIGINT (130): rerunning the same command resumes.
"""

import sys

import common

from co2_tf.evaluation import semi_supervised


def fine_tune(config):
    results = semi_supervised.fine_tune(config, verbose=1 if sys.stdout.isatty() else 2)
    subset = results["subset"]
    print(f"fine-tuned {results['backbone']['source']}"
          f"{' (random init)' if config.random_init else ''} on {subset['examples']} labelled "
          f"examples ({subset.get('split_file') or subset.get('standard_subset')}): "
          f"top-1 {100 * results['top1']:.2f}%, top-5 {100 * results['top5']:.2f}% on "
          f"{results['data']['dataset']} {results['data']['eval_split']}; "
          f"model in {results['model_file']}")


main = common.tool(fine_tune, semi_supervised.SemiSupervisedConfig)

if __name__ == "__main__":
    common.run_tool(main)
