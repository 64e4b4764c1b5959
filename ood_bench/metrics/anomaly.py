"""Few-shot anomaly detection metrics: image level (scores vs labels) and pixel level (maps vs masks).

Everything is computed on full float64 vectors, by scikit-learn where it applies; the convention is pinned in
``ANOMALY_CONVENTION`` and printed with every table.

* ``image_auroc``, ``pixel_auroc``: ROC AUC with the anomalous image / defect pixel as the positive class.
* ``image_aupr``: average precision (scikit-learn), anomalous images positive.
* ``image_f1_max``, ``pixel_f1_max``: the best F1 over all thresholds. The threshold is picked on the test set
  itself (an oracle threshold, as anomalib's ``F1Max`` and the few-shot AD papers report it): optimistic by
  construction, never a deployable operating point.
* ``aupro``: area under the per-region-overlap (PRO) curve up to a false-positive rate of 0.3, divided by 0.3
  (the MVTec AD reference evaluation). Regions are the 8-connected components of the ground-truth masks, counted
  over the whole test set; every region weighs the same, whatever its size. The FPR is taken over all defect-free
  pixels (those of defect-free images included).

These follow the MVTec AD reference evaluation code, not anomalib: anomalib's ``AUPRO`` computes in float32 and
resamples each region's curve, and its ``AUROC`` (torchmetrics) passes scores outside [0, 1] through a sigmoid
first (in float32 it saturates and ties large scores; anomalib issue #3407), so its numbers can differ.

``AnomalyMetrics`` accumulates batches (``update``) and computes once (``compute``), so the numbers never depend
on how the scoring was batched.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

log = logging.getLogger(__name__)

ANOMALY_CONVENTION = (
    "higher score = more anomalous | positive class: anomalous image (image_*), defect pixel (pixel_*, aupro) | "
    "auroc, aupr (average precision): scikit-learn, float64 | *_f1_max: best F1 over all thresholds, threshold "
    "tuned on the test set (oracle) | aupro: per-region overlap integrated up to FPR 0.3, divided by 0.3 "
    "(MVTec AD reference; 8-connected regions over the whole test set) | mean/std rows: over shot seeds "
    "(std: ddof=1); 'all' = mean over categories"
)
IMAGE_METRICS = ("image_auroc", "image_aupr", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_f1_max")
ANOMALY_METRICS = IMAGE_METRICS + PIXEL_METRICS
AUPRO_FPR_LIMIT = 0.3
# 8-connectivity, as the MVTec AD reference code (scipy.ndimage.label with a 3x3 structure of ones)
_STRUCTURE = np.ones((3, 3), dtype=int)


def _finite(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds {int((~np.isfinite(arr)).sum())} non-finite values (NaN or inf)")
    return arr


def _binary(y: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(y)
    values = np.unique(arr)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} must hold 0 (normal) and 1 (anomalous) only, got values {values[:10].tolist()}")
    return arr.astype(np.int64)


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds (``score >= threshold`` = anomalous) and that threshold."""
    y = _binary(labels, "labels").ravel()
    s = _finite(scores, "scores").ravel()
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pro_curve(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve of the MVTec AD reference: ``(fpr, pro)`` at every distinct threshold, from (0, 0) to (1, 1).

    ``maps`` are ``[N, H, W]`` anomaly maps, ``masks`` the matching binary ground truth.
    """
    a = _finite(maps, "maps")
    m = _binary(masks, "masks")
    if a.shape != m.shape or a.ndim != 3:
        raise ValueError(f"maps {a.shape} and masks {m.shape} must both be [N, H, W] of the same shape")
    fp_change = np.zeros(a.shape, dtype=np.float64)
    pro_change = np.zeros(a.shape, dtype=np.float64)
    n_regions = 0
    for i in range(len(m)):
        labelled, n = ndimage.label(m[i], structure=_STRUCTURE)
        n_regions += n
        fp_change[i] = labelled == 0
        if n:
            sizes = np.bincount(labelled.ravel())
            pro_change[i] = np.where(labelled > 0, 1.0 / sizes[labelled], 0.0)
    n_ok = fp_change.sum()
    if n_regions == 0 or n_ok == 0:
        raise ValueError(f"the PRO curve needs defect and defect-free pixels; got {n_regions} regions, {n_ok} ok")
    order = np.argsort(-a.ravel(), kind="stable")  # descending scores
    scores = a.ravel()[order]
    fpr = np.cumsum(fp_change.ravel()[order]) / n_ok
    pro = np.cumsum(pro_change.ravel()[order]) / n_regions
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # a threshold accepts every pixel tied with it
    fpr, pro = np.clip(fpr[last_of_tie], None, 1.0), np.clip(pro[last_of_tie], None, 1.0)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` (x non-decreasing) from 0 to ``x_max``, interpolating at ``x_max``."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max:  # close the curve at x_max on the segment that crosses it
        j = int(np.searchsorted(x, x_max, side="right"))
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_at]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (1 = perfect, ~fpr_limit/2 = chance)."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit={fpr_limit} must lie in (0, 1]")
    fpr, pro = pro_curve(maps, masks)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def image_metrics(scores: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """``image_auroc``, ``image_aupr``, ``image_f1_max`` (and the F1 threshold) of image scores."""
    s = _finite(scores, "image scores").ravel()
    y = _binary(labels, "image labels").ravel()
    if len(s) != len(y):
        raise ValueError(f"{len(s)} image scores for {len(y)} labels")
    if y.min() == y.max():
        raise ValueError(f"image metrics need normal and anomalous test images; all {len(y)} have label {y[0]}")
    f1, thr = f1_max(y, s)
    return {
        "image_auroc": float(roc_auc_score(y, s)),
        "image_aupr": float(average_precision_score(y, s)),
        "image_f1_max": f1,
        "image_f1_threshold": thr,
    }


def pixel_metrics(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = AUPRO_FPR_LIMIT) -> dict[str, float]:
    """``pixel_auroc``, ``aupro``, ``pixel_f1_max`` of anomaly maps against binary masks (NaN without defects)."""
    a = _finite(maps, "maps")
    m = _binary(masks, "masks")
    if a.shape != m.shape:
        raise ValueError(f"maps {a.shape} and masks {m.shape} differ in shape")
    n_pos = int(m.sum())
    if n_pos == 0 or n_pos == m.size:
        log.warning("pixel metrics are undefined: %d of %d pixels are defects", n_pos, m.size)
        return {k: math.nan for k in (*PIXEL_METRICS, "pixel_f1_threshold")}
    f1, thr = f1_max(m.ravel(), a.ravel())
    return {
        "pixel_auroc": float(roc_auc_score(m.ravel(), a.ravel())),
        "aupro": aupro(a, m, fpr_limit),
        "pixel_f1_max": f1,
        "pixel_f1_threshold": thr,
    }


class AnomalyMetrics:
    """Accumulate image scores, labels and (optionally) maps and masks; compute every metric once at the end."""

    def __init__(self, fpr_limit: float = AUPRO_FPR_LIMIT) -> None:
        self.fpr_limit = fpr_limit
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []

    def update(
        self, scores: ArrayLike, labels: ArrayLike, maps: ArrayLike | None = None, masks: ArrayLike | None = None
    ) -> None:
        s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel()
        if len(s) != len(y):
            raise ValueError(f"{len(s)} scores for {len(y)} labels")
        if (maps is None) != (masks is None):
            raise ValueError("pass maps and masks together (or neither)")
        if maps is not None:
            if self._scores and not self._maps:
                raise ValueError("earlier batches came without maps; pass maps for every batch or none")
            maps, masks = np.asarray(maps), np.asarray(masks)
            if maps.shape != masks.shape or len(maps) != len(s):
                raise ValueError(f"maps {maps.shape} and masks {masks.shape} must be [N, H, W] with N = {len(s)}")
            self._maps.append(maps)
            self._masks.append(masks)
        elif self._maps:
            raise ValueError("earlier batches came with maps; pass maps for every batch")
        self._scores.append(s)
        self._labels.append(y)

    def compute(self) -> dict[str, float]:
        if not self._scores:
            raise ValueError("no batches: call update() first")
        out = image_metrics(np.concatenate(self._scores), np.concatenate(self._labels))
        if self._maps:
            out.update(pixel_metrics(np.concatenate(self._maps), np.concatenate(self._masks), self.fpr_limit))
        else:
            out.update({k: math.nan for k in (*PIXEL_METRICS, "pixel_f1_threshold")})
        return out
