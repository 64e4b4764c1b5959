"""ood_bench.metrics.ood_metrics against cases computed by hand and against the metric definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ood_bench.metrics import CONVENTION, ood_metrics

KEYS = {"auroc", "fpr95", "fpr95_oodpos", "fpr95_pct", "aupr_in", "aupr_out"}


# ---------------------------------------------------------------------------------------------------------------
# Reference implementations of the definitions (brute force, written from the definitions, not from sklearn)
# ---------------------------------------------------------------------------------------------------------------


def auroc_by_pairs(s_id, s_ood) -> float:
    """P(score_ood > score_id) + 1/2 P(tie), over all (ID, OOD) pairs."""
    wins = sum((o > i) + 0.5 * (o == i) for o in s_ood for i in s_id)
    return wins / (len(s_id) * len(s_ood))


def fpr95_by_definition(s_id, s_ood) -> float:
    """Share of OOD accepted as ID (score <= t) at the smallest t that accepts at least 95% of ID."""
    s_id = np.sort(np.asarray(s_id, dtype=float))
    k = math.ceil(0.95 * len(s_id) - 1e-9)
    t = s_id[k - 1]
    return float(np.mean(np.asarray(s_ood) <= t))


def fpr95_oodpos_by_definition(s_id, s_ood) -> float:
    """Share of ID flagged as OOD (score >= t) at the largest t that flags at least 95% of OOD."""
    s_ood = np.sort(np.asarray(s_ood, dtype=float))[::-1]
    k = math.ceil(0.95 * len(s_ood) - 1e-9)
    t = s_ood[k - 1]
    return float(np.mean(np.asarray(s_id) >= t))


def average_precision_by_definition(pos, neg) -> float:
    """sum_k (R_k - R_{k-1}) P_k over distinct thresholds, higher = positive (ties form one threshold)."""
    pos, neg = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(np.r_[pos, neg])[::-1]:
        tp, fp = np.sum(pos >= t), np.sum(neg >= t)
        recall = tp / len(pos)
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------


def test_perfect_separation():
    m = ood_metrics([0.0, 1.0, 2.0], [3.0, 4.0])
    assert set(m) == KEYS
    assert m["auroc"] == 1.0
    assert m["fpr95"] == 0.0
    assert m["fpr95_oodpos"] == 0.0
    assert m["aupr_in"] == 1.0
    assert m["aupr_out"] == 1.0


def test_reversed_separation():
    m = ood_metrics([3.0, 4.0, 5.0], [0.0, 1.0])
    assert m["auroc"] == 0.0
    # every OOD score lies below the threshold that keeps 95% of ID: all accepted as ID
    assert m["fpr95"] == 1.0
    assert m["fpr95_oodpos"] == 1.0


def test_auroc_with_ties_by_hand():
    s_id = [0.1, 0.3, 0.3, 0.5]
    s_ood = [0.3, 0.6, 0.2]
    # 12 (OOD, ID) pairs. OOD 0.3: beats 0.1 (1), ties 0.3 twice (2 x 1/2), loses to 0.5 -> 2.
    # OOD 0.6 beats all four -> 4. OOD 0.2 beats 0.1 -> 1. Total 7 / 12.
    assert ood_metrics(s_id, s_ood)["auroc"] == pytest.approx(7 / 12, abs=1e-12)
    assert auroc_by_pairs(s_id, s_ood) == pytest.approx(7 / 12)


def test_fpr95_by_hand_with_ties_at_threshold():
    # 20 ID scores; 95% of 20 = 19, so the threshold is the 19th smallest ID score, 19. Both ID 19s are kept.
    s_id = [float(k) for k in range(1, 19)] + [19.0, 19.0]
    # OOD accepted as ID are those <= 19: 18.5 and the two tied 19s -> 3 of 5.
    s_ood = [18.5, 19.0, 19.0, 20.0, 25.0]
    assert ood_metrics(s_id, s_ood)["fpr95"] == pytest.approx(3 / 5, abs=1e-12)
    assert fpr95_by_definition(s_id, s_ood) == pytest.approx(3 / 5)


def test_fpr95_by_hand_largest_id_score_excluded():
    # ID 1..20: the threshold keeping 19 of 20 ID is 19 (ID 20 is the 5% rejected).
    s_id = [float(k) for k in range(1, 21)]
    # accepted (<= 19): 19.0 and 0.5; rejected: 19.5, 20.0 -> 2 of 4
    s_ood = [19.0, 19.5, 20.0, 0.5]
    assert ood_metrics(s_id, s_ood)["fpr95"] == pytest.approx(0.5, abs=1e-12)


def test_fpr95_oodpos_by_hand():
    # OpenOOD: 20 OOD scores 1..20; catching 19 of 20 needs threshold 2 (flag score >= 2).
    s_ood = [float(k) for k in range(1, 21)]
    # ID flagged as OOD (>= 2): 2, 2, 3 -> 3 of 5
    s_id = [1.5, 2.0, 2.0, 3.0, 0.0]
    m = ood_metrics(s_id, s_ood)
    assert m["fpr95_oodpos"] == pytest.approx(3 / 5, abs=1e-12)
    assert fpr95_oodpos_by_definition(s_id, s_ood) == pytest.approx(3 / 5)
    # the ID-positive FPR@95 is a different number on the same scores: threshold = 19th smallest ID...
    # only 5 ID: ceil(0.95 * 5) = 5 -> threshold 3.0; OOD <= 3: 1, 2, 3 -> 3 of 20
    assert m["fpr95"] == pytest.approx(3 / 20, abs=1e-12)


def test_aupr_by_hand():
    s_id = [0.1, 0.2, 0.5]
    s_ood = [0.3, 0.6]
    m = ood_metrics(s_id, s_ood)
    # AUPR-Out (OOD positive, rank by score, descending): 0.6 O (P=1, R=1/2), 0.5 I, 0.3 O (P=2/3, R=1)
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert m["aupr_out"] == pytest.approx(5 / 6, abs=1e-12)
    # AUPR-In (ID positive, rank by -score): 0.1 I (P=1, R=1/3), 0.2 I (P=1, R=2/3), 0.3 O, 0.5 I (P=3/4, R=1)
    # AP = 1/3 + 1/3 + 1/3 * 3/4 = 11/12
    assert m["aupr_in"] == pytest.approx(11 / 12, abs=1e-12)
    # AUROC: OOD 0.3 beats 0.1, 0.2; OOD 0.6 beats all three -> 5 of 6
    assert m["auroc"] == pytest.approx(5 / 6, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Against the definitions on random scores with many ties
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_id, n_ood", [(20, 7), (37, 41), (100, 3)])
def test_matches_definitions_on_tied_integer_scores(seed, n_id, n_ood):
    rng = np.random.default_rng(seed)
    s_id = rng.integers(0, 8, n_id).astype(float)
    s_ood = rng.integers(3, 11, n_ood).astype(float)
    m = ood_metrics(s_id, s_ood)
    assert m["auroc"] == pytest.approx(auroc_by_pairs(s_id, s_ood), abs=1e-12)
    assert m["fpr95"] == pytest.approx(fpr95_by_definition(s_id, s_ood), abs=1e-12)
    assert m["fpr95_oodpos"] == pytest.approx(fpr95_oodpos_by_definition(s_id, s_ood), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(average_precision_by_definition(s_ood, s_id), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(average_precision_by_definition(-s_id, -s_ood), abs=1e-12)
    for v in m.values():
        assert 0.0 <= v <= 1.0


# ---------------------------------------------------------------------------------------------------------------
# Numerics and invariances
# ---------------------------------------------------------------------------------------------------------------


def test_raw_scores_near_100_do_not_collapse():
    """Scores that differ only in the 4th decimal around 100 (where a sigmoid saturates to 1.0)."""
    raw_id = [100.0001, 100.0003, 100.0002, 100.0005]
    raw_ood = [100.0002, 100.0004, 100.0006]
    shifted_id = [1.0, 3.0, 2.0, 5.0]
    shifted_ood = [2.0, 4.0, 6.0]
    raw, shifted = ood_metrics(raw_id, raw_ood), ood_metrics(shifted_id, shifted_ood)
    for k in KEYS:
        assert raw[k] == pytest.approx(shifted[k], abs=1e-12), k
    # OOD 2 beats 1 and ties 2 (1.5); OOD 4 beats 1, 3, 2 (3); OOD 6 beats all (4) -> 8.5 / 12
    assert raw["auroc"] == pytest.approx(8.5 / 12, abs=1e-12)
    assert raw["auroc"] != 0.5  # a collapsed (all-equal) score vector gives 0.5


def test_float32_torch_scores_near_100():
    """float32 tensors (what a method may hand over) keep their order: metrics are computed in float64."""
    base = torch.tensor(100.0, dtype=torch.float32)
    s_id = base + torch.arange(0, 10, dtype=torch.float32) * 1e-3
    s_ood = base + 0.0095 + torch.arange(0, 10, dtype=torch.float32) * 1e-3
    m = ood_metrics(s_id, s_ood)
    expected = auroc_by_pairs(s_id.double().numpy(), s_ood.double().numpy())
    assert m["auroc"] == pytest.approx(expected, abs=1e-12)
    assert m["auroc"] > 0.9


@pytest.mark.parametrize(
    "transform",
    [lambda x: x + 1e4, lambda x: 3.0 * x - 7.0, lambda x: np.exp(x), lambda x: x**3],
    ids=["shift", "affine", "exp", "cube"],
)
def test_invariant_to_monotone_transform(transform):
    rng = np.random.default_rng(0)
    s_id = np.round(rng.normal(0.0, 1.0, 50), 2)  # rounding makes ties
    s_ood = np.round(rng.normal(0.8, 1.0, 30), 2)
    base = ood_metrics(s_id, s_ood)
    moved = ood_metrics(transform(s_id), transform(s_ood))
    for k in KEYS:
        assert moved[k] == pytest.approx(base[k], abs=1e-12), k
    assert 0.5 < base["auroc"] < 1.0


def test_sides_swapped_mirrors_auroc():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=40), rng.normal(0.5, 1.0, size=25)
    assert ood_metrics(a, b)["auroc"] == pytest.approx(1.0 - ood_metrics(b, a)["auroc"], abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_empty_id_scores_raise():
    with pytest.raises(ValueError, match="scores_id"):
        ood_metrics([], [1.0, 2.0])


def test_empty_ood_scores_raise():
    with pytest.raises(ValueError, match="scores_ood"):
        ood_metrics(np.array([1.0, 2.0]), np.array([]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise_naming_the_side(bad):
    with pytest.raises(ValueError, match=r"scores_ood.*non-finite"):
        ood_metrics([0.1, 0.2], [0.3, bad])
    with pytest.raises(ValueError, match=r"scores_id.*non-finite"):
        ood_metrics([bad, 0.2], [0.3, 0.4])


def test_convention_is_documented():
    assert "higher score = more OOD" in CONVENTION
    assert "fpr95" in CONVENTION and "fpr95_oodpos" in CONVENTION


def test_fpr95_pct_is_the_official_dlsr_rule_and_can_differ_from_fpr95():
    """fpr95_pct = mean(OOD < np.percentile(ID, 95)) (xbyym/DLSR test scripts): the interpolated threshold lies between
    two ID scores, so an OOD score in that gap counts for fpr95 (<= the 95 % ID score) but not for fpr95_pct."""
    s_id = np.arange(1.0, 21.0)  # 20 ID scores: fpr95 threshold = 19, np.percentile(., 95) = 19.05
    s_ood = np.array([19.0, 19.02, 19.1, 25.0])
    m = ood_metrics(s_id, s_ood)
    assert m["fpr95"] == pytest.approx(fpr95_by_definition(s_id, s_ood)) == pytest.approx(1 / 4)
    assert m["fpr95_pct"] == pytest.approx(2 / 4)  # 19.0 and 19.02 lie below 19.05
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=200), rng.normal(0.5, size=200)
    assert ood_metrics(a, b)["fpr95_pct"] == pytest.approx(np.sum(b < np.percentile(a, 95)) / 200, abs=1e-12)
    assert "fpr95_pct" in CONVENTION
