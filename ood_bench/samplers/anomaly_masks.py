"""AnomalySD's masks: multi-scale grid masks, prototype-guided masks and foreground-based training masks.

Convention as everywhere in the suite: **1 = known pixel, 0 = pixel to inpaint** (the SD UNet's mask channel has
the opposite polarity; ``ood_bench.samplers.sd_inpaint`` flips it where the UNet input is built).

Grid masks at scale ``k`` split the image into ``k x k`` cells and group the cells into masks so that every pixel
is inpainted by exactly one mask of the scale:

* ``checkerboard``: 2 masks (cells with ``i + j`` even, then odd);
* ``quad``: 4 masks (cells with ``(i mod 2, j mod 2) = (a, b)``): each mask hides a quarter, so more context is kept;
* ``cells``: ``k^2`` masks of one cell each (the paper's "M_{i,j}" read literally; GPU-sized).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

GRID_LAYOUTS = ("checkerboard", "quad", "cells")


def masks_per_scale(layout: str, cells: int) -> int:
    """How many masks one scale has (each pixel is inpainted by exactly one of them)."""
    return {"checkerboard": 2, "quad": 4, "cells": cells * cells}[layout]


def check_grid(size: int, scales: list[int], layout: str, cell_multiple: int = 1) -> None:
    """Every scale divides the image into whole cells of a multiple of ``cell_multiple`` pixels (latent cells)."""
    if layout not in GRID_LAYOUTS:
        raise ValueError(f"method.mask_layout={layout!r} is not valid; valid: {list(GRID_LAYOUTS)}")
    if not scales:
        raise ValueError("method.mask_scales is empty; give at least one grid size, e.g. [4, 8]")
    for k in scales:
        if not isinstance(k, int) or isinstance(k, bool) or k < 2 or size % k or (size // k) % cell_multiple:
            raise ValueError(
                f"method.mask_scales: {k!r} is not valid for {size}-px images; a scale k must be an integer >= 2 "
                f"that divides the image into k x k cells of a multiple of {cell_multiple} px (the latent cell)"
            )
        if layout == "quad" and k % 2:
            raise ValueError(f"method.mask_scales: {k} is odd; the quad layout needs even grid sizes")


def grid_masks(size: int, cells: int, layout: str) -> torch.Tensor:
    """``[G, size, size]`` float masks (1 = known) of one scale; their holes partition the image."""
    check_grid(size, [cells], layout)
    i, j = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
    if layout == "checkerboard":
        group = (i + j) % 2
    elif layout == "quad":
        group = (i % 2) * 2 + (j % 2)
    else:
        group = i * cells + j
    n = masks_per_scale(layout, cells)
    holes = torch.stack([(group == g).float() for g in range(n)])  # [G, cells, cells], 1 = hole
    block = size // cells
    holes = holes.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return 1.0 - holes


def top_fraction_mask(score: torch.Tensor, ratio: float, dilate: int = 0) -> torch.Tensor:
    """Known-mask ``[N, h, w]`` hiding the ``ratio`` share of cells with the highest ``score`` (``[N, h, w]``).

    Exactly ``max(1, round(ratio * h * w))`` cells per sample are hidden (ties broken by position), then the holes
    are dilated by ``dilate`` cells (a square structuring element).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"method.pg_ratio={ratio} is not valid; valid: 0 < pg_ratio <= 1")
    n, h, w = score.shape
    count = max(1, round(ratio * h * w))
    flat = score.reshape(n, -1).float()
    top = torch.topk(flat, count, dim=1, sorted=False).indices
    holes = torch.zeros_like(flat).scatter_(1, top, 1.0).view(n, 1, h, w)
    if dilate > 0:
        holes = F.max_pool2d(holes, 2 * dilate + 1, stride=1, padding=dilate)
    return 1.0 - holes[:, 0]


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest upsampling of ``[..., h, w]`` masks by an integer factor (latent cells -> pixels)."""
    return mask.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def foreground_mask(image: torch.Tensor, min_fraction: float = 0.15) -> torch.Tensor:
    """Bool ``[H, W]`` foreground of one image ``[C, H, W]`` in ``[0, 1]``: pixels that differ from the border.

    The grey image's absolute difference from the median border value is thresholded with Otsu's method. When
    that leaves less than ``min_fraction`` of the image (a texture or a part that fills the frame, whose border is
    object too), the whole image counts as foreground.
    """
    from scipy.ndimage import binary_closing, binary_opening
    from skimage.filters import threshold_otsu

    grey = image.float().mean(0).cpu().numpy()
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    diff = np.abs(grey - np.median(border))
    if np.ptp(diff) < 1e-6:
        return torch.ones(grey.shape, dtype=torch.bool)
    fg = diff > threshold_otsu(diff)
    fg = binary_opening(binary_closing(fg, iterations=2), iterations=1)
    if fg.mean() < min_fraction:
        return torch.ones(grey.shape, dtype=torch.bool)
    return torch.from_numpy(fg)


def random_train_mask(
    gen: torch.Generator,
    fg: torch.Tensor,
    grid: torch.Tensor,
    grid_prob: float,
    full_prob: float,
    max_boxes: int,
    box_range: tuple[float, float],
) -> torch.Tensor:
    """One training mask on the latent grid (``[h, w]``, 1 = known), drawn with ``gen``.

    With probability ``full_prob`` everything is hidden, with ``grid_prob`` one of the inference grid masks
    (``grid``: ``[G, h, w]``) is used, otherwise 1..``max_boxes`` rectangles with sides in ``box_range`` (fractions
    of the side) are centred on foreground cells ``fg`` (bool ``[h, w]``): the paper's foreground-based masks.
    """
    h, w = fg.shape
    u = float(torch.rand((), generator=gen))
    if u < full_prob:
        return torch.zeros(h, w)
    if u < full_prob + grid_prob and len(grid):
        return grid[int(torch.randint(len(grid), (), generator=gen))].clone()
    mask = torch.ones(h, w)
    ys, xs = torch.nonzero(fg, as_tuple=True)
    if len(ys) == 0:
        ys, xs = torch.nonzero(torch.ones(h, w, dtype=torch.bool), as_tuple=True)
    for _ in range(int(torch.randint(1, max_boxes + 1, (), generator=gen))):
        c = int(torch.randint(len(ys), (), generator=gen))
        bh, bw = (
            max(1, round(float(box_range[0] + (box_range[1] - box_range[0]) * torch.rand((), generator=gen)) * s))
            for s in (h, w)
        )
        y0, x0 = int(ys[c]) - bh // 2, int(xs[c]) - bw // 2
        mask[max(0, y0) : max(0, y0 + bh), max(0, x0) : max(0, x0 + bw)] = 0
    return mask
