"""Fine-tuning an SD-inpainting stack on the k normal shots (AnomalySD, paper §3.2), resumable and cached.

Two stages, both on augmented shots (flips, 90° rotations, random crops, brightness/contrast jitter):

1. VAE (``vae_mode``): ``decoder`` fine-tunes the decoder with ``||x - x̂||² + β·LPIPS(x, x̂)`` (the paper's L_D);
   ``full`` trains encoder and decoder with the same loss plus ``kl_weight``·KL (a stack built from configs starts
   from random weights, so its encoder has to be learnt too) and sets the latent scaling factor to 1/std of the
   shots' latents (LDM's rule); ``none`` keeps the VAE.
2. UNet: the ε-loss of SD inpainting, ``||ε - ε_θ([z_t; m; E((1-m)⊙x)], t, τ(y))||²``, with foreground-based random
   masks (boxes centred on the object, plus the inference grid masks and full masks) and the hierarchical prompts
   (object level "A perfect [c]." / detail level "A [c] with intact …", one drawn per sample). The text encoder
   stays frozen; the UNet keeps an EMA of its weights (diffusers ``EMAModel`` with warm-up).

``finetune`` saves the full training state every ``checkpoint_every`` steps into a resume folder; an interrupted
run continues from it and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ood_bench.models.sd_stack import PatchAutoencoder, SDStack
from ood_bench.samplers.anomaly_masks import foreground_mask, random_train_mask, upsample_mask
from ood_bench.samplers.sd_inpaint import unet_input
from ood_bench.utils import atomic_path

log = logging.getLogger(__name__)

VAE_MODES = ("none", "decoder", "full")
FOREGROUNDS = ("otsu", "none")


@dataclass
class Augment:
    """Shot augmentation; every draw comes from the training generator."""

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    crop_min: float = 0.5  # random square crops of side in [sqrt(crop_min), 1] of the image, resized back
    brightness: float = 0.1  # additive shift drawn from U[-b, b]
    contrast: float = 0.1  # gain around the image mean drawn from U[1-c, 1+c]

    def __call__(self, x: torch.Tensor, fg: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment images ``[B, C, H, W]`` in ``[0, 1]`` and their foregrounds ``[B, H, W]`` alike."""
        out, out_fg = [], []
        size = x.shape[-1]
        for img, f in zip(x, fg.float()):
            if self.crop_min < 1.0:
                side = float(self.crop_min + (1 - self.crop_min) * torch.rand((), generator=gen)) ** 0.5
                c = max(8, round(side * size))
                y0, x0 = (int(torch.randint(size - c + 1, (), generator=gen)) for _ in range(2))
                img = F.interpolate(
                    img[None, :, y0 : y0 + c, x0 : x0 + c], size=(size, size), mode="bilinear", antialias=True
                )[0]
                f = F.interpolate(f[None, None, y0 : y0 + c, x0 : x0 + c], size=(size, size), mode="nearest")[0, 0]
            if self.hflip and torch.rand((), generator=gen) < 0.5:
                img, f = img.flip(-1), f.flip(-1)
            if self.vflip and torch.rand((), generator=gen) < 0.5:
                img, f = img.flip(-2), f.flip(-2)
            if self.rot90:
                k = int(torch.randint(4, (), generator=gen))
                img, f = img.rot90(k, (-2, -1)), f.rot90(k, (-2, -1))
            if self.contrast > 0:
                gain = 1 + self.contrast * (2 * float(torch.rand((), generator=gen)) - 1)
                img = (img - img.mean()) * gain + img.mean()
            if self.brightness > 0:
                img = img + self.brightness * (2 * float(torch.rand((), generator=gen)) - 1)
            out.append(img.clamp(0, 1))
            out_fg.append(f > 0.5)
        return torch.stack(out), torch.stack(out_fg)


@dataclass
class FinetuneConfig:
    """Everything that determines the fine-tuned weights (it is part of the cache key)."""

    unet_steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    vae_mode: str = "full"
    vae_steps: int = 150
    vae_lr: float = 1e-3
    vae_batch_size: int = 8
    beta: float = 1.0
    kl_weight: float = 1e-6
    foreground: str = "otsu"
    mask_grid_prob: float = 0.4
    mask_full_prob: float = 0.1
    mask_max_boxes: int = 3
    mask_box_range: tuple[float, float] = (0.1, 0.5)
    augment: Augment = field(default_factory=Augment)
    precision: str = "bf16"
    seed: int = 0

    def identity(self) -> dict[str, Any]:
        return asdict(self)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _latent_fg(fg: torch.Tensor, factor: int) -> torch.Tensor:
    """A latent cell is foreground when any of its pixels is."""
    return F.max_pool2d(fg.float()[:, None], factor)[:, 0] > 0.5


class _Checkpoint:
    """The training state of one stage (its stateful objects, the generator, the losses), saved atomically."""

    def __init__(self, resume_dir: Path | None, stage: str, every: int) -> None:
        self.file = resume_dir / f"{stage}_state.pt" if resume_dir is not None else None
        self.every = every
        self.objects: dict[str, Any] = {}
        self.gen: torch.Generator | None = None

    def track(self, gen: torch.Generator, **objects: Any) -> _Checkpoint:
        """What to save and restore: objects with ``state_dict`` / ``load_state_dict`` and the generator."""
        self.gen, self.objects = gen, objects
        return self

    def restore(self, device: torch.device) -> tuple[int, list[tuple[str, int, float]]]:
        """Load a saved state into the tracked objects; ``(next step, losses so far)`` (``(0, [])`` if none)."""
        if self.file is None or not self.file.is_file():
            return 0, []
        log.info("resuming fine-tuning from %s", self.file)
        state = torch.load(self.file, map_location=device, weights_only=True)
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        return int(state["step"]), [tuple(x) for x in state["losses"]]

    def maybe_save(self, step: int, total: int, losses: list[tuple[str, int, float]]) -> None:
        if self.file is None or not self.every or (step + 1) % self.every or step + 1 >= total:
            return
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state.update(step=step + 1, rng=torch.get_rng_state(), gen=self.gen.get_state(), losses=losses)
        with atomic_path(self.file) as tmp:
            torch.save(state, tmp)


def _train_vae(
    stack: SDStack,
    shots: torch.Tensor,
    fg: torch.Tensor,
    cfg: FinetuneConfig,
    lpips_model: torch.nn.Module,
    device: torch.device,
    gen: torch.Generator,
    ckpt: _Checkpoint,
    progress: bool,
) -> list[tuple[str, int, float]]:
    vae = stack.vae
    vae.train().requires_grad_(False)
    params = list(vae.parameters()) if cfg.vae_mode == "full" else list(vae.decoder.parameters())
    if cfg.vae_mode == "decoder":
        params += list(vae.post_quant_conv.parameters()) if vae.post_quant_conv is not None else []
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    start, losses = ckpt.track(gen, model=vae, opt=opt).restore(device)
    bar = tqdm(
        range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="fine-tune VAE", disable=not progress
    )
    for step in bar:
        idx = torch.randint(len(shots), (cfg.vae_batch_size,), generator=gen)
        x, _ = cfg.augment(shots[idx], fg[idx], gen)
        x = x.to(device) * 2 - 1
        with _autocast(device, cfg.precision):
            if cfg.vae_mode == "full":
                post = vae.encode(x).latent_dist
                eps = torch.randn(post.mean.shape, generator=gen).to(device)
                z = post.mean + post.std * eps
                # KL per image pixel, so kl_weight means what it means in LDM (KL sum vs per-pixel sums)
                kl = post.kl().mean() / x[0].numel()
            else:
                with torch.no_grad():
                    z = vae.encode(x).latent_dist.mean
                kl = torch.zeros((), device=device)
            rec = vae.decode(z).sample
        rec = rec.float()
        loss = F.mse_loss(rec, x) + cfg.kl_weight * kl.float()
        if cfg.beta > 0:
            loss = loss + cfg.beta * lpips_model(rec.clamp(-1, 1), x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(("vae", step, loss.item()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        ckpt.maybe_save(step, cfg.vae_steps, losses)
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def _normalise_latents(stack: SDStack, shots: torch.Tensor, device: torch.device, shift: bool) -> None:
    """LDM's rule: scale latents to unit variance (1 / std of the shots' latent means). ``shift`` also centres them
    on the shots' mean (SD3's ``shift_factor``): a ``PatchAutoencoder``'s latents are pixels, far from zero-mean."""
    z = stack.vae.encode(shots.to(device) * 2 - 1).latent_dist.mean.float()
    if shift:
        stack.vae.register_to_config(shift_factor=float(z.mean()))
    stack.vae.register_to_config(scaling_factor=1.0 / max(float(z.std()), 1e-6))


@dataclass
class TrainingBatch:
    """One UNet training batch: the augmented images, their masks and prompts, and their latents."""

    x: torch.Tensor  # [B, 3, H, W] augmented shots in [-1, 1]
    known: torch.Tensor  # [B, 1, h, w] training masks at latent resolution, 1 = known
    prompts: list[int]  # index of each sample's prompt (into the unique prompts)
    z0: torch.Tensor  # [B, C, h, w] target latents: stack.encode(x, gen, sample=True)
    masked: torch.Tensor  # [B, C, h, w] latents of the masked images: stack.encode(x * known)


def training_batch(
    stack: SDStack,
    shots: torch.Tensor,
    fg: torch.Tensor,
    prompt_ids: list[list[int]],
    grid_latent: torch.Tensor,
    cfg: FinetuneConfig,
    device: torch.device,
    gen: torch.Generator,
) -> TrainingBatch:
    """Draw one training batch with ``gen``: shots, augmentation, masks, prompts, then the latents.

    The target goes through the same ``SDStack.encode`` (shift and scale) as every latent the UNet is scored on;
    the posterior sample draws its noise from ``gen`` (after the prompts, before the diffusion noise and ``t``).
    """
    f, bs = stack.vae_scale_factor, cfg.batch_size
    idx = torch.randint(len(shots), (bs,), generator=gen)
    x, fgb = cfg.augment(shots[idx], fg[idx], gen)
    fg_lat = _latent_fg(fgb, f)
    known = torch.stack(
        [
            random_train_mask(
                gen, fg_lat[i], grid_latent, cfg.mask_grid_prob, cfg.mask_full_prob, cfg.mask_max_boxes,
                cfg.mask_box_range,
            )
            for i in range(bs)
        ]
    )[:, None]  # fmt: skip
    which = [prompt_ids[int(i)][int(torch.randint(len(prompt_ids[int(i)]), (), generator=gen))] for i in idx]
    x, known = x.to(device) * 2 - 1, known.to(device)
    with torch.no_grad(), _autocast(device, cfg.precision):
        z0 = stack.encode(x, gen, sample=True).float()
        masked = stack.encode(x * upsample_mask(known, f)).float()
    return TrainingBatch(x, known, which, z0, masked)


def _train_unet(
    stack: SDStack,
    shots: torch.Tensor,
    fg: torch.Tensor,
    prompt_ids: list[list[int]],
    prompt_emb: torch.Tensor,
    grid_latent: torch.Tensor,
    cfg: FinetuneConfig,
    device: torch.device,
    gen: torch.Generator,
    ckpt: _Checkpoint,
    progress: bool,
) -> list[tuple[str, int, float]]:
    unet = stack.unet
    sched = stack.ddpm()
    n_train = int(sched.config.num_train_timesteps)
    unet.train().requires_grad_(True)
    # at decay 0 diffusers' EMA copies the weights at every step (its decay is min(warm-up decay, 0) = 0; s - (s - p)
    # equals p up to float rounding): no shadow copy then, which saves 4 bytes per parameter (3.4 GB for SD-1.5's UNet)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75) if cfg.ema_decay else None
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.warmup_steps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    tracked = {"model": unet, "opt": opt, "lr_sched": lr_sched} | ({"ema": ema} if ema is not None else {})
    start, losses = ckpt.track(gen, **tracked).restore(device)
    bs = cfg.batch_size
    bar = tqdm(
        range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps, desc="fine-tune UNet", disable=not progress
    )
    for step in bar:
        batch = training_batch(stack, shots, fg, prompt_ids, grid_latent, cfg, device, gen)
        text = prompt_emb[batch.prompts].to(device)
        z0, known = batch.z0, batch.known
        noise = torch.randn(z0.shape, generator=gen, device="cpu").to(device)
        t = torch.randint(0, n_train, (bs,), generator=gen).to(device)
        z_t = sched.add_noise(z0, noise, t)
        with _autocast(device, cfg.precision):
            pred = unet(unet_input(z_t, known, batch.masked), t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        if ema is not None:
            ema.step(unet.parameters())
        losses.append(("unet", step, loss.item()))
        if step % 20 == 0:
            recent = [v for *_, v in losses[-50:]]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        ckpt.maybe_save(step, cfg.unet_steps, losses)
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)
    return losses


def finetune(
    stack: SDStack,
    shots: torch.Tensor,
    shot_prompts: list[list[str]],
    grid_latent: torch.Tensor,
    cfg: FinetuneConfig,
    lpips_model: torch.nn.Module,
    device: torch.device,
    out_dir: Path,
    resume_dir: Path | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> None:
    """Fine-tune ``stack`` in place on ``shots`` (``[K, 3, H, W]`` in ``[0, 1]``) and save ``unet/`` and ``vae/``.

    ``shot_prompts[i]`` lists the prompts shot ``i`` may be trained with; ``grid_latent`` (``[G, h, w]``, 1 = known)
    are the inference grid masks at latent resolution, mixed into the training masks.
    """
    ptype = stack.scheduler_config.get("prediction_type", "epsilon")
    if cfg.unet_steps > 0 and ptype != "epsilon":  # _train_unet regresses the noise; inference reads ptype
        raise ValueError(
            f"{stack.source}: its scheduler's prediction_type={ptype!r}, but AnomalySD's fine-tuning trains the UNet "
            "on the noise (epsilon) target; valid: 'epsilon' (SD-inpainting checkpoints), or unet_steps=0"
        )
    if resume_dir is not None:
        resume_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed)
        fg = torch.stack(
            [
                foreground_mask(s) if cfg.foreground == "otsu" else torch.ones(s.shape[-2:], dtype=torch.bool)
                for s in shots
            ]
        )
        losses: list[tuple[str, int, float]] = []
        vae_done = resume_dir / "vae_done" if resume_dir is not None else None
        if isinstance(stack.vae, PatchAutoencoder):  # nothing to train: exact, only normalised to the shots
            if cfg.vae_mode != "none":
                raise ValueError(
                    f"vae_mode={cfg.vae_mode!r}: the VAE is a parameter-free PatchAutoencoder; use vae_mode=none"
                )
            _normalise_latents(stack, shots, device, shift=True)
        elif cfg.vae_mode != "none" and cfg.vae_steps > 0:
            if vae_done is not None and (vae_done / "config.json").is_file():
                stack.vae = type(stack.vae).from_pretrained(vae_done).to(device).eval().requires_grad_(False)
                gen.set_state(torch.load(vae_done / "gen.pt", weights_only=True))
                losses = [tuple(x) for x in json.loads((vae_done / "losses.json").read_text())]
            else:
                ckpt = _Checkpoint(resume_dir, "vae", checkpoint_every)
                losses = _train_vae(stack, shots, fg, cfg, lpips_model, device, gen, ckpt, progress)
                if cfg.vae_mode == "full":
                    _normalise_latents(stack, shots, device, shift=False)
                if vae_done is not None:
                    stack.vae.save_pretrained(vae_done)
                    torch.save(gen.get_state(), vae_done / "gen.pt")
                    (vae_done / "losses.json").write_text(json.dumps(losses))
        t_vae = time.perf_counter() - t0
        unique = sorted({p for ps in shot_prompts for p in ps})
        prompt_emb = stack.encode_prompts(unique).float().cpu()
        prompt_ids = [[unique.index(p) for p in ps] for ps in shot_prompts]
        ckpt = _Checkpoint(resume_dir, "unet", checkpoint_every)
        losses += _train_unet(stack, shots, fg, prompt_ids, prompt_emb, grid_latent, cfg, device, gen, ckpt, progress)
    stack.unet.save_pretrained(out_dir / "unet")
    stack.vae.save_pretrained(out_dir / "vae")
    with open(out_dir / "loss.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["stage", "step", "loss"])
        w.writerows(losses)
    info = {
        "seconds": round(time.perf_counter() - t0, 2),
        "vae_seconds": round(t_vae, 2),
        "n_shots": len(shots),
        "foreground_fraction": [round(float(m.float().mean()), 3) for m in fg],
        "scaling_factor": stack.scaling_factor,
        "device": str(device),
    }
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2))
    log.info("fine-tuned in %.1f s (VAE %.1f s)", info["seconds"], t_vae)
