"""Pictures as PNG files: fonts, writing PNGs, the augmentation preview grid, and line
charts of a run's TensorBoard scalars.

`write_curve(CurveConfig(model_dir=...))` is tools/plot_curve.py: a line chart
of one scalar of a run's TensorBoard logs (by default `epoch_knn_top1`, the
kNN monitor, with the random-init baseline of summary.json as a dashed line),
drawn with Pillow (co2_tf's only imaging dependency; no plotting library).
"""

import dataclasses
import io as stdio
import math

import numpy as np
import tensorflow as tf

from co2_tf import io
from co2_tf.config import flag
from co2_tf.errors import UserError
from co2_tf.run import rundir

_BLUE, _ORANGE, _GRID, _BLACK = (31, 100, 180), (220, 110, 20), (225, 225, 225), (0, 0, 0)


def font(size):
    """Pillow's default font at `size` px (scalable with FreeType, Pillow >= 10.1)."""
    from PIL import ImageFont  # noqa: PLC0415 (imaging only where pictures are drawn)

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def write_png(path, image, flag="--out"):
    """Writes a PIL image as PNG to `path` (any tf.io.gfile path), atomically.

    A picture whose pixels are all gray is stored as one channel (a third of the bytes).
    """
    pixels = np.asarray(image.convert("RGB"))
    if np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0],
                                                                         pixels[..., 2]):
        image = image.convert("L")
    buffer = stdio.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    try:
        io.write_bytes_atomic(path, buffer.getvalue())
    except (OSError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot write {path} ({first}): pass a writable {flag}") from None
    return path


def view_pair_grid(images, views1, views2, pad=2):
    """A preview grid: one row per image: source, view 1, view 2.

    Args:
      images: [n, S, S, 3] sources (uint8 or float in [0, 1]), already resized
        to the views' size (e.g. with co2_tf.data.augment.eval_view).
      views1, views2: [n, S, S, 3] float in [0, 1] (or uint8).
      pad: white pixels between tiles.

    Returns:
      uint8 numpy array [n * (S + pad) + pad, 3 * (S + pad) + pad, 3].
    """
    cols = [as_uint8(np.asarray(x)) for x in (images, views1, views2)]
    n, s = cols[0].shape[0], cols[0].shape[1]
    grid = np.full((n * (s + pad) + pad, 3 * (s + pad) + pad, 3), 255,
                   np.uint8)
    for row in range(n):
        for col, arr in enumerate(cols):
            y = pad + row * (s + pad)
            x = pad + col * (s + pad)
            grid[y:y + s, x:x + s] = arr[row]
    return grid


def as_uint8(arr):
    """A picture as uint8: floats in [0, 1] scaled to 0..255 and rounded, uint8 as is."""
    if arr.dtype == np.uint8:
        return arr
    return np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)


def nice_ticks(low, high, count=5):
    """About `count` round tick values (1, 2 or 5 x 10^k apart) covering [low, high]."""
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9) * step
    ticks = []
    value = first
    while value < high + step * 1e-9 or len(ticks) < 2:
        ticks.append(round(value, 10))
        value += step
    return ticks


def line_chart(xs, ys, *, title, x_label, y_label, references=(), percent=False,
               size=(560, 320)):
    """A PIL image: the points (xs, ys) joined by a line, on labelled axes.

    The title names y_label too (in parentheses) when they differ. references:
    (label, y) horizontal dashed lines (e.g. a baseline); percent: y values
    are fractions, labelled as percentages.
    """
    from PIL import Image, ImageDraw  # noqa: PLC0415

    width, height = size
    left, right, top, bottom = 58, 18, 30, 42
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    small, large = font(11), font(13)
    values = list(ys) + [y for _, y in references]
    y_ticks = (nice_ticks(0.0, 1.0) if percent and 0 <= min(values) and max(values) <= 1
               else nice_ticks(min(values), max(values)))
    x_ticks = nice_ticks(min(xs), max(xs), 6)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                top + (y1 - y) / (y1 - y0) * (height - top - bottom))

    def y_text(y, digits=0):
        return f"{100 * y:.{digits}f}%" if percent else f"{y:.{digits + 3}g}"

    for y in y_ticks:
        a, b = px(x0, y), px(x1, y)
        draw.line([a, b], fill=_GRID)
        draw.text((a[0] - 6, a[1]), y_text(y), fill=_BLACK, font=small, anchor="rm")
    for x in x_ticks:
        a, b = px(x, y0), px(x, y1)
        draw.line([a, b], fill=_GRID)
        draw.text((a[0], a[1] + 6), f"{x:g}", fill=_BLACK, font=small, anchor="mt")
    draw.rectangle([px(x0, y1), px(x1, y0)], outline=_BLACK)
    for label, y in references:
        (a, ya), (b, _) = px(x0, y), px(x1, y)
        for start in range(int(a), int(b), 10):  # dashed
            draw.line([(start, ya), (min(start + 6, b), ya)], fill=_ORANGE, width=2)
        draw.text((b - 4, ya - 3), f"{label} {y_text(y, 2)}", fill=_ORANGE, font=small,
                  anchor="rb")
    points = [px(x, y) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=_BLUE, width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_BLUE)
    last_x, last_y = points[-1]
    draw.text((last_x - 4, last_y - 6), y_text(ys[-1], 2), fill=_BLUE, font=small, anchor="rb")
    draw.text((left, 8), title if title == y_label else f"{title} ({y_label})", fill=_BLACK,
              font=large)
    draw.text(((left + width - right) / 2, height - 6), x_label, fill=_BLACK, font=small,
              anchor="mb")
    return canvas


@dataclasses.dataclass
class CurveConfig:
    model_dir: str = flag("", "pretraining run dir: draws a scalar of its TensorBoard logs "
                              "(RUN/logs)")
    tag: str = flag("epoch_knn_top1", "the scalar: epoch_knn_top1 (the kNN monitor), epoch_loss, "
                                      "batch_loss, ...")
    subdir: str = flag("train", "the logs' subdirectory (train)")
    out: str = flag("", "PNG file to write ('' = RUN_DIR/<tag>.png)")
    width: int = flag(560, "picture width in pixels")
    height: int = flag(320, "picture height in pixels")

    def check(self):
        if not self.model_dir:
            raise UserError("--model_dir is required: the run whose TensorBoard logs to draw")
        if self.out and not self.out.lower().endswith(".png"):
            raise UserError(f"--out={self.out} must end in .png")
        if self.width < 200 or self.height < 120:
            raise UserError("--width must be >= 200 and --height >= 120 (pixels)")
        return self


_TITLES = {"epoch_knn_top1": "kNN top-1 on the held-out split, per epoch of pretraining"}


def write_curve(config: CurveConfig):
    """Draws the scalar `config.tag` of the run; returns {"picture", "steps", "values"}.

    Epoch scalars (epoch_*) are drawn against the epoch count (TensorBoard's
    step + 1), batch scalars against the step. For epoch_knn_top1, summary.json's
    knn_top1_random_init (the same network untrained) is the dashed baseline.
    """
    config.check()
    points = rundir.read_scalars(config.model_dir, config.tag, config.subdir)
    if not points:
        hint = (" (kNN monitor off: --knn_every=0, or no held-out split)"
                if config.tag == "epoch_knn_top1" else "")
        raise UserError(f"no scalar {config.tag!r} in {rundir.log_dir(config.model_dir)}/"
                        f"{config.subdir}{hint}: pass another --tag or --model_dir")
    epochs = config.tag.startswith("epoch_")
    xs = [step + 1 if epochs else step for step, _ in points]
    ys = [value for _, value in points]
    references = []
    summary_path = io.join(config.model_dir, rundir.SUMMARY_FILE)
    if config.tag == "epoch_knn_top1" and io.exists(summary_path):
        baseline = io.read_json(summary_path).get("knn_top1_random_init")
        if baseline is not None:
            references.append(("random init", float(baseline)))
    percent = "top1" in config.tag or "top5" in config.tag or config.tag.endswith("acc")
    picture = line_chart(xs, ys, title=_TITLES.get(config.tag, config.tag),
                         x_label="epoch" if epochs else "step", y_label=config.tag,
                         references=references, percent=percent,
                         size=(config.width, config.height))
    path = config.out or io.join(config.model_dir, f"{config.tag}.png")
    write_png(path, picture)
    return {"picture": path, "steps": xs, "values": ys}
