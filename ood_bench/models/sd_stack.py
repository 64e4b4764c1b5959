"""A Stable-Diffusion inpainting stack on diffusers / transformers components (AnomalySD's backbone).

The stack is the folder layout of diffusers' SD-inpainting checkpoints: ``unet/`` (a ``UNet2DConditionModel`` with
9 input channels ``[z_t; mask; masked-image latents]``), ``vae/`` (``AutoencoderKL``), ``text_encoder/``
(``CLIPTextModel``), ``tokenizer/`` (``CLIPTokenizer``) and ``scheduler/``. ``load_stack`` reads it from a local
folder or a Hugging Face hub id. Machines without those weights build a small stack from configs
(``build_scratch_stack``): random, seeded weights and a tiny CLIP BPE vocabulary for the prompt words, saved in the
same layout so that it loads through the same ``from_pretrained`` calls as a real checkpoint.

Latents are ``vae.encode(x).latent_dist * scaling_factor`` with images in ``[-1, 1]``; the UNet's mask channel
follows diffusers' polarity, **1 = repaint** (the suite's masks use 1 = known; the flip happens in one place,
``ood_bench.samplers.sd_inpaint.unet_input``).
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin

log = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Stable Diffusion's training schedule (v1.x and v2 inpainting share it).
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


VAE_KINDS = ("kl", "patch")


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """A lossless, parameter-free stand-in for the VAE: space-to-depth by ``patch_size`` (pixel (un)shuffle).

    ``encode`` folds each ``p x p`` patch into ``3 p²`` channels, ``decode`` unfolds them: exact, so inpainting
    differences are not buried under an autoencoder's reconstruction error. The latent grid is the one a VAE with
    the same factor would give, so the UNet costs the same; diffusion then runs in pixel space at patch resolution
    (as "simple diffusion", Hoogeboom et al. 2023, patches pixels). Used by scratch stacks (``scratch.vae.kind:
    patch``), where a VAE trained from scratch on a few shots is far from lossless. It has the ``encode`` /
    ``decode`` interface of ``AutoencoderKL`` (a deterministic latent distribution) and its folder layout
    (``vae/config.json``; no weights file).
    """

    @register_to_config
    def __init__(
        self, in_channels: int = 3, patch_size: int = 4, scaling_factor: float = 1.0, shift_factor: float = 0.0
    ) -> None:
        super().__init__()

    @property
    def latent_channels(self) -> int:
        return int(self.config.in_channels) * int(self.config.patch_size) ** 2

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput:
        z = F.pixel_unshuffle(x, int(self.config.patch_size))
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], 1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput:
        return DecoderOutput(sample=F.pixel_shuffle(z, int(self.config.patch_size)))


def vae_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent cell along each side of an ``AutoencoderKL`` or ``PatchAutoencoder``."""
    if isinstance(vae, PatchAutoencoder):
        return int(vae.config.patch_size)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_channels(vae: torch.nn.Module) -> int:
    return vae.latent_channels if isinstance(vae, PatchAutoencoder) else int(vae.config.latent_channels)


def vae_shift(vae: torch.nn.Module) -> float:
    """The latent shift (SD3's ``shift_factor``; ``None`` / 0 for SD 1.x and 2.x)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


class StackNotFoundError(FileNotFoundError):
    """A Stable-Diffusion stack is neither a local folder nor loadable from the hub."""


@dataclass
class SDStack:
    """The five parts of an SD-inpainting checkpoint; ``source`` says where they came from."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | PatchAutoencoder
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict[str, Any]
    source: str

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return vae_factor(self.vae)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return vae_channels(self.vae)

    def to(self, device: torch.device) -> SDStack:
        for part in (self.unet, self.vae, self.text_encoder):
            part.to(device)
        return self

    def eval(self) -> SDStack:
        for part in (self.unet, self.vae, self.text_encoder):
            part.eval().requires_grad_(False)
        return self

    def ddpm(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config)

    def ddim(self, **overrides: Any) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.scheduler_config, **overrides)

    def parameter_counts(self) -> dict[str, int]:
        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP hidden states ``[N, L, D]`` (padded to the tokenizer's max length, as SD pipelines do)."""
        device = next(self.text_encoder.parameters()).device
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(device))[0]

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False):
        """Latents of images in ``[-1, 1]`` (posterior mean, or a sample drawn with ``generator``)."""
        dist = self.vae.encode(images).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return (z - vae_shift(self.vae)) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` (not clamped) from scaled latents."""
        return self.vae.decode(latents / self.scaling_factor + vae_shift(self.vae)).sample

    def save(self, folder: Path, parts: Iterable[str] = PARTS) -> None:
        """Write the chosen parts in the diffusers SD folder layout."""
        folder = Path(folder)
        for part in parts:
            if part == "scheduler":
                DDIMScheduler.from_config(self.scheduler_config).save_pretrained(folder / "scheduler")
            else:
                getattr(self, part).save_pretrained(folder / part)


def check_stack(stack: SDStack) -> None:
    """The parts fit together as an SD-inpainting model (9-channel UNet, matching latent and text widths)."""
    u, latent = stack.unet.config, stack.latent_channels
    want_in = 2 * latent + 1
    if u.in_channels != want_in or u.out_channels != latent:
        raise ValueError(
            f"{stack.source}: the UNet takes {u.in_channels} and gives {u.out_channels} channels; an inpainting UNet "
            f"for {latent}-channel latents takes {want_in} ([z_t; mask; masked-image latents]) and gives "
            f"{latent} (is this a text-to-image checkpoint rather than an inpainting one?)"
        )
    hidden = stack.text_encoder.config.hidden_size
    if u.cross_attention_dim != hidden:
        raise ValueError(f"{stack.source}: UNet cross_attention_dim {u.cross_attention_dim} != text width {hidden}")


# ---------------------------------------------------------------------------------------------------------------
# Loading (local folder or hub id)
# ---------------------------------------------------------------------------------------------------------------


def _load_vae(where: str, subfolder: str = "vae", **kwargs: Any) -> AutoencoderKL | PatchAutoencoder:
    """``vae/`` as the class its config names (``PatchAutoencoder`` has no weights file)."""
    cfg = AutoencoderKL.load_config(where, subfolder=subfolder)
    if cfg.get("_class_name") == PatchAutoencoder.__name__:
        return PatchAutoencoder.from_config(cfg)
    return AutoencoderKL.from_pretrained(where, subfolder=subfolder, **kwargs)


def _load_part(part: str, ref: str, local: Path | None, offline_hint: str):
    from transformers import CLIPTextModel, CLIPTokenizer

    loaders = {
        "unet": UNet2DConditionModel.from_pretrained,
        "vae": _load_vae,
        "text_encoder": CLIPTextModel.from_pretrained,
        "tokenizer": CLIPTokenizer.from_pretrained,
    }
    # diffusers models: plain loading (``accelerate`` is not a dependency; saying so avoids its warning)
    extra = {"low_cpu_mem_usage": False} if part in ("unet", "vae") else {}
    where = str(local) if local is not None else ref
    try:
        return loaders[part](where, subfolder=part, **extra)
    except (OSError, ValueError) as err:
        raise StackNotFoundError(
            f"method.stack={ref!r}: could not load its {part!r} ({type(err).__name__}: {str(err)[:300]}). "
            f"{offline_hint}"
        ) from err


def load_stack(ref: str, parts_from: dict[str, str] | None = None) -> SDStack:
    """Load an SD-inpainting stack from a local folder (diffusers layout) or a hub id.

    ``parts_from`` maps a part name to another folder to read it from (a fine-tuned ``unet``/``vae`` beside the
    base stack's text encoder).
    """
    local = Path(ref).expanduser()
    is_local = local.is_dir()
    if not is_local and (ref.startswith((".", "/", "~")) or local.exists()):
        raise StackNotFoundError(f"method.stack={ref!r} is not a folder; expected the diffusers layout {list(PARTS)}")
    hint = (
        "A local folder needs the diffusers SD-inpainting layout: " + ", ".join(f"{p}/" for p in PARTS) + "."
        if is_local
        else (
            f"Hub ids need internet access. Offline: on a machine with internet run "
            f"`huggingface-cli download {ref} --local-dir <dir>` (or `hf download {ref} --local-dir <dir>`), copy "
            f"<dir> here and set method.stack=<dir>."
        )
    )
    parts_from = parts_from or {}
    loaded: dict[str, Any] = {}
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        src = parts_from.get(part)
        loaded[part] = (
            _load_part(part, src, Path(src), hint) if src else _load_part(part, ref, local if is_local else None, hint)
        )
    sched_src = parts_from.get("scheduler") or (str(local) if is_local else ref)
    try:
        sched_cfg = dict(DDIMScheduler.load_config(sched_src, subfolder="scheduler"))
    except (OSError, ValueError) as err:
        raise StackNotFoundError(f"method.stack={ref!r}: no scheduler/ config ({err}). {hint}") from err
    stack = SDStack(scheduler_config=sched_cfg, source=f"pretrained:{ref}", **loaded)
    check_stack(stack)
    return stack


# ---------------------------------------------------------------------------------------------------------------
# A small stack built from configs (for machines without SD weights)
# ---------------------------------------------------------------------------------------------------------------


def prompt_words(prompts: Iterable[str]) -> list[str]:
    """The lower-case words (letter runs) of ``prompts``, sorted and unique."""
    import re

    return sorted({w for p in prompts for w in re.findall(r"[a-z]+", p.lower())})


def build_tokenizer(words: Iterable[str], max_length: int):
    """A CLIP BPE tokenizer whose vocabulary is every printable ASCII character plus the whole ``words``.

    Any ASCII text tokenizes (unknown words fall back to characters); each listed word is one token, built by
    left-to-right merges exactly as CLIP's BPE merges sub-words (``</w>`` marks the end of a word).
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        for tok in (c, c + "</w>"):
            vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        if len(word) < 2 or not word.isascii() or not word.isalpha():
            continue
        left = word[0]
        for i, c in enumerate(word[1:], 1):
            right = c + "</w>" if i == len(word) - 1 else c
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
            vocab.setdefault(left, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _scratch_kl(vcfg: dict[str, Any]) -> AutoencoderKL:
    """A random ``AutoencoderKL`` from ``method.scratch.vae`` (``kind: kl``)."""
    vae_blocks = tuple(vcfg["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
        up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
        block_out_channels=vae_blocks,
        layers_per_block=int(vcfg["layers_per_block"]),
        latent_channels=int(vcfg["latent_channels"]),
        norm_num_groups=int(vcfg["norm_num_groups"]),
        mid_block_add_attention=bool(vcfg.get("mid_block_attention", True)),
        scaling_factor=1.0,  # set from the shots' latent std when the VAE is trained
    )


def scratch_factor(cfg: dict[str, Any]) -> int:
    """Pixels per latent cell of the scratch stack ``method.scratch`` describes (before it is built)."""
    v = cfg["vae"]
    return int(v["patch_size"]) if v.get("kind", "kl") == "patch" else 2 ** (len(v["block_out_channels"]) - 1)


def build_scratch_stack(cfg: dict[str, Any], words: Iterable[str], seed: int) -> SDStack:
    """A randomly initialised (seeded) SD-inpainting stack from the ``method.scratch`` settings."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vcfg, ucfg, tcfg = dict(cfg["vae"]), dict(cfg["unet"]), dict(cfg["text"])
    tokenizer = build_tokenizer(words, int(tcfg["max_length"]))
    kind = vcfg.get("kind", "kl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "patch":
            vae = PatchAutoencoder(in_channels=3, patch_size=int(vcfg["patch_size"]))
        else:
            vae = _scratch_kl(vcfg)
        latent = vae_channels(vae)
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=int(tcfg["hidden_size"]),
                intermediate_size=int(tcfg["intermediate_size"]),
                num_hidden_layers=int(tcfg["num_layers"]),
                num_attention_heads=int(tcfg["num_heads"]),
                max_position_embeddings=int(tcfg["max_length"]),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            in_channels=2 * latent + 1,
            out_channels=latent,
            block_out_channels=tuple(ucfg["block_out_channels"]),
            down_block_types=tuple(ucfg["down_block_types"]),
            up_block_types=tuple(ucfg["up_block_types"]),
            layers_per_block=int(ucfg["layers_per_block"]),
            norm_num_groups=int(ucfg["norm_num_groups"]),
            attention_head_dim=int(ucfg["attention_head_dim"]),
            cross_attention_dim=int(tcfg["hidden_size"]),
        )
    stack = SDStack(unet, vae, text, tokenizer, dict(SD_SCHEDULER), "scratch")
    check_stack(stack)
    return stack


def validate_scratch_cfg(cfg: dict[str, Any]) -> None:
    """Fail fast on an inconsistent ``method.scratch`` architecture (before any data is read)."""
    for key in ("vae", "unet", "text"):
        if key not in cfg:
            raise ValueError(f"method.scratch.{key} is missing; method.scratch needs vae, unet and text settings")
    kind = cfg["vae"].get("kind", "kl")
    if kind not in VAE_KINDS:
        raise ValueError(f"method.scratch.vae.kind={kind!r} is not valid; valid: {list(VAE_KINDS)}")
    if kind == "patch" and (not isinstance(cfg["vae"].get("patch_size"), int) or cfg["vae"]["patch_size"] < 1):
        raise ValueError(
            f"method.scratch.vae.patch_size={cfg['vae'].get('patch_size')!r} is not valid; use an integer >= 1"
        )
    u = cfg["unet"]
    lens = [len(u[k]) for k in ("block_out_channels", "down_block_types", "up_block_types")]
    if len(set(lens)) != 1:
        raise ValueError(
            f"method.scratch.unet: block_out_channels, down_block_types and up_block_types need the same length, "
            f"got {lens}"
        )
    checked = [("unet", u["norm_num_groups"])] + ([("vae", cfg["vae"]["norm_num_groups"])] if kind == "kl" else [])
    for key, groups in checked:
        bad = [c for c in cfg[key]["block_out_channels"] if c % groups]
        if bad:
            raise ValueError(f"method.scratch.{key}.block_out_channels {bad} are not divisible by norm_num_groups")
    t = cfg["text"]
    if t["hidden_size"] % t["num_heads"]:
        raise ValueError(f"method.scratch.text.hidden_size={t['hidden_size']} must be divisible by num_heads")


def scratch_stack_dir(cache, cfg: dict[str, Any], words: Sequence[str], seed: int) -> tuple[Path, str]:
    """The cached folder of the scratch stack for ``cfg`` (built and saved once) and its cache key."""
    spec = {"version": 1, "scratch": cfg, "words": sorted(set(words)), "seed": seed, "scheduler": SD_SCHEDULER}

    def build(tmp: Path) -> None:
        build_scratch_stack(cfg, words, seed).save(tmp)
        (tmp / "stack.json").write_text(json.dumps({"kind": "scratch", "seed": seed}, indent=2))

    entry, _ = cache.get_or_create("sd_stack", spec, build)
    return entry, entry.name


# CLIP ViT-L/14's text tower (SD 1.x): transformers CLIPTextConfig of openai/clip-vit-large-patch14
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)


def random_known_stack_dir(cache, ref: str, words: Sequence[str], seed: int, err: BaseException) -> tuple[Path, str]:
    """debug=fast_dev_run only: the published architecture of stack ``ref`` (``plan.KNOWN_SD_STACKS``) with random
    weights, saved in the cache in the diffusers layout; outside the mode (or for an unknown ``ref``) ``err``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ood_bench import fast_dev_run
    from ood_bench.plan import KNOWN_SD_STACKS

    if ref not in KNOWN_SD_STACKS:
        raise err
    fast_dev_run.random_init(f"the SD-inpainting stack {ref} (UNet, VAE, CLIP text encoder)", ref, err)
    unet_cfg, vae_cfg = (dict(c) for c in KNOWN_SD_STACKS[ref])
    spec = {"random_known": ref, "words": sorted(set(words)), "seed": seed, "scheduler": SD_SCHEDULER}

    def build(tmp: Path) -> None:
        tokenizer = build_tokenizer(words, int(SD15_TEXT["max_position_embeddings"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config(unet_cfg)
            vae = AutoencoderKL.from_config({**vae_cfg, "scaling_factor": 0.18215})
            text = CLIPTextModel(
                CLIPTextConfig(
                    **SD15_TEXT,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
        stack = SDStack(unet, vae, text, tokenizer, dict(SD_SCHEDULER), f"random:{ref}")
        check_stack(stack)
        stack.save(tmp)
        (tmp / "stack.json").write_text(json.dumps({"kind": "random(fast_dev_run)", "ref": ref}, indent=2))

    entry, _ = cache.get_or_create("sd_stack", spec, build)
    return entry, entry.name
