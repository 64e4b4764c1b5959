"""scripts/make_tables.py: tabulates runs.csv with the convention and the matching paper numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import REPO_ROOT

from ood_bench.metrics import ANOMALY_CONVENTION, CONVENTION
from ood_bench.results import RunStore


def test_table_lists_runs_and_matches_paper_rows_by_score(tmp_path: Path) -> None:
    paper = tmp_path / "paper.csv"
    paper.write_text(
        "paper,table,id_dataset,ood_dataset,method,setting,metric,value,source\n"
        "DLSR,Table1,cifar10,mnist,DLSR,mse,auroc,99.4,x\n"
        "DLSR,Table1,cifar10,mnist,DLSR,mfsim,auroc,99.9,x\n"
    )
    for score, auroc in (("mfsim", 0.91), ("lr", 0.82)):
        record = {
            "method": "dlsr",
            "data": "cifar10_mnist",
            "config_hash": score,
            "auroc": auroc,
            "method.score": score,
        }
        RunStore(tmp_path / "results", "dlsr", "cifar10_mnist", score).write(record, {"score": np.zeros(2)}, "{}")
    anomaly = {"method": "patch_knn", "data": "magnetic_tile", "config_hash": "a", "k_shot": 4, "image_auroc": 0.6248}
    RunStore(tmp_path / "results", "patch_knn", "magnetic_tile", "a").write(anomaly, {"score": np.zeros(2)}, "{}")
    out = subprocess.run(
        [sys.executable, "scripts/make_tables.py", "--results", str(tmp_path / "results"), "--paper", str(paper)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},  # this checkout's package, not another installed one
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    lines = out.splitlines()
    mfsim_line = next(line for line in lines if "0.9100" in line)
    lr_line = next(line for line in lines if "0.8200" in line)
    assert "0.999 (Table1, mfsim)" in mfsim_line
    assert "Table1" not in lr_line  # no paper row for the lr score: left empty, not another variant's number
    assert CONVENTION in out
    # the anomaly run gets its own table, columns and convention (not an empty OOD row)
    assert ANOMALY_CONVENTION in out and not any("magnetic_tile" in line for line in lines[: lines.index(lr_line)])
    assert "0.6248" in next(line for line in lines if "magnetic_tile" in line)
