"""Write a run's results: per-sample scores and one summary row, atomically, with a done marker last.

Layout: ``<results_dir>/<method>/<data>/<config_hash>/{scores.csv, summary.csv, config.yaml, DONE}``, plus one
row appended to ``<results_dir>/runs.csv`` (all runs). A run with a table of several rows (anomaly detection: one per
category and shot seed, mean and std) writes them to ``rows.csv``; figures and other files go in the same folder.
A run directory counts as complete only when ``DONE`` exists; it is built in a temporary directory and renamed into
place, so readers never see half a run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from ood_bench.metrics import CONVENTION
from ood_bench.utils import atomic_write_text

log = logging.getLogger(__name__)

# Columns every summary row starts with (more method-specific columns follow).
RESULT_COLUMNS = [
    "method",
    "data",
    "config_hash",
    "n_id",
    "n_ood",
    "auroc",
    "fpr95",
    "aupr_in",
    "aupr_out",
    "fpr95_oodpos",
    "seconds",
    "fit_seconds",
    "score_seconds",
    "nfe_per_image",
    "images_per_s",
    "device",
    "git_commit",
    "timestamp",
]


# Anomaly-detection rows continue with these (then the rest, sorted).
ANOMALY_COLUMNS = [
    "category",
    "shot_seed",
    "k_shot",
    "mode",
    "n_test",
    "n_good",
    "n_anomalous",
    "image_auroc",
    "image_aupr",
    "image_f1_max",
    "pixel_auroc",
    "aupro",
    "pixel_f1_max",
]

# Columns of the printed metrics table.
TABLE_COLUMNS = ["method", "data", "n_id", "n_ood", "auroc", "fpr95", "aupr_in", "aupr_out", "seconds"]


def _csv_text(rows: list[Mapping[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in columns})
    return buf.getvalue()


def ordered_columns(record: Mapping[str, Any]) -> list[str]:
    leading = [c for c in (*RESULT_COLUMNS, *ANOMALY_COLUMNS) if c in record]
    return leading + sorted(k for k in record if k not in leading)


def union_columns(rows: list[Mapping[str, Any]]) -> list[str]:
    """Columns of all rows, in the order of their first appearance (each row ordered by ``ordered_columns``)."""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in ordered_columns(r) if c not in cols]
    return cols


class RunStore:
    """The results folder of one run, identified by method, data and config hash."""

    def __init__(self, results_dir: str | os.PathLike[str], method: str, data: str, config_hash: str) -> None:
        self.results_dir = Path(results_dir)
        self.dir = self.results_dir / method / data / config_hash

    @property
    def done(self) -> bool:
        return (self.dir / "DONE").is_file()

    def load_record(self) -> dict[str, str]:
        with open(self.dir / "summary.csv", newline="") as f:
            return next(csv.DictReader(f))

    def load_rows(self) -> list[dict[str, str]]:
        """The run's full table (``rows.csv``), or an empty list for a one-row run."""
        if not (self.dir / "rows.csv").is_file():
            return []
        with open(self.dir / "rows.csv", newline="") as f:
            return list(csv.DictReader(f))

    def write(
        self,
        record: Mapping[str, Any],
        per_sample: dict[str, np.ndarray],
        config_yaml: str,
        rows: list[Mapping[str, Any]] | None = None,
        files: Mapping[str, str | bytes] | None = None,
        convention: str = CONVENTION,
    ) -> Path:
        """Write scores, summary, config, the optional full table (``rows.csv``) and extra files (name -> text or
        bytes, e.g. ``figures/<name>.png``) into a temporary folder, mark it DONE, rename it into place."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.dir.name}.", dir=self.dir.parent))
        try:
            n = {len(v) for v in per_sample.values()}
            if len(n) != 1:
                raise ValueError(f"per-sample columns differ in length: { {k: len(v) for k, v in per_sample.items()} }")
            cols = list(per_sample)
            samples = [dict(zip(cols, vals)) for vals in zip(*(per_sample[c].tolist() for c in cols))]
            (tmp / "scores.csv").write_text(_csv_text(samples, cols))
            (tmp / "summary.csv").write_text(_csv_text([record], ordered_columns(record)))
            (tmp / "config.yaml").write_text(config_yaml)
            if rows:
                (tmp / "rows.csv").write_text(_csv_text(list(rows), union_columns(list(rows))))
            for name, content in (files or {}).items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    target.write_text(content)
            (tmp / "DONE").write_text(json.dumps({"convention": convention}) + "\n")
            if self.dir.exists():  # an incomplete or overwritten earlier run
                shutil.rmtree(self.dir)
            os.replace(tmp, self.dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        self._append_index(record)
        log.info("results written to %s", self.dir)
        return self.dir

    def _append_index(self, record: Mapping[str, Any]) -> None:
        """Add the row to ``runs.csv`` (rewritten atomically; columns are the union of all rows)."""
        index = self.results_dir / "runs.csv"
        with FileLock(str(index) + ".lock"):  # parallel sweep jobs append one at a time
            rows: list[dict[str, Any]] = []
            if index.is_file():
                with open(index, newline="") as f:
                    rows = list(csv.DictReader(f))
            rows.append(dict(record))
            atomic_write_text(index, _csv_text(rows, union_columns(rows)))


def format_table(
    records: list[Mapping[str, Any]], columns: list[str] | None = None, convention: str = CONVENTION
) -> str:
    """Plain-text metrics table with the metric convention printed under it."""
    columns = columns or TABLE_COLUMNS

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        try:
            return f"{float(v):.4f}" if "." in str(v) else str(v)
        except ValueError:
            return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "-" * len(line)] + ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    out.append(f"convention: {convention}")
    return "\n".join(out)
