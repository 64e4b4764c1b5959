"""patch_knn — a nearest-neighbour patch reference for few-shot anomaly detection (no diffusion, no training).

After PatchCore (Roth et al., CVPR 2022) and AnomalyDINO (Damm et al., WACV 2025). Fit: a frozen encoder taps chosen
layers of the k normal shots (optionally augmented: ``shot_augment``); every map is averaged over a
``local_pool`` x ``local_pool`` neighbourhood (PatchCore's locally aware patch features), the deeper maps are
upsampled (bilinear) to the first map's grid and concatenated: each grid position is one patch feature, and all patches
of all (augmented) shots form the memory bank. Score: the distance (``distance``: Euclidean, or cosine = 1 - cosine
similarity as AnomalyDINO) of every test patch to its nearest bank patch; optionally the background patches of a test
image (``foreground_mask=pca``, AnomalyDINO's masking) get distance 0. The patch map is upsampled (bilinear) to the
image size and smoothed with a Gaussian (sigma 4 px, ``scipy.ndimage.gaussian_filter``, as PatchCore and AnomalyDINO);
the image score is the maximum or the mean of the top ``topk_fraction`` (``image_score``) of the smoothed map or of the
patch distances (``image_score_on``; AnomalyDINO: mean of the top 1 % patch distances).

``shot_augment``: ``none``; ``rot90`` (the shot rotated by 0, 90, 180, 270 degrees: exact, 4 images per shot);
``flips_rot90`` (those four and the four of the horizontally flipped shot: the 8 symmetries of the square);
``rotations`` (AnomalyDINO's: 0, 45, ..., 315 degrees about the image centre, bilinear, borders reflected without
repeating the edge pixel as OpenCV's default border: 8 images per shot).

``foreground_mask=pca`` (AnomalyDINO's ``compute_background_mask``, applied to test images only as its default
``mask_ref_images=False``): the first principal component of the test image's own patch features (centred; sign as
scikit-learn's PCA: the component's largest-magnitude entry positive), thresholded at ``mask_threshold``
(AnomalyDINO: 10, on DINOv2 features); if at most 35 % of the central crop (20 % border cut off each side) is kept,
the sign is flipped; then a 3 x 3 dilation and a 3 x 3 closing of the mask as AnomalyDINO applies them: to the
``[h*w, 1]`` column of patches, i.e. along the raster order only (OpenCV's border semantics: the border neither grows
nor erodes the mask).

Deviations from PatchCore, by design for a few-shot reference: no coreset subsampling and no random projection (the
bank holds at most tens of thousands of patches at k <= 16, so the search is exact), no re-weighting of the image
score by the neighbours' density, ImageNet AlexNet / VGG16 instead of WideResNet-50, images at ``data.image_size``.
In multi-class mode the bank holds the shots of every category; labels are never used to score.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter

from ood_bench.costs import phase
from ood_bench.methods.base import Context, Method, Scores, check_choice, check_int, register
from ood_bench.models.dinov2 import DINO_MODELS, DinoPatchEncoder, is_dino
from ood_bench.models.encoders import FeatureEncoder, check_encoder_name
from ood_bench.utils import PRECISIONS, autocast, check_precision

log = logging.getLogger(__name__)

IMAGE_SCORES = ("max", "topk_mean")
MATRIX_BYTES = 1 << 30  # largest query x bank distance matrix computed in one product
IMAGE_SCORE_ON = ("map", "patches")
DISTANCES = ("l2", "cosine")
SHOT_AUGMENTS = ("none", "rot90", "flips_rot90", "rotations")
FOREGROUND_MASKS = ("none", "pca")
ROTATION_ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)  # AnomalyDINO's augment_image


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate ``[N,C,H,W]`` counter-clockwise (as displayed) about the centre: bilinear, reflected borders.

    ``align_corners=True`` puts -1 and 1 on the outer pixel centres, so the reflection does not repeat the edge pixel
    (OpenCV's ``BORDER_REFLECT_101``, the default border of AnomalyDINO's ``cv2.warpAffine``).
    """
    if degrees % 360 == 0:
        return images.clone()
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    n, _, h, w = images.shape
    # output pixel (x, y) samples the input at R(-t) (x, y) about the centre (y points down)
    ry = (h - 1) / (w - 1)  # normalised y per normalised x, in pixel units (align_corners=True)
    theta = torch.tensor([[c, -s * ry, 0.0], [s / ry, c, 0.0]], dtype=torch.float32)
    theta = theta.to(images.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=True)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def augment_shots(images: torch.Tensor, mode: str) -> torch.Tensor:
    """The shots and their ``mode`` augmentations, ``[N * A, C, H, W]`` (all views of shot 0 first)."""
    check_choice("shot_augment", mode, SHOT_AUGMENTS)
    if mode == "none":
        return images
    if mode in ("rot90", "flips_rot90"):
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"shot_augment={mode} needs square images, got {tuple(images.shape[-2:])}")
        bases = [images] if mode == "rot90" else [images, images.flip(-1)]
        views = [torch.rot90(b, k, dims=(-2, -1)) for b in bases for k in range(4)]
    else:
        views = [rotate(images, a) for a in ROTATION_ANGLES]
    return torch.stack(views, dim=1).flatten(0, 1)


def pca_foreground(features: torch.Tensor, threshold: float, border: float = 0.2, kernel: int = 3) -> np.ndarray:
    """AnomalyDINO's background mask of one image from its patch features ``[D, h, w]``: True = foreground."""
    d, h, w = features.shape
    x = features.reshape(d, -1).T.double()
    x = x - x.mean(0, keepdim=True)
    _, _, vt = torch.linalg.svd(x, full_matrices=False)
    v = vt[0]
    v = v * torch.sign(v[v.abs().argmax()])  # scikit-learn's svd_flip (v-based)
    pc = (x @ v).reshape(h, w).cpu().numpy()
    mask = pc > threshold
    centre = mask[int(h * border) : int(h * (1 - border)), int(w * border) : int(w * (1 - border))]
    if centre.sum() <= centre.size * 0.35:
        mask = -pc > threshold
    # AnomalyDINO runs cv2.dilate / MORPH_CLOSE on the [h*w, 1] column of the first component, not on the grid: the
    # 3 x 3 kernel acts along the raster order only (a patch grows into its left and right neighbours, wrapping from a
    # row's end to the next row's start). Same here, with OpenCV's borders (they neither grow nor erode the mask).
    flat, se = mask.reshape(-1), np.ones(kernel, dtype=bool)
    flat = binary_dilation(flat, se)
    flat = binary_erosion(binary_dilation(flat, se), se, border_value=1)  # closing
    return flat.reshape(h, w)


def top_mean(values: np.ndarray, fraction: float) -> np.ndarray:
    """Mean of the top ``int(fraction * n)`` values of each row (at least 1: AnomalyDINO's ``mean_top1p``)."""
    k = max(1, int(fraction * values.shape[1]))
    return np.sort(values, axis=1)[:, -k:].mean(axis=1)


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
        input_size: int | None = None,
        local_pool: int = 3,
        sigma: float = 4.0,
        distance: str = "cosine",
        image_score: str = "topk_mean",
        topk_fraction: float = 0.01,
        image_score_on: str = "map",
        shot_augment: str = "flips_rot90",
        foreground_mask: str = "none",
        mask_threshold: float = 10.0,
        precision: str = "fp32",
        batch_size: int = 16,
        weights_dir: str | None = None,
    ) -> None:
        if not is_dino(encoder):
            try:
                check_encoder_name(encoder)
            except ValueError as err:
                raise ValueError(f"{err}; or a DINOv2 model: {sorted(DINO_MODELS)}") from err
        if input_size is not None:
            check_int("input_size", input_size, low=16)
        check_int("local_pool", local_pool)
        if local_pool % 2 == 0:
            raise ValueError(f"method.local_pool={local_pool} is not valid; use an odd size (1 = no pooling)")
        if not isinstance(sigma, int | float) or sigma < 0:
            raise ValueError(f"method.sigma={sigma!r} is not valid; use a number >= 0 (0 = no smoothing)")
        check_choice("distance", distance, DISTANCES)
        check_choice("image_score", image_score, IMAGE_SCORES)
        check_choice("image_score_on", image_score_on, IMAGE_SCORE_ON)
        check_choice("shot_augment", shot_augment, SHOT_AUGMENTS)
        check_choice("foreground_mask", foreground_mask, FOREGROUND_MASKS)
        if not 0.0 < topk_fraction <= 1.0:
            raise ValueError(f"method.topk_fraction={topk_fraction!r} is not valid; use a fraction in (0, 1]")
        if not isinstance(mask_threshold, int | float):
            raise ValueError(f"method.mask_threshold={mask_threshold!r} is not valid; use a number")
        check_int("batch_size", batch_size)
        check_choice("precision", precision, PRECISIONS)
        self.encoder_name, self.encoder_weights = encoder, encoder_weights
        self.layers = list(layers) if layers else (["norm"] if is_dino(encoder) else ["features.4", "features.7"])
        self.input_size = input_size
        self.local_pool, self.sigma = int(local_pool), float(sigma)
        self.distance = distance
        self.image_score, self.topk_fraction, self.image_score_on = image_score, float(topk_fraction), image_score_on
        self.shot_augment = shot_augment
        self.foreground_mask, self.mask_threshold = foreground_mask, float(mask_threshold)
        self.batch_size, self.weights_dir, self.precision = batch_size, weights_dir, precision
        self.encoder: FeatureEncoder | DinoPatchEncoder | None = None
        self.bank: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self.n_views = 0

    def _input_size(self, image_size: int) -> int:
        """The encoder's input side: ``input_size``, else the image size (DINOv2: down to a multiple of 14)."""
        size = self.input_size or image_size
        if is_dino(self.encoder_name):
            patch = DINO_MODELS[self.encoder_name].patch
            if self.input_size is not None and size % patch:
                raise ValueError(
                    f"method.input_size={size} is not valid for {self.encoder_name}; use a multiple of {patch} "
                    f"(e.g. {size // patch * patch} or {(size // patch + 1) * patch}) or null"
                )
            size = max(patch, size // patch * patch)
        return size

    def _encoder(self, image_size: int, device: torch.device | str = "cpu") -> FeatureEncoder | DinoPatchEncoder:
        size = self._input_size(image_size)
        if self.encoder is None or self.encoder.input_size != size:
            if is_dino(self.encoder_name):
                self.encoder = DinoPatchEncoder(
                    self.encoder_name, self.layers, self.encoder_weights, self.weights_dir, input_size=size
                )
            else:
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
        return torch.cat([m.float() for m in maps], dim=1)

    def fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None = None) -> None:
        check_precision(self.precision, ctx.device)
        shots = augment_shots(id_train, self.shot_augment)
        self.n_views = len(shots) // max(1, len(id_train))
        bs = self.batch_size
        emb = torch.cat([self._embed(shots[i : i + bs], ctx.device) for i in range(0, len(shots), bs)])
        self.grid = tuple(emb.shape[-2:])
        bank = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        if self.distance == "cosine":
            bank = F.normalize(bank, dim=1)
        self.bank = bank.contiguous()
        log.info(
            "patch_knn: memory bank of %d patches x %d features (%d shots x %d views)",
            *self.bank.shape,
            len(id_train),
            self.n_views,
        )

    @torch.no_grad()
    def _nearest(self, query: torch.Tensor) -> torch.Tensor:
        """Distance of every query row to its nearest bank row: Euclidean (``|q|^2 + |b|^2 - 2 q.b``, clamped) or
        cosine (``1 - q.b / (|q| |b|)``, the bank already unit-norm). Query rows go in chunks whose distance matrix
        stays under ``MATRIX_BYTES`` (at 512 px, 15 shots x 8 views, one batch's full matrix is 30 GB); sizes
        under it take one product, as before."""
        bank = self.bank.to(query.device)
        rows = max(1, MATRIX_BYTES // (4 * max(1, bank.shape[0])))
        if query.shape[0] > rows:
            return torch.cat([self._nearest(query[s : s + rows]) for s in range(0, query.shape[0], rows)])
        if self.distance == "cosine":
            return (1.0 - F.normalize(query, dim=1) @ bank.T).min(dim=1).values.clamp_min_(0)
        d2 = query.pow(2).sum(1, keepdim=True) + bank.pow(2).sum(1)[None] - 2.0 * query @ bank.T
        return d2.min(dim=1).values.clamp_min_(0).sqrt_()

    def patch_distances(self, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Nearest-bank distance of every patch ``[N, h, w]`` (background 0 under ``foreground_mask=pca``)."""
        emb = self._embed(images, torch.device(device))
        b, d, gh, gw = emb.shape
        dist = self._nearest(emb.permute(0, 2, 3, 1).reshape(-1, d)).view(b, gh, gw)
        if self.foreground_mask == "pca":
            fg = np.stack([pca_foreground(e, self.mask_threshold) for e in emb])
            dist = dist * torch.from_numpy(fg).to(dist)
        return dist

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
        patch_values = []
        for i in range(0, len(images), self.batch_size):
            dist = self.patch_distances(images[i : i + self.batch_size], ctx.device)
            patch_values.append(dist.flatten(1).double().cpu().numpy())
            up = F.interpolate(dist[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
            for j, m in enumerate(up):
                maps[i + j] = gaussian_filter(m, sigma=self.sigma, mode="reflect") if self.sigma > 0 else m
        if self.image_score_on == "map":
            flat = maps.reshape(len(maps), -1).astype(np.float64)
        else:
            flat = np.concatenate(patch_values)
        values = flat.max(axis=1) if self.image_score == "max" else top_mean(flat, self.topk_fraction)
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
            "shot_views": self.n_views,
            "local_pool": self.local_pool,
            "sigma": self.sigma,
            "distance": self.distance,
            "image_score": self.image_score,
            "topk_fraction": self.topk_fraction,
            "image_score_on": self.image_score_on,
            "shot_augment": self.shot_augment,
            "foreground_mask": self.foreground_mask,
            "mask_threshold": self.mask_threshold,
            "precision": self.precision,
        }
