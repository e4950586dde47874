"""An image folder with every supported file kind, nesting, non-images and broken files."""
import io

import numpy as np
from PIL import Image


def _rand(rng, h=20, w=24):
    return rng.randint(0, 256, (h, w, 3)).astype(np.uint8)


def make_image_folder(root):
    """Every supported kind, nesting, non-images, and 3 broken files."""
    rng = np.random.RandomState(0)
    a, b, c = root / "cats", root / "dogs" / "deep" / "er", root / "zebras"
    for d in (a, b, c):
        d.mkdir(parents=True)
    Image.fromarray(_rand(rng)).save(a / "rgb.jpg")
    Image.fromarray(_rand(rng)).convert("L").save(a / "gray.JPG")
    Image.fromarray(_rand(rng)).convert("CMYK").save(a / "cmyk.jpeg")
    Image.fromarray(_rand(rng, 48, 40)).save(a / "prog.jpg",
                                             progressive=True)
    Image.fromarray(_rand(rng)).save(b / "rgb.png")
    rgba = np.concatenate([_rand(rng), np.zeros((20, 24, 1), np.uint8)], -1)
    rgba[:10, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(b / "rgba.png")
    Image.fromarray(_rand(rng)).convert("L").save(b / "l.png")
    la = np.stack([_rand(rng)[..., 0], np.full((20, 24), 100, np.uint8)], -1)
    Image.fromarray(la, "LA").save(b / "la.PNG")
    Image.fromarray(_rand(rng)).convert("P").save(b / "palette.png")
    Image.fromarray(rng.randint(0, 65536, (20, 24)).astype(np.uint16)).save(
        c / "sixteen.png")
    Image.fromarray(_rand(rng)).save(
        c / "anim.gif", save_all=True, append_images=[
            Image.fromarray(_rand(rng))])
    Image.fromarray(_rand(rng)).save(c / "pic.bmp")
    Image.fromarray(_rand(rng)).save(c / "ünïcødé 猫.jpg")
    (c / "notes.txt").write_text("not an image")
    (c / "drawing.svg").write_text("<svg/>")
    (c / "sound.wav").write_bytes(b"RIFF\0\0\0\0WAVE")
    (c / "garbage.png").write_bytes(b"this is not a png")
    buf = io.BytesIO()
    Image.fromarray(_rand(rng, 64, 64)).save(buf, "JPEG")
    (c / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue())
                                                     // 2])
    # Valid header and trailer, damaged body: only decoding can tell.
    buf = io.BytesIO()
    Image.fromarray(_rand(rng, 64, 64)).save(buf, "PNG")
    body = bytearray(buf.getvalue())
    body[60:80] = bytes(20)
    (c / "damaged.png").write_bytes(bytes(body))
    return root


GOOD = {"cats": ["cmyk.jpeg", "gray.JPG", "prog.jpg", "rgb.jpg"],
        "dogs": ["la.PNG", "l.png", "palette.png", "rgb.png", "rgba.png"],
        "zebras": ["anim.gif", "pic.bmp", "sixteen.png", "ünïcødé 猫.jpg"]}


def write_split_folders(root, classes=3, per_class=8, size=20, splits=("train", "val")):
    """root/<split>/c<k>/<i>.png through tf.io.gfile: root may be a file:// or ram:// URI.

    Class k's images are noise around a grey level of its own, so a feature
    extractor can tell the classes apart.
    """
    import tensorflow as tf  # noqa: PLC0415 (only this helper needs TF)

    rng = np.random.RandomState(0)
    for split in splits:
        for k in range(classes):
            folder = f"{root}/{split}/c{k}"
            tf.io.gfile.makedirs(folder)
            for i in range(per_class):
                pixels = 40 + 80 * k + rng.randint(0, 40, (size, size, 3))
                buf = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
                with tf.io.gfile.GFile(f"{folder}/{i}.png", "wb") as f:
                    f.write(buf.getvalue())
    return root
