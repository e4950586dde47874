"""Runs a tool's main (tools/TOOL.py) inside the test process: no TF import to pay.

The tool's module is executed afresh (its absl flags defined), argv parsed into absl's
FLAGS, its main(argv) (common.tool's) called; afterwards the flags it defined are removed
again, so that the next tool (or the same one) can define them. Returns the exit code: 0
when main returns, else its SystemExit's (common.fail: 1 and one `error:` line on stderr).
"""
import os
import runpy
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")
# Binaries live in tools/ (users'), research/ and benchmarks/; all import tools/common.py.
FOLDERS = [TOOLS, os.path.join(ROOT, "research"), os.path.join(ROOT, "benchmarks")]


def run_main(tool, args):
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    before = set(flags.FLAGS)
    path = next(p for p in (os.path.join(d, f"{tool}.py") for d in FOLDERS) if os.path.exists(p))
    try:
        namespace = runpy.run_path(path, run_name=f"{tool}_in_process")
        main = namespace["make_main"]() if "make_main" in namespace else namespace["main"]
        try:
            argv = flags.FLAGS([path] + list(args))
            main(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 0
    finally:
        flags.FLAGS.unparse_flags()
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)


def parse_flags(tool, args):
    """{flag: value} of the flags `tool` defines, parsed from `args` (a --flagfile, say);
    nothing is run, and the flags are removed again afterwards."""
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    before = set(flags.FLAGS)
    path = next(p for p in (os.path.join(d, f"{tool}.py") for d in FOLDERS) if os.path.exists(p))
    try:
        namespace = runpy.run_path(path, run_name=f"{tool}_in_process")
        if "make_main" in namespace:
            namespace["make_main"]()
        flags.FLAGS([path] + list(args))
        return {name: flags.FLAGS[name].value for name in set(flags.FLAGS) - before}
    finally:
        flags.FLAGS.unparse_flags()
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
