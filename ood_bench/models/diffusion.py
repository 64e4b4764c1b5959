"""Image diffusion backbone: a diffusers ``UNet2DModel`` plus its noise schedule.

``get_diffusion_model`` either loads a pretrained model (hub id or local folder, ``model.pretrained``) or
trains one on the ID training images and caches it under a key hashed from the data, the architecture
and the training settings; the next run with the same key loads it instead of training. ``model.train.precision``
(``fp32`` | ``bf16`` | ``fp16``) runs the training forward pass and loss under autocast (fp16 with a gradient
scaler, CUDA only); the weights, the optimizer and EMA stay float32.

A class-conditional model (``model_cfg["conditioning"] = {num_classes: K, label_dropout: p}``, set by a method
that needs one) has ``K + 1`` class embeddings, the last one the null class; training replaces each label by
the null class with probability ``p`` (classifier-free guidance). Its cache key adds the conditioning and the
labels; an unconditional model keeps the key it always had.

``model.train.sde`` chooses the training objective: ``ddpm`` (default; Ho et al.'s discrete steps, what the DDPM/DDIM
samplers use) or ``subvp`` (score-SDE's continuous subVP-SDE as LMD trains it: ``t ~ U(1e-5, 1)``, input
``exp(-B(t)/2) x0 + (1 - exp(-B(t))) z``, time input ``999 t``, loss ``mean((net - z)^2)``: ``losses.get_sde_loss_fn``
with ``continuous=True, likelihood_weighting=False, reduce_mean=True``), with ``beta_min = N beta_start`` and
``beta_max = N beta_end`` from ``model.scheduler`` (0.1 and 20 for the linear 1e-4..0.02 schedule). A subVP model
carries ``_score_sde`` in its UNet config, as a converted score_sde checkpoint, and is sampled by
``method.sampler=subvp_em``. ``sde: ddpm`` is left out of the cache key (models trained before keep their keys).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ood_bench.cache import ArtifactCache
from ood_bench.convert.score_sde import DDPMArch, sde_info
from ood_bench.data.imageset import Prefetcher
from ood_bench.errors import WeightsNotFoundError
from ood_bench.models.subvp import TIME_LABEL_SCALE, TRAIN_EPS, SubVPSDE
from ood_bench.utils import PRECISIONS, atomic_path, autocast, check_precision, tensor_fingerprint

log = logging.getLogger(__name__)

CACHE_KIND = "diffusion"
CACHE_VERSION = 1
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TRAIN_SDES = ("ddpm", "subvp")  # model.train.sde; "ddpm" (the default) stays out of cache keys and config hashes


@dataclass
class DiffusionModel:
    """A denoiser and the noise schedule it was trained with; images live in ``[-1, 1]``."""

    unet: UNet2DModel
    scheduler_config: dict[str, Any]
    source: str  # "trained:<cache key>" or "pretrained:<id or path>"

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def has_null_class(self) -> bool:
        """Whether the last class embedding is the null class (the suite's class-conditional models). Converted
        ADM models have none (``_has_null_class: false`` in their config): every embedding is a real class."""
        return self.unet.config.get("num_class_embeds") is not None and bool(
            self.unet.config.get("_has_null_class", True)
        )

    @property
    def num_classes(self) -> int | None:
        """Number of real classes of a class-conditional model (a null class has this index), else None."""
        n = self.unet.config.get("num_class_embeds")
        if n is None:
            return None
        return int(n) - 1 if self.has_null_class else int(n)

    def ddim(self, **overrides: Any) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.scheduler_config, **overrides)

    def ddpm(self, **overrides: Any) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config, **overrides)


def build_unet(
    unet_cfg: dict[str, Any], sample_size: int, channels: int, num_class_embeds: int | None = None
) -> UNet2DModel:
    """A fresh ``UNet2DModel`` from the ``model.unet`` settings (with class embeddings when asked)."""
    cfg = dict(unet_cfg)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        cfg[key] = tuple(cfg[key])
    if not len(cfg["block_out_channels"]) == len(cfg["down_block_types"]) == len(cfg["up_block_types"]):
        raise ValueError(
            "model.unet: block_out_channels, down_block_types and up_block_types need the same length, got "
            f"{len(cfg['block_out_channels'])}, {len(cfg['down_block_types'])}, {len(cfg['up_block_types'])}"
        )
    downsamples = len(cfg["block_out_channels"]) - 1
    if sample_size % (2**downsamples):
        raise ValueError(f"data.image_size={sample_size} must be divisible by 2^{downsamples} for this UNet")
    if num_class_embeds is not None:
        cfg["num_class_embeds"] = int(num_class_embeds)
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, **cfg)


def _train_target(sched: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ptype = sched.config.prediction_type
    if ptype == "epsilon":
        return noise
    if ptype == "sample":
        return x0
    return sched.get_velocity(x0, noise, t)


def subvp_sde(model_cfg: dict[str, Any]) -> SubVPSDE:
    """The subVP-SDE of ``model.scheduler``'s linear schedule: ``beta_min = N beta_start``, ``beta_max = N beta_end``
    (score_sde's ``discrete_betas`` are ``linspace(beta_min/N, beta_max/N, N)``)."""
    sc = model_cfg["scheduler"]
    n = int(sc["num_train_timesteps"])
    return SubVPSDE(float(sc["beta_start"]) * n, float(sc["beta_end"]) * n)


def subvp_noisy(
    sde: SubVPSDE, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The subVP marginal sample ``mean(t) x0 + std(t) noise`` and the network's time input ``999 t``."""
    mean, std = sde.marginal(t)
    view = (-1,) + (1,) * (x0.dim() - 1)
    return mean.view(view) * x0 + std.view(view) * noise, t * TIME_LABEL_SCALE


def train_unet(
    images: torch.Tensor,
    model_cfg: dict[str, Any],
    device: torch.device,
    out_dir: Path,
    progress: bool = True,
    resume_dir: Path | None = None,
    labels: torch.Tensor | None = None,
) -> None:
    """Train a UNet on ``images`` (float ``[0,1]``) and save the EMA weights and the schedule to ``out_dir``.

    A class-conditional model (``model_cfg["conditioning"]``) needs ``labels``: class indices in
    ``[0, num_classes)``.

    Initialisation, dropout and every draw are seeded by ``model.train.seed`` (the global RNG state is
    restored afterwards), so the same cache key always yields the same weights on the same device.
    With ``resume_dir``, the full training state is saved there every ``model.checkpoint_every`` steps and an
    interrupted training continues from it; the resumed run gives the same weights as an uninterrupted one.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(model_cfg["train"]["seed"]))
        _train_unet(images, model_cfg, device, out_dir, progress, resume_dir, labels)


def _train_unet(
    images: torch.Tensor,
    model_cfg: dict[str, Any],
    device: torch.device,
    out_dir: Path,
    progress: bool,
    resume_dir: Path | None,
    labels: torch.Tensor | None,
) -> None:
    tcfg = model_cfg["train"]
    sched = DDPMScheduler(**model_cfg["scheduler"])
    subvp = subvp_sde(model_cfg) if tcfg.get("sde", "ddpm") == "subvp" else None
    cond = model_cfg.get("conditioning")
    if cond and (labels is None or len(labels) != len(images)):
        raise ValueError("a class-conditional diffusion model needs one label per training image")
    null_class = int(cond["num_classes"]) if cond else None
    n_embeds = null_class + 1 if cond else None
    unet = build_unet(model_cfg["unet"], model_cfg["sample_size"], model_cfg["channels"], n_embeds).to(device)
    ema = EMAModel(unet.parameters(), decay=tcfg["ema_decay"], use_ema_warmup=True, power=0.75)
    opt = torch.optim.AdamW(unet.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    warmup = max(1, int(tcfg["warmup_steps"]))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    precision = tcfg.get("precision", "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 gradients underflow without it
    gen = torch.Generator().manual_seed(int(tcfg["seed"]))
    # each step reads only its batch (a lazy ImageSet decodes just those rows) and maps it to [-1, 1]
    n, bs, steps = images.shape[0], int(tcfg["batch_size"]), int(tcfg["steps"])
    n_params = sum(p.numel() for p in unet.parameters())
    log.info(
        "training UNet (%.2f M params) on %d images: %d steps of batch %d on %s", n_params / 1e6, n, steps, bs, device
    )
    losses: list[tuple[int, float]] = []
    start, every = 0, int(model_cfg.get("checkpoint_every") or 0)
    state_file = resume_dir / "state.pt" if resume_dir is not None else None
    if state_file is not None and state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr_sched"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start, losses = int(state["step"]), [tuple(x) for x in state["losses"]]
        log.info("resuming diffusion training at step %d of %d from %s", start, steps, state_file)
    unet.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train diffusion", disable=not progress)
    prefetch = Prefetcher(images)  # a lazy split decodes the next batch while this one trains
    for step in bar:
        idx = torch.randint(0, n, (bs,), generator=gen)
        x0 = prefetch.get(idx).mul(2).sub(1)
        if tcfg.get("hflip"):
            flip = torch.rand(bs, generator=gen) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=gen)
        if subvp is None:
            t = torch.randint(0, sched.config.num_train_timesteps, (bs,), generator=gen)
        else:  # continuous t in [1e-5, 1] as score_sde's get_sde_loss_fn
            t = torch.rand(bs, generator=gen) * (1.0 - TRAIN_EPS) + TRAIN_EPS
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        y = None
        if cond:  # labels, each replaced by the null class with probability label_dropout (for CFG)
            drop = torch.rand(bs, generator=gen) < float(cond["label_dropout"])
            y = torch.where(drop, torch.full_like(labels[idx], null_class), labels[idx]).to(device)
        if step + 1 < steps:  # the next step's indices, drawn from a copy: the generator's stream is unchanged
            peek = torch.Generator().set_state(gen.get_state())
            prefetch.ahead(torch.randint(0, n, (bs,), generator=peek))
        with autocast(device, precision, key="model.train.precision"):
            if subvp is None:
                pred = unet(sched.add_noise(x0, noise, t), t, class_labels=y).sample
                loss = F.mse_loss(pred.float(), _train_target(sched, x0, noise, t))
            else:
                x_t, label = subvp_noisy(subvp, x0, noise, t)
                pred = unet(x_t, label, class_labels=y).sample
                loss = F.mse_loss(pred.float(), noise)  # = score_sde's (score * std + z)^2, reduce_mean
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tcfg.get("grad_clip"):
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), float(tcfg["grad_clip"]))
        scaler.step(opt)
        scaler.update()
        lr_sched.step()
        ema.step(unet.parameters())
        losses.append((step, loss.item()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(v for _, v in losses[-50:]) / len(losses[-50:]):.4f}")
        if state_file is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            state = {
                "step": step + 1,
                "losses": losses,
                "unet": unet.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "lr_sched": lr_sched.state_dict(),
                "gen": gen.get_state(),
                "rng": torch.get_rng_state(),
            }
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            with atomic_path(state_file) as tmp:
                torch.save(state, tmp)
    prefetch.close()
    ema.copy_to(unet.parameters())
    if subvp is not None:  # what the network's time input and output mean, as a converted score_sde model
        arch = DDPMArch(
            sde="subvpsde",
            continuous=True,
            beta_min=subvp.beta_min,
            beta_max=subvp.beta_max,
            num_scales=int(sched.config.num_train_timesteps),
        )
        unet.register_to_config(_score_sde=sde_info(arch))
    unet.save_pretrained(out_dir / "unet")
    sched.save_pretrained(out_dir / "scheduler")
    with open(out_dir / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows(losses)
    info = {"seconds": round(time.perf_counter() - t0, 2), "params": n_params, "n_images": n, "device": str(device)}
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2))
    log.info(
        "trained in %.1f s, final loss (last 100 steps) %.4f",
        info["seconds"],
        sum(v for _, v in losses[-100:]) / max(1, len(losses[-100:])),
    )


def _random_pretrained(model_cfg: dict[str, Any], ref: str, err: WeightsNotFoundError) -> UNet2DModel:
    """debug=fast_dev_run only: the published architecture of ``model.name`` with random weights; else ``err``."""
    from ood_bench import fast_dev_run
    from ood_bench.plan import KNOWN_ARCHITECTURES

    if model_cfg.get("name") not in KNOWN_ARCHITECTURES:
        raise err
    fast_dev_run.random_init(f"the {model_cfg['name']} UNet", ref, err)
    torch.manual_seed(0)
    return UNet2DModel.from_config(dict(KNOWN_ARCHITECTURES[model_cfg["name"]]))


def load_pretrained(model_cfg: dict[str, Any], device: torch.device) -> DiffusionModel:
    """Load ``model.pretrained`` (hub id or local folder) with its scheduler config when it ships one."""
    ref = str(model_cfg["pretrained"])
    sub = model_cfg.get("subfolder")
    local = Path(ref).expanduser()
    if local.is_dir() and sub is None and (local / "unet").is_dir():
        sub = "unet"
    try:
        unet = UNet2DModel.from_pretrained(str(local) if local.is_dir() else ref, subfolder=sub)
    except (OSError, ValueError) as err:
        missing = WeightsNotFoundError(
            f"model.pretrained={ref!r} could not be loaded ({err}). Give a local folder holding a diffusers "
            f"UNet2DModel (config.json + weights), or a Hugging Face hub id with internet access. Offline: "
            f"`huggingface-cli download {ref} --local-dir <dir>` on a machine with internet, copy <dir> here, "
            f"and set model.pretrained=<dir>."
        )
        missing.__cause__ = err
        unet = _random_pretrained(model_cfg, ref, missing)
    sched_cfg = dict(model_cfg["scheduler"])
    for cand in ("scheduler", None):
        try:
            sched_cfg = dict(DDPMScheduler.load_config(str(local) if local.is_dir() else ref, subfolder=cand))
            break
        except (OSError, ValueError):
            continue
    else:
        log.warning("no scheduler config next to %s; using model.scheduler from the config", ref)
    if unet.config.sample_size != model_cfg["sample_size"] or unet.config.in_channels != model_cfg["channels"]:
        raise ValueError(
            f"model.pretrained={ref!r} expects {unet.config.in_channels}x{unet.config.sample_size}px images, but "
            f"the data gives {model_cfg['channels']}x{model_cfg['sample_size']}px: set data.image_size / data.channels"
        )
    sde = unet.config.get("_score_sde")
    if isinstance(sde, dict) and sde.get("sde") == "subvpsde":
        log.warning(
            "model.pretrained=%s is a score-SDE model trained on the subVP-SDE (scripts/convert_score_sde.py): its "
            "time input is 999 t and its noisy inputs follow subVP marginals (std 1 - abar), not the discrete VP "
            "schedule the DDPM/DDIM samplers use; method.sampler=subvp_em samples it as the official code "
            "(docs/deviations.md L1)",
            ref,
        )
    return DiffusionModel(unet.to(device).eval(), sched_cfg, f"pretrained:{ref}")


def cache_spec(model_cfg: dict[str, Any], images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Everything that determines a trained model: data content, architecture, schedule, training (and, for a
    class-conditional model, the conditioning settings and the labels).

    The training precision is part of the key; ``fp32`` (the loop before precisions existed) is left out, so
    models trained before keep their keys; so is ``sde: ddpm`` (``subvp`` enters the key).
    """
    train = {
        k: v
        for k, v in model_cfg["train"].items()
        if not (k == "precision" and v == "fp32") and not (k == "sde" and v == "ddpm")
    }
    spec = {
        "version": CACHE_VERSION,
        "data": tensor_fingerprint(images),
        "sample_size": model_cfg["sample_size"],
        "channels": model_cfg["channels"],
        "unet": model_cfg["unet"],
        "scheduler": model_cfg["scheduler"],
        "train": train,
    }
    if model_cfg.get("conditioning"):
        spec["conditioning"] = model_cfg["conditioning"]
        spec["labels"] = tensor_fingerprint(torch.as_tensor(labels))
    return spec


def validate_model_cfg(model_cfg: dict[str, Any]) -> None:
    """Check the ``model`` settings before any data is read (architecture fits the image size, valid types)."""
    ptype = model_cfg["scheduler"].get("prediction_type", "epsilon")
    if ptype not in PREDICTION_TYPES:
        raise ValueError(f"model.scheduler.prediction_type={ptype!r} is not valid; valid: {list(PREDICTION_TYPES)}")
    if not model_cfg.get("pretrained"):
        build_unet(model_cfg["unet"], model_cfg["sample_size"], model_cfg["channels"])
        for key in ("steps", "batch_size"):
            if int(model_cfg["train"][key]) < 1:
                raise ValueError(f"model.train.{key}={model_cfg['train'][key]!r} is not valid; use a positive integer")
        sde = model_cfg["train"].get("sde", "ddpm")
        if sde not in TRAIN_SDES:
            raise ValueError(f"model.train.sde={sde!r} is not valid; valid: {list(TRAIN_SDES)}")
        if sde == "subvp":
            sc = model_cfg["scheduler"]
            if ptype != "epsilon" or sc.get("beta_schedule", "linear") != "linear":
                raise ValueError(
                    f"model.train.sde=subvp needs model.scheduler.prediction_type=epsilon and beta_schedule=linear "
                    f"(beta_min/max = N beta_start/end), got {ptype!r} and {sc.get('beta_schedule')!r}"
                )
            if model_cfg.get("conditioning"):
                raise ValueError("model.train.sde=subvp trains unconditional models only (LMD's); got conditioning")
        precision = model_cfg["train"].get("precision", "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"model.train.precision={precision!r} is not valid; valid: {list(PRECISIONS)}")
    cond = model_cfg.get("conditioning")
    if cond:
        n, p = cond.get("num_classes"), cond.get("label_dropout")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"conditioning num_classes={n!r} is not valid; use a positive integer")
        if not isinstance(p, int | float) or not 0.0 <= p < 1.0:
            raise ValueError(f"label_dropout={p!r} is not valid; use 0 <= label_dropout < 1")


def get_diffusion_model(
    model_cfg: dict[str, Any],
    images: torch.Tensor,
    cache: ArtifactCache,
    device: torch.device,
    progress: bool = True,
    labels: torch.Tensor | None = None,
) -> DiffusionModel:
    """Load the pretrained model, or the cached model trained on ``images``, training it first if needed.

    ``labels`` (class indices) train a class-conditional model when ``model_cfg["conditioning"]`` is set.
    """
    validate_model_cfg(model_cfg)
    if model_cfg.get("pretrained"):
        return load_pretrained(model_cfg, device)
    check_precision(model_cfg["train"].get("precision", "fp32"), device, key="model.train.precision")
    spec = cache_spec(model_cfg, images, labels)
    # Training checkpoints live beside the cache entry until the entry is complete.
    resume_dir = cache.entry(CACHE_KIND, f".partial-{cache.key(CACHE_KIND, spec)}")
    entry, created = cache.get_or_create(
        CACHE_KIND,
        spec,
        lambda tmp: train_unet(images, model_cfg, device, tmp, progress=progress, resume_dir=resume_dir, labels=labels),
    )
    if resume_dir.exists():
        shutil.rmtree(resume_dir)
    if not created:
        log.info("using cached diffusion model %s (no training)", entry)
    unet = UNet2DModel.from_pretrained(entry / "unet").to(device).eval()
    sched_cfg = dict(DDPMScheduler.load_config(entry / "scheduler"))
    return DiffusionModel(unet, sched_cfg, f"trained:{entry.name}")
