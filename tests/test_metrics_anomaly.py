"""Anomaly metrics against brute-force references written from the definitions, on small hand-made masks and maps
(several regions, a diagonal region that is one region only under 8-connectivity, ties, a defect-free image)."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
from test_metrics import auroc_by_pairs, average_precision_by_definition

from ood_bench.metrics.anomaly import (
    ANOMALY_CONVENTION,
    AnomalyMetrics,
    aupro,
    f1_max,
    image_metrics,
    pixel_metrics,
    pro_curve,
)

# ---------------------------------------------------------------------------------------------------------------
# Brute-force references (loops over thresholds, an own flood fill; no scipy, no scikit-learn)
# ---------------------------------------------------------------------------------------------------------------


def regions_by_flood_fill(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """8-connected components of a binary 2-D mask, as sets of pixel coordinates."""
    seen: set[tuple[int, int]] = set()
    regions = []
    h, w = mask.shape
    for r0 in range(h):
        for c0 in range(w):
            if not mask[r0, c0] or (r0, c0) in seen:
                continue
            region, todo = set(), deque([(r0, c0)])
            seen.add((r0, c0))
            while todo:
                r, c = todo.popleft()
                region.add((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and (rr, cc) not in seen:
                            seen.add((rr, cc))
                            todo.append((rr, cc))
            regions.append(region)
    return regions


def aupro_by_definition(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """For every distinct threshold t: FPR(t) = share of defect-free pixels with score >= t, PRO(t) = mean over all
    regions (of all images) of the share of the region's pixels with score >= t. The curve starts at (0, 0);
    the area up to ``limit`` (linear interpolation at the limit) is divided by ``limit``."""
    regions = [(i, reg) for i in range(len(masks)) for reg in regions_by_flood_fill(masks[i])]
    ok = masks == 0
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        fpr = float(np.sum((maps >= t) & ok) / np.sum(ok))
        pro = float(np.mean([np.mean([maps[i][p] >= t for p in reg]) for i, reg in regions]))
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:  # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def f1_max_by_definition(labels: np.ndarray, scores: np.ndarray) -> float:
    """max over distinct thresholds t of F1 for the prediction score >= t."""
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp, fn = np.sum(pred & (labels == 0)), np.sum(~pred & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return float(best)


# ---------------------------------------------------------------------------------------------------------------
# Hand-made masks and maps
# ---------------------------------------------------------------------------------------------------------------


def hand_made() -> tuple[np.ndarray, np.ndarray]:
    """Three 7x7 images: two regions (one diagonal, 8-connected only), one large region, no defect at all.
    Maps are quantised to 0.1 steps so that many pixels tie, inside and outside the regions."""
    masks = np.zeros((3, 7, 7), dtype=np.int64)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 2, 2] = 1  # diagonal: one region under 8-connectivity
    masks[0, 4:6, 4:7] = 1  # a 2x3 block
    masks[1, 2:6, 1:4] = 1  # one 4x3 region
    rng = np.random.default_rng(3)
    maps = np.round(rng.random((3, 7, 7)) * 0.6, 1)  # background 0.0 .. 0.6
    maps[masks == 1] = np.round(0.3 + rng.random(int(masks.sum())) * 0.7, 1)  # defects 0.3 .. 1.0
    maps[2, 3, 3] = 0.9  # a strong false alarm in the defect-free image
    return maps, masks


def test_flood_fill_reference_sees_three_regions():
    _, masks = hand_made()
    assert [len(regions_by_flood_fill(m)) for m in masks] == [2, 1, 0]


def test_aupro_matches_the_definition_on_hand_made_maps():
    maps, masks = hand_made()
    assert len(np.unique(maps)) < maps.size / 10  # many ties
    for limit in (0.3, 0.05, 0.5, 1.0):
        assert aupro(maps, masks, limit) == pytest.approx(aupro_by_definition(maps, masks, limit), abs=1e-12), limit


def test_aupro_weighs_regions_not_pixels():
    """A tiny region that is missed costs as much as a large one: 2 regions, one found -> PRO 0.5 at low FPR."""
    masks = np.zeros((1, 8, 8), dtype=np.int64)
    masks[0, 0:4, 0:4] = 1  # 16 pixels, found
    masks[0, 7, 7] = 1  # 1 pixel, missed
    maps = np.zeros((1, 8, 8))
    maps[0, 0:4, 0:4] = 1.0
    fpr, pro = pro_curve(maps, masks)
    assert fpr[1] == 0.0 and pro[1] == pytest.approx(0.5)  # pixel-weighted it would be 16/17
    assert aupro(maps, masks) == pytest.approx(aupro_by_definition(maps, masks), abs=1e-12)


def test_aupro_hand_computed_cases():
    maps, masks = hand_made()
    perfect = masks.astype(float)
    assert aupro(perfect, masks) == pytest.approx(1.0)
    # one threshold for every pixel: the curve is the straight line (0,0)-(1,1); area up to 0.3 is 0.045
    assert aupro(np.full(masks.shape, 0.5), masks) == pytest.approx(0.045 / 0.3)
    assert aupro(1.0 - perfect, masks) == pytest.approx(0.0)


def test_pixel_auroc_and_f1_match_the_definitions():
    maps, masks = hand_made()
    m = pixel_metrics(maps, masks)
    y, s = masks.ravel(), maps.ravel()
    assert m["pixel_auroc"] == pytest.approx(auroc_by_pairs(s[y == 0], s[y == 1]), abs=1e-12)
    assert m["pixel_f1_max"] == pytest.approx(f1_max_by_definition(y, s), abs=1e-12)
    assert m["aupro"] == pytest.approx(aupro_by_definition(maps, masks), abs=1e-12)
    # the threshold reported is one that reaches the maximum
    pred = s >= m["pixel_f1_threshold"]
    tp, fp, fn = np.sum(pred & (y == 1)), np.sum(pred & (y == 0)), np.sum(~pred & (y == 1))
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(m["pixel_f1_max"])


def test_image_metrics_match_the_definitions_with_ties():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.2, 0.4, 0.9, 0.3, 0.05, 0.9])
    m = image_metrics(scores, labels)
    assert m["image_auroc"] == pytest.approx(auroc_by_pairs(scores[labels == 0], scores[labels == 1]), abs=1e-12)
    assert m["image_aupr"] == pytest.approx(
        average_precision_by_definition(scores[labels == 1], scores[labels == 0]), abs=1e-12
    )
    assert m["image_f1_max"] == pytest.approx(f1_max_by_definition(labels, scores), abs=1e-12)
    assert f1_max(labels, scores) == (m["image_f1_max"], m["image_f1_threshold"])


def test_accumulated_batches_equal_one_batch():
    maps, masks = hand_made()
    scores, labels = maps.reshape(3, -1).max(1), (masks.reshape(3, -1).max(1) > 0).astype(int)
    acc = AnomalyMetrics()
    acc.update(scores[:1], labels[:1], maps[:1], masks[:1])
    acc.update(scores[1:], labels[1:], maps[1:], masks[1:])
    whole = {**image_metrics(scores, labels), **pixel_metrics(maps, masks)}
    assert acc.compute() == pytest.approx(whole, abs=1e-15)


def test_undefined_and_bad_inputs():
    maps, masks = hand_made()
    nan = pixel_metrics(maps[2:], masks[2:])  # the defect-free image alone: no positive pixel
    assert all(math.isnan(v) for v in nan.values())
    with pytest.raises(ValueError, match="normal and anomalous"):
        image_metrics([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="non-finite"):
        pixel_metrics(np.where(masks == 1, np.nan, maps), masks)
    with pytest.raises(ValueError, match="0 \\(normal\\) and 1"):
        pixel_metrics(maps, masks * 255)
    acc = AnomalyMetrics()
    acc.update([0.1], [0], maps[:1], masks[:1])
    with pytest.raises(ValueError, match="with maps"):
        acc.update([0.2], [1])
    assert "higher score = more anomalous" in ANOMALY_CONVENTION and "oracle" in ANOMALY_CONVENTION
