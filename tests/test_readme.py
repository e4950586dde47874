"""README.md and docs/flags.md against the tools: every flag the README's commands name
exists, docs/flags.md is what docs/flags_doc.py generates and lists every flag of
tools/train.py, the commands beside the README's pictures run (on a tiny run) and write PNGs,
docs/make_pictures.sh runs those same commands, the README stays short (<= 250 lines), and
pyproject.toml's commands and packages name what the checkout holds.

One subprocess (tests/helpers/tool_runner.py) loads every tool the README names and runs the
picture commands: one TF import for all of them.
"""

import json
import os
import re
import runpy
import tomllib

import numpy as np
import pytest
import tensorflow as tf
from helpers.references import split_arrays
from helpers.tools_in_one_process import run_tools
from PIL import Image

from co2_tf.run import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as _f:
    README = _f.read()
FLAGS_DOC = os.path.join(ROOT, "docs", "flags.md")  # every flag, generated from the config
PICTURES_SCRIPT = os.path.join(ROOT, "docs", "make_pictures.sh")
MAX_README_LINES = 250  # a newcomer reads it in ten minutes (issue 22)
# absl's own flags, which every tool has.
ABSL = {"flagfile", "help", "helpfull", "helpshort", "helpxml"}
# Appended to the picture commands: tiny sizes (absl keeps a flag's last value).
TINY = {"preview_classes": ["--image_size=16", "--per_class=2"],
        "preview_augmentations": ["--image_size=16", "--num_images=2"],
        "retrieval": ["--num_queries=2", "--k=3", "--thumb_size=16"],
        "plot_curve": ["--width=240", "--height=160"]}
PICTURES_BUDGET = 400 * 1024  # bytes, all of docs/*.png


def readme_commands():
    """(tool, [args]) of every `python tools/TOOL.py ...` in README.md (continuations joined)."""
    text = README.replace("\\\n", " ")
    return [(m.group(1), m.group(2).split())
            for m in re.finditer(r"python3? tools/(\w+)\.py([^\n`#|]*)", text)]


def flag_names(args):
    return {m.group(1) for arg in args for m in [re.match(r"\[?--(\w+)", arg)] if m}


def picture_commands():
    """{docs/NAME.png: (tool, args)} of the commands that write the README's pictures."""
    found = {}
    for tool, args in readme_commands():
        for arg in args:
            m = re.fullmatch(r"--out=(docs/\w+\.png)", arg)
            if m:
                found[m.group(1)] = (tool, args)
    return found


def fake_knn_run(path):
    """A run dir with only what tools/plot_curve.py reads: kNN scalars and summary.json."""
    with tf.summary.create_file_writer(os.path.join(path, "logs", "train")).as_default():
        for step, value in ((1, 0.3), (3, 0.6), (5, 0.7)):
            tf.summary.scalar("epoch_knn_top1", value, step=step)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"knn_top1": 0.7, "knn_top1_random_init": 0.2, "steps": 60}, f)
    return path


def check_class_grid(path, size, per_class, pad=4):
    """The class picture's content: a row per class of the built-in data (10), each row a
    name (dark text on white) then `per_class` different tiles, each one of THAT class's
    training images, centre-cropped to `size` (NumPy's own crop of the split, to a grey
    level); white gaps between tiles. Tiles are placed from the right edge (the name column's
    width depends on the font)."""
    grid = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    images, labels = split_arrays("train", size)
    images = np.round(images * 255).astype(np.int16)
    height, width, _ = grid.shape
    assert height == pad + 10 * (size + pad), grid.shape
    left = width - pad - per_class * (size + pad)
    assert left > 20  # room for the names
    for c in range(10):
        y = pad + c * (size + pad)
        assert grid[y:y + size, pad:left - pad].min() < 128, f"no name drawn in row {c}"
        assert (grid[y - pad:y] == 255).all()  # the white gap above the row
        found = []
        for j in range(per_class):
            x = left + j * (size + pad)
            tile = grid[y:y + size, x:x + size]
            assert (grid[y:y + size, x + size:x + size + pad] == 255).all()
            distance = np.abs(images - tile[None]).max(axis=(1, 2, 3))
            match = int(np.argmin(distance))
            assert distance[match] <= 1, (c, j, distance[match])  # uint8 rounding
            assert labels[match] == c, (c, j, labels[match])
            found.append(match)
        assert len(set(found)) == per_class, found


def check_retrieval(path, reference, queries=2, k=3, thumb=16):
    """The retrieval picture's content: per row a held-out query (a test image, black frame)
    and, in order of the cells, the k training images whose features are the most cosine-
    similar to the query's, recomputed in NumPy from the reference features; each framed
    green when its class is the query's, else red. Cell geometry: 6 px padding, 3 px frames,
    two 16 px caption lines, 18 px between the query and its neighbours, a 22 px title."""
    _, ref = reference
    grid = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    train_x, train_y, train_f = ref["train"]
    test_x, test_y, test_f = ref["test"]
    train_x, test_x = (np.round(x * 255).astype(np.int16) for x in (train_x, test_x))
    cell_w, cell_h = thumb + 6, thumb + 6 + 32

    def tile_at(x, y):
        return grid[y:y + thumb, x:x + thumb]

    def find(tile, images):
        distance = np.abs(images - tile[None]).max(axis=(1, 2, 3))
        assert distance.min() <= 1, distance.min()
        return int(np.argmin(distance))

    unit_train = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
    for r in range(queries):
        y = 22 + r * (cell_h + 6) + 3
        assert (grid[y - 3, 6] == 0).all()  # the query's black frame
        q = find(tile_at(9, y), test_x)
        sims = unit_train @ (test_f[q] / np.linalg.norm(test_f[q]))
        expected = np.argsort(-sims, kind="stable")[:k]
        shown = []
        for j in range(k):
            x = 6 + cell_w + 18 + j * (cell_w + 6) + 3
            shown.append(find(tile_at(x, y), train_x))
            red, green, _ = grid[y - 3, x]
            assert (green > red) == (train_y[shown[-1]] == test_y[q]), (r, j)
        # As sets: features from another batch size may swap two near-equal neighbours.
        assert set(shown) == set(expected.tolist()), (r, shown, expected)


def test_readme_flags_exist_and_picture_commands_draw(run_dir, reference, tmp_path):
    commands = readme_commands()
    tools = sorted({tool for tool, _ in commands})
    assert {"train", "export", "knn_eval", "linear_eval", "retrieval"} <= set(tools)

    # The pictures the README shows are the ones its commands write, small, and all there.
    shown = set(re.findall(r"!\[[^\]]*\]\((docs/[\w.]+)\)", README))
    pictures = picture_commands()
    assert shown == set(pictures) and len(shown) == 4, (shown, sorted(pictures))
    sizes = [os.path.getsize(os.path.join(ROOT, p)) for p in shown]
    assert sum(sizes) <= PICTURES_BUDGET, sizes

    fake = fake_knn_run(str(tmp_path / "knn_run"))
    runs = []
    for picture, (tool, args) in sorted(pictures.items()):
        model_dir = fake if tool == "plot_curve" else run_dir
        args = [f"--model_dir={model_dir}" if a.startswith("--model_dir=") else
                f"--out={tmp_path / os.path.basename(picture)}" if a.startswith("--out=") else a
                for a in args]
        runs.append([tool] + args + TINY[tool])
    report, result = run_tools(runs, flags=tools, cwd=ROOT)

    # Every flag a README command names is one of its tool's flags.
    for tool, args in commands:
        unknown = flag_names(args) - set(report["flags"][tool]) - ABSL
        assert not unknown, f"README: tools/{tool}.py has no --{', --'.join(sorted(unknown))}"
    # docs/flags.md's train section names exactly the flags tools/train.py has (the README
    # links to it).
    assert "docs/flags.md" in README and "python tools/train.py --helpfull" in README
    with open(FLAGS_DOC) as f:
        section = f.read().split("(`python tools/train.py`)")[1].split("\n## ")[0]
    assert set(re.findall(r"^\| `--(\w+)`", section, re.M)) == set(report["flags"]["train"])

    assert report["exit"] == [0] * len(runs), result.stderr[-3000:]
    for picture in pictures:
        with Image.open(tmp_path / os.path.basename(picture)) as image:
            assert image.format == "PNG" and min(image.size) > 16, picture
            image.verify()
    check_class_grid(tmp_path / "classes.png", size=16, per_class=2)
    check_retrieval(tmp_path / "retrieval.png", reference)
    # The curve's points: what the logs hold, as plot_curve reads them.
    assert rundir.read_scalars(fake, "epoch_knn_top1") == [
        (1, pytest.approx(0.3)), (3, pytest.approx(0.6)), (5, pytest.approx(0.7))]
    with Image.open(tmp_path / "knn_curve.png") as image:
        assert image.size == (240, 160)
    check_curve(tmp_path / "knn_curve.png")


def check_curve(path, blue=(31, 100, 180), orange=(220, 110, 20)):
    """The kNN curve's content: the fake run's points (0.3, 0.6, 0.7 at epochs 2, 4, 6) in
    blue, rising left to right, above the random-init baseline (0.2, dashed orange), at
    heights in proportion to the values: (0.3 - 0.2) / (0.7 - 0.3) = 0.25 of the rise, read
    off the pixels (a linear y axis, whatever its ticks)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    is_blue = (np.abs(pixels - blue).max(-1) <= 40)
    is_orange = (np.abs(pixels - orange).max(-1) <= 40)
    columns = np.flatnonzero(is_blue.any(0))
    first, last = columns[:4], columns[-4:]  # the first and last markers (the label of the
    # last value is written left of its marker)
    y_first = np.flatnonzero(is_blue[:, first].any(1)).mean()
    y_last = np.flatnonzero(is_blue[:, last].any(1)).mean()
    y_base = np.argmax(is_orange[:, first[0]:last[-1]].sum(1))  # the dashed line's row
    assert y_base > y_first > y_last, (y_base, y_first, y_last)
    assert (y_base - y_first) / (y_first - y_last) == pytest.approx(0.25, abs=0.06)


def test_readme_is_short_and_its_setup_commands_are_cis():
    lines = README.count("\n") + (not README.endswith("\n"))
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"
    # The two set-up commands, as a fresh clone runs them: the demo's and CI's test command.
    venv = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
    assert f"{venv} && .venv/bin/python tools/train.py --model_dir=/tmp/co2_demo" in README
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    test_command = ".venv/bin/python -m pytest -q -n 3 tests"
    assert test_command in ci
    assert (f"{venv} -r requirements-test.txt -r requirements-torch.txt && {test_command}"
            in README)


def test_make_pictures_runs_the_readme_picture_commands_after_a_fresh_demo():
    """docs/make_pictures.sh redraws every picture the README shows, each with the README's
    command (the run dir aside), the two that read a run after the README's demo command."""
    with open(PICTURES_SCRIPT) as f:
        script = [line.split() for line in f.read().splitlines()
                  if line.startswith("$PYTHON tools/")]
    runs = [(line[1][len("tools/"):-len(".py")], line[2:]) for line in script]

    def without_run_dir(args):
        return [a for a in args if not a.startswith("--model_dir=")]

    for picture, (tool, args) in picture_commands().items():
        assert (tool, without_run_dir(args)) in [(t, without_run_dir(a)) for t, a in runs], \
            picture
        if any(a.startswith("--model_dir=") for a in args):  # reads the demo's run
            demo = runs.index(("train", ['--model_dir="$RUN"']))
            assert demo < [t for t, _ in runs].index(tool), picture
    assert len(runs) == len(picture_commands()) + 1  # the pictures and the demo, nothing else


def test_the_readme_names_the_installed_commands():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    named = set(re.findall(r"`(co2-[\w-]+)`", README))
    assert named == set(scripts), (sorted(named), sorted(scripts))


def test_flags_doc_is_current():
    """docs/flags.md is what `python docs/flags_doc.py > docs/flags.md` writes now."""
    markdown = runpy.run_path(os.path.join(ROOT, "docs", "flags_doc.py"),
                              run_name="flags_doc")["markdown"]
    with open(FLAGS_DOC) as f:
        assert f.read() == markdown(), (
            "docs/flags.md is stale: run python docs/flags_doc.py > docs/flags.md")


def test_pyproject_commands_and_packages_are_the_checkouts():
    """[project.scripts] names tool files (co2-knn-eval -> tools/knn_eval.py, as
    tools/__init__.py runs them), all through its launcher; the package list is every folder
    of co2_tf with Python files, and tools/ as co2_tf_tools (no top-level tools or common)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    scripts = project["project"]["scripts"]
    assert {"co2-train", "co2-export", "co2-knn-eval", "co2-linear-eval"} <= set(scripts)
    for command, target in scripts.items():
        assert target == "co2_tf_tools:main", command
        tool = command.removeprefix("co2-").replace("-", "_")
        assert os.path.isfile(os.path.join(ROOT, "tools", f"{tool}.py")), command
    setuptools = project["tool"]["setuptools"]
    folders = {os.path.relpath(d, ROOT).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(ROOT, "co2_tf"))
               if any(f.endswith(".py") for f in files)}
    assert set(setuptools["packages"]) == folders | {"co2_tf_tools"}
    assert setuptools["package-dir"] == {"co2_tf_tools": "tools"}
