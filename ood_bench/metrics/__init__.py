"""Evaluation metrics."""

from ood_bench.metrics.ood import CONVENTION, ood_metrics

__all__ = ["CONVENTION", "ood_metrics"]
