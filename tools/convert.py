"""Converts weights between co2_tf run dirs and PyTorch (.pth) files; needs requirements-torch.txt.

Into co2_tf: a MoCo v1/v2 checkpoint or a torchvision ResNet state_dict -> a new run dir
(config.json, train.cfg, checkpoints/ckpt-0) that every tool reads and tools/train.py continues:

  python tools/convert.py --torch_checkpoint=moco_v2_200ep_pretrain.pth.tar --model_dir=/tmp/moco_v2
  python tools/convert.py --torch_checkpoint=resnet50-0676ba61.pth --model_dir=/tmp/tv50
  python tools/train.py --flagfile=/tmp/moco_v2/train.cfg --model_dir=/tmp/moco_v2   # CO2 from MoCo

Out of co2_tf: a run's latest (or --checkpoint) weights -> a .pth, in torchvision's layout (the
query backbone; torchvision.models.resnet50() loads it with strict=True once fc is dropped) or
MoCo's (both encoders, heads, queue; detectron2's MoCo converter reads it):

  python tools/convert.py --model_dir=/tmp/moco_v2 --torch_out=/tmp/backbone.pth
  python tools/convert.py --model_dir=/tmp/moco_v2 --torch_out=/tmp/moco.pth.tar --torch_layout=moco
"""

import common

from co2_tf.interop import convert as convert_lib


def convert(config):
    info = convert_lib.convert(config)
    if config.into_co2_tf:
        what = (f"MoCo v{info['moco_version']} checkpoint" if info["format"] == "moco"
                else "torchvision state_dict (fresh heads and queue)")
        print(f"converted the {info['backbone']} {what} {info['source']} into the run dir "
              f"{config.model_dir} ({info['checkpoint']}, step 0); continue training with: "
              f"python tools/train.py --flagfile={config.model_dir}/train.cfg "
              f"--model_dir={config.model_dir}")
    else:
        print(f"wrote {info['tensors']} tensors of the {info['backbone']} at step {info['step']} "
              f"({info['checkpoint']}) in {info['layout']} layout to {info['torch_out']}")


main = common.tool(convert, convert_lib.ConvertConfig)

if __name__ == "__main__":
    common.run_tool(main)
