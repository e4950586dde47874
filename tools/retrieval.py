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
from absl import app

from co2_tf.evaluation import retrieval

common.define_flags(retrieval.RetrievalConfig, retrieval.HELP)


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    common.quiet_logs()
    config = common.config_from_flags(retrieval.RetrievalConfig)
    result = common.run_guarded(retrieval.retrieval_picture, config,
                                verbose=1 if sys.stdout.isatty() else 0)
    print(f"wrote {result['picture']}")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
