"""Weighted kNN accuracy of a pretrained backbone (what the pretraining monitor measures).

  python tools/knn_eval.py --model_dir=/tmp/co2_demo
  python tools/knn_eval.py --keras_model=/tmp/co2_demo_export/backbone.keras \\
      --projector_dir=/tmp/co2_demo_projector      # then: tensorboard --logdir=...

Memory bank: the training split; queries: the held-out split (centre crops).
Results: OUTPUT_DIR/knn_eval.json (default OUTPUT_DIR: RUN_DIR/knn_eval).
--projector_dir also writes the held-out embeddings (metadata.tsv, sprite.png)
for TensorBoard's projector. --strategy / --tpu as in tools/train.py.
"""

import sys

import common

from co2_tf.evaluation import knn


def knn_eval(config):
    results = knn.knn_eval(config, verbose=1 if sys.stdout.isatty() else 0)
    print(f"kNN (k={config.k}, t={config.temperature}) of {results['backbone']['source']}"
          f"{' (random init)' if config.random_init else ''}: "
          f"top-1 {100 * results['top1']:.2f}%, top-5 {100 * results['top5']:.2f}% on "
          f"{results['data']['dataset']} {results['data']['eval_split']}")
    if config.projector_dir:
        print(f"projector embeddings in {config.projector_dir}: "
              f"tensorboard --logdir={config.projector_dir}")


main = common.tool(knn_eval, knn.KnnConfig)

if __name__ == "__main__":
    common.run_tool(main)
