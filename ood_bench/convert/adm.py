"""OpenAI guided-diffusion (ADM) ``UNetModel`` checkpoint -> diffusers ``UNet2DModel`` (``scripts/convert_adm.py``).

ADM's UNet maps onto ``UNet2DModel`` block for block:

- ``input_blocks`` level l -> ``down_blocks[l]``: ``AttnDownBlock2D`` where ADM has attention at that level, else
  ``ResnetDownsampleBlock2D`` (``resblock_updown``) or ``DownBlock2D`` (strided-conv ``Downsample``);
  ``downsample_type``/``upsample_type`` ``"resnet"`` with ``resblock_updown``. ``output_blocks`` likewise.
- ``ResBlock`` -> ``ResnetBlock2D`` (``resnet_time_scale_shift="scale_shift"`` for ``use_scale_shift_norm``:
  ``norm(h) * (1 + scale) + shift``); the 1x1 ``skip_connection`` -> ``conv_shortcut``.
- ``AttentionBlock`` -> ``Attention`` with ``attention_head_dim`` = ADM's ``num_head_channels`` (or width /
  ``num_heads`` when that is the same at every attention level); the fused ``qkv`` 1x1 conv is split into
  ``to_q``/``to_k``/``to_v`` in ADM's head order (``legacy``: heads first, then q/k/v; ``new``:
  ``use_new_attention_order``). ADM scales q and k by ``ch**-0.25`` each, diffusers the product by ``ch**-0.5``:
  the same. ``attn_norm_num_groups=32`` keeps the middle block's GroupNorm, which diffusers drops by default with
  scale-shift resnets.
- time embedding: ``[cos, sin]`` of ``t * 10000**(-i/half)`` (``flip_sin_to_cos=True, freq_shift=0``); the class
  embedding ``label_emb`` -> ``class_embedding`` (``num_class_embeds = num_classes``).
- learned sigma: ``out_channels = 2 * in_channels`` as in ADM; channels ``[:C]`` are epsilon, ``[C:]`` the
  variance interpolation value v of ``exp(v' log beta + (1 - v') log beta_tilde)``, ``v' = (v + 1) / 2``
  (diffusers' ``variance_type="learned_range"``, written into the scheduler config).

Not representable (refused with a ``CheckpointError`` that says why): a first-level multiplier other than 1
(512x512 model: the sinusoid width would differ), a fixed head count with different head widths across levels
(128x128 model: ``num_heads=4``), ``conv_resample=False`` without ``resblock_updown``, super-resolution
(``*_upsampler.pt``) and classifier (``*_classifier.pt``) checkpoints.

ADM checkpoints do not store their flags. Everything that shapes the weights is read from them (width, levels,
blocks per level, attention levels, classes, scale-shift, resblock up/down, learned sigma); what does not
(head width, attention order, noise schedule, image size) comes from the preset of the official file name
(``PRESETS``) or the command-line flags, which must agree with the official README's flags for that file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ood_bench.convert.common import CheckpointError, load_checkpoint, map_state_dict, save_folder

log = logging.getLogger(__name__)

ATTENTION_ORDERS = ("legacy", "new")
NOISE_SCHEDULES = ("linear", "cosine")

#: The flags of guided-diffusion's README for each released diffusion checkpoint that the weights do not reveal.
PRESETS: dict[str, dict[str, Any]] = {
    "64x64_diffusion.pt": {
        "image_size": 64,
        "num_head_channels": 64,
        "attention_order": "new",
        "noise_schedule": "cosine",
    },
    "256x256_diffusion.pt": {
        "image_size": 256,
        "num_head_channels": 64,
        "attention_order": "legacy",
        "noise_schedule": "linear",
    },
    "256x256_diffusion_uncond.pt": {
        "image_size": 256,
        "num_head_channels": 64,
        "attention_order": "legacy",
        "noise_schedule": "linear",
    },
}
#: Released files that cannot be represented as a ``UNet2DModel``, and why.
UNSUPPORTED: dict[str, str] = {
    "128x128_diffusion.pt": (
        "it uses num_heads=4 at every attention level (widths 512, 768, 1024 give head widths 128, 192, 256), "
        "while UNet2DModel has one attention_head_dim for all levels"
    ),
    "512x512_diffusion.pt": (
        "its channel_mult starts at 0.5: the time embedding's sinusoid has model_channels (256) entries but "
        "UNet2DModel sizes it by the first block (128)"
    ),
}


@dataclass(frozen=True)
class ADMArch:
    """The ADM ``UNetModel`` settings that determine the network's function."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_levels: tuple[int, ...]  # levels (0 = full resolution) with attention blocks
    num_classes: int | None
    use_scale_shift_norm: bool
    resblock_updown: bool
    head_channels: int  # channels per attention head (the same at every attention level)
    attention_order: str
    noise_schedule: str
    diffusion_steps: int = 1000

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @property
    def attention_resolutions(self) -> tuple[int, ...]:
        """In ADM's flag units (image resolution of each attention level)."""
        return tuple(self.image_size // 2**lvl for lvl in self.attention_levels)


def _has(sd: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def check_kind(sd: Any, source: str) -> None:
    """Refuse what is not an ADM diffusion ``UNetModel`` state dict, naming what it looks like instead."""
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = list(sd)[:8] if isinstance(sd, Mapping) else type(sd).__name__
        hint = ""
        if isinstance(sd, Mapping) and {"model", "ema"} & set(sd):
            hint = " It looks like a score_sde_pytorch checkpoint: use scripts/convert_score_sde.py."
        raise CheckpointError(
            f"{source}: not a guided-diffusion UNetModel state dict (a flat mapping of parameter names to tensors); "
            f"top-level entries: {keys}.{hint}"
        )
    if any(k.startswith("module.") for k in sd):
        raise CheckpointError(f"{source}: keys start with 'module.' (a DataParallel wrapper); strip that prefix first")
    if _has(sd, "input_blocks.") and not _has(sd, "output_blocks."):
        raise CheckpointError(
            f"{source}: has input_blocks but no output_blocks: a guided-diffusion classifier (EncoderUNetModel), "
            "not a diffusion model"
        )
    needed = ["time_embed.0.weight", "input_blocks.0.0.weight", "middle_block.0.in_layers.0.weight", "out.2.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(
            f"{source}: not a guided-diffusion UNetModel checkpoint: missing keys {missing} "
            f"(first keys present: {sorted(sd)[:6]})"
        )


def infer_arch(
    sd: Mapping[str, torch.Tensor],
    image_size: int,
    num_head_channels: int | None = 64,
    num_heads: int | None = None,
    attention_order: str = "legacy",
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    source: str = "checkpoint",
) -> ADMArch:
    """Read the architecture from the weights' names and shapes; the head layout and schedule are given."""
    check_kind(sd, source)
    if attention_order not in ATTENTION_ORDERS:
        raise CheckpointError(f"attention_order={attention_order!r} is not valid; valid: {list(ATTENTION_ORDERS)}")
    if noise_schedule not in NOISE_SCHEDULES:
        raise CheckpointError(f"noise_schedule={noise_schedule!r} is not valid; valid: {list(NOISE_SCHEDULES)}")
    mc = int(sd["time_embed.0.weight"].shape[1])
    in_ch = int(sd["input_blocks.0.0.weight"].shape[1])
    first = int(sd["input_blocks.0.0.weight"].shape[0])
    out_ch = int(sd["out.2.weight"].shape[0])
    n_out = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"output_blocks\.(\d+)\.", k)))
    n_in = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k)))

    def is_attn(prefix: str) -> bool:
        return f"{prefix}.qkv.weight" in sd

    def has_up(k: int) -> bool:  # output block k ends its level with an up-sampler
        last = 2 if is_attn(f"output_blocks.{k}.1") else 1
        return _has(sd, f"output_blocks.{k}.{last}.")

    ups = [k for k in range(n_out) if has_up(k)]
    nrb = ups[0] if ups else n_out - 1
    levels = n_out // (nrb + 1)
    if levels * (nrb + 1) != n_out or n_in != n_out or ups != [(u + 1) * (nrb + 1) - 1 for u in range(levels - 1)]:
        raise CheckpointError(
            f"{source}: the block layout ({n_in} input blocks, {n_out} output blocks, up-samplers in output blocks "
            f"{ups}) is not a guided-diffusion UNetModel's"
        )
    mult, attn_levels = [], []
    for lvl in range(levels):
        prefix = f"input_blocks.{1 + lvl * (nrb + 1)}"
        width = int(sd[f"{prefix}.0.out_layers.3.weight"].shape[0])
        if width % mc:
            raise CheckpointError(f"{source}: level {lvl} has {width} channels, not a multiple of {mc}")
        mult.append(width // mc)
        if is_attn(f"{prefix}.1"):
            attn_levels.append(lvl)
    if first != mc or mult[0] != 1:
        raise CheckpointError(
            f"{source}: the first level has {first} channels but the time embedding {mc} (channel_mult[0] != 1): "
            "UNet2DModel sizes the time sinusoid by the first block, so this model cannot be represented"
        )
    updown = levels > 1 and f"input_blocks.{nrb + 1}.0.in_layers.0.weight" in sd
    if levels > 1 and not updown and f"input_blocks.{nrb + 1}.0.op.weight" not in sd:
        raise CheckpointError(
            f"{source}: the down-sampler has no weights (conv_resample=False: average pooling); UNet2DModel's "
            "DownBlock2D down-samples with a strided conv, so this model cannot be represented"
        )
    emb_w = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    res_w = sd["input_blocks.1.0.out_layers.3.weight"].shape[0]
    widths = sorted({mc * mult[lvl] for lvl in attn_levels} | {mc * mult[-1]})  # the middle block attends too
    if num_heads is not None and num_heads > 0 and (num_head_channels is None or num_head_channels <= 0):
        dims = {w // num_heads for w in widths}
        if any(w % num_heads for w in widths) or len(dims) != 1:
            raise CheckpointError(
                f"{source}: num_heads={num_heads} at attention widths {widths} gives head widths "
                f"{sorted(w / num_heads for w in widths)}; UNet2DModel needs one attention_head_dim for every level"
            )
        head = dims.pop()
    elif num_head_channels is not None and num_head_channels > 0:
        head = int(num_head_channels)
        if any(w % head for w in widths):
            raise CheckpointError(f"{source}: attention widths {widths} are not multiples of num_head_channels={head}")
    else:
        raise CheckpointError("give num_head_channels (> 0) or num_heads (> 0)")
    label = sd.get("label_emb.weight")
    return ADMArch(
        image_size=int(image_size),
        in_channels=in_ch,
        model_channels=mc,
        out_channels=out_ch,
        num_res_blocks=nrb,
        channel_mult=tuple(mult),
        attention_levels=tuple(attn_levels),
        num_classes=None if label is None else int(label.shape[0]),
        use_scale_shift_norm=emb_w == 2 * res_w,
        resblock_updown=updown,
        head_channels=head,
        attention_order=attention_order,
        noise_schedule=noise_schedule,
        diffusion_steps=int(diffusion_steps),
    )


def unet_config(arch: ADMArch) -> dict[str, Any]:
    """The ``UNet2DModel`` settings that compute what ADM's ``UNetModel`` with ``arch`` computes."""
    if arch.image_size % 2 ** (len(arch.channel_mult) - 1):
        raise CheckpointError(f"image_size={arch.image_size} is not divisible by 2^{len(arch.channel_mult) - 1}")
    levels = range(len(arch.channel_mult))
    plain_down = "ResnetDownsampleBlock2D" if arch.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if arch.resblock_updown else "UpBlock2D"
    down = [("AttnDownBlock2D" if lvl in arch.attention_levels else plain_down) for lvl in levels]
    up = [("AttnUpBlock2D" if lvl in arch.attention_levels else plain_up) for lvl in reversed(levels)]
    return {
        "sample_size": arch.image_size,
        "in_channels": arch.in_channels,
        "out_channels": arch.out_channels,
        "block_out_channels": [arch.model_channels * m for m in arch.channel_mult],
        "layers_per_block": arch.num_res_blocks,
        "down_block_types": down,
        "up_block_types": up,
        "downsample_type": "resnet" if arch.resblock_updown else "conv",
        "upsample_type": "resnet" if arch.resblock_updown else "conv",
        "downsample_padding": 1,
        "attention_head_dim": arch.head_channels,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if arch.use_scale_shift_norm else "default",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "num_class_embeds": arch.num_classes,
    }


def scheduler(arch: ADMArch) -> DDPMScheduler:
    """ADM's noise schedule as a diffusers scheduler (learned-range variance for learned-sigma models)."""
    steps = arch.diffusion_steps
    if arch.noise_schedule == "linear":  # guided_diffusion.gaussian_diffusion.get_named_beta_schedule
        scale = 1000 / steps
        sched = {"beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
    else:  # the same alpha-bar cosine with s = 0.008 and betas capped at 0.999
        sched = {"beta_schedule": "squaredcos_cap_v2"}
    variance = "learned_range" if arch.learn_sigma else "fixed_large"
    return DDPMScheduler(num_train_timesteps=steps, prediction_type="epsilon", variance_type=variance, **sched)


_Fn = Callable[[torch.Tensor], torch.Tensor] | None


def _squeeze(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t


def _qkv_part(part: int, heads: int, order: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """q (0), k (1) or v (2) rows of ADM's fused qkv conv, in diffusers' head-major order."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        t = _squeeze(t)  # [3C, C] or [3C]
        c3 = t.shape[0]
        c, ch = c3 // 3, c3 // 3 // heads
        rest = t.shape[1:]
        if order == "legacy":  # per head: q, k, v blocks of ch rows
            return t.reshape(heads, 3, ch, *rest)[:, part].reshape(c, *rest)
        return t.reshape(3, c, *rest)[part]  # q of all heads, then k, then v

    return fn


def key_mapping(arch: ADMArch, target_keys: set[str]) -> dict[str, tuple[str, _Fn]]:
    """diffusers key -> (ADM key, transform) for every weight of the converted model."""
    m: dict[str, tuple[str, _Fn]] = {}

    def pair(dst: str, src: str, fn: _Fn = None) -> None:
        for p in ("weight", "bias"):
            m[f"{dst}.{p}"] = (f"{src}.{p}", fn)

    def res(dst: str, src: str) -> None:
        pair(f"{dst}.norm1", f"{src}.in_layers.0")
        pair(f"{dst}.conv1", f"{src}.in_layers.2")
        pair(f"{dst}.time_emb_proj", f"{src}.emb_layers.1")
        pair(f"{dst}.norm2", f"{src}.out_layers.0")
        pair(f"{dst}.conv2", f"{src}.out_layers.3")
        if f"{dst}.conv_shortcut.weight" in target_keys:
            pair(f"{dst}.conv_shortcut", f"{src}.skip_connection")

    def attn(dst: str, src: str, width: int) -> None:
        heads = width // arch.head_channels
        pair(f"{dst}.group_norm", f"{src}.norm")
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            pair(f"{dst}.{name}", f"{src}.qkv", _qkv_part(i, heads, arch.attention_order))
        pair(f"{dst}.to_out.0", f"{src}.proj_out", _squeeze)

    pair("time_embedding.linear_1", "time_embed.0")
    pair("time_embedding.linear_2", "time_embed.2")
    if arch.num_classes is not None:
        m["class_embedding.weight"] = ("label_emb.weight", None)
    pair("conv_in", "input_blocks.0.0")
    nrb, levels = arch.num_res_blocks, len(arch.channel_mult)
    for lvl in range(levels):
        width = arch.model_channels * arch.channel_mult[lvl]
        base = 1 + lvl * (nrb + 1)
        for j in range(nrb):
            res(f"down_blocks.{lvl}.resnets.{j}", f"input_blocks.{base + j}.0")
            if lvl in arch.attention_levels:
                attn(f"down_blocks.{lvl}.attentions.{j}", f"input_blocks.{base + j}.1", width)
        if lvl != levels - 1:
            if arch.resblock_updown:
                res(f"down_blocks.{lvl}.downsamplers.0", f"input_blocks.{base + nrb}.0")
            else:
                pair(f"down_blocks.{lvl}.downsamplers.0.conv", f"input_blocks.{base + nrb}.0.op")
    mid = arch.model_channels * arch.channel_mult[-1]
    res("mid_block.resnets.0", "middle_block.0")
    attn("mid_block.attentions.0", "middle_block.1", mid)
    res("mid_block.resnets.1", "middle_block.2")
    for u, lvl in enumerate(reversed(range(levels))):
        width = arch.model_channels * arch.channel_mult[lvl]
        has_attn = lvl in arch.attention_levels
        for i in range(nrb + 1):
            src = f"output_blocks.{u * (nrb + 1) + i}"
            res(f"up_blocks.{u}.resnets.{i}", f"{src}.0")
            if has_attn:
                attn(f"up_blocks.{u}.attentions.{i}", f"{src}.1", width)
            if lvl != 0 and i == nrb:
                up = f"{src}.{2 if has_attn else 1}"
                if arch.resblock_updown:
                    res(f"up_blocks.{u}.upsamplers.0", up)
                else:
                    pair(f"up_blocks.{u}.upsamplers.0.conv", f"{up}.conv")
    pair("conv_norm_out", "out.0")
    pair("conv_out", "out.2")
    return m


def convert_state_dict(sd: Mapping[str, torch.Tensor], arch: ADMArch) -> UNet2DModel:
    """A ``UNet2DModel`` (eval mode, float32) holding the ADM weights ``sd``."""
    unet = UNet2DModel(**unet_config(arch))
    if arch.num_classes is not None:  # every embedding is a real class (the suite's own models add a null class)
        unet.register_to_config(_has_null_class=False)
    what = f"ADM UNetModel {asdict(arch)}"
    want = unet.state_dict()
    unet.load_state_dict(map_state_dict(sd, key_mapping(arch, set(want)), want, what), strict=True)
    return unet.eval()


def preset_for(path: str | Path) -> dict[str, Any]:
    """The official flags for a released file name (empty for another name); refuses unsupported releases."""
    name = Path(path).name
    if name in UNSUPPORTED:
        raise CheckpointError(f"{name} cannot be converted to a UNet2DModel: {UNSUPPORTED[name]}")
    if "upsampler" in name:
        raise CheckpointError(
            f"{name} is a super-resolution model (SuperResModel: a bilinear low-res input concatenated to x), "
            "which UNet2DModel does not express"
        )
    if "classifier" in name:
        raise CheckpointError(f"{name} is a noisy-image classifier (EncoderUNetModel), not a diffusion model")
    return dict(PRESETS.get(name, {}))


def convert(
    checkpoint: str | Path,
    out_dir: str | Path,
    image_size: int | None = None,
    num_head_channels: int | None = None,
    num_heads: int | None = None,
    attention_order: str | None = None,
    noise_schedule: str | None = None,
    diffusion_steps: int = 1000,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Convert the ADM checkpoint file into a diffusers folder ``out_dir``; unset flags come from the preset."""
    preset = preset_for(checkpoint)
    flags = {
        "image_size": image_size,
        "num_head_channels": num_head_channels,
        "num_heads": num_heads,
        "attention_order": attention_order,
        "noise_schedule": noise_schedule,
    }
    for key, value in flags.items():
        if value is not None and key in preset and preset[key] != value:
            log.warning("%s: %s=%r overrides the official %r", Path(checkpoint).name, key, value, preset[key])
    settings = {**preset, **{k: v for k, v in flags.items() if v is not None}}
    if num_heads is not None and num_head_channels is None:
        settings["num_head_channels"] = None
    sd = load_checkpoint(checkpoint, allow_pickle=allow_pickle)
    if "image_size" not in settings:
        raise CheckpointError(
            f"{Path(checkpoint).name} is not one of the released files {sorted(PRESETS)}: give --image-size "
            "(and --num-head-channels/--num-heads, --attention-order, --noise-schedule as trained)"
        )
    arch = infer_arch(
        sd,
        image_size=settings["image_size"],
        num_head_channels=settings.get("num_head_channels", 64),
        num_heads=settings.get("num_heads"),
        attention_order=settings.get("attention_order", "legacy"),
        noise_schedule=settings.get("noise_schedule", "linear"),
        diffusion_steps=diffusion_steps,
        source=str(checkpoint),
    )
    unet = convert_state_dict(sd, arch)
    info = {
        "converter": "ood_bench.convert.adm",
        "source": str(Path(checkpoint).resolve()),
        "architecture": {**asdict(arch), "attention_resolutions": arch.attention_resolutions},
        "learn_sigma": arch.learn_sigma,
        "has_null_class": False if arch.num_classes is not None else None,
        "parameters": sum(p.numel() for p in unet.parameters()),
    }
    log.info("ADM architecture: %s", info["architecture"])
    return save_folder(out_dir, unet, scheduler(arch), info, overwrite=overwrite)
