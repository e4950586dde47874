"""Writes docs/flags.md: the flags of every user tool, from their config fields.

  python docs/flags_doc.py > docs/flags.md

The tools are pyproject.toml's [project.scripts]; each tool file is loaded (its flags
defined, as common.tool defines them from the fields' help, choices and groups) and its
flags listed, TrainConfig's by group. tests/test_readme.py fails when docs/flags.md is not
what this prints.
"""

import os
import re
import runpy
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
# tools/common.py, the runner every binary shares, also puts the checkout on sys.path.
sys.path.insert(0, TOOLS)
import common  # noqa: E402, F401  (first: it sets TF's environment before TF is imported)
from absl import flags  # noqa: E402

PREFIX = "co2-"  # as tools/__init__.py: co2-knn-eval runs knn_eval.py


def commands():
    """[(command, tool name)] of pyproject.toml's [project.scripts], in its order."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:  # local-only: the checkout's
        scripts = tomllib.load(f)["project"]["scripts"]
    return [(command, command.removeprefix(PREFIX).replace("-", "_")) for command in scripts]


def tool_flags(tool):
    """[(group, [absl Flag, ...])] of tools/TOOL.py in definition order (group "" = none)."""
    before = set(flags.FLAGS)
    path = os.path.join(TOOLS, f"{tool}.py")
    try:
        namespace = runpy.run_path(path, run_name="flags_doc")  # sys.argv[0] = path meanwhile
        if "make_main" in namespace:  # flags defined in __main__ only
            namespace["make_main"]()
        groups = {}  # (number, group) -> flags; common._section names the groups "N. group"
        for name in [n for n in flags.FLAGS if n not in before]:
            module = flags.FLAGS.find_module_defining_flag(name) or ""
            group = re.fullmatch(r"(\d+)\. (.+)", module)
            if group or module == path:  # the tool's (common.define_flags), not TF's own
                key = (int(group.group(1)), group.group(2)) if group else (0, "")
                groups.setdefault(key, []).append(flags.FLAGS[name])
        return [(group, group_flags) for (_, group), group_flags in sorted(groups.items())]
    finally:
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)


def _default(flag):
    value = flag.default
    if isinstance(value, list):
        value = ",".join(value)
    return f"`{value!r}`" if value == "" else f"`{value}`"


def _cell(text):
    return text.replace("|", "\\|")


def markdown():
    lines = ["# Flags of the co2_tf tools", "",
             "Generated from the config fields' help, choices and groups by "
             "`python docs/flags_doc.py > docs/flags.md` (tests/test_readme.py fails when it is "
             "stale). Every tool also takes absl's `--flagfile=FILE`, `--help` and `--helpfull`; "
             "after `pip install .` the commands run the same tools.", ""]
    for command, tool in commands():
        lines += [f"## `{command}` (`python tools/{tool}.py`)", ""]
        for group, group_flags in tool_flags(tool):
            if group:
                lines += [f"### {group}", ""]
            lines += ["| flag | default | meaning |", "|---|---|---|"]
            for flag in group_flags:
                meaning, choices = flag.help, getattr(flag.parser, "enum_values", None)
                if choices:  # absl starts an enum's help with "<a|b>: "
                    meaning = meaning.removeprefix(f"<{'|'.join(choices)}>: ")
                    meaning += f" (one of {', '.join(f'`{c}`' for c in choices)})"
                lines.append(f"| `--{flag.name}` | {_default(flag)} | {_cell(meaning)} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit("usage: python docs/flags_doc.py > docs/flags.md")
    print(markdown(), end="")
