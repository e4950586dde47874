"""The peer of co2_tf's input pipeline: PyTorch's DataLoader with MoCo v2's transforms.

  python benchmarks/torch_input.py --files=LIST --batch_size=64 --workers=2 --warmup=4 --batches=16

Run by benchmarks/benchmark.py --input_only (a subprocess of its own: no TF in the
process, as in a PyTorch run); prints one JSON line: CPU-ms per source image
(two views) over the timed batches, of this process and its DataLoader
workers together (read from /proc), and images/s.

torchvision does not install with torch 2.13, so its PIL transforms are
written here as torchvision 0.2x runs them on PIL images, with MoCo v2's
recipe (facebookresearch/moco main_moco.py, `aug_plus`): pil_loader ->
RandomResizedCrop(224, scale=(0.2, 1)) -> RandomApply(ColorJitter(0.4, 0.4,
0.4, 0.1), p=0.8) -> RandomGrayscale(0.2) -> RandomApply(MoCo's PIL
GaussianBlur(sigma in [0.1, 2]), p=0.5) -> RandomHorizontalFlip -> ToTensor
-> Normalize, twice per image (TwoCropsTransform).
"""

import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pil_loader(path):
    with open(path, "rb") as f:  # local-only: torchvision's loader, local files
        return Image.open(f).convert("RGB")


def random_resized_crop(img, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            break
    else:  # centre crop fallback
        in_ratio = width / height
        w, h = width, height
        if in_ratio < ratio[0]:
            h = int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            w = int(round(h * ratio[1]))
        i, j = (height - h) // 2, (width - w) // 2
    return img.crop((j, i, j + w, i + h)).resize((size, size), Image.BILINEAR)


def adjust_hue(img, factor):
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    # torchvision's np.uint8(factor * 255) (a C cast: truncation, then wrap-around),
    # which NumPy 2 refuses for negative values.
    with np.errstate(over="ignore"):
        np_h += np.uint8(int(factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def color_jitter(img, b=0.4, c=0.4, s=0.4, h=0.1):
    fb, fc, fs = (torch.empty(1).uniform_(1 - x, 1 + x).item() for x in (b, c, s))
    fh = torch.empty(1).uniform_(-h, h).item()
    for idx in torch.randperm(4).tolist():
        if idx == 0:
            img = ImageEnhance.Brightness(img).enhance(fb)
        elif idx == 1:
            img = ImageEnhance.Contrast(img).enhance(fc)
        elif idx == 2:
            img = ImageEnhance.Color(img).enhance(fs)
        else:
            img = adjust_hue(img, fh)
    return img


def to_grayscale(img):
    gray = np.array(img.convert("L"))
    return Image.fromarray(np.dstack([gray, gray, gray]), "RGB")


def mocov2_view(img, size):
    img = random_resized_crop(img, size)
    if torch.rand(1).item() < 0.8:
        img = color_jitter(img)
    if torch.rand(1).item() < 0.2:
        img = to_grayscale(img)
    if torch.rand(1).item() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
    if torch.rand(1).item() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(size, size, 3)
    x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class TwoCrops(torch.utils.data.Dataset):
    """Endless: index k reads file k mod N (a long epoch, no worker restarts)."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return 10**9

    def __getitem__(self, k):
        img = pil_loader(self.files[k % len(self.files)])
        return mocov2_view(img, self.size), mocov2_view(img, self.size)


def tree_cpu_seconds():
    """CPU time of this process and its live children (the DataLoader workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:  # local-only: a system file
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def run(files, batch_size, workers, warmup, batches, size=224):
    loader = torch.utils.data.DataLoader(TwoCrops(files, size), batch_size=batch_size,
                                         num_workers=workers, shuffle=False, drop_last=True)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start, start_cpu = time.perf_counter(), tree_cpu_seconds()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - start, tree_cpu_seconds() - start_cpu
    images = batches * batch_size
    del iterator
    return {"images_per_sec": round(images / wall, 1),
            "cpu_ms_per_image": round(1000 * cpu / images, 2),
            "cores_used": round(cpu / wall, 2), "workers": workers, "torch": torch.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", required=True, help="a text file: one JPEG path a line")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches")
    parser.add_argument("--batches", type=int, default=16, help="timed batches")
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args()
    with open(args.files) as f:  # local-only: the list the benchmark wrote
        files = f.read().split("\n")
    files = [p for p in files if p]
    print(json.dumps(run(files, args.batch_size, args.workers, args.warmup, args.batches,
                         args.image_size)), flush=True)


if __name__ == "__main__":
    main()
