"""Image-level OOD metrics, computed by scikit-learn on full float64 score vectors.

The convention is pinned here and printed with every table (see ``CONVENTION``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

CONVENTION = (
    "higher score = more OOD | auroc, aupr_out: OOD positive | aupr_in: ID positive | "
    "fpr95: share of OOD accepted as ID at the threshold keeping 95% of ID (ODIN/DLSR) | "
    "fpr95_oodpos: share of ID flagged as OOD at the threshold catching 95% of OOD (OpenOOD v1.5) | "
    "fpr95_pct: share of OOD below np.percentile(ID, 95), linear interpolation (official DLSR scripts)"
)


def _as_scores(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one score on each side")
    if not np.all(np.isfinite(arr)):
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name} holds {bad} non-finite scores (NaN or inf); metrics need finite scores")
    return arr


def _fpr_at_tpr(neg: np.ndarray, pos: np.ndarray, tpr_level: float) -> float:
    """FPR at the first threshold (from strict to lax) reaching ``tpr_level`` of ``pos``; higher = positive."""
    y = np.r_[np.zeros(neg.size), np.ones(pos.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[neg, pos], drop_intermediate=False)
    idx = int(np.searchsorted(tpr, tpr_level - 1e-12, side="left"))
    return float(fpr[idx])


def ood_metrics(scores_id: ArrayLike, scores_ood: ArrayLike) -> dict[str, float]:
    """AUROC, FPR@95, AUPR-In and AUPR-Out for ``higher score = more OOD``.

    >>> m = ood_metrics([0.1, 0.2, 0.3], [0.25, 0.4, 0.5])
    >>> round(m["auroc"], 4)
    0.8889
    """
    s_id = _as_scores(scores_id, "scores_id")
    s_ood = _as_scores(scores_ood, "scores_ood")
    scores = np.r_[s_id, s_ood]
    is_ood = np.r_[np.zeros(s_id.size), np.ones(s_ood.size)]
    return {
        "auroc": float(roc_auc_score(is_ood, scores)),
        # ID is the positive class, the detector calls ID when -score is high.
        "fpr95": _fpr_at_tpr(neg=-s_ood, pos=-s_id, tpr_level=0.95),
        "fpr95_oodpos": _fpr_at_tpr(neg=s_id, pos=s_ood, tpr_level=0.95),
        # the official DLSR scripts' rule: the threshold interpolates between ID scores, so it can differ from fpr95
        # by about one sample's share at small n (0.328 vs 0.344 at 200 + 200)
        "fpr95_pct": float(np.mean(s_ood < np.percentile(s_id, 95))),
        "aupr_in": float(average_precision_score(1 - is_ood, -scores)),
        "aupr_out": float(average_precision_score(is_ood, scores)),
    }
