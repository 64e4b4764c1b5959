"""What a run or sweep will cost, before it starts (``python run.py ... plan=true``, also with ``-m``).

A cell's plan is a list of ``Stage``s, one per network and phase (training a diffusion model, the UNet calls of
scoring, a perceptual distance, a classifier pass ...): how many images the stage covers, how many network
evaluations it runs per image, and a ``Probe`` that builds the network's architecture (random weights, no
checkpoint read) with an input of batch 1 at full size. Per network the planner measures, once per process:

* **FLOPs per evaluation** with ``torch.utils.flop_counter.FlopCounterMode`` on the **meta device** (shapes only:
  no arithmetic, no memory; CPU with batch 1 where a network cannot run on meta). FlopCounterMode counts matrix
  products, convolutions and attention (the work that dominates these networks), not element-wise ops. A
  training evaluation is one forward and backward (the optimiser step is not counted); ``input_grad`` (classifier
  guidance) a forward and the backward to the input.
* **Activation memory**: the peak bytes of the tensors alive during one evaluation, tracked op by op on meta (a
  tensor counts from the op that makes it until it is freed; views and in-place results add nothing), at batch 1
  and 2; the difference is the per-row part, scaled to the configured batch (halved under bf16/fp16 autocast:
  an approximation, autocast keeps some ops in fp32).

Peak accelerator memory of a stage = float32 weights of every network of its phase + (training) gradients, AdamW
moments and EMA (4 + 8 + 4 bytes per parameter) + the stage's activations at its batch. Hours = FLOPs / (peak dense
TFLOP/s x utilisation) per named accelerator (``ACCELERATORS``, ``UTILISATION``); fp32 convolutions count at the
TF32 peak (cuDNN's default in PyTorch), fp32 matrix products at the FP32 peak. "This machine" divides by the FLOP/s
``make bench`` measured here (``cpu_rates``: a bare UNet forward per precision, a training step per precision,
the LFDN's MLP forward), so it predicts CPU seconds on one idle core at ``threads=1``.

The planner runs no training, no scoring and no data decoding: split sizes come from the data's file lists or
label files when present, else from the datasets' published sizes (``KNOWN_SIZES``). A method is planned by one
function in ``PLANNERS``; the runner calls ``plan_run`` instead of running the cell when ``plan=true``.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ood_bench.errors import ConfigError
from ood_bench.utils import atomic_write_text

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]

# Peak dense TFLOP/s (no structured sparsity), vendor datasheets: A100 SXM4, H100 SXM5, H200 SXM (same compute as
# H100 SXM, 141 GB HBM3e), GeForce RTX 4090 (Ada whitepaper: FP16/BF16 tensor with FP32 accumulate).
ACCELERATORS: dict[str, dict[str, float]] = {
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0, "memory_gib": 80},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "memory_gib": 80},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "memory_gib": 141},
    "RTX4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2, "memory_gib": 24},
}
# Share of the peak that these workloads reach (model FLOPs utilisation). Calibrated on a published measurement:
# DDPM's CIFAR-10 UNet (the architecture of model=unet_ddpm) trained at 21 steps/s of batch 128 on a TPU v3-8
# (Ho et al. 2020, appendix B; 420 TFLOP/s bf16 peak); with this planner's 37.3 GFLOPs per training image that is
# 21 * 128 * 37.3e9 / 420e12 = 0.24. Small-image UNets at these batch sizes sit there; override with
# +plan_utilisation=<value>.
UTILISATION = 0.24

# Published split sizes (train, test) for data that is not on disk. Offline copies may differ (the offline
# CIFAR-10 JPEG mirror has 10,000 training images): present data is counted from its file lists instead.
KNOWN_SIZES: dict[str, tuple[int, int]] = {
    "cifar10": (50000, 10000),
    "cifar100": (50000, 10000),
    "svhn": (73257, 26032),
    "mnist": (60000, 10000),
    "fashionmnist": (60000, 10000),
    "kmnist": (60000, 10000),
    "notmnist": (0, 18724),
    "celeba": (162770, 19962),
    "textures": (0, 5640),
    "lsun": (0, 10000),
    "lsun_resize": (0, 10000),
    "isun": (0, 8925),
    "places365": (0, 36500),
    "tinyimagenet": (100000, 10000),
    "tinyimagenet_openood": (0, 7793),
    "imagenet": (1281167, 50000),
    "species": (0, 11893),
    "inaturalist": (0, 10000),
    "openimage_o": (0, 15869),
    "imagenet_o": (0, 2000),
    "digits": (1078, 719),
}
# test images per category of the anomaly datasets (MVTec AD; VisA's 1cls split), for data not on disk
KNOWN_ANOMALY_TEST: dict[str, int] = {
    **dict(
        bottle=83,
        cable=150,
        capsule=132,
        carpet=117,
        grid=78,
        hazelnut=110,
        leather=124,
        metal_nut=115,
        pill=167,
        screw=160,
        tile=117,
        toothbrush=42,
        transistor=100,
        wood=79,
        zipper=151,
    ),
    **dict(
        candle=200,
        capsules=160,
        cashew=150,
        chewinggum=150,
        fryum=150,
        macaroni1=200,
        macaroni2=200,
        pcb1=200,
        pcb2=200,
        pcb3=201,
        pcb4=201,
        pipe_fryum=150,
    ),
    "magnetic_tile": 644,
    "kolektor_sdd": 152,
}
KINDS = ("forward", "train", "input_grad")
OPTIMIZER_BYTES = {"adamw": 4 + 8, "adamw_ema": 4 + 8 + 4}  # gradients + AdamW moments (+ EMA weights), per param
GIB = float(1 << 30)


# ---------------------------------------------------------------------------------------------------------------
# Measuring one network
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A network's architecture and an input batch: ``build()`` -> module (random weights), ``example(rows, device)``
    -> ``(args, kwargs)`` of one call; ``key`` names what determines both (the measurement cache key)."""

    key: str
    build: Callable[[], nn.Module]
    example: Callable[[int, torch.device], tuple[tuple, dict]]


@dataclass(frozen=True)
class NetCost:
    """One evaluation of a network at batch 1: FLOPs (convolutions apart) and the activation bytes."""

    params: int
    flops: float
    conv_flops: float
    act_bytes_per_row: float
    act_bytes_fixed: float
    device: str


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode and still alive (views and in-place results add none)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outs = out if isinstance(out, tuple | list) else (out,)
        for i, t in enumerate(outs):
            aliased = i < len(returns) and returns[i].alias_info is not None
            if isinstance(t, torch.Tensor) and not aliased:
                nbytes = t.numel() * t.element_size()
                self.live += nbytes
                weakref.finalize(t, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def _evaluate(module: nn.Module, args: tuple, kwargs: dict, kind: str) -> None:
    """One evaluation of ``kind``: a forward, a forward + backward to the parameters, or to the input."""
    if kind == "forward":
        with torch.no_grad():
            module(*args, **kwargs)
        return
    out = module(*args, **kwargs)
    out = out.sample if hasattr(out, "sample") else out
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()


def _prepare(module: nn.Module, args: tuple, kind: str) -> tuple:
    module.requires_grad_(kind == "train")
    if kind == "input_grad":
        args = (args[0].detach().requires_grad_(True), *args[1:])
    return args


def _count(module: nn.Module, probe: Probe, kind: str, device: torch.device) -> NetCost:
    params = sum(p.numel() for p in module.parameters())
    args, kwargs = probe.example(1, device)
    args = _prepare(module, args, kind)
    with FlopCounterMode(display=False) as counter:
        _evaluate(module, args, kwargs, kind)
    per_op = counter.get_flop_counts().get("Global", {})
    flops = float(sum(per_op.values()))
    conv = float(sum(v for op, v in per_op.items() if "convolution" in str(op)))
    peaks = []
    for rows in (1, 2):
        module.zero_grad(set_to_none=True)
        args, kwargs = probe.example(rows, device)
        args = _prepare(module, args, kind)
        with LiveBytes() as mem:
            _evaluate(module, args, kwargs, kind)
        del args, kwargs
        peaks.append(mem.peak)
    module.zero_grad(set_to_none=True)
    per_row = max(0.0, float(peaks[1] - peaks[0]))
    return NetCost(params, flops, conv, per_row, max(0.0, peaks[0] - per_row), device.type)


_COSTS: dict[tuple[str, str], NetCost] = {}
CALLS = {"meta": 0, "cpu": 0}  # evaluations the planner ran, by device (tests read them)


def measure(probe: Probe, kind: str) -> NetCost:
    """FLOPs and activation bytes of one ``kind`` evaluation (``KINDS``) of ``probe``'s network, cached per process.

    Tried on the meta device first; a network that cannot run there is built and evaluated on CPU at batch 1.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not valid; valid: {list(KINDS)}")
    key = (probe.key, kind)
    if key in _COSTS:
        return _COSTS[key]
    meta = torch.device("meta")
    try:
        with torch.device(meta):
            module = probe.build()
        module = module.to(meta)
        cost = _count(module, probe, kind, meta)
        CALLS["meta"] += 3
    except (NotImplementedError, RuntimeError, TypeError, ValueError) as err:
        log.info("plan: %s does not run on the meta device (%s); counting on CPU at batch 1", probe.key, err)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = probe.build()
        cost = _count(module, probe, kind, torch.device("cpu"))
        CALLS["cpu"] += 3
    _COSTS[key] = cost
    return cost


# ---------------------------------------------------------------------------------------------------------------
# Stages and cells
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One network's share of a cell: ``images x evals_per_image`` evaluations of ``kind``, ``batch`` rows a call."""

    phase: str  # "train" (fitting) | "score"
    network: str
    probe: Probe
    kind: str
    images: int
    evals_per_image: float
    batch: int
    precision: str = "fp32"
    optimizer: str | None = None  # training: a key of OPTIMIZER_BYTES
    family: str = "conv"  # which CPU rate applies: conv (UNets, CNNs) | mlp
    note: str = ""
    cost: NetCost | None = None

    def measure(self) -> NetCost:
        if self.cost is None:
            self.cost = measure(self.probe, self.kind)
        return self.cost

    @property
    def evals(self) -> float:
        return self.images * self.evals_per_image

    @property
    def flops(self) -> float:
        return self.evals * self.measure().flops

    def activation_bytes(self) -> float:
        c = self.measure()
        scale = 0.5 if self.precision in ("bf16", "fp16") else 1.0
        return scale * (c.act_bytes_fixed + self.batch * c.act_bytes_per_row)

    def extra_bytes(self) -> float:
        c = self.measure()
        opt = OPTIMIZER_BYTES[self.optimizer] * c.params if self.optimizer else 0
        return opt + self.activation_bytes()


@dataclass
class CellPlan:
    """The stages of one cell, with what identifies the cell."""

    method: str
    data: str
    overrides: str
    sizes: dict[str, int]
    stages: list[Stage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def accelerator_seconds(stage: Stage, acc: dict[str, float], utilisation: float) -> float:
    """Seconds of ``stage`` on an accelerator with peaks ``acc`` at ``utilisation``."""
    c = stage.measure()
    if stage.precision in ("bf16", "fp16"):
        conv_peak = other_peak = acc[stage.precision]
    else:  # PyTorch's defaults: cuDNN convolutions may use TF32, matrix products stay FP32
        conv_peak, other_peak = acc["tf32"], acc["fp32"]
    per_eval = c.conv_flops / conv_peak + (c.flops - c.conv_flops) / other_peak
    return stage.evals * per_eval / (1e12 * utilisation)


# ---------------------------------------------------------------------------------------------------------------
# This machine: FLOP/s from `make bench`
# ---------------------------------------------------------------------------------------------------------------


def _bench_file(name: str) -> Path | None:
    for folder in (ROOT / "results" / "bench", ROOT / "docs" / "speed"):
        if (folder / name).is_file():
            return folder / name
    return None


def _data_geometry(data: str) -> tuple[int, int]:
    """(image_size, channels) of ``conf/data/<data>.yaml`` without composing (defaults: ``_defaults.yaml``)."""
    base = OmegaConf.load(ROOT / "conf" / "data" / "_defaults.yaml")
    cfg = OmegaConf.load(ROOT / "conf" / "data" / f"{data}.yaml")
    return int(cfg.get("image_size", base.image_size)), int(cfg.get("channels", base.channels))


def _unet_small_probe(size: int, channels: int, class_embeds: int | None = None) -> Probe:
    model = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "unet_small.yaml"), resolve=True)
    return unet_probe(model, size, channels, class_embeds)


@functools.lru_cache(maxsize=1)
def cpu_rates() -> dict[tuple[str, str], float]:
    """FLOP/s of this machine per (kind, precision) and family, from ``make bench`` (results/bench or docs/speed):

    * ``("forward", p)``: the bare forward of the bench's LMD (bf16) and DiffGuard (fp32) UNets;
    * ``("train", p)``: the training step of ``--variants`` (unet_small, batch 64, contiguous, eager);
    * ``("forward_mlp", p)``: DLSR's LFDN bare forward (an MLP: another efficiency than convolutions).
    Empty when no bench CSV exists.
    """
    rates: dict[tuple[str, str], float] = {}
    bench = _bench_file("bench.csv")
    if bench is not None:
        with open(bench, newline="") as f:
            for row in csv.DictReader(f):
                bare = row.get("bare_evals_per_s") or ""
                if not bare or row["case"] not in ("lmd", "diffguard", "dlsr"):
                    continue
                size, ch = _data_geometry(row["data"])
                if row["case"] == "dlsr":
                    # DLSR's bench case runs the method's CPU defaults: the LFDN on AlexNet's 5-layer features
                    from ood_bench.methods.dlsr import DLSR  # noqa: F401  (registry)

                    dim = int(float(row.get("feature_dim") or 0)) or 1152
                    m = OmegaConf.load(ROOT / "conf" / "method" / "dlsr.yaml")
                    probe = lfdn_probe(dim, int(m.width), int(m.num_blocks), m.time_embed_dim)
                    key = ("forward_mlp", row["precision"])
                else:
                    probe = _unet_small_probe(size, ch, 11 if row["case"] == "diffguard" else None)
                    key = ("forward", row["precision"])
                rates[key] = float(bare) * measure(probe, "forward").flops
    variants = _bench_file("variants.csv")
    if variants is not None:
        size, ch = _data_geometry("fashionmnist_mnist")  # bench.variants: unet_small on fashionmnist_mnist
        flops = measure(_unet_small_probe(size, ch), "train").flops
        with open(variants, newline="") as f:
            for row in csv.DictReader(f):
                if row["layout"] == "contiguous" and row["compile"] == "False" and row["train_step"] not in ("", "nan"):
                    rates[("train", row["precision"])] = float(row["train_step"]) * flops
    return rates


def cpu_seconds(stage: Stage) -> float:
    """Seconds of ``stage`` on one core of this machine (``cpu_rates``; nan without a bench)."""
    rates = cpu_rates()
    prec = stage.precision if stage.precision in ("fp32", "bf16") else "fp32"
    kind = "train" if stage.kind == "train" else "forward"
    key = (f"{kind}_mlp", prec) if stage.family == "mlp" and (f"{kind}_mlp", prec) in rates else (kind, prec)
    rate = rates.get(key) or rates.get((kind, "fp32"))
    if stage.kind == "input_grad" and rate:
        rate = rates.get(("train", prec)) or rate  # a backward: closer to training efficiency
    return stage.flops / rate if rate else math.nan


# ---------------------------------------------------------------------------------------------------------------
# Probes of the suite's networks
# ---------------------------------------------------------------------------------------------------------------


class _Call(nn.Module):
    """Adapts a module whose call takes extra arguments (timesteps, labels, a second image) to the probe call."""

    def __init__(self, inner: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.inner, *args, **kwargs)


def unet_probe(model_cfg: dict[str, Any], size: int, channels: int, class_embeds: int | None = None) -> Probe:
    """The image diffusion UNet of ``model`` (the trained architecture, or a pretrained folder's config)."""
    from ood_bench.models.diffusion import build_unet

    pretrained = model_cfg.get("pretrained")
    unet_cfg = model_cfg.get("unet")
    if pretrained:
        unet_cfg = _pretrained_unet_config(model_cfg)
    key = f"unet:{sorted((k, str(v)) for k, v in unet_cfg.items())}:{size}:{channels}:{class_embeds}:{bool(pretrained)}"

    def build() -> nn.Module:
        if pretrained:
            from diffusers import UNet2DModel

            return UNet2DModel.from_config(unet_cfg)
        return build_unet(unet_cfg, size, channels, num_class_embeds=class_embeds)

    def example(rows: int, device: torch.device) -> tuple[tuple, dict]:
        x = torch.zeros(rows, channels, size, size, device=device)
        t = torch.zeros(rows, dtype=torch.long, device=device)
        kwargs = {"class_labels": torch.zeros(rows, dtype=torch.long, device=device)} if class_embeds else {}
        return (x, t), kwargs

    return Probe(key, build, example)


# Architectures of the pretrained models the configs name, for planning before they are downloaded or converted
# (diffusers ``UNet2DModel`` configs; a folder on disk takes precedence).
_ADM_LEVELS = 6  # guided-diffusion 256x256_diffusion_uncond: 256 channels, mult (1,1,2,2,4,4), 2 res blocks,
# attention at 32/16/8 px with 64-channel heads, scale-shift norm, resblock up/down, learned sigma (6 out channels)
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "adm_imagenet256_uncond": dict(
        sample_size=256,
        in_channels=3,
        out_channels=6,
        layers_per_block=2,
        block_out_channels=(256, 256, 512, 512, 1024, 1024),
        down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,
        up_block_types=("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",) * 3,
        downsample_type="resnet",
        upsample_type="resnet",
        resnet_time_scale_shift="scale_shift",
        attention_head_dim=64,
        norm_num_groups=32,
    ),
    "ddpm_cifar10_pretrained": dict(  # google/ddpm-cifar10-32 (the unet_ddpm architecture)
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    ),
}


# SD-inpainting stacks (diffusers UNet2DConditionModel / AutoencoderKL configs of the published checkpoints)
_SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)
KNOWN_SD_STACKS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "stable-diffusion-v1-5/stable-diffusion-inpainting": (
        dict(
            in_channels=9,
            out_channels=4,
            cross_attention_dim=768,
            attention_head_dim=8,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            sample_size=64,
        ),
        _SD15_VAE,
    ),
}


def _pretrained_unet_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a pretrained UNet folder (no weights read), else ``KNOWN_ARCHITECTURES``."""
    import json

    ref = Path(str(model_cfg["pretrained"])).expanduser()
    sub = model_cfg.get("subfolder")
    for cand in ([ref / sub] if sub else []) + [ref / "unet", ref]:
        if (cand / "config.json").is_file():
            return json.loads((cand / "config.json").read_text())
    if model_cfg.get("name") in KNOWN_ARCHITECTURES:
        log.info("plan: %s not on disk; its published architecture is planned", model_cfg["pretrained"])
        return dict(KNOWN_ARCHITECTURES[model_cfg["name"]])
    raise ConfigError(
        f"plan: model.pretrained={model_cfg['pretrained']!r} is not a local folder with a config.json, so its "
        f"architecture is unknown here; download or convert it first (see conf/model/{model_cfg.get('name')}.yaml)"
    )


def classifier_probe(cfg: dict[str, Any], channels: int, size: int, num_classes: int) -> Probe:
    """The ``classifier`` group's network (architecture only) with its input adaptation."""
    from ood_bench.models.classifier import CifarResNet, Classifier, SmallCNN

    kind = cfg["kind"]
    key = f"classifier:{kind}:{cfg.get('depth') or cfg.get('arch') or cfg.get('width')}:{channels}:{size}:{num_classes}"

    def build() -> nn.Module:
        if kind == "small_cnn":
            net, in_ch = SmallCNN(channels, num_classes, int(cfg["width"])), channels
        elif kind == "cifar_resnet":
            net, in_ch = CifarResNet(int(cfg["depth"]), num_classes=10), 3
        else:
            import torchvision

            net, in_ch = torchvision.models.get_model(cfg["arch"], weights=None), 3
        mean = tuple(cfg.get("mean") or [0.5] * in_ch)
        std = tuple(cfg.get("std") or [0.5] * in_ch)
        cam = cfg.get("cam_layer") or ""
        return Classifier(
            net,
            list(range(num_classes)),
            in_channels=in_ch,
            mean=mean,
            std=std,
            input_size=cfg.get("input_size"),
            cam_layer=cam,
            source="plan",
        )

    def example(rows: int, device: torch.device) -> tuple[tuple, dict]:
        return (torch.zeros(rows, channels, size, size, device=device),), {}

    return Probe(key, build, example)


def distance_probe(name: str, size: int, channels: int, lpips_net: str = "alex") -> Probe | None:
    """A perceptual distance's network on a pair of images (``None`` for the arithmetic ones)."""
    if name == "lpips":
        from ood_bench.distances.lpips import NETS

        min_size = NETS[lpips_net][3]

        def build() -> nn.Module:
            import lpips

            def call(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                if x.shape[1] == 1:
                    x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
                if min(x.shape[-2:]) < min_size:
                    x = nn.functional.interpolate(x, size=(min_size, min_size), mode="bilinear")
                    y = nn.functional.interpolate(y, size=(min_size, min_size), mode="bilinear")
                return model(x, y, normalize=True).flatten()

            return _Call(lpips.LPIPS(net=lpips_net, pretrained=False, pnet_rand=True, verbose=False), call)

        key = f"lpips:{lpips_net}:{size}:{channels}"
    elif name == "dists":

        def build() -> nn.Module:
            import torchvision
            from piq import DISTS
            from piq.perceptual import VGG16_LAYERS, ContentLoss

            from ood_bench.distances.dists import CHANNELS, LAYERS

            metric = DISTS.__new__(DISTS)
            ones = [torch.ones(1, c, 1, 1) for c in CHANNELS]
            ContentLoss.__init__(
                metric,
                feature_extractor=torchvision.models.vgg16(weights=None).features,
                layers=[VGG16_LAYERS[n] for n in LAYERS],
                weights=ones + ones,
                replace_pooling=True,
                reduction="none",
                normalize_features=False,
                allow_layers_weights_mismatch=True,
            )

            def call(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                if x.shape[1] == 1:
                    x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
                return ContentLoss.forward(m, x, y)

            return _Call(metric, call)

        key = f"dists:{size}:{channels}"
    else:
        return None

    def example(rows: int, device: torch.device) -> tuple[tuple, dict]:
        x = torch.zeros(rows, channels, size, size, device=device)
        return (x, x.clone()), {}

    return Probe(key, build, example)


def lfdn_probe(dim: int, width: int, num_blocks: int, time_embed_dim: int | None) -> Probe:
    """DLSR's LFDN on one feature vector."""
    from ood_bench.models.lfdn import LFDN

    def build() -> nn.Module:
        return LFDN(dim, width=width, num_blocks=num_blocks, time_embed_dim=time_embed_dim)

    def example(rows: int, device: torch.device) -> tuple[tuple, dict]:
        return (torch.zeros(rows, dim, device=device), torch.zeros(rows, dtype=torch.long, device=device)), {}

    return Probe(f"lfdn:{dim}:{width}:{num_blocks}:{time_embed_dim}", build, example)


@functools.lru_cache(maxsize=16)
def _encoder_dim(name: str, layers: tuple[str, ...] | None, input_size: int, stride: int | None) -> int:
    """Feature dimension of a DLSR encoder (built on meta: shapes only)."""
    from ood_bench.models.encoders import FeatureEncoder

    with torch.device("meta"):
        return FeatureEncoder(name, layers=layers, weights="none", input_size=input_size, stride=stride).dim


def encoder_probe(name: str, layers: tuple[str, ...] | None, input_size: int, stride: int | None, size: int) -> Probe:
    """DLSR's frozen feature encoder (architecture only) on ``size``-px images."""
    from ood_bench.models.encoders import FeatureEncoder

    def build() -> nn.Module:
        return FeatureEncoder(name, layers=layers, weights="none", input_size=input_size, stride=stride)

    def example(rows: int, device: torch.device) -> tuple[tuple, dict]:
        return (torch.zeros(rows, 3, size, size, device=device),), {}

    return Probe(f"encoder:{name}:{layers}:{input_size}:{stride}:{size}", build, example)


# ---------------------------------------------------------------------------------------------------------------
# Split sizes
# ---------------------------------------------------------------------------------------------------------------


def _source_size(src_cfg: DictConfig, split: str) -> tuple[int, str]:
    """(images in ``split`` of a dataset source, where the number came from), reading no image."""
    from hydra.utils import instantiate

    from ood_bench.data.sources import ImageFolderSource, ImageListSource, TorchvisionSource

    name = str(src_cfg.get("name"))
    try:
        src = instantiate(src_cfg)
        if isinstance(src, TorchvisionSource) and src._fallback_ready():
            return len(src.fallback.labels(split)), "files"
        if isinstance(src, ImageFolderSource | ImageListSource):
            return len(src.labels(split)), "files"
        if type(src).__name__ == "DigitsSource":
            return len(src.labels(split)), "files"
    except (OSError, ValueError, KeyError) as err:  # absent data: the published size
        log.debug("plan: %s %s not counted from disk (%s)", name, split, err)
    if name in KNOWN_SIZES:
        n = KNOWN_SIZES[name][0 if split == "train" else 1]
        if n:
            return n, "known"
    raise ConfigError(
        f"plan: the size of {name}'s {split} split is unknown (data absent, not in ood_bench.plan.KNOWN_SIZES); "
        f"set data.n_train / data.n_id_test / data.n_ood_test"
    )


def ood_sizes(data: DictConfig) -> tuple[dict[str, int], str]:
    """Images per split of an OOD pair (``n_train``, ``n_id``, ``n_ood``), after the configured subsets."""
    out, how = {}, set()
    for key, side, split, cap, classes in (
        ("n_train", "id", "train", data.n_train, data.id_classes),
        ("n_id", "id", "test", data.n_id_test, data.id_classes),
        ("n_ood", "ood", "test", data.n_ood_test, data.ood_classes),
    ):
        n, src = _source_size(data[side], split)
        if classes is not None:  # a class subset: assume balanced classes
            n = round(n * len(classes) / max(len(classes), _num_classes(data[side])))
            src += "+classes"
        out[key] = min(n, int(cap)) if cap is not None else n
        how.add(src)
    return out, ",".join(sorted(how))


def _num_classes(src_cfg: DictConfig) -> int:
    return {"cifar100": 100, "imagenet": 1000}.get(str(src_cfg.get("name")), 10)


def anomaly_sizes(data: DictConfig) -> dict[str, Any]:
    """Test images per category (after ``n_test``), shot draws and fits of an anomaly data config."""
    tests = {}
    for name, src in data.categories.items():
        n = None
        root = Path(str(src.get("root", ""))) / str(src.get("folder", name)) / "test"
        if root.is_dir():
            n = sum(1 for p in root.rglob("*") if p.is_file())
        n = n if n is not None else KNOWN_ANOMALY_TEST.get(str(name))
        if n is None:
            raise ConfigError(f"plan: the test size of category {name!r} is unknown; set data.n_test")
        tests[str(name)] = min(n, int(data.n_test)) if data.n_test is not None else n
    groups = len(tests) if data.mode == "per_category" else 1
    return {"tests": tests, "seeds": len(data.shot_seeds), "fits": groups * len(data.shot_seeds)}


# ---------------------------------------------------------------------------------------------------------------
# Method planners
# ---------------------------------------------------------------------------------------------------------------

Planner = Callable[[DictConfig, dict[str, int]], list[Stage]]
PLANNERS: dict[str, Planner] = {}


def register_planner(*names: str) -> Callable[[Planner], Planner]:
    def deco(fn: Planner) -> Planner:
        for name in names:
            PLANNERS[name] = fn
        return fn

    return deco


def _model_cfg(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.model, resolve=True)


def _diffusion_training(cfg: DictConfig, n_train: int, class_embeds: int | None = None) -> list[Stage]:
    """Training the image UNet on the ID split (none for a pretrained model)."""
    model = _model_cfg(cfg)
    if model.get("pretrained"):
        return []
    t = model["train"]
    steps, bs = int(t["steps"]), int(t["batch_size"])
    probe = unet_probe(model, int(cfg.data.image_size), int(cfg.data.channels), class_embeds)
    opt = "adamw_ema" if float(t.get("ema_decay") or 0) > 0 else "adamw"
    return [
        Stage(
            "train",
            f"unet {model['name']}",
            probe,
            "train",
            n_train,
            steps * bs / max(n_train, 1),
            bs,
            t.get("precision", "fp32"),
            opt,
            note=f"{steps} steps x batch {bs}",
        )
    ]


@register_planner("lmd", "lmd_mse")
def plan_lmd(cfg: DictConfig, sizes: dict[str, int]) -> list[Stage]:
    m, size, ch = cfg.method, int(cfg.data.image_size), int(cfg.data.channels)
    stages = _diffusion_training(cfg, sizes["n_train"])
    n = sizes["n_id"] + sizes["n_ood"]
    probe = unet_probe(_model_cfg(cfg), size, ch)
    rows = min(int(m.eval_batch), int(m.batch_size) * int(m.reps))
    stages.append(
        Stage(
            "score",
            "unet (inpainting)",
            probe,
            "forward",
            n,
            int(m.reps) * int(m.steps),
            rows,
            m.precision,
            note=f"{m.reps} repeats x {m.steps} {m.sampler} steps",
        )
    )
    dist = distance_probe(m.distance, size, ch, m.get("lpips_net", "alex"))
    if dist is not None:
        stages.append(Stage("score", f"distance {m.distance}", dist, "forward", n, int(m.reps), int(m.batch_size)))
    return stages


@register_planner("msp", "mls", "ebo")
def plan_baseline(cfg: DictConfig, sizes: dict[str, int]) -> list[Stage]:
    stages = _classifier_stages(cfg, sizes, int(cfg.method.batch_size))
    n = sizes["n_id"] + sizes["n_ood"]
    probe = _classifier(cfg)
    stages.append(Stage("score", "classifier", probe, "forward", n, 1, int(cfg.method.batch_size)))
    return stages


def _classifier(cfg: DictConfig) -> Probe:
    c = OmegaConf.to_container(cfg.classifier, resolve=True)
    classes = int(c.get("num_classes") or (10 if c["kind"] == "cifar_resnet" else _num_classes(cfg.data.id)))
    return classifier_probe(c, int(cfg.data.channels), int(cfg.data.image_size), classes)


def _classifier_stages(cfg: DictConfig, sizes: dict[str, int], batch: int) -> list[Stage]:
    """Training the small CNN on the ID split (pretrained classifiers: none)."""
    c = OmegaConf.to_container(cfg.classifier, resolve=True)
    if c["kind"] != "small_cnn":
        return []
    steps, bs = int(c["train"]["steps"]), int(c["train"]["batch_size"])
    return [
        Stage(
            "train",
            "classifier small_cnn",
            _classifier(cfg),
            "train",
            sizes["n_train"],
            steps * bs / max(sizes["n_train"], 1),
            bs,
            optimizer="adamw",
            note=f"{steps} steps x batch {bs}",
        )
    ]


@register_planner("diffguard")
def plan_diffguard(cfg: DictConfig, sizes: dict[str, int]) -> list[Stage]:
    m, size, ch = cfg.method, int(cfg.data.image_size), int(cfg.data.channels)
    bs, n = int(m.batch_size), sizes["n_id"] + sizes["n_ood"]
    stages = _classifier_stages(cfg, sizes, bs)
    clf = _classifier(cfg)
    stages.append(Stage("score", "classifier", clf, "forward", n, 1, bs, note="the prediction of every input"))
    n_classes = None
    if m.guidance == "cfg" and not cfg.model.get("pretrained"):
        c = OmegaConf.to_container(cfg.classifier, resolve=True)
        n_classes = int(c.get("num_classes") or (10 if c["kind"] == "cifar_resnet" else _num_classes(cfg.data.id)))
        stages += _diffusion_training(cfg, sizes["n_train"], n_classes + 1)
    probe = unet_probe(_model_cfg(cfg), size, ch, n_classes + 1 if n_classes else None)
    # upper bound: every image inverted the full inversion_steps (early stop and "+X" deferral only lower it)
    depth = int(m.inversion_steps)
    first = 0 if m.ddim_convention == "adm" else 1
    last = int(m.steps) - 1 if m.ddim_convention == "adm" else int(m.steps)
    syn = min(max(depth + int(m.synthesis_offset), first), last) - first + 1
    guided = syn * (2 if m.guidance == "cfg" else 1)
    aux = syn if m.uncond_aux else 0
    stages.append(
        Stage(
            "score",
            "unet (inversion + synthesis)",
            probe,
            "forward",
            n,
            depth + guided + aux,
            bs,
            m.precision,
            note=f"<= {depth} inversion + {syn} synthesis steps"
            + (" (CFG: 2 evaluations)" if m.guidance == "cfg" else "")
            + (f" + {aux} unguided" if aux else ""),
        )
    )
    if m.guidance == "cg":
        cut = max(1, int(m.cutouts))
        stages.append(
            Stage(
                "score",
                "classifier (guidance gradient)",
                clf,
                "input_grad",
                n,
                syn * cut,
                bs * cut,
                m.precision,
                note=f"{syn} steps x {cut} cutouts",
            )
        )
    if m.distance == "logit_l1":
        stages.append(Stage("score", "classifier (logit distance)", clf, "forward", n, 2, bs))
    else:
        dist = distance_probe(m.distance, size, ch, m.get("lpips_net", "alex"))
        if dist is not None:
            stages.append(Stage("score", f"distance {m.distance}", dist, "forward", n, 1, bs))
    if m.get("early_stop_dists") is not None:
        dists = distance_probe("dists", size, ch)
        stages.append(
            Stage(
                "score",
                "distance dists (early stop)",
                dists,
                "forward",
                n,
                depth,
                bs,
                note="after every inversion step",
            )
        )
    if m.combine != "none":
        stages.append(Stage("score", "classifier (+X threshold)", clf, "forward", sizes["n_train"], 1, bs))
    return stages


@register_planner("dlsr")
def plan_dlsr(cfg: DictConfig, sizes: dict[str, int]) -> list[Stage]:
    m, size = cfg.method, int(cfg.data.image_size)
    layers = tuple(m.layers) if m.layers else None
    stride = m.pool_stride
    dim = _encoder_dim(m.encoder, layers, int(m.input_size), stride)
    enc = encoder_probe(m.encoder, layers, int(m.input_size), stride, size)
    net = lfdn_probe(dim, int(m.width), int(m.num_blocks), m.time_embed_dim)
    n_train, n = sizes["n_train"], sizes["n_id"] + sizes["n_ood"]
    bs = min(int(m.train_batch_size), n_train)
    seen = int(m.epochs) * (n_train // bs) * bs
    ema = "adamw_ema" if float(m.ema_decay) > 0 else "adamw"
    calls = int(m.t) if m.recon == "official" else int(m.t) + 1
    calls *= 2 if m.score == "lr" else 1
    return [
        Stage(
            "train",
            f"encoder {m.encoder}",
            enc,
            "forward",
            n_train,
            1,
            int(m.batch_size),
            note="features of the ID training split",
        ),
        Stage(
            "train",
            "lfdn",
            net,
            "train",
            n_train,
            seen / max(n_train, 1),
            bs,
            optimizer=ema,
            family="mlp",
            note=f"{m.epochs} epochs x batch {bs}",
        ),
        Stage("score", f"encoder {m.encoder}", enc, "forward", n, 1, int(m.batch_size), m.precision),
        Stage(
            "score",
            "lfdn",
            net,
            "forward",
            n,
            calls,
            int(m.batch_size),
            m.precision,
            family="mlp",
            note=f"t={m.t}, recon={m.recon}" + (", two checkpoints" if m.score == "lr" else ""),
        ),
    ]


@register_planner("patch_knn")
def plan_patch_knn(cfg: DictConfig, sizes: dict[str, Any]) -> list[Stage]:
    m, size = cfg.method, int(cfg.data.image_size)
    layers = tuple(m.layers) if m.get("layers") else None
    fsize = int(m.get("feature_size") or size)
    enc = encoder_probe(m.get("encoder", "alexnet"), layers, fsize, None, size)
    n_test = sum(sizes["tests"].values()) * sizes["seeds"]
    shots = int(cfg.data.k_shot) * len(sizes["tests"]) * sizes["seeds"]
    bs = int(m.get("batch_size", 32))
    prec = m.get("precision", "fp32")
    return [
        Stage("train", "encoder (memory bank)", enc, "forward", shots, 1, bs, prec),
        Stage("score", "encoder", enc, "forward", n_test, 1, bs, prec, note="+ nearest-neighbour search (not counted)"),
    ]


@register_planner("anomalysd")
def plan_anomalysd(cfg: DictConfig, sizes: dict[str, Any]) -> list[Stage]:
    from ood_bench.samplers.anomaly_masks import masks_per_scale

    m, size = cfg.method, int(cfg.data.image_size)
    stack = _sd_parts(OmegaConf.to_container(m, resolve=True), size)
    n_test = sum(sizes["tests"].values()) * sizes["seeds"]
    fits = sizes["fits"]
    shots = int(cfg.data.k_shot) * (len(sizes["tests"]) if cfg.data.mode == "multi_class" else 1)
    n_steps = min(int(int(m.steps) * float(m.strength)), int(m.steps))  # samplers/sd_inpaint.inference_timesteps
    masks = sum(masks_per_scale(m.mask_layout, k) for k in m.mask_scales) + 1  # AnomalySD.masks_per_image
    prec, bs = m.precision, int(m.batch_size)
    ema = "adamw_ema" if float(m.ema_decay) > 0 else "adamw"
    stages = [
        Stage(
            "train",
            "sd unet (fine-tune)",
            stack["unet"],
            "train",
            fits * shots,
            int(m.unet_steps) * int(m.train_batch_size) / shots,
            int(m.train_batch_size),
            prec,
            ema,
            note=f"{fits} fits x {m.unet_steps} steps x batch {m.train_batch_size}",
        ),
        Stage(
            "score",
            "sd unet (inpainting)",
            stack["unet"],
            "forward",
            n_test,
            masks * n_steps,
            bs,
            prec,
            note=f"{masks} masks x {n_steps} steps (strength {m.strength})",
        ),
        Stage("score", "alexnet features", stack["alex"], "forward", n_test, masks + 1, bs, prec),
    ]
    if stack["vae"] is not None:
        stages.append(Stage("score", "vae (encode + decode)", stack["vae"], "forward", n_test, masks + 1, bs, prec))
        if m.vae_mode != "none":
            stages.append(
                Stage(
                    "train",
                    "vae (fine-tune)",
                    stack["vae"],
                    "train",
                    fits * shots,
                    int(m.vae_steps) * int(m.vae_batch_size) / shots,
                    int(m.vae_batch_size),
                    prec,
                    "adamw",
                    note=f"{fits} fits x {m.vae_steps} steps",
                )
            )
    return stages


def _sd_parts(mc: dict[str, Any], size: int) -> dict[str, Probe | None]:
    """Probes of an SD-inpainting stack's UNet and VAE (from the scratch config or a local stack's configs) and of
    the AlexNet feature maps."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel

    if mc.get("scratch"):
        from ood_bench.models.sd_stack import _scratch_kl, scratch_factor

        s = mc["scratch"]
        f = scratch_factor(s)
        vae_kind = s["vae"]["kind"]
        lat_ch = 3 * s["vae"]["patch_size"] ** 2 if vae_kind == "patch" else int(s["vae"]["latent_channels"])
        u = dict(s["unet"])
        unet_cfg = dict(
            sample_size=size // f,
            in_channels=2 * lat_ch + 1,
            out_channels=lat_ch,
            block_out_channels=tuple(u["block_out_channels"]),
            down_block_types=tuple(u["down_block_types"]),
            up_block_types=tuple(u["up_block_types"]),
            layers_per_block=u["layers_per_block"],
            norm_num_groups=u["norm_num_groups"],
            attention_head_dim=u["attention_head_dim"],
            cross_attention_dim=int(s["text"]["hidden_size"]),
        )
        text_len, text_dim = int(s["text"]["max_length"]), int(s["text"]["hidden_size"])
        vae_build = (lambda: _scratch_kl(s["vae"])) if vae_kind == "kl" else None
    else:
        ref = Path(str(mc["stack"])).expanduser()
        if (ref / "unet" / "config.json").is_file() and (ref / "vae" / "config.json").is_file():
            unet_cfg = json.loads((ref / "unet" / "config.json").read_text())
            vae_cfg = json.loads((ref / "vae" / "config.json").read_text())
        elif str(mc["stack"]) in KNOWN_SD_STACKS:
            log.info("plan: %s not on disk; its published architecture is planned", mc["stack"])
            unet_cfg, vae_cfg = (dict(c) for c in KNOWN_SD_STACKS[str(mc["stack"])])
        else:
            raise ConfigError(
                f"plan: method.stack={mc['stack']!r} is not a local folder with unet/ and vae/config.json, nor a "
                f"known stack ({sorted(KNOWN_SD_STACKS)}); download it first (conf/method/anomalysd_sd.yaml)"
            )
        lat_ch, f = int(vae_cfg["latent_channels"]), 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        unet_cfg["sample_size"] = size // f
        text_len, text_dim = 77, int(unet_cfg["cross_attention_dim"])
        vae_build = lambda: AutoencoderKL.from_config(vae_cfg)  # noqa: E731
    lat = size // f

    def unet_example(rows: int, device: torch.device) -> tuple[tuple, dict]:
        x = torch.zeros(rows, int(unet_cfg["in_channels"]), lat, lat, device=device)
        t = torch.zeros(rows, dtype=torch.long, device=device)
        return (x, t), {"encoder_hidden_states": torch.zeros(rows, text_len, text_dim, device=device)}

    parts: dict[str, Probe | None] = {
        "unet": Probe(
            f"sd_unet:{sorted(unet_cfg.items())}:{lat}",
            lambda: UNet2DConditionModel.from_config(unet_cfg),
            unet_example,
        ),
        "vae": None,
    }
    if vae_build is not None:

        def vae_call(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return vae.decode(vae.encode(x).latent_dist.mode()).sample

        parts["vae"] = Probe(
            f"sd_vae:{mc.get('stack')}:{size}",
            lambda: _Call(vae_build(), vae_call),
            lambda rows, device: ((torch.zeros(rows, 3, size, size, device=device),), {}),
        )
    fsize = int(mc.get("feature_size") or size)
    parts["alex"] = encoder_probe("alexnet", None, fsize, None, size)
    return parts


# ---------------------------------------------------------------------------------------------------------------
# The plan of a cell, its table and CSV
# ---------------------------------------------------------------------------------------------------------------


def plan_cell(cfg: DictConfig) -> CellPlan:
    """The stages of the cell ``cfg`` (sizes from disk or ``KNOWN_SIZES``), each measured."""
    method = str(cfg.method.name)
    if method not in PLANNERS:
        raise ConfigError(f"plan: method.name={method!r} has no planner; planned methods: {sorted(PLANNERS)}")
    task = cfg.data.get("task") or "ood"
    notes = []
    if task == "anomaly":
        sizes = anomaly_sizes(cfg.data)
        flat = {"n_test": sum(sizes["tests"].values()), "shot_seeds": sizes["seeds"], "fits": sizes["fits"]}
    else:
        flat, how = ood_sizes(cfg.data)
        sizes = flat
        notes.append(f"sizes from {how}")
    overrides = _overrides()
    cell = CellPlan(method, str(cfg.data.name), overrides, flat, PLANNERS[method](cfg, sizes), notes)
    for stage in cell.stages:
        stage.measure()
    return cell


def _overrides() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return " ".join(HydraConfig.get().overrides.task)


def cell_rows(cell: CellPlan, utilisation: float) -> list[dict[str, Any]]:
    """One CSV row per stage and one ``total`` row for the cell."""
    weights: dict[str, float] = {}
    for s in cell.stages:  # float32 weights of every distinct network of a phase, resident together
        weights.setdefault(s.phase, 0.0)
    seen: set[tuple[str, str]] = set()
    for s in cell.stages:
        if (s.phase, s.probe.key) not in seen:
            seen.add((s.phase, s.probe.key))
            weights[s.phase] += 4.0 * s.measure().params
    base = {"method": cell.method, "data": cell.data, "overrides": cell.overrides, **cell.sizes}
    rows = []
    for s in cell.stages:
        c = s.measure()
        row = {
            **base,
            "phase": s.phase,
            "network": s.network,
            "params_m": round(c.params / 1e6, 3),
            "images": s.images,
            "evals_per_image": round(s.evals_per_image, 3),
            "kind": s.kind,
            "gflops_per_eval": round(c.flops / 1e9, 4),
            "total_pflops": s.flops / 1e15,
            "batch": s.batch,
            "precision": s.precision,
            "peak_mem_gib": round((weights[s.phase] + s.extra_bytes()) / GIB, 3),
            "counted_on": c.device,
            "cpu_hours": cpu_seconds(s) / 3600,
            **{f"{a}_hours": accelerator_seconds(s, acc, utilisation) / 3600 for a, acc in ACCELERATORS.items()},
            "note": s.note,
        }
        rows.append(row)
    rows.append(_total(rows, base, "total"))
    return rows


def _total(rows: list[dict[str, Any]], base: dict[str, Any], label: str) -> dict[str, Any]:
    keys = ["total_pflops", "cpu_hours", *(f"{a}_hours" for a in ACCELERATORS)]
    out = {**base, "phase": label, "network": ""}
    for k in keys:
        out[k] = sum(r[k] for r in rows if r["phase"] in ("train", "score"))
    out["peak_mem_gib"] = max((r["peak_mem_gib"] for r in rows if r["phase"] in ("train", "score")), default=0.0)
    return out


COLUMNS = (
    "method",
    "data",
    "overrides",
    "n_train",
    "n_id",
    "n_ood",
    "n_test",
    "shot_seeds",
    "fits",
    "phase",
    "network",
    "params_m",
    "images",
    "evals_per_image",
    "kind",
    "gflops_per_eval",
    "total_pflops",
    "batch",
    "precision",
    "peak_mem_gib",
    "counted_on",
    "cpu_hours",
    *(f"{a}_hours" for a in ACCELERATORS),
    "note",
)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomically write ``rows`` with ``COLUMNS``."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The plan as a Markdown table (hours as h, memory as GiB)."""
    import pandas as pd

    shown = [
        "method",
        "data",
        "phase",
        "network",
        "images",
        "evals_per_image",
        "gflops_per_eval",
        "total_pflops",
        "batch",
        "precision",
        "peak_mem_gib",
        "cpu_hours",
        *(f"{a}_hours" for a in ACCELERATORS),
    ]
    frame = pd.DataFrame(rows).reindex(columns=shown)
    return frame.to_markdown(index=False, floatfmt=".4g")


def _out_dir(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.log_dir) / "plan"


def plan_run(cfg: DictConfig) -> dict[str, Any]:
    """``plan=true``: plan the cell, print it, write ``plan.csv`` into the job folder; returns the total row."""
    utilisation = float(cfg.get("plan_utilisation") or UTILISATION)
    if not 0 < utilisation <= 1:
        raise ConfigError(f"plan_utilisation={utilisation} is not valid; valid: 0 < value <= 1")
    cell = plan_cell(cfg)
    rows = cell_rows(cell, utilisation)
    path = _out_dir(cfg) / "plan.csv"
    write_csv(path, rows)
    total = rows[-1]
    log.info(
        "plan of %s on %s (%s; utilisation %.2f of peak; CPU = one core here, from make bench):\n%s\n"
        "cell total: %.4g PFLOP, peak memory %.2f GiB, %s; written: %s",
        cell.method,
        cell.data,
        "; ".join(cell.notes) or "sizes",
        utilisation,
        format_rows(rows),
        total["total_pflops"],
        total["peak_mem_gib"],
        _hours_text(total),
        path,
    )
    return total


def _hours_text(row: dict[str, Any]) -> str:
    parts = [f"{a} {row[f'{a}_hours']:.3g} h" for a in ACCELERATORS]
    return "GPU-hours: " + ", ".join(parts) + f"; this CPU {row['cpu_hours']:.3g} h"


def summarize_sweep(sweep_dir: Path) -> list[dict[str, Any]] | None:
    """Gather the ``plan.csv`` of every job of a sweep into ``<sweep_dir>/plan.csv`` with a sweep total; print it."""
    files = sorted(sweep_dir.glob("*/plan.csv"), key=lambda p: (len(p.parent.name), p.parent.name))
    if not files:
        return None
    rows: list[dict[str, Any]] = []
    for f in files:
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                for k, v in r.items():
                    if k.endswith(("hours", "pflops", "gib")) and v not in ("", None):
                        r[k] = float(v)
                rows.append(r)
    cells = [r for r in rows if r["phase"] == "total"]
    tokens = [str(r.get("overrides") or "").split() for r in cells]
    common = set.intersection(*(set(t) for t in tokens)) if tokens else set()
    for r, toks in zip(cells, tokens):  # the cell's own overrides name it in the table
        r["phase"], r["network"] = "cell", " ".join(t for t in toks if t not in common)
    total = _total([{**r, "phase": "train"} for r in cells], {"method": "", "data": "", "overrides": ""}, "sweep")
    rows = [r for r in rows if r["phase"] != "cell"] + cells + [total]
    write_csv(sweep_dir / "plan.csv", rows)
    log.info(
        "sweep plan (%d cells):\n%s\nsweep total: %.4g PFLOP, largest peak memory %.2f GiB, %s; written: %s",
        len(cells),
        format_rows([*cells, total]),
        total["total_pflops"],
        total["peak_mem_gib"],
        _hours_text(total),
        sweep_dir / "plan.csv",
    )
    return rows


class PlanSummary(Callback):
    """Hydra callback: at the end of a ``plan=true`` multirun, gather the cells' plans and print the sweep total."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("plan"):
            summarize_sweep(Path(str(config.hydra.sweep.dir)))
