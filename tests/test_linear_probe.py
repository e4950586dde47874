"""Tests for co2_tf.evaluation.linear_probe: the fast and MoCo protocols."""
import json

import numpy as np
import pytest
from helpers.references import SMALL, topk

from co2_tf.evaluation import classifier, common, knn, linear_probe


def test_linear_fast_protocol_and_its_feature_cache(run_dir, reference, tmp_path, monkeypatch):
    _, ref = reference
    config = linear_probe.LinearEvalConfig(model_dir=run_dir, protocol="fast", epochs=3,
                                           output_dir=str(tmp_path / "fast"))
    trained, train_classifier = [], classifier.train_classifier

    def keep_the_classifier(model, *args, **kwargs):  # to recompute its accuracy
        trained.append(model)
        return train_classifier(model, *args, **kwargs)
    monkeypatch.setattr(classifier, "train_classifier", keep_the_classifier)
    results = linear_probe.linear_eval(config, verbose=0)
    with np.load(tmp_path / "fast" / "features.npz") as cached:
        np.testing.assert_allclose(cached["train_f"], ref["train"][2], atol=1e-4)
        np.testing.assert_allclose(cached["eval_f"], ref["test"][2], atol=1e-4)
        np.testing.assert_array_equal(cached["eval_y"], ref["test"][1])
        train_f, eval_f, eval_y = cached["train_f"], cached["eval_f"], cached["eval_y"]
    # top-1 / top-5 of the trained classifier on the held-out features, in NumPy:
    # standardised with the TRAINING split's statistics, then the linear layer.
    kernel, bias = trained[0].get_layer("classifier").get_weights()
    standardised = (eval_f - train_f.mean(0)) / np.sqrt(train_f.var(0) + 1e-6)
    scores = standardised.astype(np.float64) @ kernel + bias
    top1, top5 = topk(scores, eval_y, 1), topk(scores, eval_y, 5)
    assert 0.1 < top1 < top5  # better than chance (10 classes), and top-5 is not top-1
    with open(tmp_path / "fast" / "linear_eval.json") as f:
        on_disk = json.load(f)
    assert on_disk["top1"] == pytest.approx(top1, abs=1e-3)
    assert on_disk["top5"] == pytest.approx(top5, abs=1e-3)
    assert on_disk["hyper_parameters"]["learning_rate"] == 0.1  # the fast protocol's default
    assert on_disk["hyper_parameters"]["epochs"] == 3
    assert on_disk["backbone"]["step"] == SMALL["train_steps"]
    assert not on_disk["backbone"]["random_init"]
    assert on_disk["data"]["train_examples"] == len(train_f) == 8000

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again instead of read from the cache")
    monkeypatch.setattr(knn, "extract_features", no_extraction)
    again = linear_probe.linear_eval(config, verbose=0)
    assert again["top1"] == pytest.approx(results["top1"], abs=1e-3)


def test_linear_moco_protocol_trains_only_the_classifier(run_dir, reference, tmp_path,
                                                         monkeypatch):
    """MoCo's protocol: the backbone frozen (BN statistics too), and the reported top-1 / top-5
    are the trained linear layer's on the held-out split's features, recomputed here in NumPy
    from the reference features (centre crop, BN in inference mode).

    No accuracy margin: measured (the 3-step run, 1 epoch at MoCo's lr 30 on the 2000 test
    images) top-1 0.11, top-5 0.52, chance level (0.1, 0.5); what this test can tell from a
    broken protocol is the metric itself, exact against NumPy (the fast protocol's test,
    above, has the accuracy margin).
    """
    _, ref = reference
    loaded = common.load_backbone(common.EvalConfig(model_dir=run_dir))
    before = loaded.backbone.get_weights()  # BN moving statistics included
    monkeypatch.setattr(common, "load_backbone", lambda config: loaded)  # to inspect it after
    trained, train_classifier = [], classifier.train_classifier

    def keep_the_classifier(model, *args, **kwargs):  # to recompute its accuracy
        trained.append(model)
        return train_classifier(model, *args, **kwargs)
    monkeypatch.setattr(classifier, "train_classifier", keep_the_classifier)
    results = linear_probe.linear_eval(linear_probe.LinearEvalConfig(
        model_dir=run_dir, epochs=1, split="test", batch_size=128,
        output_dir=str(tmp_path / "moco")), verbose=0)
    after = loaded.backbone.get_weights()
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(before, after))
    assert results["protocol"] == "moco" and results["hyper_parameters"]["learning_rate"] == 30
    kernel, bias = trained[0].get_layer("classifier").get_weights()
    _, eval_y, eval_f = ref["test"]
    scores = eval_f.astype(np.float64) @ kernel + bias
    top1, top5 = topk(scores, eval_y, 1), topk(scores, eval_y, 5)
    # abs 2e-3: features from another batch size may flip a near-tie or two of 2000.
    assert results["top1"] == pytest.approx(top1, abs=2e-3)
    assert results["top5"] == pytest.approx(top5, abs=2e-3)
    assert 0 < top1 < top5 < 1
