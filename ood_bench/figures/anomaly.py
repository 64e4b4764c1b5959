"""Anomaly-detection figures: input, ground-truth mask and anomaly-map overlay of the best- and worst-scored images.

Rows, top to bottom: the ``n`` highest-scored anomalous images (best found), the ``n`` lowest-scored anomalous images
(worst: missed) and the ``n`` highest-scored normal images (worst: false alarms). The colour scale of the maps is
shared by all rows (the category's minimum to maximum map value), so rows can be compared.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib.pyplot as plt  # the package's __init__ has selected the Agg backend
import numpy as np
import torch


def pick_rows(scores: np.ndarray, labels: np.ndarray, n: int) -> list[tuple[str, int]]:
    """``(group, index)`` of the best- and worst-scored images: best anomalous, missed anomalous, false alarms."""
    order = np.argsort(-scores, kind="stable")  # highest first
    anomalous = [int(i) for i in order if labels[i] == 1]
    normal = [int(i) for i in order if labels[i] == 0]
    best = anomalous[:n]
    missed = [i for i in anomalous[::-1][:n] if i not in best]
    return [("best", i) for i in best] + [("missed", i) for i in missed] + [("false alarm", i) for i in normal[:n]]


@dataclass
class Panel:
    """One row of the grid: an image of the test set, its mask (None without masks) and its map."""

    group: str
    image: torch.Tensor  # [C, H, W] in [0, 1]
    mask: np.ndarray | None
    amap: np.ndarray
    score: float
    rank: int  # 1 = highest score of the test set
    file: str


def _rgb(x: np.ndarray) -> np.ndarray:
    """``[H, W]`` or ``[H, W, 1|3]`` in [0, 1] to ``[H, W, 3]``."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3 and x.shape[-1] == 3:
        return x
    x = x[..., 0] if x.ndim == 3 else x
    return np.repeat(x[..., None], 3, axis=-1)


def overlay_grid(panels: list[Panel], title: str, vmin: float, vmax: float, n_test: int) -> bytes:
    """A PNG (bytes) with one row per panel: input | ground truth | map (``vmin``..``vmax``, jet) over the input.

    The grid is composed as one image and drawn on one axis (fast: one figure per category and run)."""
    jet = plt.get_cmap("jet")
    tiles = []
    for p in panels:
        img = _rgb(p.image.permute(1, 2, 0).cpu().numpy())
        mask = _rgb(p.mask if p.mask is not None else np.zeros(p.amap.shape))
        heat = jet(np.clip((p.amap - vmin) / max(vmax - vmin, 1e-12), 0, 1))[..., :3]
        gap = np.ones((img.shape[0], 2, 3), dtype=np.float32)
        tiles.append(np.concatenate([img, gap, mask, gap, 0.55 * img + 0.45 * heat], axis=1))
    h, w = tiles[0].shape[:2]
    sep = np.ones((h // 6, w, 3), dtype=np.float32)  # room for the row's caption
    grid = np.concatenate([x for t in tiles for x in (sep, t)], axis=0)
    fig = plt.figure(figsize=(7.5, 7.5 * grid.shape[0] / grid.shape[1] + 0.5))
    ax = fig.add_axes((0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    ax.imshow(np.clip(grid, 0, 1), interpolation="nearest")
    ax.set_axis_off()
    for r, p in enumerate(panels):
        y = r * (h + sep.shape[0]) + sep.shape[0] - 2
        mask_note = "ground truth" if p.mask is not None else "no mask"
        caption = f"{p.group}: {p.file}  |  {mask_note}  |  score {p.score:.4g} (rank {p.rank}/{n_test})"
        ax.text(2, y, caption, fontsize=7, va="bottom")
    fig.suptitle(f"{title}\nrows: best-scored anomalous, missed anomalous, false alarms", fontsize=8, y=0.998)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
