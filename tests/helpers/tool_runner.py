"""Runs several tools/*.py in ONE process (one TF import): tests/test_readme.py and
tests/test_remote_paths.py.

  python tests/helpers/tool_runner.py REQUEST_JSON

REQUEST_JSON: {"flags": [tool, ...], "run": [[tool, arg, ...], ...], "capture": bool}.
Prints one JSON line: {"flags": {tool: [its flag names]}, "exit": [exit code of each
run]}, and with "capture", "stdout" and "stderr": what each run wrote (file descriptors
1 and 2, TF's own logs included), instead of the runner's streams.
Each tool's module is executed afresh (runpy) after the previous tool's flags
are removed from absl's FLAGS, so tools that define the same flags follow
each other; a run executes it as `python tools/TOOL.py ARGS` would.
"""
import json
import os
import runpy
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")
# Binaries live in tools/ (users'), research/ and benchmarks/; all import tools/common.py.
FOLDERS = [TOOLS, os.path.join(ROOT, "research"), os.path.join(ROOT, "benchmarks")]
sys.path[:0] = FOLDERS


def tool_path(tool):
    return next(p for p in (os.path.join(d, f"{tool}.py") for d in FOLDERS) if os.path.exists(p))

from absl import app, flags, logging  # noqa: E402, F401 (app and logging define flags)

FLAGS = flags.FLAGS
ABSL_FLAGS = set(FLAGS)  # absl's own (--flagfile, --helpfull, --verbosity, ...)


def load(tool, run_name):
    """Executes tools/TOOL.py with only absl's flags defined; returns its flag names."""
    FLAGS.unparse_flags()
    for name in set(FLAGS) - ABSL_FLAGS:
        delattr(FLAGS, name)
    path = tool_path(tool)
    namespace = runpy.run_path(path, run_name=run_name)
    if run_name != "__main__" and "make_main" in namespace:  # flags defined in __main__ only
        namespace["make_main"]()
    return sorted(set(FLAGS) - ABSL_FLAGS)


def run(tool, args):
    """Runs tools/TOOL.py ARGS; returns its exit code."""
    sys.argv = [tool_path(tool)] + args
    try:
        load(tool, "__main__")  # app.run parses the flags, runs main and exits
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def captured(fn, *args):
    """fn(*args) with file descriptors 1 and 2 in temporary files: (result, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            result = fn(*args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return result, texts[0], texts[1]


def main(request):
    request = json.loads(request)
    result = {"flags": {tool: load(tool, "readme_check") for tool in request.get("flags", [])},
              "exit": []}
    if request.get("capture"):
        result.update(stdout=[], stderr=[])
    for tool, *args in request.get("run", []):
        if request.get("capture"):
            code, out, err = captured(run, tool, args)
            result["stdout"].append(out)
            result["stderr"].append(err)
        else:
            code = run(tool, args)
        result["exit"].append(code)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
