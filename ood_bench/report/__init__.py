"""The researcher's report: paper tables (``tables``) and figures across runs, from ``results/``."""

from ood_bench.report.tables import PAPER_PROTOCOL, Table, build_tables, cost_points, load_paper, load_runs, summarise

__all__ = ["PAPER_PROTOCOL", "Table", "build_tables", "cost_points", "load_paper", "load_runs", "summarise"]
