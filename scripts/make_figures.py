"""Figures across runs from ``results/`` (``make figures``).

    python scripts/make_figures.py [--results results] [--out results/figures]

Writes ``auroc_vs_nfe.png`` and ``auroc_vs_seconds.png`` (AUROC against network evaluations and against scoring
seconds per image, one point per method and setting, mean ± std over seeds, a panel per data pair) with the
plotted numbers in ``auroc_vs_cost.csv``, and adds the ROC curve and score histograms to any complete run
folder that lacks them (e.g. runs written before figures existed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from ood_bench.figures.ood import HIST_PNG, ROC_PNG, auroc_vs_cost, write_score_figures
from ood_bench.report import cost_points, load_runs, summarise
from ood_bench.report.tables import is_anomaly, run_dir

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("make_figures")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="results folder (with runs.csv)")
    parser.add_argument("--out", type=Path, default=None, help="where the figures go (default: <results>/figures)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        runs = load_runs(args.results)
    except FileNotFoundError as err:
        log.error("error: %s", err)
        return 1
    out = args.out or args.results / "figures"
    n_anomaly = int(is_anomaly(runs).sum())
    runs = runs[~is_anomaly(runs)]  # AUROC against cost and ROC curves are OOD figures (anomaly runs draw their own)
    points = cost_points(summarise(runs, args.results, n_boot=0)) if len(runs) else pd.DataFrame()
    if len(points):
        out.mkdir(parents=True, exist_ok=True)
        points.to_csv(out / "auroc_vs_cost.csv", index=False)
        for cost in ("nfe", "seconds"):
            log.info("written: %s", auroc_vs_cost(points, out / f"auroc_vs_{cost}.png", cost=cost))
    added = 0
    for _, row in runs.iterrows():
        folder = run_dir(args.results, row)
        if (folder / "DONE").is_file() and not ((folder / ROC_PNG).is_file() and (folder / HIST_PNG).is_file()):
            write_score_figures(folder, pd.read_csv(folder / "scores.csv"), row.to_dict())
            added += 1
    log.info(
        "%d settings plotted from %d runs; ROC and histograms added to %d run folders; %d anomaly runs left out",
        len(points),
        len(runs),
        added,
        n_anomaly,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
