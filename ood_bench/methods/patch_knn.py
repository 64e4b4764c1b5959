"""patch_knn — a PatchCore-style nearest-neighbour reference for few-shot anomaly detection (no diffusion).

After PatchCore (Roth et al., CVPR 2022). Fit: a frozen ImageNet CNN taps chosen layers of the k normal shots (default
AlexNet relu2 + relu3, the ImageNet weights available offline); every map is averaged over a 3 x 3 neighbourhood
(PatchCore's locally aware patch features), the deeper maps are upsampled (bilinear) to the first map's grid and
concatenated: each grid position is one patch feature, and all patches of all shots form the memory bank. Score: the
Euclidean distance of every test patch to its nearest bank patch; the patch map is upsampled (bilinear) to the image
size and smoothed with a Gaussian (sigma 4 px, ``scipy.ndimage.gaussian_filter``, as the PatchCore code does); the
image score is the maximum of the map (or the mean of its top ``topk_fraction``).

Deviations from PatchCore, by design for a few-shot reference: no coreset subsampling and no random projection (the
bank holds at most a few thousand patches at k <= 16, so the search is exact), no re-weighting of the image score by
the neighbours' density, AlexNet instead of WideResNet-50, images at ``data.image_size``. In multi-class mode the bank
holds the shots of every category; labels are never used to score.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from ood_bench.costs import phase
from ood_bench.methods.base import Context, Method, Scores, check_choice, check_int, register
from ood_bench.models.encoders import FeatureEncoder, check_encoder_name
from ood_bench.utils import PRECISIONS, autocast, check_precision

log = logging.getLogger(__name__)

IMAGE_SCORES = ("max", "topk_mean")


@register("patch_knn")
class PatchKNN(Method):
    """Nearest-neighbour distance of patch features to the shots' patches: a map and an image score."""

    tasks = ("anomaly",)
    runtime_keys = ("batch_size", "weights_dir")

    def __init__(
        self,
        encoder: str = "alexnet",
        encoder_weights: str = "auto",
        layers: list[str] | None = None,
        local_pool: int = 3,
        sigma: float = 4.0,
        image_score: str = "max",
        topk_fraction: float = 0.01,
        precision: str = "fp32",
        batch_size: int = 16,
        weights_dir: str | None = None,
    ) -> None:
        check_encoder_name(encoder)
        check_int("local_pool", local_pool)
        if local_pool % 2 == 0:
            raise ValueError(f"method.local_pool={local_pool} is not valid; use an odd size (1 = no pooling)")
        if not isinstance(sigma, int | float) or sigma < 0:
            raise ValueError(f"method.sigma={sigma!r} is not valid; use a number >= 0 (0 = no smoothing)")
        check_choice("image_score", image_score, IMAGE_SCORES)
        if not 0.0 < topk_fraction <= 1.0:
            raise ValueError(f"method.topk_fraction={topk_fraction!r} is not valid; use a fraction in (0, 1]")
        check_int("batch_size", batch_size)
        check_choice("precision", precision, PRECISIONS)
        self.encoder_name, self.encoder_weights = encoder, encoder_weights
        self.layers = list(layers) if layers else ["features.4", "features.7"]
        self.local_pool, self.sigma = int(local_pool), float(sigma)
        self.image_score, self.topk_fraction = image_score, float(topk_fraction)
        self.batch_size, self.weights_dir, self.precision = batch_size, weights_dir, precision
        self.encoder: FeatureEncoder | None = None
        self.bank: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None

    def _encoder(self, size: int, device: torch.device | str = "cpu") -> FeatureEncoder:
        if self.encoder is None or self.encoder.input_size != size:
            self.encoder = FeatureEncoder(
                self.encoder_name, self.layers, self.encoder_weights, self.weights_dir, input_size=size, stride=None
            )
        return self.encoder.to(device)

    def check(self, image_size: int, channels: int, model_cfg: dict[str, Any] | None) -> None:
        """Build the encoder at the data's size: unknown layers, missing weights or too small images fail now."""
        try:
            enc = self._encoder(image_size)
            with torch.no_grad():
                enc.feature_maps(torch.zeros(1, channels, image_size, image_size))
        except RuntimeError as err:  # a map shrinks to nothing before the last tapped layer
            raise ValueError(
                f"data.image_size={image_size} is too small for method.layers={self.layers} of "
                f"{self.encoder_name} ({err}); use a larger image size (e.g. 64) or earlier layers"
            ) from err

    @torch.no_grad()
    def _embed(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Patch features ``[N, D, h, w]`` on the first tapped layer's grid (float32; the encoder at ``precision``)."""
        with autocast(device, self.precision), phase("features"):
            maps = self._encoder(images.shape[-1], device).feature_maps(images.to(device))
        if self.local_pool > 1:
            maps = [F.avg_pool2d(m, self.local_pool, stride=1, padding=self.local_pool // 2) for m in maps]
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear") for m in maps]
        return torch.cat(maps, dim=1)

    def fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None = None) -> None:
        check_precision(self.precision, ctx.device)
        bs = self.batch_size
        emb = torch.cat([self._embed(id_train[i : i + bs], ctx.device) for i in range(0, len(id_train), bs)])
        self.grid = tuple(emb.shape[-2:])
        self.bank = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).contiguous()
        log.info("patch_knn: memory bank of %d patches x %d features (%d shots)", *self.bank.shape, len(id_train))

    @torch.no_grad()
    def _nearest(self, query: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of every query row to its nearest bank row (``|q|^2 + |b|^2 - 2 q.b``, clamped)."""
        bank = self.bank.to(query.device)
        d2 = query.pow(2).sum(1, keepdim=True) + bank.pow(2).sum(1)[None] - 2.0 * query @ bank.T
        return d2.min(dim=1).values.clamp_min_(0).sqrt_()

    def score(
        self,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> Scores:
        if self.bank is None:
            raise RuntimeError("patch_knn: call fit() before score()")
        h, w = images.shape[-2:]
        maps = np.zeros((len(images), h, w), dtype=np.float32)
        for i in range(0, len(images), self.batch_size):
            emb = self._embed(images[i : i + self.batch_size], ctx.device)
            b, d, gh, gw = emb.shape
            dist = self._nearest(emb.permute(0, 2, 3, 1).reshape(-1, d)).view(b, 1, gh, gw)
            up = F.interpolate(dist, size=(h, w), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
            for j, m in enumerate(up):
                maps[i + j] = gaussian_filter(m, sigma=self.sigma, mode="reflect") if self.sigma > 0 else m
        flat = maps.reshape(len(maps), -1).astype(np.float64)
        if self.image_score == "max":
            values = flat.max(axis=1)
        else:
            k = max(1, int(round(self.topk_fraction * flat.shape[1])))
            values = np.sort(flat, axis=1)[:, -k:].mean(axis=1)
        return Scores(values, maps=maps, nfe_per_image=0.0)

    def describe(self) -> dict[str, Any]:
        enc = self.encoder
        return {
            "encoder": self.encoder_name,
            "encoder_weights": enc.weights_id if enc is not None else self.encoder_weights,
            "layers": ",".join(self.layers),
            "input_size": enc.input_size if enc is not None else "",
            "feature_dim": int(self.bank.shape[1]) if self.bank is not None else "",
            "grid": "x".join(map(str, self.grid)) if self.grid else "",
            "bank_size": int(self.bank.shape[0]) if self.bank is not None else "",
            "local_pool": self.local_pool,
            "sigma": self.sigma,
            "image_score": self.image_score,
            "topk_fraction": self.topk_fraction,
            "precision": self.precision,
        }
