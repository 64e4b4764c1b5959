"""Inpainting masks. Convention (score-SDE, diffusers RePaint): 1 = known pixel, 0 = pixel to inpaint."""

from __future__ import annotations

import torch

MASK_TYPES = ("checkerboard_alt", "checkerboard", "checkerboard_inv", "center")


def checkerboard_mask(size: int, num_blocks: int, inverted: bool = False) -> torch.Tensor:
    """``[size, size]`` board of ``num_blocks`` x ``num_blocks`` blocks, as LMD's ``get_checkerboard_mask``.

    Normal board: block (i, j) is known when i + j is even; the inverted board swaps known and unknown.
    """
    if num_blocks < 2 or size % num_blocks:
        raise ValueError(f"method.num_blocks={num_blocks} must be >= 2 and divide data.image_size={size}")
    grid = torch.ones(num_blocks, num_blocks)
    if inverted:
        grid[::2, ::2] = 0
        grid[1::2, 1::2] = 0
    else:
        grid[1::2, ::2] = 0
        grid[::2, 1::2] = 0
    block = size // num_blocks
    return grid.repeat_interleave(block, 0).repeat_interleave(block, 1)


def lmd_mask(kind: str, size: int, num_blocks: int, rep: int) -> torch.Tensor:
    """The mask LMD uses in repeat ``rep``; ``checkerboard_alt`` alternates normal (even) and inverted (odd)."""
    if kind == "checkerboard_alt":
        return checkerboard_mask(size, num_blocks, inverted=rep % 2 == 1)
    if kind == "checkerboard":
        return checkerboard_mask(size, num_blocks)
    if kind == "checkerboard_inv":
        return checkerboard_mask(size, num_blocks, inverted=True)
    if kind == "center":
        m = torch.ones(size, size)
        q = size // 4
        m[q : size - q, q : size - q] = 0
        return m
    raise ValueError(f"mask={kind!r} is not valid; valid: {list(MASK_TYPES)}")
