"""co2_tf.throughput's arithmetic, pinned by hand for the presets, and benchmarks/throughput.py.

References: torchvision's published ResNet sizes (resnet50 25,557,032 parameters and 4.09
GMACs, "GFLOPS" in its docs; resnet18 11,689,512 and 1.81), less their 1000-class fc layer,
which co2_tf's backbones do not have; the rest is written out here.
"""
import json
import os
import subprocess
import sys

import pytest
import throughput_model as throughput
from helpers.presets import preset_config

from co2_tf.data import AUGMENT_PLACEMENTS, augment_device
from co2_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R50_PARAMS = 25_557_032 - (2048 * 1000 + 1000)
R50_BN_CHANNELS = 26_560  # BN layers' channels: gamma+beta are trainable, mean+var are not
R50_MACS = throughput.backbone("resnet50", 224).macs
MLP_HEAD = 2048 * 2048 + 2048 + 2048 * 128 + 128
MLP_MACS = 2048 * 2048 + 2048 * 128


def test_backbones_match_published_sizes():
    r50 = throughput.backbone("resnet50", 224)
    assert r50.params == R50_PARAMS == 23_508_032
    assert r50.bn_statistics == 2 * R50_BN_CHANNELS
    assert round((r50.macs + 2048 * 1000) / 1e9, 2) == 4.09
    r18 = throughput.backbone("resnet18", 224)
    assert r18.params == 11_689_512 - (512 * 1000 + 1000)
    assert round((r18.macs + 512 * 1000) / 1e9, 2) == 1.81
    # The tiny convnet at 16 px, conv by conv: 3x3 / 2 convs to 8, 4, 2, 1 px.
    weights = [3 * 3 * 3 * 32, 3 * 3 * 32 * 64, 3 * 3 * 64 * 128, 3 * 3 * 128 * 256]
    tiny = throughput.backbone("tiny", 16)
    assert tiny.params == sum(weights) + 2 * (32 + 64 + 128 + 256)
    assert tiny.macs == sum(w * side * side for w, side in zip(weights, (8, 4, 2, 1)))


def test_mocov2_gpu_preset_on_8_a100():
    """augment_on=auto on GPUs: the device augments, so the pipeline hands uint8 crops (the key
    images gather as uint8) and the host does the crops only, at docs/performance.md's 1.91
    CPU-ms."""
    config = preset_config("imagenet_mocov2_co2_gpu.cfg")
    assert config.augment_on == "auto"
    got = throughput.model(config, "8xa100")
    assert (got["augment_on"], got["image_dtype"], got["cpu_ms_per_image"]) == (
        "device", "uint8", 1.91)
    b = 256 // 8
    macs = R50_MACS + MLP_MACS
    flops = b * (3 * 2 * macs + 2 * macs) + b * 6 * 65536 * 128
    assert got["flops_per_step_per_replica"]["total"] == flops
    params = R50_PARAMS + MLP_HEAD
    payload = got["collective_payload_bytes_per_step_per_replica"]
    assert payload == {"gradients": 4 * params, "key images": b * 224 * 224 * 3,
                       "keys": b * 128 * 4, "BN statistics": 4 * 2 * 2 * R50_BN_CHANNELS,
                       "logs": 24, "optimizer step": 8, "overflow flag": 4}  # mixed_float16
    received = got["collective_received_bytes_per_step_per_replica"]
    assert received["gradients"] == 2 * 7 * 4 * params / 8  # ring all-reduce
    assert received["key images"] == 7 * b * 224 * 224 * 3
    assert got["host_to_device_bytes_per_image"] == 2 * 224 * 224 * 3
    seconds = flops / (312e12 * 0.25)
    assert got["step_seconds"] == pytest.approx(seconds)
    assert got["images_per_second_per_accelerator"] == pytest.approx(b / seconds)
    assert got["host_to_device_bytes_per_second_per_accelerator"] == pytest.approx(
        b / seconds * 2 * 224 * 224 * 3)
    assert got["host_cores_per_accelerator"] == pytest.approx(b / seconds * 1.91e-3)
    assert got["host_cores_per_host"] == pytest.approx(8 * b / seconds * 1.91e-3)


def test_augment_on_host_hands_float32_views():
    """augment_on=host: the pipeline's float32 views cross to the device and between
    replicas (4 bytes a channel), and the host does the whole augmentation (5.65 CPU-ms)."""
    config = preset_config("imagenet_mocov2_co2_gpu.cfg", augment_on="host")
    got = throughput.model(config, "8xa100")
    assert (got["augment_on"], got["image_dtype"], got["cpu_ms_per_image"]) == (
        "host", "float32", 5.65)
    b = 256 // 8
    assert got["collective_payload_bytes_per_step_per_replica"]["key images"] == (
        b * 224 * 224 * 3 * 4)
    assert got["collective_received_bytes_per_step_per_replica"]["key images"] == (
        7 * b * 224 * 224 * 3 * 4)
    assert got["host_to_device_bytes_per_image"] == 2 * 224 * 224 * 3 * 4
    flops = b * 8 * (R50_MACS + MLP_MACS) + b * 6 * 65536 * 128
    rate = b / (flops / (312e12 * 0.25))
    assert got["host_cores_per_accelerator"] == pytest.approx(rate * 5.65e-3)
    device = throughput.model(preset_config("imagenet_mocov2_co2_gpu.cfg",
                                            augment_on="device"), "8xa100")
    assert (device["image_dtype"], device["cpu_ms_per_image"]) == ("uint8", 1.91)
    # The placements are the training's on an accelerator (written out: no TF in the model).
    for augment_on in AUGMENT_PLACEMENTS:
        assert throughput.placement(augment_on) == augment_device.resolve_placement(
            augment_on, accelerated=True)


def test_large_batch_preset_on_tpu_v4_32_with_overrides():
    """auto on a TPU is the device placement; --image_dtype and --cpu_ms_per_image override
    what it implies."""
    config = preset_config("imagenet_mocov2_co2_lars4096_tpu.cfg")
    got = throughput.model(config, "tpu_v4_32", image_dtype="bfloat16", mfu=0.5,
                           cpu_ms_per_image=4.0)
    assert (got["augment_on"], got["image_dtype"], got["cpu_ms_per_image"]) == (
        "device", "bfloat16", 4.0)
    b = 4096 // 16
    macs = R50_MACS + MLP_MACS
    flops = b * 8 * macs + b * 6 * 65536 * 128
    assert got["flops_per_step_per_replica"]["total"] == flops
    assert got["collective_payload_bytes_per_step_per_replica"]["key images"] == (
        b * 224 * 224 * 3 * 2)
    assert got["host_to_device_bytes_per_image"] == 2 * 224 * 224 * 3 * 2
    rate = b / (flops / (275e12 * 0.5))
    assert got["host_cores_per_accelerator"] == pytest.approx(rate * 4e-3)
    assert got["host_cores_per_host"] == pytest.approx(rate * 4e-3 * 16 / 4)
    default = throughput.model(config, "tpu_v4_32")
    assert (default["image_dtype"], default["cpu_ms_per_image"]) == ("uint8", 1.91)
    assert default["collective_payload_bytes_per_step_per_replica"]["key images"] == (
        b * 224 * 224 * 3)
    assert default["host_cores_per_host"] == pytest.approx(
        b / (flops / (275e12 * 0.25)) * 1.91e-3 * 16 / 4)


def test_mocov1_linear_head_and_one_device():
    config = preset_config("imagenet_mocov1_co2_gpu.cfg")
    got = throughput.model(config, "h100")
    assert got["encoder_params"] == R50_PARAMS + 2048 * 128 + 128
    assert set(got["collective_payload_bytes_per_step_per_replica"].values()) == {0}
    assert got["flops_per_step_per_replica"]["total"] == (
        256 * 8 * (R50_MACS + 2048 * 128) + 256 * 6 * 65536 * 128)


@pytest.mark.parametrize("change, match", [
    (dict(target_name="tpu_v9"), "unknown --target"),
    (dict(precision="float32", target_name="tpu_v4_32"), "no stated float32 rate"),
    (dict(batch_size=260), "not a multiple of the 8 replicas"),
    (dict(bn="sync"), "--bn=sync"),
    (dict(mfu=1.5), "--mfu"),
    (dict(image_dtype="int3"), "--image_dtype"),
    (dict(augment_on="elsewhere"), "unknown --augment_on"),
])
def test_bad_inputs_are_one_line_errors(change, match):
    change = dict(change)
    target = change.pop("target_name", "8xa100")
    kwargs = {k: change.pop(k) for k in ("mfu", "image_dtype") if k in change}
    config = preset_config("imagenet_mocov2_co2_gpu.cfg", **change)
    with pytest.raises(UserError, match=match):
        throughput.model(config, target, **kwargs)


def test_tool_prints_the_library_figures():
    """benchmarks/throughput.py (no TF import: fast) in JSON and as the docs' table."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"),
           "--flagfile=" + os.path.join(ROOT, "flags", "imagenet_mocov2_co2_tpu.cfg"),
           "--target=tpu_v4_32,8xa100", "--precision=mixed_bfloat16"]
    out = subprocess.run(cmd + ["--format=json", "--augment_on=host"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    config = preset_config("imagenet_mocov2_co2_tpu.cfg", augment_on="host")
    assert results == [json.loads(json.dumps(throughput.model(config, t)))
                       for t in ("tpu_v4_32", "8xa100")]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "| figure | tpu_v4_32 | 8xa100 |"
    assert "| replicas x per-replica batch | 16 x 16 | 8 x 32 |" in lines
    assert "| augment_on / image dtype | device / uint8 | device / uint8 |" in lines
    assert "| host CPU-ms per image | 1.91 | 1.91 |" in lines
    bad = subprocess.run(cmd[:2] + ["--target=tpu_v9"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("error: unknown --target='tpu_v9'")
