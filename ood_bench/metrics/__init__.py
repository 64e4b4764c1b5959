"""Evaluation metrics: image-level OOD (``ood.py``) and image/pixel-level anomaly detection (``anomaly.py``)."""

from ood_bench.metrics.anomaly import ANOMALY_CONVENTION, ANOMALY_METRICS, AnomalyMetrics, aupro, f1_max
from ood_bench.metrics.ood import CONVENTION, ood_metrics

__all__ = ["ANOMALY_CONVENTION", "ANOMALY_METRICS", "CONVENTION", "AnomalyMetrics", "aupro", "f1_max", "ood_metrics"]
