"""End to end through ``run.py`` in a subprocess: ``method=patch_knn data=mvtec/bottle`` on a tiny synthetic MVTec
layout (rows per shot seed, mean and std, scores, shot files, the overlay figure, W&B offline); in process: the skip
of a complete run, and a corrupt mask failing with the file's name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from anomaly_layouts import write_mvtec
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_run import read_csv, run_cli, subprocess_env

from ood_bench.metrics import ANOMALY_CONVENTION, ANOMALY_METRICS


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("anomaly_e2e")


def args(work: Path, data_dir: Path, weights: Path, results: str = "results") -> list[str]:
    """The run's settings (the first five determine its hash), with a random stand-in AlexNet file: what these
    tests check does not depend on ImageNet features, so they run without the offline weights."""
    return [
        "method=patch_knn",
        "data=mvtec/bottle",
        "debug=anomaly",
        f"paths.data_dir={data_dir}",
        f"method.encoder_weights={weights / 'alexnet_features_imagenet.pth'}",
        f"paths.results_dir={work / results}",
        f"paths.cache_dir={work / 'cache'}",
        f"paths.log_dir={work / 'logs'}",
    ]


@pytest.fixture(scope="module")
def knn_run(work, standin_weights_dir):
    """``run.py method=patch_knn data=mvtec/bottle debug=anomaly logger=wandb logger.mode=offline``."""
    data = work / "data"
    write_mvtec(data / "mvtec_anomaly_detection", "bottle", n_train=6, n_good=8, defects={"broken": 5, "hole": 5})
    wb = work / "wandb_logger"
    _, out = run_cli(
        [*args(work, data, standin_weights_dir), "logger=wandb", "logger.mode=offline", f"logger.dir={wb}"],
        env=subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(work / "wandb_env")),
    )
    runs = sorted((work / "results" / "patch_knn" / "mvtec_bottle").iterdir())
    assert len(runs) == 1, out[-3000:]
    return runs[0], out, data, wb, standin_weights_dir


def test_run_folder_holds_rows_scores_shots_and_figure(knn_run):
    run_dir, out, data, _, _ = knn_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"summary.csv", "rows.csv", "scores.csv", "shots.json", "config.yaml", "DONE", "figures"} <= names
    rows = read_csv(run_dir / "rows.csv")
    assert [(r["category"], r["shot_seed"]) for r in rows] == [("bottle", s) for s in ("0", "1", "mean", "std")]
    assert {r["config_hash"] for r in rows} == {run_dir.name} and {r["method"] for r in rows} == {"patch_knn"}
    summary = read_csv(run_dir / "summary.csv")[0]  # the runner's cost columns, as in OOD rows
    assert summary["precision"] == "fp32" and float(summary["peak_rss_mb"]) > 100
    assert float(summary["features_seconds"]) > 0 and float(summary["cpu_seconds"]) > 0
    # scores.csv: every test image once per shot seed; the rows' image metrics follow from it
    scores = read_csv(run_dir / "scores.csv")
    assert len(scores) == 2 * int(rows[0]["n_test"]) == 24
    for seed in ("0", "1"):
        mine = [r for r in scores if r["shot_seed"] == seed]
        auc = roc_auc_score([int(r["label"]) for r in mine], [float(r["score"]) for r in mine])
        assert float(next(r for r in rows if r["shot_seed"] == seed)["image_auroc"]) == pytest.approx(auc, abs=1e-12)
        assert all((data / "mvtec_anomaly_detection" / "bottle" / r["file"]).is_file() for r in mine)
    for key in ANOMALY_METRICS:  # mean and std rows over the seeds (std with ddof=1)
        v = np.array([float(r[key]) for r in rows[:2]])
        assert float(rows[2][key]) == pytest.approx(v.mean(), abs=1e-12)
        assert float(rows[3][key]) == pytest.approx(v.std(ddof=1), abs=1e-12)
    # the shots' file names, in shots.json and in the rows, are real training images
    shots = json.loads((run_dir / "shots.json").read_text())
    assert [f["shot_seed"] for f in shots["fits"]] == [0, 1] and shots["k_shot"] == 1
    for fit, row in zip(shots["fits"], rows[:2]):
        (name,) = fit["shots"]["bottle"]
        assert name.startswith("train/good/") and (data / "mvtec_anomaly_detection" / "bottle" / name).is_file()
        assert row["shots"] == name
    assert len(shots["test"]["bottle"]) == 12
    summary = read_csv(run_dir / "summary.csv")[0]
    assert summary["shot_seed"] == "mean" and summary["image_auroc"] == rows[2]["image_auroc"]
    assert summary["image_auroc_std"] == rows[3]["image_auroc"] and int(summary["n_fits"]) == 2
    # bright synthetic defects, seen through the random stand-in AlexNet with the default recipe (cosine, top-1 %,
    # flipped and rotated shots): 1.0 / 0.75 here; a flipped polarity or a misplaced map would fall below 0.5
    assert float(summary["image_auroc"]) > 0.9 and float(summary["pixel_auroc"]) > 0.7
    assert summary["method.encoder_weights"].startswith("alexnet_features_imagenet.pth#")
    assert json.loads((run_dir / "DONE").read_text())["convention"] == ANOMALY_CONVENTION
    assert f"convention: {ANOMALY_CONVENTION}" in out and re.search(r"bottle\s*\|\s*mean\s*\|\s*1\s*\|\s*12\b", out)
    with Image.open(run_dir / "figures" / "anomaly_bottle.png") as im:
        assert im.size[0] > 300 and im.size[1] > im.size[0]  # one row per picked image


def test_figure_and_record_went_to_wandb(knn_run):
    run_dir, _, _, wb, _ = knn_run
    (offline,) = sorted((wb / "wandb").glob("offline-run-*"))
    logged = list((offline / "files" / "media" / "images").rglob("*.png"))
    assert len(logged) == 1 and "bottle" in str(logged[0])


def test_complete_run_is_skipped(knn_run, work, hydra_conf, tmp_path, caplog):
    """In process, the same settings (without the W&B logger, which is not part of the hash): read back, not rerun."""
    import logging

    from omegaconf import open_dict

    from ood_bench.runner import run

    run_dir, _, data, _, weights = knn_run
    done = (run_dir / "DONE").stat().st_mtime_ns
    cfg = hydra_conf(args(work, data, weights)[:5], tmp_path)
    with open_dict(cfg):
        cfg.paths.results_dir, cfg.paths.cache_dir = str(work / "results"), str(work / "cache")
    caplog.set_level(logging.INFO, logger="ood_bench")
    record = run(cfg)
    assert "are complete" in caplog.text and re.search(r"bottle\s*\|\s*std", caplog.text)
    assert record["config_hash"] == run_dir.name and (run_dir / "DONE").stat().st_mtime_ns == done


def test_corrupt_mask_fails_with_its_name(hydra_conf, tmp_path, standin_weights_dir):
    from ood_bench.data.anomaly import CorruptFileError
    from ood_bench.runner import run

    data = tmp_path / "data"
    base = write_mvtec(data / "mvtec_anomaly_detection", "bottle", n_train=3, n_good=2, defects={"hole": 2})
    bad = base / "ground_truth" / "hole" / "001_mask.png"
    bad.write_bytes(b"garbage")
    cfg = hydra_conf([*args(tmp_path, data, standin_weights_dir)[:5], "data.n_test=null"], tmp_path)
    with pytest.raises(CorruptFileError, match=f"cannot decode mask {re.escape(str(bad))}"):
        run(cfg)
    assert not (tmp_path / "results").exists()
