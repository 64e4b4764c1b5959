"""Paired comparison of two detectors' AUROCs on the same samples: DeLong's test for correlated ROC curves.

Why DeLong (DeLong, DeLong & Clarke-Pearson 1988) rather than a paired bootstrap: both use the pairing (the same ID
and OOD samples scored by both methods), but DeLong's variance is exact for the Mann-Whitney AUROC up to its
asymptotics, needs no resampling seed or replicate count, and is what pROC's ``roc.test`` reports by default, so
p-values are reproducible and comparable. ``tests/test_paired.py`` checks its components against the pairwise
definition and its standard error against a paired bootstrap over the shared samples.

The structural components of an AUROC (OOD positive, higher score = more OOD, ties count one half) are, for each
OOD sample i, ``V10_i = mean_j psi(ood_i, id_j)`` and for each ID sample j, ``V01_j = mean_i psi(ood_i, id_j)``;
AUROC = mean(V10) = mean(V01). For the difference of two methods' AUROCs on the same samples,
``Var = var(V10_a - V10_b) / n_ood + var(V01_a - V01_b) / n_id`` (sample variances). The same holds for the mean
of the differences over several OOD sets that share one ID set (a benchmark's near / far / all rows): the ID
components of the sets are averaged per ID sample, the OOD sets are independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm, rankdata


def auroc_components(s_id: np.ndarray, s_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components ``(V10 per OOD sample, V01 per ID sample)`` from midranks."""
    s_id, s_ood = np.asarray(s_id, dtype=np.float64), np.asarray(s_ood, dtype=np.float64)
    n, m = len(s_id), len(s_ood)
    if n == 0 or m == 0:
        raise ValueError(f"need ID and OOD scores, got {n} ID and {m} OOD")
    ranks = rankdata(np.r_[s_id, s_ood])  # midranks: ties count one half
    v10 = (ranks[n:] - rankdata(s_ood)) / n  # ID samples below each OOD sample
    v01 = 1.0 - (ranks[:n] - rankdata(s_id)) / m  # OOD samples above each ID sample
    return v10, v01


@dataclass(frozen=True)
class PairedTest:
    """AUROC of methods a and b, their difference (a - b), its standard error, z and the two-sided p-value."""

    auroc_a: float
    auroc_b: float
    delta: float
    se: float
    z: float
    p_value: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def delong_mean_test(
    id_a: np.ndarray, oods_a: Sequence[np.ndarray], id_b: np.ndarray, oods_b: Sequence[np.ndarray]
) -> PairedTest:
    """DeLong's test of the mean AUROC over OOD sets sharing one ID set (one set: the classic two-curve test).

    ``id_a[j]`` and ``id_b[j]`` score the same ID sample, ``oods_a[k][i]`` and ``oods_b[k][i]`` the same OOD sample.
    """
    if len(oods_a) != len(oods_b) or not len(oods_a):
        raise ValueError(f"need the same OOD sets for both methods, got {len(oods_a)} and {len(oods_b)}")
    if len(id_a) != len(id_b) or any(len(x) != len(y) for x, y in zip(oods_a, oods_b)):
        raise ValueError("both methods must score the same samples (paired): the sizes differ")
    k = len(oods_a)
    id_part = np.zeros(len(id_a))
    var, auc_a, auc_b = 0.0, 0.0, 0.0
    for s_a, s_b in zip(oods_a, oods_b):
        v10_a, v01_a = auroc_components(id_a, s_a)
        v10_b, v01_b = auroc_components(id_b, s_b)
        auc_a, auc_b = auc_a + v10_a.mean() / k, auc_b + v10_b.mean() / k
        id_part += (v01_a - v01_b) / k
        if len(s_a) > 1:
            var += np.var(v10_a - v10_b, ddof=1) / len(s_a) / k**2
    if len(id_a) > 1:
        var += np.var(id_part, ddof=1) / len(id_a)
    delta, se = auc_a - auc_b, float(np.sqrt(max(var, 0.0)))
    if se == 0.0:  # identical components: no evidence of a difference (or a difference with no variance at all)
        z, p = (0.0, 1.0) if delta == 0 else (float(np.sign(delta) * np.inf), 0.0)
    else:
        z = delta / se
        p = float(2 * norm.sf(abs(z)))
    return PairedTest(float(auc_a), float(auc_b), float(delta), se, float(z), p)


def delong_test(id_a: np.ndarray, ood_a: np.ndarray, id_b: np.ndarray, ood_b: np.ndarray) -> PairedTest:
    """DeLong's test for two correlated ROC curves: methods a and b on the same ID and OOD samples."""
    return delong_mean_test(id_a, [ood_a], id_b, [ood_b])
