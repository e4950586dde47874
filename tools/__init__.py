"""The user tools, installed by `pip install .` as the package co2_tf_tools (pyproject.toml).

Each command of [project.scripts] (co2-train, co2-knn-eval, ...) runs `main`, which runs the
tool file the command names (co2-knn-eval -> knn_eval.py) as `python tools/knn_eval.py` does:
as __main__, with its folder on sys.path (the tools import `common` by name). In a checkout
the files run directly and this file is not used.
"""

import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "co2-"


def tool_file(command):
    """co2-knn-eval (or co2-knn-eval.exe) -> this folder's knn_eval.py."""
    name = os.path.basename(command)
    name = name[:-len(".exe")] if name.endswith(".exe") else name
    return os.path.join(HERE, name.removeprefix(PREFIX).replace("-", "_") + ".py")


def main():
    path = tool_file(sys.argv[0])
    if not os.path.exists(path):  # local-only: this package's own files
        sys.exit(f"error: {os.path.basename(sys.argv[0])} names no co2_tf tool ({path})")
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    sys.argv[0] = path  # absl's --help lists the flags of the module sys.argv[0] names
    runpy.run_path(path, run_name="__main__")
