"""The throughput model of a preset on accelerator targets: arithmetic, nothing runs.

  python benchmarks/throughput.py --flagfile=flags/imagenet_mocov2_co2_gpu.cfg --target=8xa100,h100
  python benchmarks/throughput.py --flagfile=flags/imagenet_mocov2_co2_tpu.cfg --target=tpu_v4_32 \
      --augment_on=host --format=json

Per step and per replica: FLOPs, the bytes each cross-replica call carries (payload) and a
replica receives (ring all-reduce), host-to-device bytes per image, and from the targets'
stated peak rates, an assumed utilisation (--mfu) and the host CPU cost per image, the
images/s per accelerator and the host cores each one needs. --augment_on sets the dtype the
pipeline hands the device (device, and auto on accelerators: uint8 crops; host: float32
views) and the host CPU-ms per image (docs/performance.md's measured figure for that placement);
--image_dtype and --cpu_ms_per_image override them.
docs/accelerators.md states the assumptions and holds the table of the ImageNet presets.
"""

import dataclasses
import json
import os
import sys

# tools/common.py, the runner every binary shares, also puts the checkout on sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import common  # noqa: E402  (first: it sets TF's environment before TF is imported)
import throughput_model as throughput

from co2_tf.config import TrainConfig, flag


@dataclasses.dataclass
class TargetsConfig:
    target: tuple = flag(("8xa100",), f"targets, comma-separated: {', '.join(throughput.TARGETS)}")
    format: str = flag("table", "output format", choices=("table", "json"))
    image_dtype: str = flag("", f"dtype the pipeline hands the device: "
                            f"{', '.join(throughput.DTYPE_BYTES)}; '' = the --augment_on "
                            f"placement's ({throughput.IMAGE_DTYPES})")
    mfu: float = flag(throughput.DEFAULT_MFU, "assumed model FLOPs utilisation of the "
                      "accelerators' peak")
    cpu_ms_per_image: float = flag(0.0, "host CPU milliseconds per source image (two views); "
                                   "0 = docs/performance.md's figure for the --augment_on "
                                   f"placement ({throughput.CPU_MS_PER_IMAGE})")


def _si(value, unit=""):
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def rows(result):
    """(figure, value) pairs of one model result, as the table prints them."""
    f = result["flops_per_step_per_replica"]
    out = [("replicas x per-replica batch", f"{result['replicas']} x "
                                            f"{result['per_replica_batch']}"),
           ("precision", result["precision"]),
           ("augment_on / image dtype", f"{result['augment_on']} / {result['image_dtype']}"),
           ("FLOPs per step per replica", _si(f["total"], "FLOP")),
           ("  query fwd+bwd / key fwd / loss", " / ".join(_si(f[k]) for k in
                                                          ("query", "key", "loss")))]
    payload = result["collective_payload_bytes_per_step_per_replica"]
    wire = result["collective_received_bytes_per_step_per_replica"]
    for kind, (op, _) in throughput.COLLECTIVES.items():
        out.append((f"{kind} ({op}): payload / received",
                    f"{_si(payload[kind], 'B')} / {_si(wire[kind], 'B')}"))
    out += [("host-to-device bytes per image", _si(result["host_to_device_bytes_per_image"],
                                                   "B")),
            ("assumed peak x MFU", f"{_si(result['peak_flops_per_accelerator'], 'FLOP/s')} x "
                                   f"{result['mfu']:g}"),
            ("step time (compute only)", f"{1000 * result['step_seconds']:.1f} ms"),
            ("images/s per accelerator", f"{result['images_per_second_per_accelerator']:.0f}"),
            ("interconnect received per replica", _si(
                result["interconnect_bytes_per_second_per_replica"], "B/s")),
            ("host-to-device per accelerator", _si(
                result["host_to_device_bytes_per_second_per_accelerator"], "B/s")),
            ("host CPU-ms per image", f"{result['cpu_ms_per_image']:g}"),
            ("host cores per accelerator", f"{result['host_cores_per_accelerator']:.1f}"),
            ("host cores per host", f"{result['host_cores_per_host']:.0f}")]
    return out


def table(results):
    """A markdown table: one row per figure, one column per target."""
    header = "| figure | " + " | ".join(r["target"] for r in results) + " |"
    lines = [header, "|---|" + "---|" * len(results)]
    columns = [rows(r) for r in results]
    for i, (name, _) in enumerate(columns[0]):
        lines.append(f"| {name} | " + " | ".join(c[i][1] for c in columns) + " |")
    return "\n".join(lines)


def print_model(config, targets):
    results = [throughput.model(config, target, image_dtype=targets.image_dtype or None,
                                mfu=targets.mfu, cpu_ms_per_image=targets.cpu_ms_per_image or None)
               for target in targets.target]
    if targets.format == "json":
        print(json.dumps(results, indent=2))
    else:
        print(table(results))


main = common.tool(print_model, TrainConfig, TargetsConfig, overrides={"model_dir": "unused"})

if __name__ == "__main__":
    common.run_tool(main)
