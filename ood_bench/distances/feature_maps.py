"""Per-pixel differences and patch features in ImageNet AlexNet feature space (LPIPS-style).

Built on the suite's LPIPS (``ood_bench.distances.lpips``: ImageNet AlexNet features from ``$OOD_BENCH_WEIGHTS``,
the ``lpips`` wheel's linear heads): the five ReLU outputs (relu1..relu5, 1-based layer numbers below) are
unit-normalised over channels as LPIPS does (``normalise="unit"``; ``"none"`` keeps the raw ReLUs). ``diff_map`` is
LPIPS with ``spatial=True`` restricted to chosen layers: per layer the squared difference of the (normalised)
features, weighted over channels by LPIPS' learned heads (``weighting="lpips"``; they were trained on normalised
features) or averaged (``"uniform"``), upsampled (bilinear) to the image size and averaged over the layers.
``patch_features`` resizes the chosen (normalised) layers to one grid and concatenates them (the prototype features
of AnomalySD's prototype-guided mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ood_bench.distances.lpips import LPIPSDistance

WEIGHTINGS = ("lpips", "uniform")
# unit: each pixel's feature vector divided by its norm over channels (LPIPS); none: the raw ReLU outputs
NORMALISATIONS = ("unit", "none")
N_LAYERS = 5


def check_layers(key: str, layers: Sequence[int]) -> tuple[int, ...]:
    """1-based AlexNet ReLU indices, unique and sorted; a clear error otherwise."""
    if not layers or any(not isinstance(i, int) or isinstance(i, bool) or not 1 <= i <= N_LAYERS for i in layers):
        raise ValueError(f"method.{key}={list(layers)!r} is not valid; use AlexNet ReLU numbers from 1 to {N_LAYERS}")
    return tuple(sorted(set(layers)))


class AlexFeatureMaps:
    """Spatial AlexNet features and LPIPS-style difference maps for images in ``[0, 1]``."""

    def __init__(
        self, weights: str = "auto", weights_dir: str | Path | None = None, input_size: int | None = None
    ) -> None:
        self.lpips = LPIPSDistance(net="alex", weights=weights, weights_dir=weights_dir)
        self.model = self.lpips.model
        self.input_size = input_size

    def to(self, device: torch.device) -> AlexFeatureMaps:
        self.model.to(device)
        return self

    def describe(self) -> str:
        size = f"@{self.input_size}px" if self.input_size else ""
        return f"alexnet{size}({self.lpips.weights_source})"

    @torch.no_grad()
    def features(self, x: torch.Tensor, normalise: str = "unit") -> list[torch.Tensor]:
        """The five ReLU maps of ``x`` (``[N, 1|3, H, W]`` in ``[0, 1]``), channel-normalised unless ``"none"``."""
        if normalise not in NORMALISATIONS:
            raise ValueError(f"method.diff_normalise={normalise!r} is not valid; valid: {list(NORMALISATIONS)}")
        import lpips

        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        outs = self.model.net(self.model.scaling_layer(2 * x - 1))
        return [lpips.normalize_tensor(o) for o in outs] if normalise == "unit" else list(outs)

    @torch.no_grad()
    def diff_map(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        layers: Sequence[int] = (1, 2, 3, 4, 5),
        weighting: str = "lpips",
        fx: list[torch.Tensor] | None = None,
        normalise: str = "unit",
    ) -> torch.Tensor:
        """``[N, H, W]`` difference of ``x`` and ``y`` at the resolution of ``x`` (``fx``: ``x``'s features, computed
        with the same ``normalise``)."""
        if weighting not in WEIGHTINGS:
            raise ValueError(f"method.diff_weighting={weighting!r} is not valid; valid: {list(WEIGHTINGS)}")
        fx = self.features(x, normalise) if fx is None else fx
        fy = self.features(y, normalise)
        out = torch.zeros(x.shape[0], 1, *x.shape[-2:], device=x.device)
        for layer in layers:
            d = (fx[layer - 1] - fy[layer - 1]) ** 2
            d = self.model.lins[layer - 1](d) if weighting == "lpips" else d.mean(1, keepdim=True)
            out += F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out[:, 0] / len(layers)

    @torch.no_grad()
    def patch_features(self, x: torch.Tensor, layers: Sequence[int], grid: int) -> torch.Tensor:
        """``[N, grid*grid, C]``: the chosen layers resized (bilinear) to ``grid x grid`` and concatenated."""
        feats = self.features(x)
        maps = [F.interpolate(feats[i - 1], size=(grid, grid), mode="bilinear", align_corners=False) for i in layers]
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)


def nearest_prototype_distance(patches: torch.Tensor, prototypes: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance of every patch ``[N, P, C]`` to its nearest prototype ``[M, C]`` -> ``[N, P]``."""
    n, p, c = patches.shape
    flat = patches.reshape(-1, c)
    out = torch.empty(flat.shape[0], device=flat.device)
    for s in range(0, flat.shape[0], chunk):
        out[s : s + chunk] = torch.cdist(flat[s : s + chunk].double(), prototypes.double()).min(1).values.float()
    return out.view(n, p)
