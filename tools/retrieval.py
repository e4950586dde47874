"""A PNG of nearest neighbours: a row per held-out image, its top-k training images.

  python tools/retrieval.py --model_dir=/tmp/co2_demo --out=/tmp/retrieval.png
  python tools/retrieval.py --keras_model=EXPORT/backbone.keras --dataset=folder:/data/{split} \\
      --num_queries=12 --k=10 --out=retrieval.png

Neighbours by cosine similarity of backbone features (centre crops); each is
captioned with its class and similarity and framed green (same class as the
query) or red.
"""

import sys

import common

from co2_tf.evaluation import retrieval


def retrieval_picture(config):
    result = retrieval.retrieval_picture(config, verbose=1 if sys.stdout.isatty() else 0)
    print(f"wrote {result['picture']}")


main = common.tool(retrieval_picture, retrieval.RetrievalConfig)

if __name__ == "__main__":
    common.run_tool(main)
