"""Short sampling loops on diffusers schedulers (inpainting; later DDIM inversion and guided synthesis)."""

from ood_bench.samplers.inpaint import SAMPLERS, inpaint
from ood_bench.samplers.masks import MASK_TYPES, checkerboard_mask, lmd_mask

__all__ = ["MASK_TYPES", "SAMPLERS", "checkerboard_mask", "inpaint", "lmd_mask"]
