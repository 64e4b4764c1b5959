"""score_sde_pytorch ``ddpm`` model checkpoint -> diffusers ``UNet2DModel`` (``scripts/convert_score_sde.py``).

The checkpoint LMD uses on CIFAR-10 (``checkpoint_26.pth``, ``configs/subvp/cifar10_ddpm_continuous.py``) holds
``{"model": state_dict, "ema": {"decay", "num_updates", "shadow_params"}, "optimizer", "step"}``; the network
is score_sde's ``models/ddpm.py`` (Ho et al.'s UNet: nf 128, ch_mult 1,2,2,2, 2 res blocks, attention at 16 px,
GroupNorm eps 1e-6, swish), its modules in one flat list ``all_modules``. The EMA weights (``shadow_params``,
in ``model.parameters()`` order, which is the order of the ``model`` entry's non-buffer keys) are what LMD
samples with (``ema.copy_to``); ``weights="model"`` takes the raw training weights instead.

Mapping onto ``UNet2DModel``: time embedding ``[sin, cos]`` of ``t * 10000**(-i/(half-1))``
(``flip_sin_to_cos=False, freq_shift=1``); ``ResnetBlockDDPM`` -> ``ResnetBlock2D`` (time bias added before the
second GroupNorm; ``NIN_0`` 1x1 shortcut -> ``conv_shortcut``); single-head ``AttnBlock`` (``NIN_0..3``:
q, k, v, out; scale C**-0.5) -> ``Attention`` with ``attention_head_dim=None`` (one head of the block's width);
``Downsample`` (pad right/bottom by 1, stride-2 conv) -> ``downsample_padding=0``; ``norm_eps=1e-6``.
One structural difference: score_sde's up path has ONE attention block per attention level, after the
``num_res_blocks + 1`` resnets (Ho's TF code and diffusers' ``AttnUpBlock2D`` have one after every resnet).
The converted ``AttnUpBlock2D`` carries it as its last attention; the others get a zero output projection, so
they return their input exactly (an identity that costs two extra attention evaluations per forward).

What the network computes (all three matter to a sampler; they are written into the unet config as
``_score_sde`` and into ``conversion.json``):

- input: ``data.centered=True`` (every VP/subVP config): x in [-1, 1] as the suite's images. An uncentered model
  diffuses [0, 1] data, so its noise levels do not match the suite's: refused.
- time: the network's time input is a *label*: ``999 t`` for continuous training (VP or subVP, t in [eps, 1]),
  the integer step ``t (N-1)`` for discrete VP. The converted UNet takes the same label as its ``timestep``
  (diffusers' embedding accepts floats).
- output: the noise z of the SDE's marginal ``x_t = mean(t) x0 + std(t) z`` (score = -output / std(t)); VP:
  ``std = sqrt(1 - abar(t))``, i.e. epsilon; subVP: ``std = 1 - abar(t)``, with ``abar(t) = exp(-int beta)``.
  ``prediction_type="epsilon"``.

The scheduler written next to it is the discrete linear schedule ``betas = linspace(beta_min/N, beta_max/N, N)``
(score_sde's ``VPSDE.discrete_betas``): exact for a discrete VP model, the first-order discretisation for a
continuous VP model, and NOT the marginals of a subVP model (its total variance is
``abar + (1-abar)**2``, not 1): the suite's DDPM/DDIM samplers can run such a model only approximately;
``load_pretrained`` warns (docs/deviations.md L1).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ood_bench.convert.common import CheckpointError, load_checkpoint, map_state_dict, save_folder

log = logging.getLogger(__name__)

SDES = ("vpsde", "subvpsde")
WEIGHTS = ("ema", "model")


@dataclass(frozen=True)
class DDPMArch:
    """score_sde's ``ddpm`` model settings (defaults: LMD's CIFAR-10 model, ``cifar10_ddpm_continuous``)."""

    image_size: int = 32
    num_channels: int = 3
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    centered: bool = True
    sde: str = "subvpsde"
    continuous: bool = True
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_scales: int = 1000

    def check(self) -> None:
        if self.sde not in SDES:
            raise CheckpointError(f"sde={self.sde!r} is not valid; valid: {list(SDES)} (VE models are not DDPM UNets)")
        if not self.centered:
            raise CheckpointError(
                "data.centered=False: that model diffuses images in [0, 1], the suite's samplers diffuse [-1, 1], "
                "so its noise levels would not match; only centered models (every VP/subVP config) are supported"
            )
        if self.sde == "subvpsde" and not self.continuous:
            raise CheckpointError("sde=subvpsde needs continuous=True (score_sde always uses labels 999 t for it)")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise CheckpointError(f"image_size={self.image_size} is not divisible by 2^{len(self.ch_mult) - 1}")

    @property
    def resolutions(self) -> list[int]:
        return [self.image_size // 2**i for i in range(len(self.ch_mult))]

    @property
    def time_label(self) -> str:
        return "999 t (t in [eps, 1])" if self.continuous else f"integer step t ({self.num_scales - 1} t)"


def unet_config(arch: DDPMArch) -> dict[str, Any]:
    """``UNet2DModel`` settings equal to score_sde's ``ddpm`` network for ``arch``."""
    attn = [r in arch.attn_resolutions for r in arch.resolutions]
    return {
        "sample_size": arch.image_size,
        "in_channels": arch.num_channels,
        "out_channels": arch.num_channels,
        "block_out_channels": [arch.nf * m for m in arch.ch_mult],
        "layers_per_block": arch.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "downsample_padding": 0,
        "attention_head_dim": None,  # one head as wide as the block, at every level
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "resnet_time_scale_shift": "default",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "act_fn": "silu",
        "center_input_sample": False,
    }


def _linear_from_nin(w: torch.Tensor) -> torch.Tensor:  # NIN.W is [in, out]; nn.Linear.weight is [out, in]
    return w.t()


def _conv1x1_from_nin(w: torch.Tensor) -> torch.Tensor:
    return w.t()[:, :, None, None]


def module_plan(arch: DDPMArch) -> list[tuple[str, str]]:
    """``all_modules`` in order: (kind, diffusers prefix); kind in linear/conv/resample/resnet/attn/gn."""
    plan: list[tuple[str, str]] = [
        ("linear", "time_embedding.linear_1"),
        ("linear", "time_embedding.linear_2"),
        ("conv", "conv_in"),
    ]
    levels, nrb, res = len(arch.ch_mult), arch.num_res_blocks, arch.resolutions
    for i in range(levels):
        for j in range(nrb):
            plan.append(("resnet", f"down_blocks.{i}.resnets.{j}"))
            if res[i] in arch.attn_resolutions:
                plan.append(("attn", f"down_blocks.{i}.attentions.{j}"))
        if i != levels - 1:
            plan.append(("resample", f"down_blocks.{i}.downsamplers.0.conv"))
    plan += [("resnet", "mid_block.resnets.0"), ("attn", "mid_block.attentions.0"), ("resnet", "mid_block.resnets.1")]
    for u, i in enumerate(reversed(range(levels))):
        for j in range(nrb + 1):
            plan.append(("resnet", f"up_blocks.{u}.resnets.{j}"))
        if res[i] in arch.attn_resolutions:
            plan.append(("attn", f"up_blocks.{u}.attentions.{nrb}"))
        if i != 0:
            plan.append(("resample", f"up_blocks.{u}.upsamplers.0.conv"))
    plan += [("gn", "conv_norm_out"), ("conv", "conv_out")]
    return plan


def key_mapping(arch: DDPMArch, target_keys: set[str]) -> dict[str, tuple[str, Any]]:
    """diffusers key -> (score_sde key without ``module.``, transform), for every module of ``all_modules``."""
    m: dict[str, tuple[str, Any]] = {}

    def pair(dst: str, src: str, wfn: Any = None) -> None:
        m[f"{dst}.weight"] = (f"{src}.weight", wfn)
        m[f"{dst}.bias"] = (f"{src}.bias", None)

    def nin(dst: str, src: str, wfn: Any) -> None:
        m[f"{dst}.weight"] = (f"{src}.W", wfn)
        m[f"{dst}.bias"] = (f"{src}.b", None)

    for idx, (kind, dst) in enumerate(module_plan(arch)):
        src = f"all_modules.{idx}"
        if kind in ("linear", "conv", "gn"):
            pair(dst, src)
        elif kind == "resample":  # Downsample / Upsample with_conv: the conv is their Conv_0
            pair(dst, f"{src}.Conv_0")
        elif kind == "resnet":
            pair(f"{dst}.norm1", f"{src}.GroupNorm_0")
            pair(f"{dst}.conv1", f"{src}.Conv_0")
            pair(f"{dst}.time_emb_proj", f"{src}.Dense_0")
            pair(f"{dst}.norm2", f"{src}.GroupNorm_1")
            pair(f"{dst}.conv2", f"{src}.Conv_1")
            if f"{dst}.conv_shortcut.weight" in target_keys:
                nin(f"{dst}.conv_shortcut", f"{src}.NIN_0", _conv1x1_from_nin)
        else:  # attn
            pair(f"{dst}.group_norm", f"{src}.GroupNorm_0")
            for k, name in enumerate(("to_q", "to_k", "to_v", "to_out.0")):
                nin(f"{dst}.{name}", f"{src}.NIN_{k}", _linear_from_nin)
    return m


def _identity_attentions(unet: UNet2DModel, arch: DDPMArch) -> dict[str, torch.Tensor]:
    """Weights for the up-path attentions score_sde does not have: output projection zero (the block returns its
    input), the rest a harmless fixed value."""
    out: dict[str, torch.Tensor] = {}
    sd = unet.state_dict()
    for u, i in enumerate(reversed(range(len(arch.ch_mult)))):
        if arch.resolutions[i] not in arch.attn_resolutions:
            continue
        for j in range(arch.num_res_blocks):
            prefix = f"up_blocks.{u}.attentions.{j}."
            for key, value in sd.items():
                if key.startswith(prefix):
                    fill = 1.0 if key.endswith("group_norm.weight") else 0.0
                    out[key] = torch.full_like(value, fill)
    return out


def extract_weights(ckpt: Any, weights: str, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``ddpm`` parameters (keys without ``module.``, buffers dropped) from a score_sde checkpoint."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights={weights!r} is not valid; valid: {list(WEIGHTS)}")
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if "model" not in ckpt:
        hint = ""
        if any(str(k).startswith(("input_blocks.", "time_embed.")) for k in ckpt):
            hint = " It looks like a guided-diffusion (ADM) state dict: use scripts/convert_adm.py."
        raise CheckpointError(
            f"{source}: not a score_sde_pytorch checkpoint: no 'model' entry (entries: {sorted(map(str, ckpt))[:8]})."
            f"{hint}"
        )
    model = {re.sub(r"^module\.", "", k): v for k, v in ckpt["model"].items()}
    if not any(k.startswith("all_modules.") for k in model):
        raise CheckpointError(
            f"{source}: the 'model' entry has no all_modules.* keys: not score_sde's ddpm model "
            f"(first keys: {sorted(model)[:6]}); ncsnpp/ddpmpp models are not supported"
        )
    buffers = [k for k in model if k == "sigmas"]
    params = [k for k in model if k not in buffers]  # state_dict order == model.parameters() order
    meta = {"step": int(ckpt["step"]) if "step" in ckpt else None, "weights": weights}
    if weights == "model":
        return {k: model[k] for k in params}, meta
    ema = ckpt.get("ema")
    if not isinstance(ema, Mapping) or "shadow_params" not in ema:
        raise CheckpointError(
            f"{source}: no EMA weights ('ema' entry with 'shadow_params'); pass --weights model to take the raw weights"
        )
    shadow = list(ema["shadow_params"])
    if len(shadow) != len(params):
        raise CheckpointError(
            f"{source}: the EMA holds {len(shadow)} tensors but the model has {len(params)} parameters"
        )
    for k, v in zip(params, shadow, strict=True):
        if tuple(v.shape) != tuple(model[k].shape):
            raise CheckpointError(
                f"{source}: EMA tensor for {k} has shape {tuple(v.shape)}, not {tuple(model[k].shape)}"
            )
    meta["ema_decay"] = float(ema.get("decay", float("nan")))
    meta["ema_num_updates"] = ema.get("num_updates")
    return dict(zip(params, shadow, strict=True)), meta


def convert_state_dict(sd: Mapping[str, torch.Tensor], arch: DDPMArch) -> UNet2DModel:
    """A ``UNet2DModel`` (eval, float32) computing score_sde's ``ddpm`` network with weights ``sd``."""
    arch.check()
    unet = UNet2DModel(**unet_config(arch))
    unet.register_to_config(_score_sde=sde_info(arch))
    mapping = key_mapping(arch, set(unet.state_dict()))
    identity = _identity_attentions(unet, arch)
    mapping = {k: v for k, v in mapping.items() if k not in identity}
    what = f"score_sde ddpm {asdict(arch)}"
    want = {k: v for k, v in unet.state_dict().items() if k not in identity}
    state = {**map_state_dict(sd, mapping, want, what), **identity}
    unet.load_state_dict(state, strict=True)
    return unet.eval()


def sde_info(arch: DDPMArch) -> dict[str, Any]:
    """What the network's time input and output mean (read by ``load_pretrained`` and ``samplers/sde.py``)."""
    return {
        "sde": arch.sde,
        "continuous": arch.continuous,
        "beta_min": arch.beta_min,
        "beta_max": arch.beta_max,
        "num_scales": arch.num_scales,
        "time_label": "999 * t" if arch.continuous else f"{arch.num_scales - 1} * t (integer)",
        "output": "noise z of x_t = mean(t) x0 + std(t) z; score = -output / std(t)",
        "std": "1 - abar(t)" if arch.sde == "subvpsde" else "sqrt(1 - abar(t))",
        "centered": arch.centered,
    }


def scheduler(arch: DDPMArch) -> DDPMScheduler:
    """score_sde's ``VPSDE.discrete_betas`` (linear beta_min/N .. beta_max/N) as a diffusers scheduler."""
    n = arch.num_scales
    return DDPMScheduler(
        num_train_timesteps=n,
        beta_schedule="linear",
        beta_start=arch.beta_min / n,
        beta_end=arch.beta_max / n,
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=False,
    )


def convert(
    checkpoint: str | Path,
    out_dir: str | Path,
    arch: DDPMArch,
    weights: str = "ema",
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Convert the score_sde checkpoint file into a diffusers folder ``out_dir``."""
    arch.check()
    ckpt = load_checkpoint(checkpoint, allow_pickle=allow_pickle)
    sd, meta = extract_weights(ckpt, weights, str(checkpoint))
    unet = convert_state_dict(sd, arch)
    info = {
        "converter": "ood_bench.convert.score_sde",
        "source": str(Path(checkpoint).resolve()),
        "architecture": asdict(arch),
        **meta,
        "score_sde": sde_info(arch),
        "parameters": sum(p.numel() for p in unet.parameters()),
    }
    if arch.sde == "subvpsde":
        log.warning(
            "converted a subVP-SDE model: its marginals are not the discrete VP schedule the suite's DDPM/DDIM "
            "samplers use (docs/deviations.md L1)"
        )
    return save_folder(out_dir, unet, scheduler(arch), info, overwrite=overwrite)
