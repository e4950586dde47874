"""Makes tests/fixtures/torch_layouts.txt from real torchvision and MoCo's own code (not in CI).

Needs torch and torchvision (torchvision's wheels need torch 2.14.1, not CI's 2.13.0, so
in a venv of its own) and a checkout of facebookresearch/moco (its moco/builder.py):

  python -m venv /work/venvs/tv
  /work/venvs/tv/bin/pip install torch==2.14.1 torchvision==0.29.1
  git clone https://github.com/facebookresearch/moco /tmp/moco   # commit 132aea9 used
  /work/venvs/tv/bin/python tests/helpers/make_torch_layouts.py --moco_dir=/tmp/moco \\
      > tests/fixtures/torch_layouts.txt

What it records (read back by tests/helpers/torch_layouts.py):
- torchvision.models.resnet18/34/50()'s state_dict: keys in order, dtypes, shapes;
- MoCo v2's checkpoint as main_moco.py writes it (moco_v2_800ep_pretrain.pth.tar's layout):
  moco.builder.MoCo(torchvision resnet50, dim 128, K 65536, m 0.999, T 0.2, mlp=True) wrapped
  in DistributedDataParallel (a one-process gloo group on the CPU, hence `module.`), saved
  as save_checkpoint saves it ({'epoch', 'arch', 'state_dict', 'optimizer'}) and read back
  with torch.load;
- features: each model in eval mode, loaded (strictly) with torch_layouts.deterministic_state
  and fed torch_layouts.deterministic_images, normalised as torchvision's transforms do.
"""

import argparse
import io
import os
import platform
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_layouts as tl  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNETS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}  # name -> weights seed
MOCO_SEED = 2
IMAGE_SIZE, IMAGES_SEED = 224, 0
# moco_v2_800ep_pretrain.pth.tar: main_moco.py -a resnet50 --mlp --moco-t 0.2 --aug-plus --cos
# --epochs 800 (MoCo's README); dim and K are main_moco.py's defaults.
MOCO_ARGS = dict(dim=128, K=65536, m=0.999, T=0.2, mlp=True)
MOCO_EPOCHS = 800


def layout_lines(name, state):
    lines = [f"[layout {name}]"]
    for key, value in state.items():
        dtype = str(value.dtype).replace("torch.", "")
        shape = ",".join(str(d) for d in value.shape) or "-"
        lines.append(f"{key} {dtype} {shape}")
    return lines


def layout_of(state):
    return {k: (str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in state.items()}


def torch_input(images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def load(model, state):
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


@torch.no_grad()
def outputs(net, images):
    """Eval-mode outputs of a torchvision ResNet: C2..C5 (NHWC), pooled, and fc's output."""
    seen = {}
    hooks = [getattr(net, f"layer{i}").register_forward_hook(
        lambda m, i, o, level=f"C{i + 1}": seen.__setitem__(level, o)) for i in range(1, 5)]
    hooks.append(net.avgpool.register_forward_hook(
        lambda m, i, o: seen.__setitem__("pooled", torch.flatten(o, 1))))
    seen["fc"] = net.eval()(torch_input(images))
    for hook in hooks:
        hook.remove()
    return {k: (v.permute(0, 2, 3, 1) if v.dim() == 4 else v).numpy() for k, v in seen.items()}


def feature_lines(name, extra, values):
    lines = [f"[features {name}]"] + [f"{k} {v}" for k, v in extra.items()]
    for what, array in values.items():
        s = tl.summary(array)
        lines.append(f"{what}.samples " + " ".join(f"{v:.9g}" for v in s["samples"]))
        lines.append(f"{what}.norm {s['norm']:.9g}")
        lines.append(f"{what}.max {s['max']:.9g}")
    return lines


def moco_checkpoint(moco_dir):
    """MoCo v2's model as main_moco.py builds, wraps and saves it; returns (model, loaded)."""
    sys.path.insert(0, moco_dir)
    import moco.builder  # noqa: PLC0415 (from --moco_dir)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    torch.distributed.init_process_group("gloo", world_size=1, rank=0)
    model = moco.builder.MoCo(torchvision.models.resnet50, MOCO_ARGS["dim"], MOCO_ARGS["K"],
                              MOCO_ARGS["m"], MOCO_ARGS["T"], MOCO_ARGS["mlp"])
    model = torch.nn.parallel.DistributedDataParallel(model)  # main_moco.py's wrap (CPU here)
    optimizer = torch.optim.SGD(model.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    buffer = io.BytesIO()
    torch.save({"epoch": MOCO_EPOCHS, "arch": "resnet50", "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict()}, buffer)  # save_checkpoint's dict
    buffer.seek(0)
    return model, torch.load(buffer, map_location="cpu", weights_only=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moco_dir", required=True, help="a checkout of facebookresearch/moco")
    parser.add_argument("--moco_commit", default="132aea9",
                        help="the commit of --moco_dir, for the header")
    args = parser.parse_args()
    torch.set_num_threads(2)

    images = tl.deterministic_images(IMAGE_SIZE, seed=IMAGES_SEED)
    out = [
        "# Real PyTorch layouts for co2_tf's interop tests (tests/helpers/torch_layouts.py).",
        "# Made once, outside CI, by tests/helpers/make_torch_layouts.py:",
        f"#   torch {torch.__version__} (run on the CPU), torchvision {torchvision.__version__}, "
        f"numpy {tl.np.__version__}, Python {platform.python_version()}, {platform.machine()}",
        "#   /work/venvs/tv/bin/python tests/helpers/make_torch_layouts.py "
        "--moco_dir=MOCO_CHECKOUT > tests/fixtures/torch_layouts.txt",
        "# CI's interop tests run torch 2.13.0 (requirements-torch.txt) without torchvision:",
        "# they read this file instead.",
        "# Sources: torchvision.models.resnet18/34/50() state_dict(); MoCo v2's checkpoint layout",
        f"# (moco_v2_800ep_pretrain.pth.tar) from facebookresearch/moco at {args.moco_commit}:",
        "# moco/builder.py's MoCo(resnet50, dim=128, K=65536, m=0.999, T=0.2, mlp=True) in",
        "# DistributedDataParallel, saved by main_moco.py's save_checkpoint and read back with",
        "# torch.load(weights_only=True). Not the published file itself (its weights are not",
        "# needed, only its layout: the same code wrote it). Its optimizer entry is listed by",
        "# type only (it holds SGD's momentum buffers; converters ignore it).",
        "# [features NAME]: eval-mode outputs of the real model loaded with",
        "# deterministic_state(layout, weights_seed) on deterministic_images(image_size, 1,",
        "# images_seed): 32 evenly spaced values (NHWC order for maps), norm, largest magnitude.",
    ]
    for name, seed in RESNETS.items():
        net = getattr(torchvision.models, name)()
        state = net.state_dict()
        out += layout_lines(name, state)
        weights = tl.deterministic_state(layout_of(state), seed)
        load(net, weights)
        values = outputs(net, images)
        out += feature_lines(name, {"weights_seed": seed, "image_size": IMAGE_SIZE,
                                    "images_seed": IMAGES_SEED,
                                    "weights_checksum": f"{tl.checksum(weights.values()):.17g}"},
                             {k: values[k] for k in ("C2", "C3", "C4", "C5", "pooled")})

    model, saved = moco_checkpoint(args.moco_dir)
    out.append("[checkpoint moco_v2]")
    for key, value in saved.items():
        shown = value if isinstance(value, (int, str)) else ""
        out.append(f"{key} {type(value).__name__} {shown}".rstrip())
    out += layout_lines("moco_v2", saved["state_dict"])
    weights = tl.deterministic_state(layout_of(saved["state_dict"]), MOCO_SEED)
    load(model, weights)
    values = {}
    for encoder in ("encoder_q", "encoder_k"):
        got = outputs(getattr(model.module, encoder), images)
        values[f"{encoder}.pooled"] = got["pooled"]
        values[f"{encoder}.projection"] = got["fc"]  # the MLP head's output, not normalised
    out += feature_lines("moco_v2", {"weights_seed": MOCO_SEED, "image_size": IMAGE_SIZE,
                                     "images_seed": IMAGES_SEED,
                                     "weights_checksum": f"{tl.checksum(weights.values()):.17g}"},
                         values)
    torch.distributed.destroy_process_group()
    print("\n".join(out))


if __name__ == "__main__":
    main()
