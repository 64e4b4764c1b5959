"""DLSR's latent feature diffusion: the MLP denoiser (LFDN), its training loop and the test-time reconstruction.

The LFDN mirrors the official ``ldm/modules/diffusionmodules/latent.py``: ``input_proj`` (SiLU, Linear in->width),
a sinusoidal timestep embedding of size ``width`` mapped to ``time_embed_dim``, residual blocks
(GroupNorm(1)-SiLU-Linear, + Linear(SiLU(emb)), GroupNorm(1)-SiLU-Dropout-zero Linear, residual) and a zero-init
output head. It predicts x0 (``prediction_type="sample"``).

The diffusion uses diffusers schedulers: T=100, LDM's "linear" betas 0.0015 -> 0.0195, which are linear in
sqrt(beta) (diffusers ``scaled_linear``).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos | sin]`` of (possibly fractional) timesteps, as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _zero(module: nn.Linear) -> nn.Linear:
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-Linear (+ time embedding), GroupNorm-SiLU-Dropout-zero Linear, plus the input."""

    def __init__(self, channels: int, mid_channels: int, emb_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Linear(channels, mid_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, mid_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, mid_channels), nn.SiLU(), nn.Dropout(dropout), _zero(nn.Linear(mid_channels, channels))
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return x + self.out_layers(self.in_layers(x) + self.emb_layers(emb))


class LFDN(nn.Module):
    """Latent feature denoising network: an MLP of residual blocks on a flat feature vector."""

    def __init__(
        self,
        in_dim: int,
        width: int = 1440,
        num_blocks: int = 16,
        time_embed_dim: int | None = None,
        bottleneck: int | None = None,
        dropout: float = 0.0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        emb = time_embed_dim or in_dim
        self.width = width
        self.input_proj = nn.Sequential(nn.SiLU(), nn.Linear(in_dim, width))
        self.time_embed = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.res_blocks = nn.ModuleList(
            [ResidualBlock(width, bottleneck or width, emb, dropout, groups) for _ in range(num_blocks)]
        )
        self.out = nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(), _zero(nn.Linear(width, in_dim)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict x0 from noisy features ``x [N, D]`` at integer timesteps ``t [N]``."""
        h = self.input_proj(x)
        emb = self.time_embed(timestep_embedding(t, self.width))
        for block in self.res_blocks:
            h = block(h, emb)
        return self.out(h)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process (paper: T=100, sqrt-linear betas 0.0015 -> 0.0195, x0-parameterisation)."""

    timesteps: int = 100
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    beta_schedule: str = "scaled_linear"

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={self.beta_schedule!r} is not valid; valid: {list(BETA_SCHEDULES)}")
        if self.timesteps < 2:
            raise ValueError(f"timesteps={self.timesteps} is not valid; use >= 2")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")

    def _kwargs(self) -> dict[str, Any]:
        return dict(
            num_train_timesteps=self.timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
            prediction_type="sample",
            clip_sample=False,
        )

    def ddpm(self) -> DDPMScheduler:
        return DDPMScheduler(**self._kwargs())

    def ddim(self) -> DDIMScheduler:
        """DDIM over every training step (step ratio 1); the last step (t=0) returns the clean x0 prediction."""
        sched = DDIMScheduler(**self._kwargs(), set_alpha_to_one=True, steps_offset=0)
        sched.set_timesteps(self.timesteps)
        return sched


@dataclass(frozen=True)
class TrainConfig:
    """AdamW on the x0 loss; ``early_epoch`` keeps a second checkpoint for the LR score."""

    epochs: int = 150
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-4
    ema_decay: float = 0.0  # 0 = no EMA; LDM's LitEma (0.9999 with warm-up) otherwise
    early_epoch: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} is not valid; use >= 1")
        if self.batch_size < 1:
            raise ValueError(f"train_batch_size={self.batch_size} is not valid; use >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} is not valid; use 0 (off) or a value in (0, 1)")
        if not 1 <= self.early_epoch <= self.epochs:
            raise ValueError(f"early_epoch={self.early_epoch} is not valid; use 1 <= early_epoch <= epochs")


@dataclass
class TrainResult:
    """Weights of the final and the early checkpoint, and the loss curve."""

    final: dict[str, torch.Tensor]
    early: dict[str, torch.Tensor]
    losses: list[tuple[int, int, float]]  # (step, epoch, loss)
    seconds: float


def train_lfdn(
    model: nn.Module,
    features: torch.Tensor,
    diffusion: DiffusionConfig,
    train: TrainConfig,
    device: torch.device,
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` to predict x0 from ``q(x_t | x0)`` with t ~ U{0..T-1} on ID features ``[N, D]``."""
    if features.dim() != 2 or len(features) == 0:
        raise ValueError(f"expected training features [N, D] with N > 0, got shape {tuple(features.shape)}")
    gen = torch.Generator().manual_seed(train.seed)
    sched = diffusion.ddpm()
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    # diffusers' EMAModel without its power warm-up uses LDM's schedule: decay_n = min(decay, (1+n)/(10+n)).
    ema = EMAModel(model.parameters(), decay=train.ema_decay) if train.ema_decay > 0 else None
    data = features.float()
    n, bs = len(data), min(train.batch_size, len(data))
    steps_per_epoch = max(1, n // bs)  # drop_last, as the official loader
    losses: list[tuple[int, int, float]] = []
    early: dict[str, torch.Tensor] = {}
    t0, step = time.perf_counter(), 0
    bar = tqdm(range(1, train.epochs + 1), desc="LFDN", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            x0 = data[perm[i * bs : (i + 1) * bs]]
            t = torch.randint(0, diffusion.timesteps, (len(x0),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            xt = sched.add_noise(x0, noise, t)
            loss = F.mse_loss(model(xt.to(device), t.to(device)), x0.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.step(model.parameters())
            step += 1
            value = loss.item()
            losses.append((step, epoch, value))
            total += value
        mean_loss = total / steps_per_epoch
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
        if epoch == train.early_epoch:
            early = _snapshot(model, ema)
    model.eval()
    return TrainResult(final=_snapshot(model, ema), early=early, losses=losses, seconds=time.perf_counter() - t0)


def _snapshot(model: nn.Module, ema: EMAModel | None) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights (the EMA's, when there is one; the model keeps its own weights)."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        ema.restore(model.parameters())
    return state


def write_loss_csv(path: str | Path, losses: list[tuple[int, int, float]]) -> None:
    """The loss curve, one row per optimiser step."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss"])
        w.writerows((s, e, f"{v:.6g}") for s, e, v in losses)


def read_loss_csv(path: str | Path) -> list[tuple[int, int, float]]:
    with open(path, newline="") as f:
        return [(int(r["step"]), int(r["epoch"]), float(r["loss"])) for r in csv.DictReader(f)]


RECONS = ("official", "ddim")


def noise_rows(recon: str, t: int) -> int:
    """Noise rows per sample a reconstruction draws: one to noise the input, one per step after it."""
    if recon not in RECONS:
        raise ValueError(f"recon={recon!r} is not valid; valid: {list(RECONS)}")
    return t + 1 if recon == "official" else t + 2


@torch.no_grad()
def reconstruct(
    model: nn.Module, sched: DDIMScheduler, x0: torch.Tensor, t: int, eta: float, noise: torch.Tensor
) -> torch.Tensor:
    """Noise ``x0`` once to step ``t``, then run DDIM steps t, t-1, ..., 0 back to a clean estimate (``ddim``).

    ``noise`` is ``[N, t + 2, D]``: row 0 noises the input, row k+1 is the variance noise of the k-th step
    (drawn per sample by the caller, so results do not depend on the batch size). ``t + 1`` model calls.
    """
    if noise.shape[1] < t + 2:
        raise ValueError(f"need {t + 2} noise rows per sample for t={t}, got {noise.shape[1]}")
    ts = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
    x = sched.add_noise(x0, noise[:, 0], ts)
    for k, step in enumerate(range(t, -1, -1)):
        pred = model(x, torch.full((len(x0),), step, dtype=torch.long, device=x0.device))
        x = sched.step(pred.float(), step, x, eta=eta, variance_noise=noise[:, k + 1]).prev_sample
    return x


@torch.no_grad()
def reconstruct_official(
    model: nn.Module, alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: int, eta: float, noise: torch.Tensor
) -> torch.Tensor:
    """DLSR's official test-time path (``Gen_Model`` -> ``DDIMSampler`` with S=T and ``subset_timesteps_num=t``).

    The official sampler noises ``x0`` to abar[t] (0-based, as ``q_sample``) and calls the LFDN at steps
    t, t-1, ..., 1. Its DDIM coefficients are one schedule index lower than the step the network sees (LDM's
    ``make_ddim_timesteps`` adds one, the DLSR fork's ``make_ddim_sampling_parameters`` subtracts it again):
    at network step s the update uses a_t = abar[s-1] and a_prev = abar[s-2] (abar[0] for s = 1), while the
    x0 -> eps conversion uses abar[s]. The last call (s = 1, a_t = a_prev, sigma = 0) returns its input
    unchanged, and the result is the sample at noise level abar[0], not a clean x0 estimate. ``t`` model
    calls, ``t - 1`` of them effective. ``noise`` is ``[N, t + 1, D]``: row 0 noises the input, row k+1 is the
    step noise of the k-th call.
    """
    if t < 1:
        raise ValueError(f"recon=official needs t >= 1 (it runs the DDIM steps t..1), got t={t}")
    if noise.shape[1] < t + 1:
        raise ValueError(f"need {t + 1} noise rows per sample for t={t}, got {noise.shape[1]}")
    abar = alphas_cumprod.to(device=x0.device, dtype=torch.float32)
    x = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * noise[:, 0]
    for k, step in enumerate(range(t, 0, -1)):
        a_t = abar[step - 1]
        a_prev = abar[max(step - 2, 0)]
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x0_pred = model(x, torch.full((len(x0),), step, dtype=torch.long, device=x0.device)).float()
        eps = (x / abar[step].sqrt() - x0_pred) / (1 / abar[step] - 1).sqrt()
        pred = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * pred + (1 - a_prev - sigma**2).sqrt() * eps + sigma * noise[:, k + 1]
    return x
