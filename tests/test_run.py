"""End to end through ``run.py`` in subprocesses: results files, skipping, overwrite, multirun, W&B offline."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DATA_DIR, REPO_ROOT, TEST_THREADS, WEIGHTS_DIR, shared_weight

from ood_bench.metrics import ood_metrics

REQUIRED_COLUMNS = [
    "method",
    "data",
    "config_hash",
    "n_id",
    "n_ood",
    "auroc",
    "fpr95",
    "aupr_in",
    "aupr_out",
    "seconds",
    "nfe_per_image",
    "images_per_s",
    "device",
    "git_commit",
    "method.distance_used",
]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OOD_BENCH_CACHE", None)
    env.update(
        OOD_BENCH_DATA=str(DATA_DIR),
        OOD_BENCH_WEIGHTS=str(WEIGHTS_DIR),
        OMP_NUM_THREADS=str(TEST_THREADS),
        HF_HUB_OFFLINE="1",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: dict[str, str] | None = None, check: bool = True, timeout: float = 400
) -> tuple[int, str]:
    """``python run.py ARGS`` from the repository root; returns (exit code, stdout + stderr)."""
    proc = subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=REPO_ROOT,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, f"run.py {' '.join(args)} failed ({proc.returncode}):\n{out[-6000:]}"
    return proc.returncode, out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_dirs(results: Path) -> list[Path]:
    base = results / "lmd" / "digits"
    return sorted(p for p in base.iterdir() if not p.name.startswith(".")) if base.exists() else []


def cache_entries(cache: Path) -> list[Path]:
    folder = cache / "diffusion"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


def base_args(work: Path, results: str = "results") -> list[str]:
    return [
        "debug=default",
        f"paths.results_dir={work / results}",
        f"paths.cache_dir={work / 'cache'}",
        f"paths.log_dir={work / 'logs'}",
    ]


@pytest.fixture(scope="module")
def mse_run(work):
    """The debug run with the MSE distance: trains the debug model into the shared cache of this module."""
    _, out = run_cli([*base_args(work), "method.distance=mse"])
    return work / "results", out


# ---------------------------------------------------------------------------------------------------------------
# One run and its files
# ---------------------------------------------------------------------------------------------------------------


def check_run_folder(run_dir: Path, distance_prefix: str) -> dict[str, str]:
    """Check summary.csv, scores.csv, config.yaml and DONE of one run folder; return the summary row."""
    assert (run_dir / "DONE").is_file()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = read_csv(run_dir / "summary.csv")
    assert len(rows) == 1
    rec = rows[0]
    missing = [c for c in REQUIRED_COLUMNS if c not in rec]
    assert not missing, f"summary.csv lacks {missing}"

    assert rec["method"] == "lmd" and rec["data"] == "digits" == cfg["data"]["name"]
    assert rec["config_hash"] == run_dir.name
    n_id, n_ood = int(rec["n_id"]), int(rec["n_ood"])
    assert n_id == cfg["data"]["n_id_test"] and n_ood == cfg["data"]["n_ood_test"]
    for key in ("auroc", "fpr95", "aupr_in", "aupr_out"):
        assert 0.0 <= float(rec[key]) <= 1.0, key
    assert float(rec["seconds"]) > 0 and float(rec["images_per_s"]) > 0
    reps, steps = cfg["method"]["reps"], cfg["method"]["steps"]
    assert float(rec["nfe_per_image"]) == reps * steps
    assert rec["device"] == "cpu"
    assert rec["git_commit"].strip()
    assert rec["method.distance_used"].startswith(distance_prefix), rec["method.distance_used"]

    scores = read_csv(run_dir / "scores.csv")
    assert len(scores) == n_id + n_ood
    rep_cols = [f"dist_rep_{r}" for r in range(reps)]
    for col in ("split", "label", "sample_index", "score", *rep_cols):
        assert col in scores[0], col
    assert f"dist_rep_{reps}" not in scores[0]
    assert [r["split"] for r in scores] == ["id"] * n_id + ["ood"] * n_ood
    id_classes, ood_classes = set(cfg["data"]["id_classes"]), set(cfg["data"]["ood_classes"])
    assert all(int(r["label"]) in id_classes for r in scores[:n_id])
    assert all(int(r["label"]) in ood_classes for r in scores[n_id:])
    # the score is the median over repeats, and the summary metrics follow from the per-sample scores
    dists = np.array([[float(r[c]) for c in rep_cols] for r in scores])
    score = np.array([float(r["score"]) for r in scores])
    assert np.allclose(score, np.median(dists, axis=1), rtol=1e-6, atol=1e-9)
    metrics = ood_metrics(score[:n_id], score[n_id:])
    for key, value in metrics.items():
        assert float(rec[key]) == pytest.approx(value, abs=1e-9), key
    return rec


def test_mse_run_writes_complete_results(mse_run, work):
    results, out = mse_run
    dirs = run_dirs(results)
    assert len(dirs) == 1
    check_run_folder(dirs[0], "mse")
    assert len(read_csv(results / "runs.csv")) == 1
    assert len(cache_entries(work / "cache")) == 1
    assert "training UNet" in out and "results written to" in out


def test_second_identical_run_skips(mse_run, work):
    results, _ = mse_run
    rows_before = len(read_csv(results / "runs.csv"))
    done_mtime = (run_dirs(results)[0] / "DONE").stat().st_mtime_ns
    _, out = run_cli([*base_args(work), "method.distance=mse"])
    assert "are complete" in out and "skipping" in out
    assert "training UNet" not in out and "results written to" not in out
    assert len(read_csv(results / "runs.csv")) == rows_before
    assert len(run_dirs(results)) == 1 and len(cache_entries(work / "cache")) == 1
    assert (run_dirs(results)[0] / "DONE").stat().st_mtime_ns == done_mtime


def test_overwrite_reruns_with_cached_model(mse_run, work):
    results, _ = mse_run
    run_dir = run_dirs(results)[0]
    before = read_csv(run_dir / "scores.csv")
    rows_before = len(read_csv(results / "runs.csv"))
    _, out = run_cli([*base_args(work), "method.distance=mse", "overwrite=true"])
    assert "using cached diffusion model" in out and "training UNet" not in out
    assert "results written to" in out
    assert len(read_csv(results / "runs.csv")) == rows_before + 1
    assert run_dirs(results) == [run_dir] and len(cache_entries(work / "cache")) == 1
    after = read_csv(run_dir / "scores.csv")
    # same cached model, same per-sample seeds: the same scores
    assert [r["sample_index"] for r in after] == [r["sample_index"] for r in before]
    assert np.allclose([float(r["score"]) for r in after], [float(r["score"]) for r in before], atol=1e-7)


def test_lpips_run_uses_shared_weights(mse_run, work):
    shared_weight("alexnet_features_imagenet.pth")
    _, out = run_cli([*base_args(work, results="results_lpips"), "method.distance=lpips"])
    assert "using cached diffusion model" in out  # the model does not depend on the distance
    dirs = run_dirs(work / "results_lpips")
    assert len(dirs) == 1
    assert dirs[0].name != run_dirs(mse_run[0])[0].name  # another distance, another config hash
    rec = check_run_folder(dirs[0], "lpips-alex(file:alexnet_features_imagenet.pth")
    assert "upsampled" in rec["method.distance_used"]  # 16px digits are below the net's 32px minimum


def test_multirun_writes_one_folder_per_job(mse_run, work):
    results = work / "results_multi"
    _, out = run_cli(["-m", *base_args(work, results="results_multi"), "method.distance=mse", "method.reps=1,2"])
    dirs = run_dirs(results)
    assert len(dirs) == 2
    reps = sorted(int(read_csv(d / "summary.csv")[0]["method.reps"]) for d in dirs)
    assert reps == [1, 2]
    for d in dirs:
        check_run_folder(d, "mse")
    assert len(read_csv(results / "runs.csv")) == 2
    assert "training UNet" not in out  # both jobs reuse the model cached by the first run
    assert len(list((work / "logs" / "debug" / "multiruns").glob("*/[01]"))) >= 2


def test_missing_dataset_fails_with_clear_message(work):
    code, out = run_cli(
        [*base_args(work, results="results_missing"), "data=mnist_kmnist", f"paths.data_dir={work / 'empty'}"],
        check=False,
    )
    assert code != 0
    assert "DatasetNotFoundError" in out and str(work / "empty" / "MNIST" / "raw") in out
    assert "Traceback" not in out  # a user error: one message, no traceback
    # nothing but the FAILED marker of the run: no results row, no DONE
    files = [p for p in (work / "results_missing").rglob("*") if p.is_file()]
    assert [f.name for f in files] == ["FAILED"], files
    assert json.loads(files[0].read_text())["error"] == "DatasetNotFoundError"
    assert not (work / "results_missing" / "runs.csv").exists()


# ---------------------------------------------------------------------------------------------------------------
# Weights & Biases, offline
# ---------------------------------------------------------------------------------------------------------------


def read_wandb_records(path: Path) -> list:
    """Records of a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic, version)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at {pos}")
    out = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


def wandb_summary(records) -> dict:
    """The run summary as the server would hold it: summary updates applied in order."""
    summary: dict = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
            for item in rec.summary.remove:
                summary.pop(item.key or "/".join(item.nested_key), None)
    return summary


def test_wandb_offline_run_holds_the_record(mse_run, work):
    wb_dir, wb_env = work / "wandb_logger", work / "wandb_env"
    env = subprocess_env(WANDB_DIR=str(wb_env), WANDB_MODE="offline")
    _, out = run_cli(
        [
            *base_args(work, results="results_wandb"),
            "method.distance=mse",
            "logger=wandb",
            "logger.mode=offline",
            f"logger.dir={wb_dir}",
        ],
        env=env,
    )
    dirs = run_dirs(work / "results_wandb")
    assert len(dirs) == 1
    rec = check_run_folder(dirs[0], "mse")

    runs = sorted((wb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"no offline run under {wb_dir}:\n{out[-3000:]}"
    run = runs[0]
    logs = list(run.glob("run-*.wandb"))
    assert len(logs) == 1
    records = read_wandb_records(logs[0])
    kinds = {r.WhichOneof("record_type") for r in records}
    assert {"run", "summary", "history", "exit"} <= kinds

    summary = wandb_summary(records)
    assert summary["auroc"] == pytest.approx(float(rec["auroc"]), abs=1e-12)
    for key in ("fpr95", "aupr_in", "aupr_out", "n_id", "n_ood"):
        assert float(summary[key]) == pytest.approx(float(rec[key]), abs=1e-12), key
    assert summary["config_hash"] == rec["config_hash"]
    assert summary["method.distance_used"] == "mse"
    summary_file = run / "files" / "wandb-summary.json"
    if summary_file.is_file():  # written by some wandb versions in offline mode as well
        assert json.loads(summary_file.read_text())["auroc"] == pytest.approx(float(rec["auroc"]), abs=1e-12)

    history = [r for r in records if r.WhichOneof("record_type") == "history"]
    logged = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for h in history for i in h.history.item}
    assert logged["auroc"] == pytest.approx(float(rec["auroc"]), abs=1e-12)

    run_record = next(r for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run_record.run.config.update}
    assert config["data"]["name"] == "digits" and config["method"]["distance"] == "mse"

    # the per-sample scores went along as a table, identical to scores.csv
    tables = list((run / "files" / "media" / "table").glob("scores_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    scores = read_csv(dirs[0] / "scores.csv")
    col = table["columns"].index("score")
    assert len(table["data"]) == len(scores)
    assert np.allclose([row[col] for row in table["data"]], [float(r["score"]) for r in scores])
    # the run folder's figures went along as images, byte for byte
    for stem in ("roc", "score_hist", "lmd_inpainting"):
        logged = list((run / "files" / "media" / "images").glob(f"{stem}_*.png"))
        assert len(logged) == 1 and logged[0].read_bytes() == (dirs[0] / f"{stem}.png").read_bytes(), stem
    assert not (wb_env / "wandb").exists() or not list((wb_env / "wandb").glob("offline-run-*"))


# ---------------------------------------------------------------------------------------------------------------
# In process, from a composed config (the fixture route of lightning-hydra-template)
# ---------------------------------------------------------------------------------------------------------------


def test_in_process_run_from_composed_config(cfg_tiny, tmp_path, caplog):
    import logging

    from ood_bench.runner import run

    caplog.set_level(logging.INFO, logger="ood_bench")
    record = run(cfg_tiny)
    run_dir = tmp_path / "results" / "lmd" / "digits" / record["config_hash"]
    rec = check_run_folder(run_dir, "mse")
    assert float(rec["auroc"]) == pytest.approx(record["auroc"], abs=1e-12)
    assert int(rec["method.reps"]) == cfg_tiny.method.reps == 2
    assert "training UNet" in caplog.text

    caplog.clear()
    again = run(cfg_tiny)  # complete: read back from summary.csv, nothing recomputed
    assert "are complete" in caplog.text and "training UNet" not in caplog.text
    assert float(again["auroc"]) == pytest.approx(record["auroc"], abs=1e-12)
    assert len(read_csv(tmp_path / "results" / "runs.csv")) == 1
