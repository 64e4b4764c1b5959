"""Distances: LPIPS with the offline ImageNet backbone reproduces the official values; MSE/SSIM directions."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import standin_weights
from PIL import Image

from ood_bench.distances import build_distance
from ood_bench.distances.lpips import LPIPSDistance

DATA = Path(os.environ["OOD_BENCH_DATA"])
WEIGHTS = Path(os.environ["OOD_BENCH_WEIGHTS"])
CALIB = DATA / "iqa_calibration"


def _load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


@pytest.mark.needs_shared(weights=["alexnet_features_imagenet.pth"], data=["iqa_calibration"])
def test_lpips_alex_matches_official_values() -> None:
    with open(CALIB / "results_official.csv", newline="") as f:
        official = {row["Method"]: row for row in csv.DictReader(f)}["lpips"]
    dist = LPIPSDistance(net="alex", weights="auto", weights_dir=WEIGHTS)
    assert dist.describe().startswith("lpips-alex(file:alexnet_features_imagenet.pth")
    for name in ("I03.bmp", "I06.bmp"):
        value = float(dist(_load(CALIB / "ref" / name), _load(CALIB / "dist" / name)))
        assert value == pytest.approx(float(official[name]), abs=2e-4), name


def test_lpips_small_grey_images_and_identity() -> None:
    """Shapes, identity and a positive distance: a random stand-in AlexNet does (LPIPS of a random backbone is
    still a distance; the official values are checked above)."""
    dist = build_distance("lpips", weights_dir=standin_weights())
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    same = dist(x, x)
    other = dist(x, torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-6)
    assert bool((other > 0.01).all())


def test_lpips_missing_weights_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_distance("lpips", lpips_weights=str(tmp_path / "nope.pth"))


def test_unknown_distance_names_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"distance='l3'.*lpips.*mse.*ssim"):
        build_distance("l3")


@pytest.mark.parametrize("name", ["mse", "ssim", "l1"])
def test_distance_grows_with_perturbation(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=gen)
    noise = torch.randn(4, 3, 16, 16, generator=gen)
    d = build_distance(name)
    small = d(x, (x + 0.02 * noise).clamp(0, 1))
    large = d(x, (x + 0.3 * noise).clamp(0, 1))
    assert torch.allclose(d(x, x), torch.zeros(4), atol=1e-6)
    assert bool((large > small).all())


@pytest.mark.needs_shared(weights=["vgg16_features_imagenet.pth", "dists_alpha_beta.pt"], data=["iqa_calibration"])
def test_dists_matches_official_values_at_full_resolution() -> None:
    """piq's DISTS with the local VGG16 and alpha/beta files reproduces the official values (512x384 images,
    not downsampled: piq's own forward would shrink them to 256 px and give 0.438 instead of 0.474 on I03)."""
    with open(CALIB / "results_official.csv", newline="") as f:
        official = {row["Method"]: row for row in csv.DictReader(f)}["dists"]
    dist = build_distance("dists", weights_dir=WEIGHTS)
    assert dist.describe() == "dists(file:vgg16_features_imagenet.pth+dists_alpha_beta.pt)"
    value = float(dist(_load(CALIB / "ref" / "I03.bmp"), _load(CALIB / "dist" / "I03.bmp")))
    assert value == pytest.approx(float(official["I03.bmp"]), abs=2e-5)


@pytest.mark.needs_shared(weights=["vgg16_features_imagenet.pth", "dists_alpha_beta.pt"])
def test_dists_small_grey_images_and_missing_weights(tmp_path: Path) -> None:
    dist = build_distance("dists", weights_dir=WEIGHTS)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dist(x, x), torch.zeros(3), atol=1e-5)
    assert bool((dist(x, torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))) > 0.05).all())
    with pytest.raises(FileNotFoundError, match="dists_alpha_beta.pt"):
        build_distance("dists", weights_dir=tmp_path)
