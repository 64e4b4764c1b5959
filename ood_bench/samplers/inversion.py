"""Deterministic DDIM inversion and re-synthesis with per-sample depths (DiffGuard's sampling loops).

The DDIM update (eta = 0) is written out: with ``a`` the alpha-bar of the current level and ``a'`` that of the
next, ``x0 = (x - sqrt(1-a) eps) / sqrt(a)`` and ``x' = sqrt(a') x0 + sqrt(1-a') eps``, the same for inversion
(``a' < a``, towards noise) and synthesis (``a' > a``). Two conventions, one per official code path:

- ``adm`` (guided-diffusion's ``timestep_respacing: ddimN``, DiffGuard's GDM path): grid ``tau_k = k T/N``;
  inversion step k evaluates the model at ``tau_k`` (the level it leaves) and goes from ``abar[tau_k]`` to
  ``abar[tau_{k+1}]`` (the input image counts as level 0); with ``clip``, x0 is clipped to [-1, 1] in every step
  but the first inversion step (``clip_denoised``). Synthesis from level j evaluates at ``tau_j`` and goes to
  level j-1, the last step to alpha-bar 1.
- ``ldm`` (CompVis ``DDIMSampler`` / DiffGuard's ``DDIMForward``, the LDM path; = diffusers ``DDIMScheduler`` and
  ``DDIMInverseScheduler`` with ``steps_offset=1, set_alpha_to_one=False, clip_sample=False``): grid
  ``tau_k = k T/N + 1``; inversion step k evaluates the model at ``tau_k`` (the level it reaches) and goes from
  ``abar[tau_{k-1}]`` (``abar[0]`` for k = 0) to ``abar[tau_k]``; synthesis reverses it exactly. No clipping.

Every sample carries its own depth: inversion stops a sample when its early-stop rule fires (the others go on),
and synthesis starts each sample at its own level. Samples that are done drop out of the batch, so nothing is
evaluated for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

CONVENTIONS = ("adm", "ldm")

#: ``eps_fn(x, t, rows) -> eps``: the (guided) noise prediction for the rows ``rows`` of the batch at timestep t
EpsFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
#: ``guide_fn(x, x0_raw, abar, t, rows) -> grad``: a classifier gradient applied as eps <- eps - sqrt(1-abar) grad
GuideFn = Callable[[torch.Tensor, torch.Tensor, float, int, torch.Tensor], torch.Tensor]
#: ``stop_fn(x_k, x_input) -> bool[B]``: whether each sample's inversion stops at this level
StopFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DDIMGrid:
    """Noise levels of a DDIM trajectory with N steps, and which model timestep each step uses."""

    convention: str
    levels: tuple[float, ...]  # alpha-bar after k inversion steps, k = 0..N
    inv_t: tuple[int, ...]  # model timestep of inversion step k (levels[k] -> levels[k+1]), k = 0..N-1
    syn_t: tuple[int, ...]  # model timestep of the synthesis step that leaves level j (-1: none)
    syn_to: tuple[float, ...]  # alpha-bar that synthesis step reaches
    first_syn_level: int  # synthesis ends with the step that leaves this level
    last_syn_level: int  # the highest level a synthesis can start from

    @property
    def steps(self) -> int:
        return len(self.inv_t)

    @classmethod
    def make(cls, alphas_cumprod: torch.Tensor, steps: int, convention: str) -> DDIMGrid:
        """The grid of ``steps`` DDIM steps over a schedule of ``len(alphas_cumprod)`` training timesteps."""
        if convention not in CONVENTIONS:
            raise ValueError(f"ddim convention={convention!r} is not valid; valid: {list(CONVENTIONS)}")
        abar = [float(a) for a in alphas_cumprod.double()]
        n_train = len(abar)
        if not 1 <= steps <= n_train or n_train % steps:
            raise ValueError(f"steps={steps} is not valid: it must divide the model's {n_train} training timesteps")
        stride = n_train // steps
        if convention == "adm":
            tau = [k * stride for k in range(steps)]
            levels = [abar[t] for t in tau] + [0.0]
            syn_t = [*tau, -1]
            syn_to = [1.0] + levels[: steps - 1] + [0.0]
            return cls(convention, tuple(levels), tuple(tau), tuple(syn_t), tuple(syn_to), 0, steps - 1)
        tau = [k * stride + 1 for k in range(steps)]
        levels = [abar[0]] + [abar[t] for t in tau]
        syn_t = [-1, *tau]
        syn_to = [abar[0], *levels[:steps]]
        return cls(convention, tuple(levels), tuple(tau), tuple(syn_t), tuple(syn_to), 1, steps)

    def start_level(self, depth: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Level each synthesis starts from: the inversion depth plus ``offset``, within the grid.

        DiffGuard's GDM path starts one level above the depth its inversion reached (``forback_skip_diff: 3``,
        ``offset = 1``); ``offset = 0`` is the exact reverse.
        """
        return (depth + offset).clamp(self.first_syn_level, self.last_syn_level)

    def synthesis_steps(self, start: torch.Tensor) -> torch.Tensor:
        """Number of synthesis steps (model evaluations) of each sample."""
        return start - self.first_syn_level + 1


def ddim_update(
    x: torch.Tensor, eps: torch.Tensor, a: float, a_to: float, clip: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step from alpha-bar ``a`` to ``a_to``: returns ``(x_to, x0, eps)`` after clipping."""
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps, x0, eps


def invert(
    grid: DDIMGrid,
    x0: torch.Tensor,
    max_steps: int,
    eps_fn: EpsFn,
    *,
    clip: bool = False,
    stop_fn: StopFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM-invert ``x0`` (in ``[-1, 1]``) for up to ``max_steps`` steps; returns ``(latents, depth)``.

    ``depth[i]`` is the number of inversion steps sample i took: ``stop_fn`` is asked after every step and a
    sample stops at the first level where it says so (the latent of that level is kept), as the official
    adaptive early stop. ``clip`` applies the ``adm`` convention's x0 clipping from the second step on.
    """
    if not 1 <= max_steps <= grid.steps:
        raise ValueError(f"inversion steps={max_steps} is not valid; valid: 1..{grid.steps} (the DDIM grid)")
    x = x0.clone()
    depth = torch.full((len(x0),), max_steps, dtype=torch.long)
    active = torch.arange(len(x0))
    for k in range(max_steps):
        if len(active) == 0:
            break
        xa = x[active]
        eps = eps_fn(xa, grid.inv_t[k], active)
        xa, _, _ = ddim_update(xa, eps, grid.levels[k], grid.levels[k + 1], clip and grid.convention == "adm" and k > 0)
        x[active] = xa
        if stop_fn is not None:
            stop = stop_fn(xa, x0[active]).cpu()
            if bool(stop.any()):
                depth[active[stop]] = k + 1
                active = active[~stop]
    return x, depth


def synthesize(
    grid: DDIMGrid,
    x: torch.Tensor,
    start: torch.Tensor,
    eps_fn: EpsFn,
    *,
    clip: bool = False,
    guide_fn: GuideFn | None = None,
) -> torch.Tensor:
    """Deterministic DDIM synthesis of each sample from its level ``start[i]`` down to the data.

    With ``guide_fn``, each step's noise prediction (after clipping) becomes ``eps - sqrt(1-abar) grad`` and x0
    is re-derived from it (guided-diffusion's ``condition_score``). ``guide_fn`` receives the unclipped x0.
    """
    x = x.clone()
    start = start.to(torch.long).cpu()
    if len(start) != len(x):
        raise ValueError(f"need one start level per sample: got {len(start)} for {len(x)} samples")
    if len(start) and (start.min() < grid.first_syn_level or start.max() > grid.last_syn_level):
        raise ValueError(
            f"start levels must lie in {grid.first_syn_level}..{grid.last_syn_level}, got {start.min()}..{start.max()}"
        )
    for j in range(int(start.max()) if len(start) else -1, grid.first_syn_level - 1, -1):
        rows = torch.nonzero(start >= j).flatten()
        xa = x[rows]
        a, a_to, t = grid.levels[j], grid.syn_to[j], grid.syn_t[j]
        eps = eps_fn(xa, t, rows)
        x0_raw = (xa - math.sqrt(1 - a) * eps) / math.sqrt(a)
        _, x0, eps = ddim_update(xa, eps, a, a_to, clip)
        if guide_fn is not None:
            eps = eps - math.sqrt(1 - a) * guide_fn(xa, x0_raw, a, t, rows)
            x0 = (xa - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x[rows] = math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps
    return x


def official_psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR as DiffGuard's early stop codes it: ``20 log10(255 / RMSE)`` on ``[-1, 1]`` images.

    That is the true PSNR of the ``[0, 1]`` images plus ``20 log10(127.5) = 42.11`` dB (the official threshold
    48.5 is 6.39 dB true PSNR, the value in the paper's Table 4).
    """
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 20 * torch.log10(255.0 / mse.sqrt())


class EarlyStop:
    """DiffGuard's adaptive early stop: stop once PSNR < ``psnr`` OR DISTS similarity < ``dists`` (either may be
    None = off), measured between the inverted latent and the input, both taken as images (``[-1,1] -> [0,1]``)."""

    def __init__(
        self,
        psnr: float | None = None,
        dists: float | None = None,
        dists_similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if dists is not None and dists_similarity is None:
            raise ValueError("a DISTS threshold needs a DISTS similarity function")
        self.psnr, self.dists, self.dists_similarity = psnr, dists, dists_similarity

    @property
    def active(self) -> bool:
        return self.psnr is not None or self.dists is not None

    def __call__(self, xk: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        stop = torch.zeros(len(xk), dtype=torch.bool, device=xk.device)
        if self.psnr is not None:
            stop |= official_psnr(xk, x0) < self.psnr
        if self.dists is not None:
            with torch.no_grad():
                stop |= self.dists_similarity(xk * 0.5 + 0.5, x0 * 0.5 + 0.5).to(xk.device) < self.dists
        return stop
