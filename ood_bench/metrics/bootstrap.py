"""Bootstrap confidence intervals of AUROC from per-sample scores (seeded, vectorised).

ID and OOD scores are resampled separately (the class sizes stay fixed) and each replicate's AUROC is the
Mann-Whitney statistic on average ranks, which equals scikit-learn's ``roc_auc_score`` (ties count one half).
Replicates are computed in chunks of many resamples at once. With several runs of one setting (seeds), every run
is resampled with the same seeded draws (paired when the runs score the same samples) and the interval is that
of the mean AUROC over the runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

CHUNK_ELEMENTS = 4_000_000  # resampled scores ranked at once (memory: about 100 MB of temporaries)


def auroc_replicates(s_id: np.ndarray, s_ood: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """AUROC (OOD positive, higher score = more OOD) of ``n_boot`` stratified bootstrap resamples."""
    s_id, s_ood = np.asarray(s_id, dtype=np.float64), np.asarray(s_ood, dtype=np.float64)
    n0, n1 = len(s_id), len(s_ood)
    if n0 == 0 or n1 == 0:
        raise ValueError(f"need ID and OOD scores, got {n0} ID and {n1} OOD")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, CHUNK_ELEMENTS // (n0 + n1))
    out = []
    for start in range(0, n_boot, per_chunk):
        b = min(per_chunk, n_boot - start)
        x = np.concatenate([s_id[rng.integers(0, n0, (b, n0))], s_ood[rng.integers(0, n1, (b, n1))]], axis=1)
        ranks = rankdata(x, axis=1)  # average ranks: ties count one half
        out.append((ranks[:, n0:].sum(axis=1) - n1 * (n1 + 1) / 2) / (n0 * n1))
    return np.concatenate(out) if out else np.zeros(0)


def auroc_ci(
    runs: Sequence[tuple[np.ndarray, np.ndarray]], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile ``level`` interval of the mean AUROC over ``runs`` (``(scores_id, scores_ood)`` each)."""
    if not runs:
        raise ValueError("no runs to bootstrap")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie in (0, 1)")
    mean = np.mean([auroc_replicates(s_id, s_ood, n_boot, seed) for s_id, s_ood in runs], axis=0)
    low, high = np.quantile(mean, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def mean_auroc_replicates(
    s_id: np.ndarray, s_oods: Sequence[np.ndarray], n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """Replicates of the mean AUROC over several OOD sets scored against one ID set (a benchmark's near, far and
    all means): each replicate draws one ID resample, shared by every set, and an independent resample per set."""
    s_id = np.asarray(s_id, dtype=np.float64)
    if not len(s_oods):
        raise ValueError("no OOD sets to average")
    n0 = len(s_id)
    rng = np.random.default_rng(seed)
    id_draws = rng.integers(0, n0, (n_boot, n0)) if n0 else None
    total = np.zeros(n_boot)
    for s_ood in s_oods:
        s_ood = np.asarray(s_ood, dtype=np.float64)
        n1 = len(s_ood)
        if n0 == 0 or n1 == 0:
            raise ValueError(f"need ID and OOD scores, got {n0} ID and {n1} OOD")
        ood_draws = rng.integers(0, n1, (n_boot, n1))
        per_chunk = max(1, CHUNK_ELEMENTS // (n0 + n1))
        for start in range(0, n_boot, per_chunk):
            rows = slice(start, min(start + per_chunk, n_boot))
            x = np.concatenate([s_id[id_draws[rows]], s_ood[ood_draws[rows]]], axis=1)
            ranks = rankdata(x, axis=1)
            total[rows] += (ranks[:, n0:].sum(axis=1) - n1 * (n1 + 1) / 2) / (n0 * n1)
    return total / len(s_oods)


def mean_auroc_ci(
    s_id: np.ndarray, s_oods: Sequence[np.ndarray], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile ``level`` interval of the mean AUROC over ``s_oods`` (see ``mean_auroc_replicates``)."""
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie in (0, 1)")
    reps = mean_auroc_replicates(s_id, s_oods, n_boot, seed)
    low, high = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)
