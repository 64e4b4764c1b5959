"""DISTS (Ding et al. 2020) through ``piq``, with the VGG16 features and alpha/beta weights from local files.

``piq.DISTS()`` downloads both in its constructor; here the metric is assembled from ``vgg16_features_imagenet.pth``
(torchvision's ImageNet VGG16 ``features``) and ``dists_alpha_beta.pt`` (the official release's weights) in
``paths.weights_dir``, with torchvision's download as the fallback for the backbone. The value is piq's
``1 - S`` (S = the DISTS similarity; 0 = identical), computed at the input resolution: piq's own ``forward``
first downsamples inputs larger than 256 px, the official DISTS code does not (same values up to 256 px, the
sizes DiffGuard uses). On ``iqa_calibration`` this gives the official values to 1e-5 (tests/test_distances.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ood_bench import fast_dev_run
from ood_bench.distances.base import Distance
from ood_bench.distances.lpips import _features_or_random
from ood_bench.errors import WeightsNotFoundError

log = logging.getLogger(__name__)

ALPHA_BETA_FILE = "dists_alpha_beta.pt"
LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
CHANNELS = (3, 64, 128, 256, 512, 512)  # the input image counts as a "layer" in DISTS


def build_piq_dists(weights_dir: str | Path | None) -> tuple[torch.nn.Module, str]:
    """A ``piq.DISTS`` module built from local weights (no download), and where the weights came from."""
    import piq
    import torchvision
    from piq.perceptual import VGG16_LAYERS, ContentLoss

    ab_path = Path(weights_dir) / ALPHA_BETA_FILE if weights_dir is not None else None
    if ab_path is None or not ab_path.is_file():
        err = WeightsNotFoundError(
            f"DISTS needs its alpha/beta weights: {ab_path or ALPHA_BETA_FILE} not found. Put {ALPHA_BETA_FILE} "
            f"(dict of 'alpha' and 'beta', each (1, 1475, 1, 1); piq's release file dists_weights.pt has the same "
            f"content) in paths.weights_dir (OOD_BENCH_WEIGHTS), or pick another distance."
        )
        fast_dev_run.random_init("DISTS' alpha/beta", str(ab_path or ALPHA_BETA_FILE), err)  # raises outside it
        g = torch.Generator().manual_seed(0)  # positive and summing to 1 over alpha and beta, as DISTS normalises
        ab = {k: torch.rand(1, sum(CHANNELS), 1, 1, generator=g) + 0.01 for k in ("alpha", "beta")}
        total = ab["alpha"].sum() + ab["beta"].sum()
        ab = {k: v / total for k, v in ab.items()}
        ab_source = "random(fast_dev_run)"
    else:
        ab = torch.load(ab_path, map_location="cpu", weights_only=True)
        ab_source = ALPHA_BETA_FILE
    try:
        state, source = _features_or_random("vgg", "auto", weights_dir)
    except WeightsNotFoundError as err:
        raise WeightsNotFoundError(f"DISTS needs the ImageNet VGG16 features: {err}") from err
    vgg = torchvision.models.vgg16(weights=None).features
    vgg.load_state_dict(state, strict=True)
    weights = [*torch.split(ab["alpha"], list(CHANNELS), dim=1), *torch.split(ab["beta"], list(CHANNELS), dim=1)]
    metric = piq.DISTS.__new__(piq.DISTS)
    # piq.DISTS.__init__ would download; its parent's does the same set-up with the module we give it
    ContentLoss.__init__(
        metric,
        feature_extractor=vgg,
        layers=[VGG16_LAYERS[name] for name in LAYERS],
        weights=weights,
        replace_pooling=True,
        reduction="none",
        normalize_features=False,
        allow_layers_weights_mismatch=True,
    )
    return metric.eval(), f"{source}+{ab_source}"


class DISTSDistance(Distance):
    """``1 - DISTS similarity`` between images in ``[0, 1]`` (grey images are repeated to RGB)."""

    name = "dists"

    def __init__(self, weights_dir: str | Path | None = None) -> None:
        self.metric, self.weights_source = build_piq_dists(weights_dir)

    def to(self, device: torch.device) -> DISTSDistance:
        self.metric.to(device)
        return self

    def similarity(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The DISTS similarity S in ``[0, 1]`` (1 = identical), at the input resolution."""
        from piq.perceptual import ContentLoss

        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        return ContentLoss.forward(self.metric, x, y)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.similarity(x, y)

    def describe(self) -> str:
        return f"dists({self.weights_source})"
