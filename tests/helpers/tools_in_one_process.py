"""Several tools/*.py runs in ONE subprocess (tests/helpers/tool_runner.py): one TF import
for all of them, where each `python tools/TOOL.py` would cost its own."""
import json
import os
import subprocess
import sys

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tool_runner.py")


def run_tools(runs, flags=(), capture=False, cwd=None, timeout=600):
    """runs: [[tool, arg, ...], ...]; returns (the runner's JSON report, its CompletedProcess).

    flags: tools whose flag names the report lists. capture: the report also holds each
    run's stdout and stderr.
    """
    request = {"flags": list(flags), "run": [list(r) for r in runs], "capture": capture}
    result = subprocess.run([sys.executable, RUNNER, json.dumps(request)], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result
