"""Nearest-neighbour retrieval pictures: do similar images get similar features?

`retrieval_picture(config)` picks query images from the held-out split, finds
their top-k neighbours in the training split by cosine similarity of
backbone features (centre crops), and draws a PNG grid: one row per query,
the query first, then its neighbours, each captioned with its class (and
the neighbours with their similarity), framed green when the neighbour's
class is the query's and red when it is not. The same neighbours go to a
JSON file beside the PNG (retrieval.json for retrieval.png): query and
neighbour indices, labels, similarities and precision@k.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from co2_tf import io
from co2_tf.config import flag
from co2_tf.errors import UserError
from co2_tf.evaluation import common, drawing, knn

PICTURE_FILE = "retrieval.png"
RESULTS_FILE = "retrieval.json"
_GREEN, _RED, _GRAY = (40, 160, 60), (200, 40, 40), (150, 150, 150)


@dataclasses.dataclass
class RetrievalConfig(common.EvalConfig):
    seed: int = flag(0, "seed of the query draw")
    out: str = flag("", "PNG file to write ('' = OUTPUT_DIR/retrieval.png); the neighbours go to "
                    "the same name ending in .json")
    num_queries: int = flag(8, "rows: held-out images drawn at random (--seed)")
    k: int = flag(8, "neighbours per query, from the training split")
    thumb_size: int = flag(96, "side of each thumbnail in pixels")

    def check(self):
        super().check()
        for name in ("num_queries", "k", "thumb_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name}={getattr(self, name)} must be > 0")
        if self.out and not self.out.lower().endswith(".png"):
            raise UserError(f"--out={self.out} must end in .png")
        return self


def nearest_neighbours(query_features, bank_features, k):
    """(similarities [Q, k], indices [Q, k]) of the k most cosine-similar bank rows.

    Features must be L2-normalised.
    """
    sims = tf.matmul(query_features, bank_features, transpose_b=True)
    top = tf.math.top_k(sims, k=min(k, int(bank_features.shape[0])))
    return top.values.numpy(), top.indices.numpy()


def retrieval_grid(query_images, query_labels, neighbour_images, neighbour_labels,
                   similarities, class_names=None, thumb_size=96):
    """A PIL image: a row per query, [query | neighbours], captions and match frames.

    query_images [Q, h, w, 3] and neighbour_images [Q, k, h, w, 3] are floats
    in [0, 1]; labels are ints (or None where unknown).
    """
    from PIL import Image, ImageDraw  # noqa: PLC0415

    q, k = len(query_images), neighbour_images.shape[1]
    pad, frame, caption = 6, 3, 16
    cell_w, cell_h = thumb_size + 2 * frame, thumb_size + 2 * frame + 2 * caption
    gap = 3 * pad  # between the query and its neighbours
    width = pad + cell_w + gap + k * (cell_w + pad)
    title = 22
    height = title + q * (cell_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = drawing.font(12)
    draw.text((pad, 4), f"query (held-out)   |   top-{k} neighbours in the training split, "
                        "cosine similarity of backbone features", fill=(0, 0, 0), font=font)

    def name(label):
        if label is None:
            return ""
        return class_names[label] if class_names is not None else str(label)

    def thumb(image):
        pixels = np.clip(np.round(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
        small = pixels.shape[0] < thumb_size  # upscale tiny images without blurring them
        return Image.fromarray(pixels).resize(
            (thumb_size, thumb_size), Image.NEAREST if small else Image.LANCZOS)

    def cell(x, y, image, colour, lines):
        draw.rectangle([x, y, x + cell_w - 1, y + thumb_size + 2 * frame - 1], fill=colour)
        canvas.paste(thumb(image), (x + frame, y + frame))
        for i, line in enumerate(lines):
            draw.text((x, y + thumb_size + 2 * frame + 2 + i * caption), line,
                      fill=(0, 0, 0), font=font)

    for r in range(q):
        y = title + r * (cell_h + pad)
        cell(pad, y, query_images[r], (0, 0, 0), [name(query_labels[r]), "query"])
        for j in range(k):
            x = pad + cell_w + gap + j * (cell_w + pad)
            label = neighbour_labels[r][j]
            known = label is not None and query_labels[r] is not None
            colour = (_GREEN if label == query_labels[r] else _RED) if known else _GRAY
            cell(x, y, neighbour_images[r, j], colour,
                 [name(label), f"{similarities[r][j]:.3f}"])
    return canvas


def _images(d, split, indices):
    """Centre-cropped images and labels of `indices` of `split`, in that order."""
    unique = np.unique(indices)
    images, labels = [], []
    for x, y in d.labelled(split, indices=unique):
        images.append(x.numpy())
        labels.append(y.numpy())
    position = {int(i): n for n, i in enumerate(unique)}
    order = [position[int(i)] for i in np.ravel(indices)]
    images, labels = np.concatenate(images)[order], np.concatenate(labels)[order]
    return images.reshape(np.shape(indices) + images.shape[1:]), labels.reshape(np.shape(indices))


def retrieval_picture(config: RetrievalConfig, verbose=1):
    """Writes the retrieval grid PNG; returns a dict with its path and the neighbours."""
    config.check()
    path = config.out or io.join(common.output_dir(config, "retrieval"), PICTURE_FILE)
    loaded = common.load_backbone(config)
    d = common.resolve_data(config, loaded)
    extractor = knn.FeatureExtractor(loaded.backbone)  # one trace: bank and queries
    bank_f, bank_y = knn.extract_features(extractor, d.labelled(d.split),
                                          verbose=verbose, progress=config.reporter(),
                                          what=f"features ({d.split})", batch_size=d.batch_size)
    n_eval = d.source.num_examples(d.eval_split)
    rng = np.random.default_rng(config.seed)
    queries = np.sort(rng.choice(n_eval, size=min(config.num_queries, n_eval), replace=False))
    query_images, query_labels = _images(d, d.eval_split, queries)
    query_f, _ = knn.extract_features(
        extractor, tf.data.Dataset.from_tensor_slices((query_images, query_labels)).batch(
            d.batch_size), batch_size=d.batch_size)
    sims, idx = nearest_neighbours(query_f, bank_f, config.k)
    neighbour_images, _ = _images(d, d.split, idx)
    neighbour_labels = bank_y.numpy()[idx]
    grid = retrieval_grid(query_images, query_labels.tolist(), neighbour_images,
                          neighbour_labels.tolist(), sims, d.class_names, config.thumb_size)
    drawing.write_png(path, grid)
    results = {"picture": path, "results_file": path[:-len(".png")] + ".json",
               "queries": queries.tolist(), "query_labels": query_labels.tolist(),
               "neighbours": idx.tolist(), "neighbour_labels": neighbour_labels.tolist(),
               "similarities": sims.tolist(), "class_names": list(d.class_names),
               "precision_at_k": float(np.mean(neighbour_labels == query_labels[:, None])),
               "backbone": loaded.as_dict(), "data": d.as_dict(), "k": config.k}
    io.write_json_atomic(results["results_file"], results)  # --out ends in .png (checked)
    return results
