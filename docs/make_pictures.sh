#!/bin/sh
# Redraws every picture in docs/ from a fresh demo run with today's defaults (the README's
# demo command), with the commands the README shows beside each picture.
#   sh docs/make_pictures.sh [RUN_DIR]      (from the checkout; PYTHON=... picks the interpreter)
# RUN_DIR (default: a new temporary dir) must not exist: the pictures come from a fresh run.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RUN=${1:-$(mktemp -d)/co2_demo}
if [ -e "$RUN" ]; then
  echo "make_pictures.sh: $RUN exists; give a new run dir (the pictures need a fresh demo run)" >&2
  exit 1
fi

# The data and its augmentations (no run needed).
$PYTHON tools/preview_classes.py --dataset=builtin --image_size=40 --per_class=7 --out=docs/classes.png
$PYTHON tools/preview_augmentations.py --dataset=builtin --augment=mocov1 --image_size=80 --num_images=4 --out=docs/augmentations.png
# The demo, then what it learned.
$PYTHON tools/train.py --model_dir="$RUN"
$PYTHON tools/retrieval.py --model_dir="$RUN" --num_queries=4 --k=5 --out=docs/retrieval.png
$PYTHON tools/plot_curve.py --model_dir="$RUN" --out=docs/knn_curve.png
cat "$RUN/summary.json"; echo
