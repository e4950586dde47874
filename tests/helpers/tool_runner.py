"""Runs several tools/*.py in ONE process (one TF import), for tests/test_readme.py.

  python tests/helpers/tool_runner.py REQUEST_JSON

REQUEST_JSON: {"flags": [tool, ...], "run": [[tool, arg, ...], ...]}. Prints one
JSON line: {"flags": {tool: [its flag names]}, "exit": [exit code of each run]}.
Each tool's module is executed afresh (runpy) after the previous tool's flags
are removed from absl's FLAGS, so tools that define the same flags follow
each other; a run executes it as `python tools/TOOL.py ARGS` would.
"""
import json
import os
import runpy
import sys

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tools")
sys.path.insert(0, TOOLS)

from absl import app, flags, logging  # noqa: E402, F401 (app and logging define flags)

FLAGS = flags.FLAGS
ABSL_FLAGS = set(FLAGS)  # absl's own (--flagfile, --helpfull, --verbosity, ...)


def load(tool, run_name):
    """Executes tools/TOOL.py with only absl's flags defined; returns its flag names."""
    FLAGS.unparse_flags()
    for name in set(FLAGS) - ABSL_FLAGS:
        delattr(FLAGS, name)
    path = os.path.join(TOOLS, f"{tool}.py")
    namespace = runpy.run_path(path, run_name=run_name)
    if run_name != "__main__" and "define_flags" in namespace:  # defined in __main__ only
        namespace["define_flags"]()
    return sorted(set(FLAGS) - ABSL_FLAGS)


def main(request):
    request = json.loads(request)
    result = {"flags": {tool: load(tool, "readme_check") for tool in request.get("flags", [])},
              "exit": []}
    for tool, *args in request.get("run", []):
        sys.argv = [os.path.join(TOOLS, f"{tool}.py")] + args
        try:
            load(tool, "__main__")  # app.run parses the flags, runs main and exits
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        result["exit"].append(code)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
