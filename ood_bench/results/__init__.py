"""Results: the flat run record, per-sample score files and the done marker."""

from ood_bench.results.store import RESULT_COLUMNS, TABLE_COLUMNS, RunStore, format_table

__all__ = ["RESULT_COLUMNS", "TABLE_COLUMNS", "RunStore", "format_table"]
