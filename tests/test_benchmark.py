"""benchmarks/benchmark.py: the JSON line and its fields (a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(ROOT, "benchmarks", "benchmark.py")
# The MLP head (not the default linear one): the FLOP count checks both of its layers.
TINY = ["--backbone=tiny", "--image_size=16", "--batch_size=16", "--queue_size=64", "--dim=16",
        "--head=mlp", "--warmup=1", "--repeats=2", "--matmul_size=256"]


def run(args, **env):
    """The tool's JSON; `env` sets (str) or unsets (None) environment variables."""
    environ = dict(os.environ)
    for name, value in env.items():
        environ.pop(name, None)
        if value is not None:
            environ[name] = value
    result = subprocess.run([sys.executable, BENCHMARK] + args, capture_output=True, text=True,
                            timeout=600, env=environ)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout  # one JSON line, nothing else on stdout
    return json.loads(lines[0])


def tiny_conv_flops(size=16, widths=(32, 64, 128, 256)):
    """Forward FLOPs (2 per multiply-add) of the tiny backbone's stride-2 3x3 convs."""
    flops, channels = [], 3
    for width in widths:
        size //= 2
        flops.append(2 * size * size * width * channels * 9)
        channels = width
    return flops


def cpuinfo_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_train_step_fields(tmp_path):
    # The user's TF_ENABLE_ONEDNN_OPTS wins over the tools' default.
    out = run(TINY + ["--ablate", "--steps_per_execution=2"], TF_ENABLE_ONEDNN_OPTS="0")
    assert out["onednn_opts_env"] == "0"
    if "avx512_vnni" not in cpuinfo_flags():  # TF's own default would be on there
        assert out["onednn_opts"] is False
    for field in ("images_per_sec", "step_ms", "gflop_per_image", "gflops_per_sec",
                  "matmul_gflops_per_sec", "numpy_matmul_gflops_per_sec",
                  "ceiling_gflops_per_sec", "ceiling_source", "utilisation",
                  "utilisation_vs_tf_matmul", "jit_compile", "onednn_opts", "cpu",
                  "flop_count_method",
                  "step_ms_bare", "overhead_fraction", "step_ms_bare_shuffle_bn",
                  "overhead_fraction_vs_shuffle_bn", "utilisation_paired_median",
                  "step_ms_convs_only", "utilisation_convs_only"):
        assert field in out, field
    assert out["backbone"] == "tiny" and out["batch_size"] == 16
    assert out["steps_per_execution"] == 2 and out["bn_groups"] == 4 and out["replicas"] == 1
    assert out["timed_executions"] == 2 and len(out["step_ms_samples"]) == 2
    assert out["step_ms"] > 0 and out["matmul_gflops_per_sec"] > 0
    assert out["jit_compile"] is False
    # The ceiling is the better of TF's and NumPy's matmul, and says whose it is.
    rates = {"tf": out["matmul_gflops_per_sec"], "numpy": out["numpy_matmul_gflops_per_sec"]}
    assert out["ceiling_gflops_per_sec"] == max(rates.values()) > 0
    assert rates[out["ceiling_source"]] == out["ceiling_gflops_per_sec"]
    # The instruction sets are /proc/cpuinfo's.
    flags = cpuinfo_flags()
    for name in ("avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"):
        assert out["cpu"][name] is (name in flags), name
    # Default threads: one matmul uses every core; it is timed over about one step.
    assert out["matmul_parallel"] == 1 and out["matmuls_per_sample"] >= 1
    assert len(out["utilisation_per_round"]) == 2
    # The fields agree with each other (up to their rounding).
    assert out["images_per_sec"] == pytest.approx(16 / (out["step_ms"] / 1000), rel=0.01)
    assert out["gflops_per_sec"] == pytest.approx(
        out["gflop_per_image"] * out["images_per_sec"], rel=0.01)
    assert out["utilisation"] == pytest.approx(
        out["gflops_per_sec"] / out["ceiling_gflops_per_sec"], rel=0.01)
    assert out["utilisation_vs_tf_matmul"] == pytest.approx(
        out["gflops_per_sec"] / out["matmul_gflops_per_sec"], rel=0.01)
    assert out["overhead_fraction"] == pytest.approx(
        out["step_ms"] / out["step_ms_bare"] - 1, abs=0.01)
    # The count is exact: query fwd + key fwd, a filter gradient per conv, an
    # input gradient per conv but the first (nothing before it trains).
    conv = tiny_conv_flops()
    by_op = out["gflop_per_image_by_op"]
    assert by_op["Conv2D"] * 1e9 == pytest.approx(2 * sum(conv), rel=1e-4)
    assert by_op["Conv2DBackpropFilter"] * 1e9 == pytest.approx(sum(conv), rel=1e-4)
    assert by_op["Conv2DBackpropInput"] * 1e9 == pytest.approx(sum(conv[1:]), rel=1e-4)
    # Head (256 -> 256 -> 16, fwd for q and k, 2 grads for q) and the K = 64 logits.
    head = 2 * (256 * 256 + 256 * 16)
    logits = 2 * 64 * 16
    assert by_op["MatMul"] * 1e9 == pytest.approx(4 * head + 3 * logits, rel=1e-3)
    assert out["gflop_per_image"] >= sum(by_op.values()) * 0.999
    # The convs-only ceiling step runs the same convolutions (plus conv biases).
    convs = sum(v for k, v in by_op.items() if k.startswith("Conv2D"))
    assert out["gflop_per_image_convs_only"] == pytest.approx(convs, rel=0.02)
    assert out["utilisation_convs_only"] == pytest.approx(
        out["gflop_per_image_convs_only"] * 16 / (out["step_ms_convs_only"] / 1000)
        / out["ceiling_gflops_per_sec"], rel=0.01)


def test_precision_xla_and_threads_are_reported():
    # Unset, the tools turn oneDNN's ops on before TF is imported.
    out = run(TINY + ["--precision=mixed_bfloat16", "--jit_compile", "--repeats=1",
                      "--intra_op_threads=1", "--inter_op_threads=2"],
              TF_ENABLE_ONEDNN_OPTS=None)
    assert out["onednn_opts"] is True and out["onednn_opts_env"] == "1"
    assert out["precision"] == "mixed_bfloat16" and out["jit_compile"] is True
    assert out["images_per_sec"] > 0
    # One thread per op: the ceiling runs one matmul per core at once.
    assert out["intra_op_threads"] == 1 and out["inter_op_threads"] == 2
    assert out["matmul_parallel"] == out["cores"]


def test_input_pipeline_fields():
    out = run(["--input_only", "--image_size=32", "--num_jpegs=8", "--input_batch_size=4",
               "--input_window=1", "--repeats=2", "--warmup=1", "--input_rounds=1",
               "--notorch_peer"])
    assert out["benchmark"] == "input_pipeline" and out["augment"] == "mocov2"
    jpeg = out["jpeg"]
    # Photograph-like: ImageNet's ~110 KB at 400-500 x 300-375 px, not ~40 KB smooth fields.
    assert jpeg["files"] == 8 and 85 < jpeg["mean_file_kb"] < 140
    for pipeline in (jpeg["host_part"], jpeg["host_all"], out["builtin"]):
        assert pipeline["source_images_per_sec"] > 0
        assert len(pipeline["window_images_per_sec"]) == 2
        assert 0 < pipeline["cores_used"] <= out["cores_available"] + 0.5
        assert pipeline["cpu_ms_per_image"] > 0
    assert "torch_dataloader" not in jpeg
    assert jpeg["device_part_on_this_cpu"]["cpu_ms_per_image"] > 0
    placement = jpeg["cpu_placement_cpu_ms_per_image"]
    assert placement["host"] == jpeg["host_all"]["cpu_ms_per_image"]
    assert placement["device"] == pytest.approx(
        jpeg["host_part"]["cpu_ms_per_image"]
        + jpeg["device_part_on_this_cpu"]["cpu_ms_per_image"], abs=0.011)
    assert jpeg["host_cores_at_3000_images_per_sec"] == pytest.approx(
        3 * jpeg["host_part"]["cpu_ms_per_image"], abs=0.051)


def test_torch_peer_pipeline(tmp_path):
    """benchmarks/torch_input.py: MoCo v2's two views as PyTorch's DataLoader delivers them."""
    pytest.importorskip("torch")
    import benchmark_lib
    import torch_input
    files = []
    rng = __import__("numpy").random.RandomState(0)
    for i in range(3):
        from PIL import Image
        path = str(tmp_path / f"{i}.jpg")
        Image.fromarray(benchmark_lib.photo_like(rng, 120, 90)).save(path, quality=90)
        files.append(path)
    views = torch_input.TwoCrops(files, 24)[4]  # endless: file 4 mod 3
    mean = torch_input.torch.tensor(torch_input.MEAN).view(3, 1, 1)
    std = torch_input.torch.tensor(torch_input.STD).view(3, 1, 1)
    for view in views:
        assert tuple(view.shape) == (3, 24, 24)
        pixels = view * std + mean  # Normalize undone: ToTensor's [0, 1]
        assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    out = torch_input.run(files, batch_size=2, workers=0, warmup=1, batches=2, size=24)
    assert out["images_per_sec"] > 0 and out["cpu_ms_per_image"] > 0 and out["workers"] == 0


def test_bad_flag_is_one_line():
    result = subprocess.run([sys.executable, BENCHMARK, "--precision=fp8"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown --precision")


# ------------------------------------------------------------ the PyTorch step
COMPARE = os.path.join(ROOT, "benchmarks", "compare_torch.py")


def test_torch_step_first_loss_is_co2_tfs():
    """Same weights, queue and inputs: the PyTorch step's loss is co2_tf's."""
    torch = pytest.importorskip("torch")

    import benchmark_lib
    import tensorflow as tf
    import torch_step

    from co2_tf.config import TrainConfig
    from co2_tf.method import objective
    from co2_tf.method.model import CO2Model
    from co2_tf.nets import backbones

    config = TrainConfig(**benchmark_lib.NOT_A_RUN, backbone="tiny", image_size=16,
                         batch_size=16, queue_size=64, dim=16, bn_groups=1, head="mlp",
                         consistency_weight=1.0).check()
    ours = CO2Model(lambda name: backbones.build_backbone("tiny", 16, model_name=name, seed=3),
                    objective.co2_objective(config), head="mlp", dim=16, queue_size=64,
                    bn_groups=1, seed=3)
    theirs = torch_step.MoCoCO2(config, groups=1).train()
    # Keras weights into the PyTorch modules, layer by layer in build order.
    keras_layers = [layer for layer in ours.query_backbone.layers + ours.query_head.layers
                    if layer.weights and type(layer).__name__ != "Normalization"]
    torch_modules = [m for m in theirs.encoder_q.modules()
                     if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear))]
    assert len(keras_layers) == len(torch_modules)
    with torch.no_grad():
        for layer, module in zip(keras_layers, torch_modules):
            w = [np.asarray(v) for v in layer.weights]
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_(torch.from_numpy(w[0].transpose(3, 2, 0, 1)))
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(w[0].T))
                module.bias.copy_(torch.from_numpy(w[1]))
            else:
                for name, value in zip(("weight", "bias", "running_mean", "running_var"), w):
                    getattr(module, name).copy_(torch.from_numpy(value))
        theirs.encoder_k.load_state_dict(theirs.encoder_q.state_dict())
        theirs.queue.copy_(torch.from_numpy(np.asarray(ours.queue)))

    rng = np.random.RandomState(0)
    x_q, x_k = (rng.rand(16, 16, 16, 3).astype("float32") for _ in "qk")
    keys, _ = ours.encode_keys(tf.constant(x_k), 0)
    loss, _ = ours.objective(ours.encode_query(tf.constant(x_q)), keys, ours.queue, 0)
    expected = float(tf.reduce_mean(loss))
    step = torch_step.TrainStep(theirs, config, compile=False)
    nchw = [torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in (x_q, x_k)]
    assert float(step(*nchw)) == pytest.approx(expected, rel=1e-5)
    # It enqueued co2_tf's keys (the shuffle-BN permutation is immaterial with one group).
    np.testing.assert_allclose(theirs.queue[:16].numpy(), keys.numpy(), atol=1e-5)
    assert theirs.ptr == 16


def test_compare_torch_fields(tmp_path):
    """One alternation end to end (each costs a TF and a torch process); the median of
    several: test_compare_torch_takes_the_median_of_the_alternations."""
    pytest.importorskip("torch")
    output = tmp_path / "compare.json"
    result = subprocess.run(
        [sys.executable, COMPARE, "--backbone=tiny", "--image_size=16", "--batch_size=16",
         "--queue_size=64", "--dim=16", "--alternations=1", "--warmup=1", "--repeats=1",
         "--notorch_compile", "--matmul_size=256", f"--output={output}"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == json.loads(output.read_text())
    assert out["alternations"] == 1 and len(out["runs"]) == 1
    for run_ in out["runs"]:
        assert run_["tf"]["benchmark"] == "train_step" and run_["tf"]["backbone"] == "tiny"
        assert run_["torch"]["benchmark"] == "torch_train_step"
        assert run_["torch"]["bn_groups"] == run_["tf"]["bn_groups"] == 4
        assert run_["torch"]["queue_size"] == 64 and run_["torch"]["torch_compile"] is False
    ratios = [r["tf"]["images_per_sec"] / r["torch"]["images_per_sec"] for r in out["runs"]]
    assert out["ratios"] == pytest.approx(ratios, rel=1e-3)
    assert out["ratio_median"] == pytest.approx(ratios[0], rel=1e-3)
    assert out["onednn_opts"] is True and out["jit_compile"] is False
    assert out["runs"][0]["tf"]["matmul_size"] == 256  # passed on to benchmark.py
    assert "ratio (median of 1)" in result.stderr


def test_compare_torch_takes_the_median_of_the_alternations(monkeypatch):
    """Three alternations (the tools' runs faked): the median ratio, not the mean."""
    pytest.importorskip("torch")
    import benchmark_lib
    import compare_torch

    from co2_tf.config import TrainConfig

    rates = iter([10.0, 20.0, 30.0, 10.0, 12.0, 12.0])  # TF, torch, ...: ratios 0.5, 3, 1
    calls = []

    def fake_tool(script, args):
        calls.append(script)
        common = dict(images_per_sec=next(rates), onednn_opts=True, jit_compile=False,
                      tensorflow="x", torch="y", torch_compile=False, channels_last=True,
                      cpu={}, cores=2, load_average_1min_before=0.0)
        return common

    monkeypatch.setattr(compare_torch, "run_tool", fake_tool)
    config = TrainConfig(**benchmark_lib.NOT_A_RUN, backbone="tiny", image_size=16,
                         batch_size=16, queue_size=64, dim=16)
    out = compare_torch.compare(config, compare_torch.CompareConfig(alternations=3))
    assert calls == ["benchmark.py", "torch_step.py"] * 3  # back to back, alternating
    assert out["ratios"] == [0.5, 3.0, 1.0] and out["ratio_median"] == 1.0
    assert out["tf_images_per_sec"] == 12.0 and out["torch_images_per_sec"] == 12.0


def test_compare_torch_without_torch_is_one_line(tmp_path):
    """Where torch is missing, the error names requirements-torch.txt."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no torch here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, COMPARE, "--backbone=tiny"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: PyTorch is not installed") and "requirements-torch.txt" in last


def test_conv_kernels_mode_adds_up_the_step_convs():
    """--conv_kernels: every conv of the backbone, its FLOPs, and the per-step sum they give."""
    import benchmark_lib

    from co2_tf.config import TrainConfig

    config = TrainConfig(**benchmark_lib.NOT_A_RUN, backbone="tiny", image_size=16, batch_size=4,
                         queue_size=64, dim=16)
    timing = benchmark_lib.BenchmarkConfig(conv_kernels=True, warmup=0, repeats=1,
                                           matmul_size=32)
    out = benchmark_lib.run(config, timing)
    rows = out["convs"]
    # The tiny backbone's four stride-2 3x3 convs, one each, FLOPs as counted by hand.
    assert [row["count"] for row in rows] == [1, 1, 1, 1]
    assert [row["gflop"] * 1e9 for row in rows] == pytest.approx(
        [4 * f for f in tiny_conv_flops()], rel=1e-5)
    assert [row["reads_images"] for row in rows] == [True, False, False, False]
    total = 0.0
    for row in rows:
        def seconds(name, row=row):
            return row["gflop"] / row[f"{name}_gflops_per_sec"]
        total += row["count"] * (2 * seconds("forward") + seconds(row["filter_grad_in_step"])
                                 + (0 if row["reads_images"] else seconds("input_grad")))
    assert out["conv_seconds_per_step"] == pytest.approx(total, rel=2e-3)
    assert out["ceiling_gflops_per_sec"] > 0 and "avx2" in out["cpu"]
    # ResNet-18 (CIFAR stem): 20 convs; the matmul filter gradient applies to layer4's
    # three stride-1 3x3 convs (4x4 maps).
    counts, matmul, _ = benchmark_lib._conv_shapes(
        TrainConfig(**benchmark_lib.NOT_A_RUN, backbone="resnet18_cifar", image_size=32,
                    batch_size=256))
    assert sum(counts.values()) == 20
    def output_size(key):  # key: (input HWC, kernel, strides, padding, filters, first)
        (h, _, _), (k, _), (s, _), padding = key[:4]
        return (h - k) // s + 1 if padding == "valid" else -(-h // s)
    on = [key for key, applies in matmul.items() if applies]
    assert {output_size(key) for key in on} == {4} and {key[1] for key in on} == {(3, 3)}
    assert {key[2] for key in on} == {(1, 1)} and sum(counts[key] for key in on) == 3


def test_paired_utilisation_is_the_median_of_the_rounds(monkeypatch):
    """The step and matmul timers faked with known seconds (in-process, the real tiny step's
    FLOP count): each round's utilisation pairs the step with the faster of TF's and NumPy's
    matmul rates around it, and the figure is the median of the rounds (not their mean, not
    the ratio of medians), recomputed here in NumPy. The timings are chosen so that those
    three differ by over 5%."""
    import benchmark_lib

    from co2_tf.config import TrainConfig

    steps = iter([0.5, 0.20, 0.25, 0.60])  # warm-up, then 3 rounds
    # Per call: the calibration (count 2), then before / after each round.
    tf_calls = iter([0.010, 0.010, 0.014, 0.020, 0.020, 0.010, 0.010])
    np_calls = iter([0.020, 0.030, 0.030, 0.010, 0.012, 0.050, 0.050])
    counts = []

    def fake_matmul(calls):
        def run(count=1):
            counts.append(count)
            return next(calls)
        return run
    monkeypatch.setattr(benchmark_lib, "_timer", lambda function, iterator: lambda: next(steps))
    monkeypatch.setattr(benchmark_lib, "matmul_timer", lambda n, parallel=1: fake_matmul(tf_calls))
    monkeypatch.setattr(benchmark_lib, "numpy_matmul_timer", lambda n: fake_matmul(np_calls))
    config = TrainConfig(**benchmark_lib.NOT_A_RUN, backbone="tiny", image_size=16,
                         batch_size=16, queue_size=64, dim=16, bn_groups=1)
    out = benchmark_lib.benchmark_train_step(
        config, benchmark_lib.BenchmarkConfig(warmup=1, repeats=3, matmul_size=64))
    assert counts[:2] == [2, 2] and set(counts[2:]) == {25, 12}  # 0.5 s / 2 / per-call time

    n, parallel = 64, out["matmul_parallel"]
    step = np.array([0.20, 0.25, 0.60])
    tf_s = np.array([[0.010, 0.014], [0.020, 0.020], [0.010, 0.010]])
    np_s = np.array([[0.030, 0.030], [0.010, 0.012], [0.050, 0.050]])
    flops = out["gflop_per_image"] * 1e9 * 16
    best = np.maximum(2 * n ** 3 * parallel / tf_s.mean(1), 2 * n ** 3 / np_s.mean(1))
    ratios = flops / step / best
    assert out["utilisation_per_round"] == pytest.approx(ratios, rel=2e-3)
    assert out["utilisation_paired_median"] == pytest.approx(np.median(ratios), rel=2e-3)
    tf_rate = 2 * n ** 3 * parallel / np.median(tf_s) / 1e9
    np_rate = 2 * n ** 3 / np.median(np_s) / 1e9
    ratio_of_medians = flops / np.median(step) / 1e9 / max(tf_rate, np_rate)
    for other in (ratios.mean(), ratio_of_medians):
        assert abs(other / np.median(ratios) - 1) > 0.05  # the check tells them apart
    assert out["step_ms"] == pytest.approx(250.0) and out["images_per_sec"] == 64.0
    assert out["step_ms_samples"] == [200.0, 250.0, 600.0]
    assert out["matmul_gflops_per_sec"] == pytest.approx(tf_rate, rel=1e-3)
    assert out["numpy_matmul_gflops_per_sec"] == pytest.approx(np_rate, rel=1e-3)
    assert out["ceiling_source"] == ("tf" if tf_rate > np_rate else "numpy")


# ------------------------------------------------------------ benchmarks/flags
BENCH_FLAGS = os.path.join(ROOT, "benchmarks", "flags")


@pytest.mark.parametrize("flagfile", sorted(os.listdir(BENCH_FLAGS)))
def test_benchmark_flagfiles_parse_and_carry_their_commands(flagfile):
    """Each benchmarks/flags/*.cfg: every command at its top names it, and parses with the
    flags of the binary it names, to the values its lines give."""
    from helpers.tool_main import parse_flags

    path = os.path.join(BENCH_FLAGS, flagfile)
    with open(path) as f:
        text = f.read()
    commands = [line.split() for line in text.splitlines() if line.startswith("#   python ")]
    assert commands
    lines = dict(line[2:].split("=", 1) if "=" in line else (line[2:], "True")
                 for line in text.splitlines() if line.startswith("--"))
    for command in commands:
        assert f"--flagfile=benchmarks/flags/{flagfile}" in command
        tool = os.path.basename(command[2])[:-len(".py")]
        values = parse_flags(tool, [f"--flagfile={path}"])
        for name, value in lines.items():
            assert str(values[name]) == value, (tool, name)
