"""Distance registry: ``mse``, ``l1``, ``ssim`` (1 - SSIM), ``lpips`` (alex, vgg or squeeze) and ``dists``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class Distance:
    """Per-sample distance between two image batches in ``[0, 1]``; ``describe`` says what really runs."""

    name = "base"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device) -> Distance:
        return self

    def describe(self) -> str:
        return self.name

    def describe_for(self, size: int) -> str:
        """What runs on ``size``-px images (a distance may resize them)."""
        return self.describe()


class MSE(Distance):
    name = "mse"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).pow(2).flatten(1).mean(1)


class L1(Distance):
    """Mean absolute difference per image."""

    name = "l1"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().flatten(1).mean(1)


class SSIMDistance(Distance):
    """``1 - SSIM`` (scikit-image, ``data_range=1``, Gaussian-free 7x7 window as in LMD's code)."""

    name = "ssim"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from skimage.metrics import structural_similarity

        xs = x.detach().cpu().numpy().transpose(0, 2, 3, 1)
        ys = y.detach().cpu().numpy().transpose(0, 2, 3, 1)
        win = min(7, xs.shape[1] - (1 - xs.shape[1] % 2))
        vals = [
            1.0 - structural_similarity(a, b, data_range=1.0, channel_axis=-1, win_size=win) for a, b in zip(xs, ys)
        ]
        return torch.as_tensor(np.asarray(vals), dtype=torch.float32, device=x.device)


DISTANCES = ("lpips", "mse", "ssim")  # LMD's choices
IMAGE_DISTANCES = (*DISTANCES, "l1", "dists")  # everything build_distance makes


def build_distance(
    name: str, *, lpips_net: str = "alex", lpips_weights: str = "auto", weights_dir: str | Path | None = None
) -> Distance:
    """The distance called ``name``; LPIPS and DISTS need ImageNet VGG/AlexNet weights (``distances/lpips.py``,
    ``distances/dists.py``)."""
    if name == "mse":
        return MSE()
    if name == "l1":
        return L1()
    if name == "dists":
        from ood_bench.distances.dists import DISTSDistance

        return DISTSDistance(weights_dir=weights_dir)
    if name == "ssim":
        return SSIMDistance()
    if name == "lpips":
        from ood_bench.distances.lpips import LPIPSDistance

        return LPIPSDistance(net=lpips_net, weights=lpips_weights, weights_dir=weights_dir)
    raise ValueError(f"distance={name!r} is not valid; valid: {list(IMAGE_DISTANCES)}")
