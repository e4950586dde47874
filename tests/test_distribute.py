"""Tests for co2_tf.distribute: XLA under tf.distribute (compiles alone, falls back replicated)."""
import logging

import numpy as np
import pytest
import tensorflow as tf
from helpers.models import batches, build, find, run_steps, state


# ------------------------------------------------------------------------ XLA
def test_full_train_step_lowers_to_xla():
    """The TPU proxy: the whole single-replica step (4 shuffle-BN groups) lowers
    to XLA: static shapes, no host callbacks, nothing run while lowering."""
    model, _ = build(jit_compile=True)
    assert model.bn_groups == 4
    before = state(model)
    x_q, x_k = (tf.constant(x[:16]) for x in batches(1))
    step = tf.function(model.train_step, jit_compile=True)
    hlo = step.experimental_get_compiler_ir((x_q, x_k))(stage="hlo")  # fails on any non-XLA op
    assert hlo.count("convolution(") >= 3 * 4  # query fwd + bwd, key fwd of the convs
    assert "sort(" in hlo  # the shuffle permutation
    assert "custom-call" not in hlo  # no host callbacks
    for name, value in state(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_xla_steps_match_the_plain_steps():
    """Keras's jit_compile path (what --jit_compile runs): 2 XLA steps give the
    plain steps' losses, weights, BN statistics and queue.

    One shuffle-BN group: TF's stateless RNG draws other numbers under XLA, so
    with several groups XLA would form other (equally valid) BN groups; with
    one group the permutation cancels out.
    """
    data = batches(2)
    plain, strategy = build(jit_compile=False, bn_groups=1)
    xla, _ = build(jit_compile=True, bn_groups=1)
    assert xla.jit_compile is True and plain.jit_compile is False
    before = state(xla)
    for a, b in zip(before.values(), state(plain).values(), strict=True):
        np.testing.assert_array_equal(a, b)

    h_plain = run_steps(plain, strategy, data)
    h_xla = run_steps(xla, strategy, data)
    for p, x in zip(h_plain, h_xla, strict=True):
        for name in ("loss", "loss_ins", "loss_con"):
            np.testing.assert_allclose(x[name], p[name], rtol=1e-4, err_msg=name)
    assert h_plain[1]["loss"] != h_plain[0]["loss"]
    s_plain, s_xla = state(plain), state(xla)
    moved = 0
    for name, value in s_plain.items():
        np.testing.assert_allclose(s_xla[name], value, rtol=1e-3, atol=2e-5, err_msg=name)
        moved += not np.array_equal(value, before[name])
    assert moved > len(s_plain) // 2, "the steps changed almost nothing: the test proves nothing"
    assert int(find(s_xla, "co2/queue_ptr")) == 32
    np.testing.assert_allclose(np.linalg.norm(find(s_xla, "co2/queue"), axis=1), 1.0, rtol=1e-5)


def test_xla_under_mirrored_cpu_falls_back_with_one_warning(two_replicas, caplog):
    with caplog.at_level(logging.WARNING, logger="co2_tf.distribute"):
        model, _ = build(two_replicas, jit_compile=True)
    assert model.jit_compile is False
    warnings = [r.getMessage() for r in caplog.records if r.name == "co2_tf.distribute"]
    assert len(warnings) == 1 and "--jit_compile ignored" in warnings[0]
    assert "\n" not in warnings[0]


# ------------------------------------------------------------ strategy choice
def test_auto_picks_tpu_with_an_address_mirrored_with_several_gpus(monkeypatch):
    from co2_tf import distribute  # noqa: PLC0415
    from co2_tf.errors import UserError  # noqa: PLC0415

    gpus = []
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: list(gpus) if kind == "GPU" else [])
    assert distribute.resolve_kind("auto") == "one_device"
    gpus.append("GPU:0")
    assert distribute.resolve_kind("auto") == "one_device"
    gpus.append("GPU:1")
    assert distribute.resolve_kind("auto") == "mirrored"
    assert distribute.resolve_kind("auto", tpu="local") == "tpu"  # an address wins
    for kind in ("one_device", "mirrored", "multi_worker", "tpu"):
        assert distribute.resolve_kind(kind, tpu="local") == kind  # an explicit choice stays
    with pytest.raises(UserError, match="--strategy='gpu'"):
        distribute.resolve_kind("gpu")


def test_tpu_flag_reaches_the_resolver_and_an_unreachable_tpu_is_one_line(monkeypatch,
                                                                          tmp_path):
    """--tpu=ADDRESS (TrainConfig.tpu) -> train -> make_strategy -> TPUClusterResolver(ADDRESS),
    connected and initialised before TPUStrategy is made (TF's TPU calls faked: no TPU here)."""
    from co2_tf import distribute, training  # noqa: PLC0415
    from co2_tf.config import TrainConfig  # noqa: PLC0415
    from co2_tf.errors import UserError  # noqa: PLC0415

    calls = []

    class Resolver:
        def __init__(self, tpu):
            calls.append(("resolver", tpu))

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster",
                        lambda r: calls.append(("connect", type(r))))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system",
                        lambda r: calls.append(("initialize", type(r))))

    class Stop(Exception):
        pass

    def strategy(resolver):
        calls.append(("strategy", type(resolver)))
        raise Stop  # the run stops here: nothing below the strategy is the subject
    monkeypatch.setattr(tf.distribute, "TPUStrategy", strategy)
    config = TrainConfig(model_dir=str(tmp_path / "run"), image_size=16, batch_size=16,
                         queue_size=64, dim=16, train_steps=1, tpu="grpc://10.0.0.2:8470")
    with pytest.raises(Stop):
        training.train(config, verbose=0)
    assert calls == [("resolver", "grpc://10.0.0.2:8470"), ("connect", Resolver),
                     ("initialize", Resolver), ("strategy", Resolver)]
    calls.clear()
    with pytest.raises(Stop):
        distribute.make_strategy("tpu")  # --strategy=tpu without --tpu: the TPU VM's own
    assert calls[0] == ("resolver", "local")

    def unreachable(r):
        raise tf.errors.UnavailableError(None, None, "failed to connect to all addresses")
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", unreachable)
    with pytest.raises(UserError) as caught:
        training.train(config, verbose=0)
    message = str(caught.value)
    assert "\n" not in message and "cannot reach TPU 'grpc://10.0.0.2:8470'" in message
    assert "failed to connect to all addresses" in message and "--tpu" in message
    assert not (tmp_path / "run").exists()
