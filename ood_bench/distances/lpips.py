"""LPIPS through the ``lpips`` package, with the ImageNet backbone taken from a local file or torchvision.

The ``lpips`` wheel ships its linear heads; the backbone (AlexNet / VGG16 / SqueezeNet features) normally
comes from a torchvision download. Lookup order for ``weights="auto"``: the converted torchvision file in
``weights_dir`` (``alexnet_features_imagenet.pth`` / ``vgg16_features_imagenet.pth``), then torchvision's
ImageNet weights (downloaded or from the torch hub cache). If neither can be had, a clear error says how
to get them. ``weights`` may also be a path to such a file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ood_bench import fast_dev_run
from ood_bench.distances.base import Distance
from ood_bench.errors import WeightsNotFoundError

log = logging.getLogger(__name__)

NETS = {
    # net: (local file name, torchvision builder, weights enum, minimum input size)
    "alex": ("alexnet_features_imagenet.pth", "alexnet", "AlexNet_Weights", 32),
    "vgg": ("vgg16_features_imagenet.pth", "vgg16", "VGG16_Weights", 16),
    "squeeze": (None, "squeezenet1_1", "SqueezeNet1_1_Weights", 32),
}


def _features_state_dict(net: str, weights: str, weights_dir: str | Path | None) -> tuple[dict, str]:
    """Backbone ``features`` state dict and a description of where it came from."""
    local_name, builder, enum_name, _ = NETS[net]
    if weights != "auto":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"method.lpips_weights={weights!r}: no such file")
        return torch.load(path, map_location="cpu", weights_only=True), f"file:{path.name}"
    if local_name and weights_dir is not None and (Path(weights_dir) / local_name).is_file():
        path = Path(weights_dir) / local_name
        return torch.load(path, map_location="cpu", weights_only=True), f"file:{path.name}"
    import torchvision

    enum = getattr(torchvision.models, enum_name).IMAGENET1K_V1
    try:
        model = getattr(torchvision.models, builder)(weights=enum)
    except Exception as err:  # download errors come as URLError, OSError, RuntimeError...
        where = f"{Path(weights_dir) / local_name}" if local_name and weights_dir else "(no local file for this net)"
        raise WeightsNotFoundError(
            f"LPIPS-{net} needs ImageNet {builder} weights: none at {where} and torchvision could not fetch "
            f"{enum.url} ({type(err).__name__}: {err}). Either download that URL into the torch hub cache "
            f"(~/.cache/torch/hub/checkpoints/), put {local_name or 'a features state dict'} in paths.weights_dir "
            f"(OOD_BENCH_WEIGHTS), or pick another distance explicitly: method.distance=mse or ssim."
        ) from err
    return model.features.state_dict(), f"torchvision:{enum_name}.IMAGENET1K_V1"


def _features_or_random(net: str, weights: str, weights_dir: str | Path | None) -> tuple[dict, str]:
    """``_features_state_dict``; under debug=fast_dev_run a missing backbone is random (seeded, WARNING)."""
    try:
        return _features_state_dict(net, weights, weights_dir)
    except WeightsNotFoundError as err:
        fast_dev_run.random_init(f"the LPIPS-{net} backbone", f"LPIPS-{net} weights {weights!r}", err)
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = getattr(torchvision.models, NETS[net][1])(weights=None)
    return model.features.state_dict(), "random(fast_dev_run)"


class LPIPSDistance(Distance):
    """LPIPS v0.1 with ImageNet features; inputs below the net's minimum size are upsampled (recorded)."""

    name = "lpips"

    def __init__(self, net: str = "alex", weights: str = "auto", weights_dir: str | Path | None = None) -> None:
        if net not in NETS:
            raise ValueError(f"lpips_net={net!r} is not valid; valid: {sorted(NETS)}")
        import lpips

        self.net_name = net
        self.min_size = NETS[net][3]
        state, self.weights_source = _features_or_random(net, weights, weights_dir)
        self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
        self._load_backbone(state)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _load_backbone(self, state: dict) -> None:
        """Copy torchvision ``features`` weights into lpips' slices (children keep torchvision indices)."""
        loaded = set()
        for sl in [m for n, m in self.model.net.named_children() if n.startswith("slice")]:
            for idx, module in sl.named_children():
                params = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == idx}
                if params:
                    module.load_state_dict(params, strict=True)
                    loaded.add(idx)
        expected = {k.split(".", 1)[0] for k in state}
        used = {idx for sl in self.model.net.children() for idx, _ in sl.named_children()}
        if missing := (expected & used) - loaded:
            raise RuntimeError(f"LPIPS-{self.net_name}: backbone layers {sorted(missing)} were not loaded")
        log.info("LPIPS-%s backbone weights from %s", self.net_name, self.weights_source)

    def to(self, device: torch.device) -> LPIPSDistance:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        if min(x.shape[-2:]) < self.min_size:
            x = F.interpolate(x, size=(self.min_size, self.min_size), mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=(self.min_size, self.min_size), mode="bilinear", align_corners=False)
        return self.model(x, y, normalize=True).flatten()

    def describe(self) -> str:
        return f"lpips-{self.net_name}({self.weights_source})"

    def describe_for(self, size: int) -> str:
        """``describe()`` plus the upsampling applied to ``size``-px inputs, if any."""
        up = f", inputs upsampled {size}->{self.min_size}px" if size < self.min_size else ""
        return f"lpips-{self.net_name}({self.weights_source}{up})"
