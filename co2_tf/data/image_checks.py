"""The check of each image file at listing: cheap, without decoding, never raising.

Corrupt files, the design: the magic number must match a supported format and
the file must hold that format's end marker (JPEG: an EOI marker FFD9 after
the SOI; PNG: the IEND chunk; GIF: the 0x3B trailer in its last 16 bytes;
BMP: at least the size its header declares). The end marker is looked for
from the end backwards: the last KiB first (one small read: the common case),
then further back, so bytes appended after it (metadata, a phone's
motion-photo video) are accepted; a truncated file has no end marker and
fails. (A truncated JPEG whose embedded EXIF thumbnail has its own EOI
passes; it fails at decode time, which co2_tf.data.image_files handles.)
This costs two small reads per file (its cost per file and on ImageNet:
docs/performance.md). It catches what usually happens to image collections:
empty and truncated files (interrupted copies or downloads) and non-images
with an image extension.

Huge images: PNG, GIF and BMP cannot be decoded smaller, so those over the
pixel limit fail the check as TOO_LARGE (their size is in the header the
check reads); JPEGs pass, decoded at reduced scale instead.
"""
import os

import tensorflow as tf

from co2_tf import io

gfile = tf.io.gfile

# Verdicts of `check_file`.
OK, CORRUPT, TOO_LARGE = "ok", "corrupt", "too large"

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and its (constant) CRC


def _has_marker_from_end(f, size, marker, start):
    """Whether `marker` occurs in the file after offset `start`, searched from the end.

    Reads the last KiB, then 64 KiB, 4 MiB, ... further back: one small read
    for a file that ends with its marker.
    """
    end, chunk = size, 1024
    while end > start:
        begin = max(start, end - chunk)
        f.seek(begin)
        # Overlap by len(marker) - 1 so a marker across two reads is found.
        if marker in f.read(min(size, end + len(marker) - 1) - begin):
            return True
        end, chunk = begin, chunk * 64
    return False


def _pixels(head):
    """width * height from the header of a PNG, GIF or BMP (first 32 bytes); None if unknown."""
    if head.startswith(_PNG_MAGIC) and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big") * int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return int.from_bytes(head[6:8], "little") * int.from_bytes(head[8:10], "little")
    if head[:2] == b"BM" and len(head) >= 26:
        if int.from_bytes(head[14:18], "little") == 12:  # OS/2 BITMAPCOREHEADER
            return int.from_bytes(head[18:20], "little") * int.from_bytes(head[20:22], "little")
        width = int.from_bytes(head[18:22], "little", signed=True)
        height = int.from_bytes(head[22:26], "little", signed=True)  # < 0: top-down
        return abs(width * height)
    return None


def _open(path):
    """A binary file object: gfile's, or for local files Python's own.

    Local files only: Python's file objects are several times cheaper per file than
    gfile.GFile for the check's reads (measured: docs/performance.md).
    """
    local = io.local_path(path)
    return open(local, "rb") if local is not None else gfile.GFile(path, "rb")  # local-only: above


def check_file(path, max_pixels=0):
    """OK, CORRUPT or TOO_LARGE (see the module docstring). Never raises."""
    try:
        with _open(path) as f:
            head = f.read(32)
            size = f.size() if isinstance(f, gfile.GFile) else os.fstat(f.fileno()).st_size
            if head.startswith(_JPEG_MAGIC):
                complete = _has_marker_from_end(f, size, _JPEG_END, 2)
            elif head.startswith(_PNG_MAGIC):
                complete = _has_marker_from_end(f, size, _PNG_END, len(_PNG_MAGIC))
            elif head[:6] in (b"GIF87a", b"GIF89a"):
                f.seek(max(0, size - 16))
                complete = b"\x3b" in f.read()
            elif head[:2] == b"BM" and len(head) >= 6:
                complete = size >= int.from_bytes(head[2:6], "little") and size > 26
            else:
                complete = False
    except (tf.errors.OpError, OSError):
        return CORRUPT
    if not complete:
        return CORRUPT
    pixels = _pixels(head)  # None for JPEG: decoded at reduced size instead
    if max_pixels and pixels is not None and pixels > max_pixels:
        return TOO_LARGE
    return OK
