"""Paper tables from ``results/runs.csv``: ours next to the papers' numbers (``make tables``).

    python scripts/make_tables.py [--results results] [--paper docs/paper_tables.csv] [--out results/tables]
                                  [--method lmd] [--bootstrap 1000] [--seed 0] [--compare lmd,dlsr]

Prints every paper table that has at least one of our runs as Markdown, in the paper's row order, then the runs
without a paper number, and writes each as ``<out>/<paper>_<table>.{md,tex,csv}`` (``ours.*`` for the rest).
See ``ood_bench/report/tables.py`` for how runs are matched, aggregated over seeds and checked against the
paper's protocol. ``--compare a,b`` prints and writes instead the paired comparison of two methods on every pair or
benchmark both ran: AUROC difference and DeLong's p-value (``ood_bench/report/compare.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ood_bench.report import build_tables
from ood_bench.report.compare import compare_table

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("make_tables")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="results folder (with runs.csv)")
    parser.add_argument("--paper", type=Path, default=ROOT / "docs" / "paper_tables.csv", help="papers' numbers")
    parser.add_argument("--out", type=Path, default=None, help="where the files go (default: <results>/tables)")
    parser.add_argument("--method", default=None, help="only this method's runs")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUROC CI (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--compare", default=None, help="two methods a,b: paired AUROC difference and DeLong p-value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.compare is not None:
        return compare_main(args)
    try:
        tables, missing = build_tables(args.results, args.paper, args.method, args.bootstrap, args.seed)
    except (FileNotFoundError, ValueError) as err:
        log.error("error: %s", err)
        return 1
    out = args.out or args.results / "tables"
    for table in tables:
        print(table.markdown())
        log.info("written: %s", ", ".join(str(p) for p in table.write(out)))
    if missing:
        log.info("paper tables without runs yet: %s", ", ".join(missing))
    return 0


def compare_main(args: argparse.Namespace) -> int:
    """``--compare a,b``: the paired comparison table, printed and written to ``<out>/compare_<a>_vs_<b>.*``."""
    methods = [m.strip() for m in args.compare.split(",") if m.strip()]
    if len(methods) != 2 or methods[0] == methods[1]:
        log.error("error: --compare=%r is not valid; give two different methods, e.g. --compare lmd,dlsr", args.compare)
        return 1
    try:
        table = compare_table(args.results, *methods)
    except (FileNotFoundError, ValueError) as err:
        log.error("error: %s", err)
        return 1
    if table.data.empty:
        log.error("error: %s and %s share no data pair or benchmark with scores in %s", *methods, args.results)
        return 1
    print(table.markdown())
    log.info("written: %s", ", ".join(str(p) for p in table.write(args.out or args.results / "tables")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
