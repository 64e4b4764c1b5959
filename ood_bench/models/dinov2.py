"""DINOv2 patch features (AnomalyDINO's backbone) through ``timm``'s ViT, with the official Meta checkpoint.

``DinoPatchEncoder`` has the interface ``patch_knn`` uses of ``FeatureEncoder``: ``feature_maps(images)`` returns one
``[N, C, h, w]`` map per tapped layer, on the ViT's patch grid (``input_size / 14`` per side).

Weights (``weights=``):

* ``auto``: the official release file ``dinov2_vits14_pretrain.pth`` (the checkpoint that
  ``torch.hub.load("facebookresearch/dinov2", "dinov2_vits14")`` loads) from ``weights_dir`` / ``$OOD_BENCH_WEIGHTS``,
  else from torch's hub cache, else downloaded there from Meta's URL; offline and absent, a clear error names the file
  and the manual step;
* a path: that file (the official layout or timm's; converted by timm's DINOv2 checkpoint filter);
* ``none``: random initialisation (seeded), for tests.

Layers: ``blocks.<i>`` (the i-th transformer block's output tokens) or ``norm`` (the last block's tokens after the
final LayerNorm: ``get_intermediate_layers(x, n=1, norm=True)``, AnomalyDINO's features). The class token is dropped.
Pre-processing (AnomalyDINO's): bicubic, antialiased resize to ``input_size`` (a multiple of 14), ImageNet mean/std.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ood_bench.models.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderWeightsError
from ood_bench.utils import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DinoSpec:
    """A DINOv2 release: timm architecture, official file name and URL, timm's Hugging Face id."""

    timm_arch: str
    file: str
    url: str
    patch: int = 14


DINO_MODELS: dict[str, DinoSpec] = {
    "dinov2_vits14": DinoSpec(
        "vit_small_patch14_dinov2",
        "dinov2_vits14_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
    ),
    "dinov2_vitb14": DinoSpec(
        "vit_base_patch14_dinov2",
        "dinov2_vitb14_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    ),
}
DINO_WEIGHTS_CHOICES = ("auto", "none", "<path to dinov2_*_pretrain.pth>")


def is_dino(name: str) -> bool:
    return name in DINO_MODELS


def _timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            "DINOv2 encoders need the `timm` package: pip install 'ood_bench[dino]' (or pip install 'timm>=1.0.9,<2')"
        ) from err
    return timm


def build_dino(name: str, input_size: int, init_seed: int = 0, init: bool = True) -> nn.Module:
    """timm's DINOv2 ViT at ``input_size`` (positional embeddings for its grid), randomly initialised (seeded), or
    left uninitialised (``init=False``) when weights are loaded next."""
    spec = DINO_MODELS[name]
    if input_size % spec.patch:
        raise ValueError(f"input_size={input_size} is not a multiple of {name}'s patch size {spec.patch}")
    timm = _timm()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = timm.create_model(
            spec.timm_arch, pretrained=False, img_size=input_size, num_classes=0, weight_init="" if init else "skip"
        )
    return model.eval().requires_grad_(False)


def load_dino_state(model: nn.Module, path: Path) -> None:
    """Load a DINOv2 checkpoint (official or timm layout) strictly; positional embeddings resampled to the grid."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a DINOv2 state dict, got {type(sd).__name__}")
    try:
        model.load_state_dict(checkpoint_filter_fn(dict(sd), model), strict=True)
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"weights {path} do not fit a DINOv2 ViT: {str(err)[:600]}") from err


def load_dino(
    name: str, weights: str = "auto", weights_dir: str | os.PathLike[str] | None = None, input_size: int = 224
) -> tuple[nn.Module, str]:
    """Build DINOv2 ``name`` and fill its weights; return ``(model, weights_id)`` as ``load_backbone`` does."""
    if name not in DINO_MODELS:
        raise ValueError(f"encoder={name!r} is not a DINOv2 model; valid: {sorted(DINO_MODELS)}")
    spec = DINO_MODELS[name]
    model = build_dino(name, input_size, init=weights == "none")
    if weights == "none":
        return model, "none(seed=0)"
    if weights != "auto":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise EncoderWeightsError(
                f"encoder {name!r}: encoder_weights file {path} does not exist; valid: {list(DINO_WEIGHTS_CHOICES)}"
            )
        load_dino_state(model, path)
        return model, f"{path.name}#{file_sha256(path)}"
    wdir = Path(weights_dir) if weights_dir else Path(os.environ.get("OOD_BENCH_WEIGHTS", "weights"))
    local = wdir / spec.file
    cached = Path(torch.hub.get_dir()) / "checkpoints" / spec.file
    for cand in (local, cached):
        if cand.is_file():
            load_dino_state(model, cand)
            log.info("encoder weights: %s", cand)
            return model, f"{cand.name}#{file_sha256(cand)}"
    try:
        torch.hub.load_state_dict_from_url(spec.url, progress=False, map_location="cpu")
    except Exception as err:  # any network/IO failure ends in the same advice
        raise EncoderWeightsError(
            f"encoder {name!r}: DINOv2 weights not found at {local} (nor in torch's hub cache {cached}) and the "
            f"download of {spec.url} failed ({type(err).__name__}: {err}). Manual step: on a machine with internet "
            f"download {spec.url} (the official DINOv2 release; torch.hub.load('facebookresearch/dinov2', "
            f"'{name}') loads the same file) and copy it to {local}, or pass "
            f"method.encoder_weights=/path/to/{spec.file}."
        ) from err
    load_dino_state(model, cached)
    return model, f"{cached.name}#{file_sha256(cached)}"


class DinoPatchEncoder(nn.Module):
    """Frozen DINOv2 ViT -> patch-token maps of the tapped layers (``feature_maps``)."""

    def __init__(
        self,
        name: str,
        layers: list[str] | tuple[str, ...] | None = None,
        weights: str = "auto",
        weights_dir: str | os.PathLike[str] | None = None,
        input_size: int = 224,
    ) -> None:
        super().__init__()
        self.name, self.input_size = name, int(input_size)
        self.backbone, self.weights_id = load_dino(name, weights, weights_dir, self.input_size)
        n_blocks = len(self.backbone.blocks)
        valid = [f"blocks.{i}" for i in range(n_blocks)] + ["norm"]
        chosen = tuple(layers) if layers else ("norm",)
        unknown = [layer for layer in chosen if layer not in valid]
        if unknown:
            raise ValueError(
                f"layers {unknown} are not valid for {name}; valid: blocks.0 ... blocks.{n_blocks - 1}, norm"
            )
        self.layers = chosen
        self.patch = DINO_MODELS[name].patch
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[N,C,H,W]`` in ``[0,1]`` (C = 1 or 3) -> normalised RGB at ``input_size`` (bicubic, antialiased)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N,1|3,H,W] in [0,1], got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped layers' patch tokens as maps ``[N, C, h, w]`` (float32)."""
        vit = self.backbone
        x = vit.patch_embed(self.preprocess(images))
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        grid = self.input_size // self.patch
        out: dict[str, torch.Tensor] = {}
        last = max(
            int(layer.split(".")[1]) if layer.startswith("blocks.") else len(vit.blocks) - 1 for layer in self.layers
        )
        for i, block in enumerate(vit.blocks[: last + 1]):
            x = block(x)
            out[f"blocks.{i}"] = x
        if "norm" in self.layers:
            out["norm"] = vit.norm(x)
        maps = []
        for layer in self.layers:
            tokens = out[layer][:, vit.num_prefix_tokens :].float()
            maps.append(tokens.transpose(1, 2).reshape(len(tokens), -1, grid, grid))
        return maps
