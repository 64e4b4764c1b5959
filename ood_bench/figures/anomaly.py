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


def overlay_grid(panels: list[Panel], title: str, vmin: float, vmax: float, n_test: int) -> bytes:
    """A PNG (bytes) with one row per panel: input | ground truth | map (``vmin``..``vmax``) over the input."""
    fig, axes = plt.subplots(len(panels), 3, figsize=(7.5, 2.4 * len(panels)), squeeze=False)
    for row, p in enumerate(panels):
        img = p.image.permute(1, 2, 0).cpu().numpy()
        img = img[..., 0] if img.shape[-1] == 1 else img
        cmap = "gray" if img.ndim == 2 else None
        axes[row, 0].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[row, 0].set_title(f"{p.group}: {p.file}"[-48:], fontsize=7)
        axes[row, 1].imshow(p.mask if p.mask is not None else np.zeros(p.amap.shape), cmap="gray", vmin=0, vmax=1)
        axes[row, 1].set_title("ground truth" if p.mask is not None else "no mask", fontsize=7)
        axes[row, 2].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[row, 2].imshow(p.amap, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
        axes[row, 2].set_title(f"score {p.score:.4g} (rank {p.rank}/{n_test})", fontsize=7)
        for ax in axes[row]:
            ax.set_axis_off()
    fig.suptitle(f"{title}\nrows: best-scored anomalous, missed anomalous, false alarms", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.4 * len(panels))))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    return buf.getvalue()
