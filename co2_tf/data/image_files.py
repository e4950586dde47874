"""Image files: folder listing, decoding, and damaged files at run time.

Files are recognised by extension (case-insensitive): .jpg .jpeg .jpe .jfif
.png .gif .bmp; anything else (.txt, .svg, audio, ...) is not listed.
JPEG (RGB, gray, CMYK, progressive), PNG (RGB, RGBA, gray, gray+alpha,
palette, 16-bit), GIF (first frame) and BMP decode to RGB uint8. Transparent
pixels are composited onto WHITE (255): what viewers and browsers show, and
what most images with transparency (icons, product shots) were made for.

Folders may be local or URIs (gs://, file://, ram://): listing and decoding
go through tf.io.gfile. Subfolders are followed once each: a local symlink
back to a folder already visited is skipped (real paths are tracked), so a
symlink loop cannot make the listing endless.

Listing checks each file cheaply, without decoding (co2_tf.data.image_checks:
empty, truncated and non-image files), by a thread pool, once per folder and
process. Files that fail are skipped, counted and reported ONCE per folder
and process (one logging warning: the count and up to 3 example paths).

Huge images (over `max_pixels`, --max_image_pixels, default 40 MP): a JPEG
is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's cheap DCT scaling), the
smallest reduction that fits, or 1/8 if none does; PNG, GIF and BMP over the
limit are skipped at listing, counted in a warning of their own.
A file that passes the check but still fails to decode (a damaged body) is
handled at run time without a crash: in pretraining it is replaced by a
plain mid-gray image (augmented as usual), so the index contract below still
holds; a line on stderr names each such file (at each occurrence: printed
by a graph op, tf.print, as the whole stream is graph ops without Python, so
that it runs where the pipeline's graph is shipped, e.g. a remote TPU
worker). If MAX_CONSECUTIVE_FAILURES
(or twice the folder's size, if smaller: such a run covers a whole epoch)
images in a row fail, (nearly) no file decodes: the stream stops with a
UserError naming the folder and the first failing files instead of looking
for a good image forever. In `labelled_dataset` a failing file is
dropped (`ignore_errors`). A full decode of every file up front would catch
everything but costs a whole epoch of decoding on ImageNet-size folders.

Measured costs (the check, the listing, the decode-failure handling): docs/performance.md.
"""
import concurrent.futures
import dataclasses
import functools
import logging
import os
import sys

import tensorflow as tf

from co2_tf import io
from co2_tf import progress as progress_lib
from co2_tf.data import image_checks
from co2_tf.errors import UserError

log = logging.getLogger(__name__)
gfile = tf.io.gfile

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp")
# Composited under transparent pixels (see the module docstring).
ALPHA_BACKGROUND = 255

DEFAULT_MAX_PIXELS = 40_000_000
# See the module docstring: consecutive decode failures that mean "nothing decodes".
MAX_CONSECUTIVE_FAILURES = 1000


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """A scanned image folder: sorted files, their labels, class names."""
    root: str
    class_names: tuple
    files: tuple
    labels: tuple
    skipped: tuple  # corrupt or truncated
    too_large: tuple = ()  # non-JPEG images over the pixel limit
    max_pixels: int = 0  # 0 = no limit
    folders: tuple = ()  # every folder listed (root first): co2_tf.data.folder_index stamps them
    checked: bool = True  # whether each file was checked (check=False: all taken as good)


def _is_image_name(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_folder(root, max_pixels=DEFAULT_MAX_PIXELS, progress=None, check=True):
    """Scans and checks `root/<class>/**/<images>` (cached per process).

    `root` is a local path or a URI (gs://, file://, ram://, ...): listing and
    checks go through tf.io.gfile. Non-JPEG images over `max_pixels` (0 = no
    limit) are skipped. Raises UserError if the folder is missing, has no
    class folders, or a class folder has no image files. `progress`: a
    co2_tf.progress.Reporter for lines during the scan (minutes on ImageNet;
    part of the cache key: equal settings share the listing, as in a tool).
    check=False: no file is opened (every image name is taken as good; a damaged
    file is handled at decode time), for object stores where the check costs
    two requests a file.
    """
    return _list_folder_cached(io.absolute(root), int(max_pixels or 0),
                               progress_lib.reporter(progress), bool(check))


def _entries(folder):
    """(subfolders, files) of a folder, names only, hidden ones left out."""
    dirs, files = [], []
    for name in gfile.listdir(folder):
        if name.endswith("/"):  # object stores mark folders so: no stat needed
            dirs.append(name.rstrip("/"))
        elif not name.startswith("."):
            # An image name is taken as a file without a stat (one per folder entry
            # would dominate listing a bucket); a folder so named fails the check.
            if _is_image_name(name):
                files.append(name)
            elif gfile.isdir(io.join(folder, name)):
                dirs.append(name)
    return [d for d in dirs if not d.startswith(".")], files


def _first_visit(folder, seen):
    """False if `folder` is a local folder already listed (reached again through a symlink)."""
    local = io.local_path(folder)
    if local is None:  # object stores and ram:// have no symlinks
        return True
    real = os.path.realpath(local)  # local-only: symlinks exist only on local disks
    if real in seen:
        return False
    seen.add(real)
    return True


def _image_files_below(folder, seen, listed=None, folders=None):
    """Every image file at any depth below `folder`, sorted.

    `seen`: real paths of local folders listed already (shared by the classes,
    which are in it from the start): each folder is listed once, so a symlink
    loop ends and a folder linked into two classes counts for the first.
    `listed(number)` is called with each folder's number of image files (progress).
    `folders`: a list each listed folder is appended to.
    """
    found, pending = [], [folder]
    while pending:
        current = pending.pop()
        if folders is not None:
            folders.append(current)
        dirs, files = _entries(current)
        found.extend(io.join(current, f) for f in files)
        if listed is not None:
            listed(len(files))
        pending.extend(sub for sub in (io.join(current, d) for d in dirs)
                       if _first_visit(sub, seen))
    return sorted(found)


@functools.lru_cache(maxsize=16)
def _list_folder_cached(root, max_pixels, progress=progress_lib.OFF, check=True):
    if not gfile.exists(root):
        raise UserError(f"image folder {root} does not exist: check the path "
                        "in folder:PATH")
    if not gfile.isdir(root):
        raise UserError(f"{root} is not a directory: folder:PATH needs a "
                        "directory with one subfolder per class")
    classes = sorted(_entries(root)[0])
    if not classes:
        raise UserError(f"image folder {root} has no class subfolders: put "
                        "images in PATH/<class_name>/")
    files, labels, seen, folders = [], [], set(), [root]
    for folder in [root] + [io.join(root, name) for name in classes]:
        _first_visit(folder, seen)
    listing = progress.task(f"listing {root}", unit="files")  # no total: no ETA
    for label, name in enumerate(classes):
        found = _image_files_below(io.join(root, name), seen, listing.add, folders)
        if not found:
            raise UserError(
                f"class folder {io.join(root, name)} has no image files "
                f"({'/'.join(IMAGE_EXTENSIONS)}): add images or remove it")
        files.extend(found)
        labels.extend([label] * len(found))
    listing.done(len(files))
    checking = progress.task(f"checking {root}", len(files), unit="files")
    verdicts = [] if check else [image_checks.OK] * len(files)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for verdict in pool.map(functools.partial(image_checks.check_file, max_pixels=max_pixels),
                                files if check else [], chunksize=256):
            verdicts.append(verdict)
            checking.update(len(verdicts))
    checking.done(len(files))
    skipped = tuple(f for f, v in zip(files, verdicts) if v == image_checks.CORRUPT)
    if skipped:
        log.warning(
            "%s: skipping %d corrupt or truncated image file(s), e.g. %s",
            root, len(skipped), ", ".join(skipped[:3]))
    too_large = tuple(f for f, v in zip(files, verdicts) if v == image_checks.TOO_LARGE)
    if too_large:
        log.warning(
            "%s: skipping %d PNG/GIF/BMP image(s) over the pixel limit (%d pixels, "
            "--max_image_pixels; JPEGs are decoded at reduced size instead), e.g. %s",
            root, len(too_large), max_pixels, ", ".join(too_large[:3]))
    kept = [(f, lab) for f, lab, v in zip(files, labels, verdicts) if v == image_checks.OK]
    present = {lab for _, lab in kept}
    for label, name in enumerate(classes):
        if label not in present:
            raise UserError(
                f"class folder {io.join(root, name)} has no readable image (all are "
                "corrupt, truncated or over --max_image_pixels): fix or remove it")
    return FolderListing(root=root, class_names=tuple(classes),
                         files=tuple(f for f, _ in kept),
                         labels=tuple(lab for _, lab in kept),
                         skipped=skipped, too_large=too_large, max_pixels=max_pixels,
                         folders=tuple(folders), checked=check)


def no_autograph(fn):
    """Skips AutoGraph for a tf.data function.

    The pipeline functions use explicit tf.cond / tf.switch_case, so
    conversion only costs time (measured: docs/performance.md).
    """
    return tf.autograph.experimental.do_not_convert(fn)


def _composite(rgb, alpha):
    a = tf.cast(alpha, tf.float32) / 255.0
    out = tf.cast(rgb, tf.float32) * a + ALPHA_BACKGROUND * (1.0 - a)
    return tf.cast(tf.round(out), tf.uint8)


def _jpeg_scale_index(contents, max_pixels):
    """0, 1, 2, 3 for decoding at 1/1, 1/2, 1/4, 1/8: the first that fits max_pixels."""
    shape = tf.cast(tf.io.extract_jpeg_shape(contents), tf.int64)  # header only
    over = [(-(-shape[0] // r)) * (-(-shape[1] // r)) > max_pixels for r in (1, 2, 4)]
    return tf.add_n([tf.cast(o, tf.int32) for o in over])  # "over" is monotone in r


def decode_image(contents, max_pixels=0):
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, 3] RGB.

    JPEG always decodes to 3 channels (libjpeg converts gray and CMYK), at
    reduced scale if larger than max_pixels (> 0; see module docstring);
    other formats decode as stored, 16-bit scaled to 8, alpha composited.
    """
    def jpeg():
        if not max_pixels:
            return tf.io.decode_jpeg(contents, channels=3)
        return tf.switch_case(_jpeg_scale_index(contents, max_pixels), [
            lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r) for r in (1, 2, 4, 8)])

    def other():
        img = tf.io.decode_image(contents, channels=0, dtype=tf.uint8,
                                 expand_animations=False)
        img = tf.ensure_shape(img, [None, None, None])
        return tf.switch_case(tf.shape(img)[-1] - 1, [
            lambda: tf.tile(img[..., :1], [1, 1, 3]),
            lambda: _composite(tf.tile(img[..., :1], [1, 1, 3]),
                               img[..., 1:2]),
            lambda: img[..., :3],
            lambda: _composite(img[..., :3], img[..., 3:4]),
        ])

    image = tf.cond(tf.io.is_jpeg(contents), jpeg, other)
    return tf.ensure_shape(image, [None, None, 3])


def read_and_decode(path, max_pixels=0):
    return decode_image(tf.io.read_file(path), max_pixels)


def to_rgb(image):
    """uint8 [h, w, 1 or 3 or 4] -> [h, w, 3]: gray tiled, a 4th channel dropped.

    For images that come decoded (TFDS features, the built-in data); encoded
    files go through `decode_image`, which composites transparency.
    """
    image = tf.ensure_shape(image, [None, None, None])
    return tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
                   lambda: image[..., :3])


def _decode_failures_noted(paths):
    """A graph op printing the files that failed to decode (one line) to stderr."""
    return tf.print("co2_tf:", tf.strings.reduce_join(paths, separator=", "),
                    "failed to decode: replaced by a plain gray image", output_stream=sys.stderr)


def _undecodable(folder, count, paths):
    """A failing assertion (a graph op) carrying the one-line error of a folder where nothing
    decodes, quoted as a UserError (co2_tf.errors.user_error_in finds it)."""
    message = tf.strings.join([
        "UserError: ", folder, ": ", tf.strings.as_string(count), " images in a row failed to "
        "decode (e.g. ", tf.strings.reduce_join(paths, separator=", "), "): the files are "
        "damaged or not images; fix or remove them"])
    return tf.debugging.Assert(False, [message], summarize=1)


def decoded_stream(paths, source_of, par, *, folder="", max_pixels=0, count=None):
    """(uint8 image, c) for c = 0, 1, 2, ...: file source_of(c), decoded.

    paths: a string tensor of the files, or a function index -> path (then
    `count` is the number of files).

    Decode errors cannot be caught inside a map function, so the decode map
    is followed by `ignore_errors` (a failed element disappears) and a scan
    finds the gaps, refilled with a plain mid-gray (128) image of the same
    size. A constant stand-in keeps every element a function of its index
    alone, so the index contract holds exactly. The scan + unbatch cost
    less than a nested one-element dataset per image, the other way to
    catch errors (measured: docs/performance.md).

    If nothing decodes, ignore_errors alone would look for a survivor
    forever: after every `limit` files the stream carries a marker element
    that cannot fail, and the scan raises UserError (naming `folder` and
    the first failing files) once `limit` files in a row have failed.
    """
    if callable(paths):
        path_of = paths
    else:
        count = int(paths.shape[0])
        path_of = functools.partial(tf.gather, paths)

    def paths_of(counters):
        return tf.map_fn(lambda c: path_of(source_of(c)), counters,
                         fn_output_signature=tf.string)
    limit = min(2 * int(count), MAX_CONSECUTIVE_FAILURES)
    period = limit + 1  # limit files, then a marker

    def decode(m):
        block = m // period
        is_marker = tf.equal(m % period, limit)
        # Files count c without the markers; a marker carries the last c of its block.
        c = m - block - tf.cast(is_marker, tf.int64)
        image = tf.cond(
            is_marker, lambda: tf.zeros([0, 0, 3], tf.uint8),
            lambda: read_and_decode(path_of(source_of(c)), max_pixels))
        return tf.ensure_shape(image, [None, None, 3]), c, is_marker

    def check(prev, elem):
        _, c, is_marker = elem
        # Files failed in a row since the last one decoded (prev).
        failed = c - prev - 1 + tf.cast(is_marker, tf.int64)
        last_failed = c - 1 + tf.cast(is_marker, tf.int64)
        first = tf.minimum(prev + 1 + tf.range(3, dtype=tf.int64), last_failed)
        ok = tf.cond(failed >= limit, lambda: _undecodable(folder, failed, paths_of(first)),
                     tf.no_op)
        with tf.control_dependencies([ok]):
            last = tf.identity(tf.where(is_marker, prev, c))
        return last, (elem[0], prev, c, is_marker)

    ds = tf.data.Dataset.counter(0, 1, dtype=tf.int64).map(
        no_autograph(decode), num_parallel_calls=par, deterministic=True)
    ds = ds.ignore_errors()
    # Pairs each element with the previous surviving file's counter value.
    ds = ds.scan(tf.constant(-1, tf.int64), no_autograph(check))
    ds = ds.filter(no_autograph(lambda image, prev, c, is_marker: tf.logical_not(is_marker)))

    def refill(image, prev, c, is_marker):
        missing = tf.range(prev + 1, c, dtype=tf.int64)
        noted = tf.cond(tf.size(missing) > 0, lambda: _decode_failures_noted(paths_of(missing)),
                        tf.no_op)
        with tf.control_dependencies([noted]):
            count = tf.cast(c - prev, tf.int32)

            def with_stand_ins():
                gray = tf.fill(tf.shape(image), tf.constant(128, tf.uint8))
                return tf.concat(
                    [tf.tile(gray[None], [count - 1, 1, 1, 1]), image[None]],
                    axis=0)
            images = tf.cond(count > 1, with_stand_ins, lambda: image[None])
        return images, tf.range(prev + 1, c + 1, dtype=tf.int64)

    return ds.map(no_autograph(refill)).unbatch()
