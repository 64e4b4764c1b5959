"""Summarise ``results/runs.csv`` as a table, next to the papers' numbers when they are given.

    python scripts/make_tables.py [--results results] [--paper ../shared/docs/paper_tables.csv] [--method lmd]

The paper file has columns ``paper,table,id_dataset,ood_dataset,method,setting,metric,value,source``;
a run matches a paper row when its data pair is ``<id_dataset>_<ood_dataset>`` and its method matches.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from ood_bench.metrics import ANOMALY_CONVENTION
from ood_bench.results import TABLE_COLUMNS, format_table

# one row per anomaly run: the mean over shot seeds (and categories) with the std over shot seeds
ANOMALY_TABLE_COLUMNS = [
    "method",
    "data",
    "k_shot",
    "mode",
    "n_test",
    "image_auroc",
    "image_auroc_std",
    "pixel_auroc",
    "pixel_auroc_std",
    "aupro",
    "image_f1_max",
    "pixel_f1_max",
    "seconds",
]

log = logging.getLogger("make_tables")


def load_runs(results: Path, method: str | None) -> list[dict[str, str]]:
    index = results / "runs.csv"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: run `python run.py ...` first")
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if method is None or r["method"] == method]


def paper_auroc(paper: Path) -> dict[tuple[str, str, str], str]:
    """``(method, pair, setting) -> 'value (table, setting)'`` for the AUROC rows of the paper table."""
    out: dict[tuple[str, str, str], str] = {}
    with open(paper, newline="") as f:
        for r in csv.DictReader(f):
            if r["metric"] == "auroc" and r["ood_dataset"]:
                key = (r["method"].lower(), f"{r['id_dataset']}_{r['ood_dataset']}", r["setting"])
                out.setdefault(key, f"{float(r['value']) / 100:.3f} ({r['table']}, {r['setting']})")
    return out


def match(ref: dict[tuple[str, str, str], str], run: dict[str, str]) -> str:
    """The paper number for a run: same method, pair and (when the run has one) score variant."""
    method, pair, setting = run["method"].lower(), run["data"], run.get("method.score", "")
    if (method, pair, setting) in ref:
        return ref[(method, pair, setting)]
    if setting:
        return ""
    return next((v for (m, p, _), v in ref.items() if (m, p) == (method, pair)), "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--paper", type=Path, default=None, help="paper_tables.csv to compare with")
    parser.add_argument("--method", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = load_runs(args.results, args.method)
    anomaly = [r for r in rows if r.get("image_auroc")]  # anomaly-detection runs have their own columns
    runs = [r for r in rows if not r.get("image_auroc")]
    columns = [*TABLE_COLUMNS[:-1], "nfe_per_image", "images_per_s", "seconds"]
    if args.paper:
        ref = paper_auroc(args.paper)
        for r in runs:
            r["paper_auroc"] = match(ref, r)
        columns.append("paper_auroc")
    if runs or not anomaly:
        log.info(format_table(runs, columns))
    if anomaly:
        log.info(format_table(anomaly, ANOMALY_TABLE_COLUMNS, ANOMALY_CONVENTION))


if __name__ == "__main__":
    main()
