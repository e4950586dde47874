"""PyTorch interop: torchvision / MoCo weights into co2_tf and back, numerically.

The torch ResNets are written in tests/helpers/torch_resnets.py with
torchvision's module names (torchvision itself is not needed). Both they and the
converter are checked against tests/fixtures/torch_layouts.txt: the layouts of real
torchvision ResNets and of MoCo v2's checkpoint, and what real torchvision / MoCo
compute from given weights (made once with torchvision, see its header). Needs torch
(requirements-torch.txt); skipped without it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import torch_layouts as tl  # noqa: E402
from helpers import torch_resnets as tr  # noqa: E402

from co2_tf.errors import UserError  # noqa: E402
from co2_tf.interop import convert, export  # noqa: E402
from co2_tf.nets import backbones  # noqa: E402
from co2_tf.run import trained  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT_TOOL = os.path.join(ROOT, "tools", "convert.py")
TRAIN_TOOL = os.path.join(ROOT, "tools", "train.py")
SIZES = {"resnet18": 64, "resnet34": 64, "resnet50": 64, "resnet18_cifar": 32}
REAL = tl.read()  # tests/fixtures/torch_layouts.txt


def assert_close(ours, theirs, what=""):
    """1e-4 relative, to the largest magnitude (ReLU zeros make per-element ratios meaningless)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, what
    assert np.abs(theirs).max() > 0.1, f"{what}: degenerate reference"
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max(),
                               err_msg=what)


def assert_matches_real(ours, recorded, what):
    """Our output against the fixture's summary of real torch's (its samples, norm, max).

    1e-4 of the output's largest magnitude, as assert_close: TF's and torch's float32
    kernels differed by at most 1.6e-6 of it on these outputs (resnet18/34/50 at 224 px,
    C2..C5, pooled, MoCo's projections; measured on an AVX-512 machine), so 60x margin.
    """
    got = tl.summary(ours)
    scale = recorded[f"{what}.max"]
    assert scale > 1.0, f"{what}: degenerate reference"
    np.testing.assert_allclose(got["samples"], recorded[f"{what}.samples"], rtol=0,
                               atol=1e-4 * scale, err_msg=what)
    np.testing.assert_allclose(got["norm"], recorded[f"{what}.norm"], rtol=1e-4, err_msg=what)
    np.testing.assert_allclose(got["max"], scale, rtol=1e-4, err_msg=what)


def layout(state):
    """[(key, dtype, shape)] of a state_dict (torch or numpy values), in its order."""
    return [(k, str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in state.items()]


def recorded_layout(name, entries=None):
    entries = REAL["layout"][name] if entries is None else entries
    return [(k, dtype, shape) for k, (dtype, shape) in entries.items()]


def numpy_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def images(size, n=2, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3), np.float32)


def randomize_our_batch_norm(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
            layer.beta.assign(0.1 * rng.standard_normal(n).astype(np.float32))
            layer.moving_mean.assign(0.1 * rng.standard_normal(n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))


# ------------------------------------------------------------------- backbones
@pytest.mark.parametrize("name", sorted(SIZES))
def test_torchvision_weights_give_torchs_features_and_pyramid(name):
    net = tr.resnet(name, seed=1)
    ours = backbones.build_backbone(name, None)
    convert.load_backbone_state(ours, numpy_state(net), "test", ignored=["fc.weight", "fc.bias"])
    x = images(SIZES[name])
    # Ours normalises [0, 1] images inside; torch's get them normalised (tr.to_torch_input).
    assert_close(ours(x, training=False), tr.pooled_features(net, x), f"{name} features")
    maps = export.feature_maps_model(ours, name)(x, training=False)
    strides = [stride for _, _, stride in backbones.feature_pyramid(name)]
    assert strides == ([1, 2, 4, 8] if name.endswith("_cifar") else [4, 8, 16, 32])
    for (level, _, stride), want in zip(backbones.feature_pyramid(name), tr.stage_maps(net, x)):
        assert want.shape[1] == SIZES[name] // stride
        assert_close(maps[level], want, f"{name} {level}")


@pytest.mark.parametrize("name", sorted(SIZES))
def test_our_weights_load_strictly_into_torchvision_and_give_our_features(name):
    ours = backbones.build_backbone(name, None, seed=3)
    randomize_our_batch_norm(ours, seed=4)
    state = convert.backbone_state(ours)
    net = tr.ARCHITECTURES[name]()
    reference_keys = [k for k in net.state_dict() if not k.startswith("fc.")]
    assert list(state) == reference_keys  # torchvision's keys, in its order, minus fc
    net.fc = torch.nn.Identity()  # "once fc is dropped"
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                        strict=True)
    assert all(state[k] == 0 and state[k].dtype == np.int64
               for k in state if k.endswith("num_batches_tracked"))
    x = images(SIZES[name], seed=1)
    assert_close(tr.pooled_features(net.eval(), x), ours(x, training=False), f"{name} features")


# ------------------------------------------------- against real torchvision / MoCo
@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_real_torchvision_layouts_and_features(name):
    """Keys, order and shapes both ways, and real torchvision's outputs at 224 px.

    Out: our backbone's state_dict is torchvision's minus fc, key for key in order, with
    its dtypes and shapes. In: torchvision's state_dict (fc ignored) loads, and with the
    fixture's weights our pooled features and C2..C5 are what real torchvision computed
    (block topology, strides, BN semantics; pooled features reach 53 / 363). The
    helper's torch modules have the same layout, so the tests that use them compare
    against torchvision, not against a mistake they share with the converter. ResNet-50:
    test_moco_v2_resnet50_* (MoCo's encoders are torchvision ResNet-50s).
    """
    real = REAL["layout"][name]
    assert layout(tr.ARCHITECTURES[name]().state_dict()) == recorded_layout(name)
    ours = backbones.build_backbone(name, None)
    assert layout(convert.backbone_state(ours)) == recorded_layout(name, tl.without_fc(real))

    recorded = REAL["features"][name]
    weights = tl.deterministic_state(real, int(recorded["weights_seed"]))
    assert tl.checksum(weights.values()) == pytest.approx(recorded["weights_checksum"],
                                                          rel=1e-12), "NumPy's stream changed"
    convert.load_backbone_state(ours, weights, "real", ignored=["fc.weight", "fc.bias"])
    x = tl.deterministic_images(int(recorded["image_size"]), seed=int(recorded["images_seed"]))
    maps = export.feature_maps_model(ours, name)(x, training=False)
    for level in ("C2", "C3", "C4", "C5"):
        assert_matches_real(maps[level].numpy(), recorded, level)
    assert_matches_real(ours(x, training=False).numpy(), recorded, "pooled")


@pytest.fixture(scope="module")
def moco_v2_resnet50(tmp_path_factory):
    """A MoCo v2 ResNet-50 checkpoint laid out as main_moco.py saves it (the fixture's
    layout, queue [128, 65536]), with the fixture's weights (large activations: pooled
    features up to 522), converted by import_checkpoint and loaded as the tools load it."""
    root = tmp_path_factory.mktemp("moco_v2_resnet50")
    recorded = REAL["features"]["moco_v2"]
    state = tl.deterministic_state(REAL["layout"]["moco_v2"], int(recorded["weights_seed"]))
    assert tl.checksum(state.values()) == pytest.approx(recorded["weights_checksum"],
                                                        rel=1e-12), "NumPy's stream changed"
    saved = {"epoch": 800, "arch": "resnet50",
             "state_dict": {k: torch.from_numpy(v) for k, v in state.items()},
             "optimizer": {"state": {}, "param_groups": []}}
    assert [(k, type(v).__name__ if k != "state_dict" else "OrderedDict")
            for k, v in saved.items()] == [(k, t) for k, (t, _) in
                                           REAL["checkpoint"]["moco_v2"].items()]
    path = str(root / "moco_v2_800ep_pretrain.pth.tar")
    torch.save(saved, path)
    run_dir = str(root / "run")
    info = convert.import_checkpoint(convert.ConvertConfig(torch_checkpoint=path,
                                                           model_dir=run_dir))
    os.remove(path)  # 250 MB
    return state, info, trained.load_run(run_dir)


def test_moco_v2_resnet50_converts_to_mocos_real_outputs(moco_v2_resnet50):
    """The convert path at full size: real MoCo's encoders and MLP heads, numerically.

    With the fixture's weights, each encoder's pooled features and unnormalised
    projection are what MoCo's builder on real torchvision computed at 224 px
    (magnitudes up to 522 and 186); the queue's columns become our rows.
    """
    state, info, run = moco_v2_resnet50
    assert (info["moco_version"], info["backbone"], info["dim"], info["queue_size"],
            info["epoch"], info["arch"]) == (2, "resnet50", 128, 65536, 800, "resnet50")
    assert run.config.image_size == 224
    recorded = REAL["features"]["moco_v2"]
    x = tl.deterministic_images(int(recorded["image_size"]), seed=int(recorded["images_seed"]))
    for encoder, backbone, head in (("encoder_q", run.model.query_backbone, run.model.query_head),
                                    ("encoder_k", run.model.key_backbone, run.model.key_head)):
        pooled = backbone(x, training=False)
        assert_matches_real(pooled.numpy(), recorded, f"{encoder}.pooled")
        assert_matches_real(head(pooled, training=False).numpy(), recorded,
                            f"{encoder}.projection")
    np.testing.assert_array_equal(run.model.queue.numpy(), state["module.queue"].T)
    assert int(run.model.queue_ptr.numpy()) == 0


def test_moco_state_is_mocos_real_layout(moco_v2_resnet50):
    """Out to MoCo's layout: the keys of MoCo's own state_dict in its order (queue and
    queue_ptr first: torch lists a module's own buffers before its submodules'), dtypes
    and shapes; the values are the ones converted in. The helper's MoCo checkpoint has
    the same layout."""
    state, _, run = moco_v2_resnet50
    out = convert.moco_state(run.model, "mlp")
    assert layout(out) == recorded_layout("moco_v2")
    # The torchvision layout out of a ResNet-50: torchvision's resnet50 minus fc.
    assert layout(convert.backbone_state(run.model.query_backbone)) == recorded_layout(
        "resnet50", tl.without_fc(REAL["layout"]["resnet50"]))
    for key, value in state.items():
        np.testing.assert_array_equal(out[key], value, err_msg=key)
    helper = tr.moco_checkpoint("resnet50", head="mlp", dim=128, queue_size=65536)
    assert layout(helper["state_dict"]) == recorded_layout("moco_v2")
    assert list(helper) == list(REAL["checkpoint"]["moco_v2"])


def test_export_of_resnet50_with_large_activations_verifies(moco_v2_resnet50, tmp_path):
    """The export path at full size: the export's self-check passes at the scale where the
    absolute 1e-5 of issue 21 failed (tests/test_export.py: it still rejects a wrong weight).

    Measured on this run (pooled features up to 522 on the fixture's image, see
    test_moco_v2_resnet50_converts_to_mocos_real_outputs; C5 maps more; AVX-512 machine):
    the reloaded export differed from the in-memory model by up to 1.2e-4 (serve) and
    9.4e-4 (feature maps) in absolute terms, 2.3e-7 and 1.9e-6 relative to those outputs'
    magnitudes; the library accepts 1e-4 relative, this test 1e-5 (5x the measured).
    """
    _, _, run = moco_v2_resnet50
    info = export.export_run(run, str(tmp_path / "export"))
    assert info["backbone"] == "resnet50" and info["image_size"] == 224
    assert max(info["verified_relative_diff"].values()) <= 1e-5, info["verified_relative_diff"]


def test_architecture_is_read_from_the_shapes():
    for name in ("resnet18", "resnet34", "resnet50", "resnet18_cifar"):
        state = numpy_state(tr.ARCHITECTURES[name]())
        assert convert.infer_backbone(state) == name
        prefixed = {f"module.encoder_q.{k}": v for k, v in state.items()}
        assert convert.infer_backbone(prefixed, "module.encoder_q.") == name
    assert convert.infer_backbone({"conv1.weight": np.zeros((32, 3, 3, 3))}) is None


def test_real_layouts_are_recognised():
    """Real torchvision state_dicts and MoCo v2's checkpoint (only their shapes matter here)."""
    def empty(name):
        return {k: np.empty(shape, np.int64 if dtype == "int64" else np.float32)
                for k, (dtype, shape) in REAL["layout"][name].items()}

    for name in ("resnet18", "resnet34", "resnet50"):
        assert convert.describe(empty(name), "real.pth").backbone == name
    ckpt = convert.describe({"epoch": 800, "arch": "resnet50", "state_dict": empty("moco_v2")},
                            "moco_v2_800ep_pretrain.pth.tar")
    assert (ckpt.file_format, ckpt.backbone, ckpt.root, ckpt.head, ckpt.dim, ckpt.queue_size,
            ckpt.epoch, ckpt.arch) == ("moco", "resnet50", "module.", "mlp", 128, 65536, 800,
                                       "resnet50")


# ---------------------------------------------------------------- error lines
@pytest.fixture(scope="module")
def resnet18_state():
    return numpy_state(tr.resnet("resnet18", seed=2))


def _load(state):
    ours = backbones.build_backbone("resnet18", None)
    convert.load_backbone_state(ours, state, "x.pth", ignored=["fc.weight", "fc.bias"])


def test_missing_unexpected_and_misshapen_tensors_are_named(resnet18_state):
    state = dict(resnet18_state)
    del state["layer3.1.bn2.running_var"]
    with pytest.raises(UserError, match=r"^x.pth has no tensor layer3.1.bn2.running_var: "):
        _load(state)
    state = dict(resnet18_state, **{"layer4.2.conv1.weight": np.zeros((512, 512, 3, 3))})
    with pytest.raises(UserError, match=r"unexpected tensor layer4.2.conv1.weight"):
        _load(state)
    state = dict(resnet18_state, **{"layer2.0.conv1.weight": np.zeros((128, 64, 1, 1))})
    with pytest.raises(UserError, match=r"layer2.0.conv1.weight has shape \[128, 64, 1, 1\], "
                                        r"expected \[128, 64, 3, 3\]"):
        _load(state)
    # num_batches_tracked is optional on the way in.
    _load({k: v for k, v in resnet18_state.items() if not k.endswith("num_batches_tracked")})


def test_wrong_backbone_flag_and_unknown_architecture(resnet18_state):
    with pytest.raises(UserError, match="holds a resnet18, not a resnet34"):
        convert.describe(resnet18_state, "x.pth", backbone="resnet34")
    with pytest.raises(UserError, match="no PyTorch counterpart"):
        convert.describe(resnet18_state, "x.pth", backbone="tiny")
    odd = {k: v for k, v in resnet18_state.items() if not k.startswith("layer4.1.")}
    with pytest.raises(UserError, match="cannot tell the architecture .* pass --backbone"):
        convert.describe(odd, "x.pth")


def test_without_torch_the_error_names_the_requirements_file(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(UserError, match=r"pip install -r requirements-torch.txt"):
        convert.read_torch_file(str(tmp_path / "x.pth"))
    with pytest.raises(UserError, match=r"requirements-torch.txt"):
        convert.export_checkpoint(convert.ConvertConfig(model_dir=str(tmp_path),
                                                        torch_out=str(tmp_path / "o.pth")))


def test_pth_files_go_through_gfile():
    """.pth files are read and written with tf.io.gfile (here TF's in-memory file system)."""
    path = "ram://convert_test/sub/weights.pth"
    convert.write_torch_file(path, {"state_dict": {"a.weight": np.arange(6.0).reshape(2, 3)},
                                    "arch": "resnet18"})
    obj = convert.read_torch_file(path)
    assert obj["arch"] == "resnet18"
    np.testing.assert_array_equal(convert.state_dict_of(obj, path)["a.weight"],
                                  np.arange(6.0).reshape(2, 3))
    with pytest.raises(UserError, match="does not exist"):
        convert.read_torch_file("ram://convert_test/missing.pth")
    from co2_tf import io
    io.write_bytes_atomic("ram://convert_test/junk.pth", b"not a torch file")
    with pytest.raises(UserError, match=r"cannot read .*junk.pth with torch.load"):
        convert.read_torch_file("ram://convert_test/junk.pth")


def test_flags_are_checked():
    with pytest.raises(UserError, match="exactly one"):
        convert.ConvertConfig(model_dir="d").check()
    with pytest.raises(UserError, match="exactly one"):
        convert.ConvertConfig(model_dir="d", torch_checkpoint="a", torch_out="b").check()
    with pytest.raises(UserError, match="--torch_layout"):
        convert.ConvertConfig(model_dir="d", torch_out="b", torch_layout="keras").check()
    with pytest.raises(UserError, match="--backbone describes"):
        convert.ConvertConfig(model_dir="d", torch_out="b", backbone="resnet50").check()


# ------------------------------------------------------------------- run dirs
@pytest.fixture(scope="module")
def moco_v1(tmp_path_factory):
    """A MoCo v1 checkpoint file (resnet18_cifar, linear head) and its run dir, converted."""
    root = tmp_path_factory.mktemp("moco_v1")
    saved = tr.moco_checkpoint("resnet18_cifar", head="linear", dim=8, queue_size=32, ptr=8,
                               seed=5, epoch=17)
    path = str(root / "moco_v1.pth.tar")
    torch.save(saved, path)
    run_dir = str(root / "run")
    info = convert.import_checkpoint(convert.ConvertConfig(
        torch_checkpoint=path, model_dir=run_dir, dataset="builtin"))
    return saved, path, run_dir, info


def test_moco_checkpoint_becomes_a_run_dir(moco_v1):
    saved, path, run_dir, info = moco_v1
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.json", "convert.json",
                                           "train.cfg"]
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert {k: config[k] for k in ("backbone", "head", "dim", "queue_size", "image_size",
                                   "augment", "temperature", "dataset", "bn")} == {
        "backbone": "resnet18_cifar", "head": "linear", "dim": 8, "queue_size": 32,
        "image_size": 32, "augment": "mocov1", "temperature": 0.07, "dataset": "builtin",
        "bn": "shuffle"}
    assert config["queue_size"] % config["batch_size"] == 0
    assert info["moco_version"] == 1 and info["epoch"] == 17 and info["step"] == 0

    run = trained.load_run(run_dir)
    assert run.step == 0 and run.checkpoint.endswith("ckpt-0")
    query, key = tr.networks_of(saved, "resnet18_cifar", head="linear")
    x = images(32, n=3, seed=2)
    with torch.no_grad():
        for net, backbone, head, what in ((query, run.model.query_backbone, run.model.query_head,
                                           "query"),
                                          (key, run.model.key_backbone, run.model.key_head,
                                           "key")):
            assert_close(backbone(x, training=False), tr.pooled_features(net, x), what)
            projection = net(tr.to_torch_input(x)).numpy()  # the MoCo head is fc
            assert_close(head(backbone(x, training=False)), projection, f"{what} head")
    # [dim, K] columns -> [K, dim] rows, rotated so that the oldest key (at ptr 8) is row 0.
    queue = saved["state_dict"]["module.queue"].numpy()
    np.testing.assert_array_equal(run.model.queue.numpy(), np.roll(queue.T, -8, axis=0))
    assert int(run.model.queue_ptr.numpy()) == 0


def test_run_dir_out_to_moco_and_torchvision_layouts(moco_v1, tmp_path):
    saved, _, run_dir, _ = moco_v1
    out = str(tmp_path / "again.pth.tar")
    info = convert.export_checkpoint(convert.ConvertConfig(model_dir=run_dir, torch_out=out,
                                                           torch_layout="moco"))
    assert info["step"] == 0 and info["layout"] == "moco"
    again = torch.load(out, weights_only=True)
    assert again["arch"] == "resnet18_cifar"
    original, state = saved["state_dict"], again["state_dict"]
    assert list(state) == list(original)  # MoCo's keys, in MoCo's order
    for k, v in original.items():
        if k == "module.queue":  # the same keys, the FIFO rotated to start at 0
            np.testing.assert_array_equal(state[k].numpy(), np.roll(v.numpy(), -8, axis=1))
        elif k == "module.queue_ptr":
            assert state[k].tolist() == [0] and state[k].dtype == torch.int64
        elif k.endswith("num_batches_tracked"):
            assert int(state[k]) == 0 and state[k].dtype == torch.int64
        else:
            np.testing.assert_array_equal(state[k].numpy(), v.numpy(), err_msg=k)
    # What detectron2's MoCo converter keeps: module.encoder_q.* with the prefix stripped.
    q = "module.encoder_q."
    backbone = {k[len(q):]: v for k, v in state.items()
                if k.startswith(q) and not k.startswith(q + "fc.")}
    net = tr.ARCHITECTURES["resnet18_cifar"]()
    net.fc = torch.nn.Identity()
    net.load_state_dict(backbone, strict=True)

    tv = str(tmp_path / "backbone.pth")
    convert.export_checkpoint(convert.ConvertConfig(model_dir=run_dir, checkpoint="ckpt-0",
                                                    torch_out=tv))
    net = tr.ARCHITECTURES["resnet18_cifar"]()
    net.fc = torch.nn.Identity()
    net.load_state_dict(torch.load(tv, weights_only=True), strict=True)
    query, _ = tr.networks_of(saved, "resnet18_cifar", head="linear")
    x = images(32, seed=6)
    assert_close(tr.pooled_features(net.eval(), x), tr.pooled_features(query, x))


def test_export_of_a_converted_run_gives_torchs_pyramid(moco_v1, tmp_path):
    """The evaluation / export tools read a converted run dir; C2..C5 are torch's layer1..4."""
    saved, _, run_dir, _ = moco_v1
    info = export.export(export.ExportConfig(model_dir=run_dir, export_dir=str(tmp_path / "e")))
    assert info["backbone"] == "resnet18_cifar" and info["step"] == 0
    assert [v["stride"] for v in info["feature_pyramid"]["levels"].values()] == [1, 2, 4, 8]
    import keras
    maps = keras.models.load_model(str(tmp_path / "e" / "feature_maps.keras"))
    query, _ = tr.networks_of(saved, "resnet18_cifar", head="linear")
    x = images(32, seed=7)
    got = maps(x, training=False)
    for level, want in zip(("C2", "C3", "C4", "C5"), tr.stage_maps(query, x)):
        assert_close(got[level], want, level)


def test_torchvision_state_dict_becomes_a_run_with_fresh_head_and_queue(tmp_path):
    net = tr.resnet("resnet18", seed=8)  # fc: the 1000-class ImageNet classifier
    path = str(tmp_path / "resnet18.pth")
    torch.save(net.state_dict(), path)
    run_dir = str(tmp_path / "run")
    info = convert.import_checkpoint(convert.ConvertConfig(
        torch_checkpoint=path, model_dir=run_dir, dim=8, queue_size=32, image_size=64,
        dataset="builtin"))
    assert info["format"] == "torchvision" and info["dropped"] == ["fc.weight", "fc.bias"]
    run = trained.load_run(run_dir)
    assert (run.config.backbone, run.config.head, run.config.dim) == ("resnet18", "mlp", 8)
    x = images(64, seed=9)
    want = tr.pooled_features(net, x)
    assert_close(run.model.query_backbone(x, training=False), want)
    # The key encoder is a copy of the query encoder, BN statistics included.
    for q, k in zip(run.model.query_backbone.weights + run.model.query_head.weights,
                    run.model.key_backbone.weights + run.model.key_head.weights):
        np.testing.assert_array_equal(q.numpy(), k.numpy())
    np.testing.assert_allclose(np.linalg.norm(run.model.queue.numpy(), axis=1), 1.0, rtol=1e-5)

    with pytest.raises(UserError, match="not empty"):  # a run dir is never overwritten
        convert.import_checkpoint(convert.ConvertConfig(torch_checkpoint=path,
                                                        model_dir=run_dir))


def test_flags_that_contradict_a_moco_file_are_refused(tmp_path):
    path = str(tmp_path / "moco.pth")
    torch.save(tr.moco_checkpoint("resnet18_cifar", dim=8, queue_size=32), path)
    with pytest.raises(UserError, match=r"--dim=16 but .* has 8: drop --dim"):
        convert.import_checkpoint(convert.ConvertConfig(
            torch_checkpoint=path, model_dir=str(tmp_path / "m"), dim=16))
    assert not os.path.exists(tmp_path / "m")


def test_tiny_runs_do_not_convert(tmp_path):
    from co2_tf import training
    from co2_tf.config import TrainConfig
    run_dir = str(tmp_path / "tiny")
    training.train(TrainConfig(model_dir=run_dir, image_size=16, batch_size=16, queue_size=64,
                               dim=16, train_steps=1, knn_every=0, dataset="folder:" + str(
                                   _image_folder(tmp_path / "images"))), verbose=0)
    with pytest.raises(UserError, match="tiny run, which has no PyTorch counterpart"):
        convert.export_checkpoint(convert.ConvertConfig(model_dir=run_dir,
                                                        torch_out=str(tmp_path / "x.pth")))
    assert not os.path.exists(tmp_path / "x.pth")


def _image_folder(root, per_class=8):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


# ------------------------------------------------------------- the binaries
def _run(tool, *flags):
    return subprocess.run([sys.executable, tool, *flags], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)


def test_converted_moco_v2_checkpoint_continues_training_with_its_queue(tmp_path):
    """tools/convert.py then tools/train.py --flagfile=RUN/train.cfg: the queue survives."""
    saved = tr.moco_checkpoint("resnet18_cifar", head="mlp", dim=16, queue_size=64, ptr=24,
                               seed=11)
    path = str(tmp_path / "moco_v2.pth.tar")
    torch.save(saved, path)
    run_dir = str(tmp_path / "run")
    # A folder dataset: with the built-in one, train.py would also run its kNN summary.
    folder = _image_folder(tmp_path / "images")
    result = _run(CONVERT_TOOL, f"--torch_checkpoint={path}", f"--model_dir={run_dir}",
                  "--image_size=16", f"--dataset=folder:{folder}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MoCo v2 checkpoint" in result.stdout and "train.cfg" in result.stdout
    before = trained.load_run(run_dir)
    queue_before = before.model.queue.numpy()
    query_before = before.model.query_backbone.get_layer("conv1").kernel.numpy()

    steps, batch = 2, 8
    result = _run(TRAIN_TOOL, f"--flagfile={run_dir}/train.cfg", f"--model_dir={run_dir}",
                  f"--train_steps={steps}", f"--batch_size={batch}")
    assert result.returncode == 0, result.stderr[-3000:]

    after = trained.load_run(run_dir)
    assert after.step == steps
    queue_after = after.model.queue.numpy()
    written = steps * batch  # from the converted pointer, 0
    assert int(after.model.queue_ptr.numpy()) == written
    np.testing.assert_array_equal(queue_after[written:], queue_before[written:])
    assert not np.allclose(queue_after[:written], queue_before[:written])
    # Trained on from the converted weights (a fresh init would correlate ~0 with them).
    query_after = after.model.query_backbone.get_layer("conv1").kernel.numpy()
    assert not np.array_equal(query_after, query_before)
    assert np.corrcoef(query_after.ravel(), query_before.ravel())[0, 1] > 0.9


def test_tool_errors_are_one_line(tmp_path):
    state = numpy_state(tr.resnet("resnet18_cifar", seed=0))
    del state["layer2.0.downsample.1.weight"]
    path = str(tmp_path / "broken.pth")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    result = _run(CONVERT_TOOL, f"--torch_checkpoint={path}", f"--model_dir={tmp_path}/run")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "layer2.0.downsample.1.weight" in last, result.stderr
    assert not os.path.exists(tmp_path / "run")
