"""The issues' acceptance runs at full CPU size (slow: minutes each; `make test-full` runs them).

Each runs ``run.py`` exactly as a user would, with empty cache and results folders, and checks the AUROC floor.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from conftest import shared_path, shared_weight
from test_run import run_cli, subprocess_env

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, args: list[str], minutes: float) -> dict[str, str]:
    """Run ``run.py ARGS`` with fresh folders; fails if it takes longer than the issue's time limit."""
    env = subprocess_env(OMP_NUM_THREADS=str(os.cpu_count() or 1))
    paths = [
        f"paths.results_dir={tmp_path / 'results'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "progress=false",
    ]
    run_cli([*args, *paths], env=env, timeout=60 * minutes)
    with open(tmp_path / "results" / "runs.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def test_embedded_default_reaches_auroc_080(tmp_path: Path) -> None:
    row = _run(tmp_path, [], minutes=10)
    assert (row["method"], row["data"], row["method.distance_used"]) == ("lmd", "digits", "mse")
    assert float(row["auroc"]) >= 0.80


def test_lmd_fashionmnist_vs_mnist_reaches_auroc_095(tmp_path: Path) -> None:
    shared_path("FashionMNIST", "raw")
    shared_weight("alexnet_features_imagenet.pth")
    row = _run(tmp_path, ["method=lmd", "data=fashionmnist_mnist"], minutes=25)
    assert row["method.distance_used"].startswith("lpips-alex")
    assert float(row["auroc"]) >= 0.95


@pytest.mark.parametrize("score", ["mfsim", "mse"])
def test_dlsr_fashionmnist_vs_mnist_reaches_auroc_097(tmp_path: Path, score: str) -> None:
    shared_path("FashionMNIST", "raw")
    shared_weight("alexnet_features_imagenet.pth")
    row = _run(tmp_path, ["method=dlsr", "data=fashionmnist_mnist", f"method.score={score}"], minutes=10)
    assert row["method.encoder"] == "alexnet" and "alexnet_features_imagenet.pth" in row["method.encoder_weights"]
    assert float(row["auroc"]) >= 0.97


@pytest.mark.parametrize(
    "data, image_floor, pixel_floor",
    [("magnetic_tile", 0.64, 0.62), ("kolektor_sdd", 0.70, 0.80)],
)
def test_patch_knn_reference_on_real_surface_defects(tmp_path: Path, data: str, image_floor, pixel_floor) -> None:
    """The anomaly reference at its defaults (1 shot, 3 shot seeds, 200 test images; cosine + top 1 % + 8 flips and
    rotations since issue 17): measured 0.676 / 0.648 (magnetic tiles) and 0.757 / 0.854 (KolektorSDD) image / pixel
    AUROC (docs/anomaly.md); the magnetic-tile floor is issue 17's acceptance line, the others leave room for BLAS."""
    shared_path(data, "train", "good")
    shared_weight("alexnet_features_imagenet.pth")
    row = _run(tmp_path, ["method=patch_knn", f"data={data}"], minutes=10)
    assert (row["category"], row["shot_seed"], row["n_fits"]) == (data, "mean", "3")
    assert float(row["image_auroc"]) >= image_floor and float(row["pixel_auroc"]) >= pixel_floor


def test_anomalysd_magnetic_tile_within_30_minutes(tmp_path: Path) -> None:
    """Issue 6's run: 1 shot, 3 shot seeds, fine-tuning included, every metric and the overlay figure. Measured
    0.559 image AUROC in 9.5 min on 2 cores with the relu1 difference; 0.593 with relu1-5, the default since
    2026-12-03 (docs/anomalysd.md); the floor is the issue's."""
    shared_path("magnetic_tile", "train", "good")
    shared_weight("alexnet_features_imagenet.pth")
    row = _run(tmp_path, ["method=anomalysd", "data=magnetic_tile"], minutes=30)
    assert (row["category"], row["shot_seed"], row["n_fits"]) == ("magnetic_tile", "mean", "3")
    assert row["method.vae"] == "PatchAutoencoder" and row["method.reference"] == "input"
    for metric in ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "aupro", "pixel_f1_max"):
        assert 0.0 <= float(row[metric]) <= 1.0, metric
    assert float(row["image_auroc"]) >= 0.55
    figures = list((tmp_path / "results").rglob("figures/anomaly_magnetic_tile.png"))
    assert len(figures) == 1


def test_anomalysd_kolektor_sdd_reaches_055(tmp_path: Path) -> None:
    """Issue 17's acceptance command from an empty cache. Measured 0.587 ± 0.034 image AUROC (seeds 0.585, 0.553,
    0.622) with the relu1-5 difference (docs/anomalysd.md#the-difference-layers-2026-12-03); relu1 gave 0.489."""
    shared_path("kolektor_sdd", "train", "good")
    shared_weight("alexnet_features_imagenet.pth")
    row = _run(tmp_path, ["method=anomalysd", "data=kolektor_sdd"], minutes=45)
    assert (row["category"], row["shot_seed"], row["n_fits"]) == ("kolektor_sdd", "mean", "3")
    assert row["method.diff_layers"] == "1|2|3|4|5"
    assert float(row["image_auroc"]) >= 0.55


def test_diffguard_digits_reaches_auroc_090(tmp_path: Path) -> None:
    row = _run(tmp_path, ["method=diffguard", "data=digits"], minutes=15)
    assert (row["method.guidance"], row["method.distance_used"]) == ("cfg", "logit_l1")
    assert float(row["method.classifier_acc"]) >= 0.95
    assert float(row["auroc"]) >= 0.90


def test_diffguard_fashionmnist_vs_mnist_within_30_minutes(tmp_path: Path) -> None:
    shared_path("FashionMNIST", "raw")
    row = _run(tmp_path, ["method=diffguard", "data=fashionmnist_mnist"], minutes=30)
    assert float(row["auroc"]) >= 0.6 and float(row["method.classifier_acc"]) >= 0.8  # measured 0.694, acc 0.86


def test_diffguard_cifar10_textures_with_the_shared_resnet(tmp_path: Path) -> None:
    shared_path("cifar10-jpeg")
    shared_weight("cifar10_resnet20-12fca82f.th")
    row = _run(tmp_path, ["method=diffguard", "data=cifar10_textures", "classifier=resnet20_cifar10"], minutes=30)
    assert row["method.classifier"] == "resnet20_cifar10" and float(row["method.classifier_acc"]) >= 0.75
