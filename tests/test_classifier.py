"""Classifiers (small CNN trained and cached, CIFAR ResNet checkpoints, torchvision) and the MSP/MLS/EBO baselines."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path, shared_weight, sklearn_digits, small_cnn_cfg

from ood_bench.cache import ArtifactCache
from ood_bench.methods import Context, build_method
from ood_bench.methods.classifier_scores import baseline_scores
from ood_bench.models.classifier import (
    CifarResNet,
    get_classifier,
    load_cifar_resnet,
    resolve_module,
    validate_classifier_cfg,
)

CIFAR_RESNET20 = {
    "kind": "cifar_resnet",
    "depth": 20,
    "checkpoint": "cifar10_resnet20-12fca82f.th",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "input_size": 32,
    "cam_layer": "layer3.-1",
}


def digits(classes: tuple[int, ...] = (0, 1), size: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    x, y = sklearn_digits(classes)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, y


# ---------------------------------------------------------------------------------------------------------------
# Baseline scores on a logit matrix whose values are known by hand
# ---------------------------------------------------------------------------------------------------------------


def test_baseline_scores_on_hand_made_logits() -> None:
    logits = torch.tensor(
        [[math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0 + math.log(4.0), 1.0]], dtype=torch.float64
    )
    # row 0: softmax = (3/5, 1/5, 1/5); max logit log 3; logsumexp = log 5
    # row 1: softmax = 1/3 each; max logit 0; logsumexp = log 3
    # row 2: exp = e * (1, 4, 1): softmax max = 4/6; max logit 1 + log 4; logsumexp = 1 + log 6
    np.testing.assert_allclose(baseline_scores("msp", logits), [-0.6, -1 / 3, -2 / 3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(baseline_scores("mls", logits), [-math.log(3), 0.0, -1 - math.log(4)], atol=1e-12)
    ebo = [-math.log(5), -math.log(3), -1 - math.log(6)]
    np.testing.assert_allclose(baseline_scores("ebo", logits), ebo, atol=1e-12)
    # temperature 2: row 1 -> -2 log(3 e^0) = -2 log 3
    assert baseline_scores("ebo", logits, temperature=2.0)[1] == pytest.approx(-2 * math.log(3), abs=1e-12)
    with pytest.raises(ValueError, match=r"baseline='knn'.*msp.*mls.*ebo"):
        baseline_scores("knn", logits)


# ---------------------------------------------------------------------------------------------------------------
# Loading and training
# ---------------------------------------------------------------------------------------------------------------


def test_cifar_resnet20_checkpoint_classifies_the_shared_cifar10() -> None:
    """The checkpoint loads strictly into our option-A ResNet-20 and classifies the JPEG CIFAR-10 test images
    (80.5 % on 2,000 of them; the JPEG codec costs ~11 points against the original 91.7 %)."""
    from ood_bench.data import TorchvisionSource
    from ood_bench.data.transforms import to_float

    weights = shared_weight("cifar10_resnet20-12fca82f.th").parent
    shared_path("cifar10-jpeg", "test")
    src = TorchvisionSource("cifar10", "CIFAR10", str(shared_path()), fallback_folder="cifar10-jpeg")
    idx = np.arange(0, 10000, 50)
    x = to_float(src.images("test", idx))
    clf = load_cifar_resnet(CIFAR_RESNET20, weights)
    assert clf.num_classes == 10 and clf.source == "file:cifar10_resnet20-12fca82f.th"
    assert clf.accuracy(clf.logits(x), src.labels("test")[idx]) >= 0.75
    # without the ImageNet normalisation it is much worse: the normalisation the README states matters
    plain = load_cifar_resnet({**CIFAR_RESNET20, "mean": [0.5] * 3, "std": [0.5] * 3}, weights)
    assert plain.accuracy(plain.logits(x), src.labels("test")[idx]) < 0.72


def test_cifar_resnet_rejects_a_checkpoint_of_another_depth(tmp_path: Path) -> None:
    torch.save({"state_dict": {f"module.{k}": v for k, v in CifarResNet(20).state_dict().items()}}, tmp_path / "r.th")
    cfg = {**CIFAR_RESNET20, "checkpoint": str(tmp_path / "r.th")}
    assert load_cifar_resnet(cfg, None).num_classes == 10
    with pytest.raises(RuntimeError, match="layer1.3"):
        load_cifar_resnet({**cfg, "depth": 32}, None)
    with pytest.raises(FileNotFoundError, match=r"classifier.checkpoint='nope.th'.*paths.weights_dir"):
        load_cifar_resnet({**cfg, "checkpoint": "nope.th"}, tmp_path)


def test_small_cnn_trains_once_then_loads_from_cache(tmp_path: Path, caplog) -> None:
    x, y = digits((3, 7))
    cache = ArtifactCache(tmp_path / "cache")
    caplog.set_level(logging.INFO, logger="ood_bench")
    clf = get_classifier(small_cnn_cfg(), x, y, cache, torch.device("cpu"), progress=False)
    assert "training small CNN" in caplog.text
    assert clf.classes == [3, 7] and clf.source.startswith("trained:")
    assert clf.accuracy(clf.logits(x), y) > 0.95
    np.testing.assert_array_equal(clf.class_index(np.array([7, 3, 5])), [1, 0, -1])
    caplog.clear()
    again = get_classifier(small_cnn_cfg(), x, y, cache, torch.device("cpu"), progress=False)
    assert "training small CNN" not in caplog.text and "using cached classifier" in caplog.text
    torch.testing.assert_close(again.logits(x), clf.logits(x))
    other = get_classifier(small_cnn_cfg(steps=41), x, y, cache, torch.device("cpu"), progress=False)
    assert other.source != clf.source  # training settings are part of the cache key


def test_classifier_adapts_grey_images_and_passes_gradients() -> None:
    net = CifarResNet(20).eval()
    from ood_bench.models.classifier import Classifier

    clf = Classifier(
        net,
        list(range(10)),
        in_channels=3,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        input_size=32,
        cam_layer="layer3.-1",
        source="test",
    )
    x = torch.rand(2, 1, 16, 16, requires_grad=True)
    out = clf(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert resolve_module(net, "layer3.-1") is net.layer3[2]


@pytest.mark.parametrize(
    ("cfg", "pattern"),
    [
        ({"kind": "svm"}, r"classifier.kind='svm'.*small_cnn.*cifar_resnet.*torchvision"),
        ({**CIFAR_RESNET20, "depth": 21}, r"classifier.depth=21.*6n\+2"),
        ({"kind": "torchvision", "arch": "resnet5"}, r"classifier.arch='resnet5'.*resnet50"),
        ({**small_cnn_cfg(), "train": {**small_cnn_cfg()["train"], "steps": 0}}, r"classifier.train.steps=0"),
    ],
)
def test_bad_classifier_settings_fail_clearly(cfg: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        validate_classifier_cfg(cfg)


def test_cam_layer_path_errors_name_the_children() -> None:
    with pytest.raises(ValueError, match=r"cam_layer='layer9'.*layer1"):
        resolve_module(CifarResNet(20), "layer9")


# ---------------------------------------------------------------------------------------------------------------
# The baselines as methods, and the config hash
# ---------------------------------------------------------------------------------------------------------------


def test_baseline_methods_share_the_classifier_and_record_its_accuracy(tmp_path: Path) -> None:
    x, y = digits((0, 1, 2), size=8)
    ctx = Context(
        device=torch.device("cpu"),
        cache=ArtifactCache(tmp_path / "cache"),
        classifier_cfg=small_cnn_cfg(),
        progress=False,
    )
    ood, _ = digits((8,), size=8)
    results = {}
    for name in ("msp", "mls", "ebo"):
        m = build_method({"name": name})
        m.fit(x, ctx, labels=y)
        s_id = m.score(x, ctx, labels=y, split="id")
        s_ood = m.score(ood, ctx, labels=np.full(len(ood), 8), split="ood")
        rec = m.describe()
        assert rec["classifier"] == "small_cnn" and rec["classifier_acc"] > 0.9
        assert set(np.unique(s_id.extras["pred"])) <= {0, 1, 2}
        assert s_ood.values.mean() > s_id.values.mean()  # unseen 8s look more OOD than the training digits
        results[name] = (s_id.values, m.classifier.source)
    assert len({src for _, src in results.values()}) == 1  # one cached classifier for all three
    assert not np.allclose(results["msp"][0], results["mls"][0])


def test_classifier_joins_the_config_hash_only_for_classifier_methods(cfg_tiny) -> None:
    from omegaconf import OmegaConf, open_dict

    from ood_bench.runner import run

    with open_dict(cfg_tiny):
        cfg_tiny.classifier.train.steps = 30
    lmd_a = run(cfg_tiny)["config_hash"]
    with open_dict(cfg_tiny):
        cfg_tiny.classifier.train.steps = 31
    assert run(cfg_tiny)["config_hash"] == lmd_a  # LMD ignores the classifier: same run, skipped
    with open_dict(cfg_tiny):
        cfg_tiny.method = OmegaConf.create({"name": "msp", "temperature": 1.0, "batch_size": 64})
    msp_31 = run(cfg_tiny)
    with open_dict(cfg_tiny):
        cfg_tiny.classifier.train.steps = 30
    msp_30 = run(cfg_tiny)
    assert msp_31["config_hash"] != msp_30["config_hash"]
    assert msp_30["method.classifier"] == "small_cnn" and 0.0 <= msp_30["method.classifier_acc"] <= 1.0
    assert msp_30["nfe_per_image"] == 0.0
