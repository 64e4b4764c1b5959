"""Write a run's results: per-sample scores and one summary row, atomically, with a done marker last.

Layout: ``<results_dir>/<method>/<data>/<config_hash>/{scores.csv, summary.csv, config.yaml, *.png, DONE}``,
plus one row appended to ``<results_dir>/runs.csv`` (all runs). A run with a table of several rows (anomaly
detection: one per category and shot seed, mean and std) writes them to ``rows.csv``; figures and other files go in
the same folder. A run directory counts as complete only when ``DONE`` exists; it is built in a temporary directory
and renamed into place, so readers never see half a run. ``runs.csv`` is rewritten atomically under a file lock, so
parallel jobs never lose or tear a row.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
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
    "fpr95_pct",
    "seconds",
    "fit_seconds",
    "score_seconds",
    "nfe_per_image",
    "images_per_s",
    "cpu_seconds",
    "train_seconds",
    "features_seconds",
    "sampling_seconds",
    "peak_rss_mb",
    "peak_cuda_mb",
    "precision",
    "train_precision",
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


def record_frame(record: Mapping[str, Any]) -> pd.DataFrame:
    """One results row as a one-line frame of strings (``str(value)``, empty for ``None``), columns ordered."""
    return rows_frame([record])


def rows_frame(rows: list[Mapping[str, Any]]) -> pd.DataFrame:
    """Results rows as a frame of strings (``str(value)``, empty for ``None`` or absent), columns ``union_columns``."""
    cols = union_columns(rows)
    return pd.DataFrame([{k: "" if r.get(k) is None else str(r[k]) for k in cols} for r in rows], columns=cols)


def read_csv_text(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A results CSV with every cell as written (strings; empty cells stay empty)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


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
        return read_csv_text(self.dir / "summary.csv").iloc[0].to_dict()

    def load_rows(self) -> list[dict[str, str]]:
        """The run's full table (``rows.csv``), or an empty list for a one-row run."""
        if not (self.dir / "rows.csv").is_file():
            return []
        return read_csv_text(self.dir / "rows.csv").to_dict("records")

    def figures(self) -> dict[str, Path]:
        """The run folder's figures, ``{file stem: path}`` (what goes to W&B as images)."""
        return {p.stem: p for p in sorted(self.dir.glob("*.png"))}

    def write(
        self,
        record: Mapping[str, Any],
        per_sample: dict[str, np.ndarray],
        config_yaml: str,
        rows: list[Mapping[str, Any]] | None = None,
        files: Mapping[str, str | bytes] | None = None,
        convention: str = CONVENTION,
        extra: Callable[[Path], Any] | None = None,
    ) -> Path:
        """Write scores, summary, config, the optional full table (``rows.csv``) and extra files (name -> text or
        bytes, e.g. ``figures/<name>.png``) into a temporary folder, mark it DONE, rename it into place.

        ``extra(folder)`` may add files (figures) to the temporary folder before ``DONE`` is written.
        """
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.dir.name}.", dir=self.dir.parent))
        try:
            n = {len(v) for v in per_sample.values()}
            if len(n) != 1:
                raise ValueError(f"per-sample columns differ in length: { {k: len(v) for k, v in per_sample.items()} }")
            pd.DataFrame(per_sample).to_csv(tmp / "scores.csv", index=False, lineterminator="\n")
            record_frame(record).to_csv(tmp / "summary.csv", index=False, lineterminator="\n")
            (tmp / "config.yaml").write_text(config_yaml)
            if rows:
                rows_frame(list(rows)).to_csv(tmp / "rows.csv", index=False, lineterminator="\n")
            for name, content in (files or {}).items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    target.write_text(content)
            if extra is not None:
                extra(tmp)
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

    def ensure_indexed(self, record: Mapping[str, Any]) -> bool:
        """Add the row of this complete run to ``runs.csv`` if it is not there (a process killed between ``DONE``
        and the append leaves a complete run without its row). Returns whether the row was added."""
        index = self.results_dir / "runs.csv"
        with FileLock(str(index) + ".lock"):
            if index.is_file() and str(record["config_hash"]) in set(read_csv_text(index).get("config_hash", [])):
                return False
        self._append_index(record)
        log.warning("run %s was complete but missing from %s: row added", self.dir, index)
        return True

    def _append_index(self, record: Mapping[str, Any]) -> None:
        """Add the row to ``runs.csv`` (rewritten atomically; columns are the union of all rows)."""
        index = self.results_dir / "runs.csv"
        with FileLock(str(index) + ".lock"):  # parallel sweep jobs append one at a time
            frames = [read_csv_text(index)] if index.is_file() else []
            rows = pd.concat([*frames, record_frame(record)], ignore_index=True, sort=False).fillna("")
            atomic_write_text(index, rows.to_csv(index=False, lineterminator="\n"))


def format_table(
    records: list[Mapping[str, Any]], columns: list[str] | None = None, convention: str = CONVENTION
) -> str:
    """Markdown metrics table (numbers to 4 decimals) with the metric convention printed under it."""
    columns = columns or TABLE_COLUMNS
    frame = pd.DataFrame([{c: r.get(c, "") for c in columns} for r in records], columns=columns)
    return f"{frame.to_markdown(index=False, floatfmt='.4f')}\nconvention: {convention}"
