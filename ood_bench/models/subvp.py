"""score-SDE's subVP-SDE (Song et al., ICLR 2021), written from its equations: the forward process that
``model.train.sde=subvp`` trains on and that ``method.sampler=subvp_em`` (``samplers/sde.py``) integrates back.

With ``beta(t) = beta_min + t (beta_max - beta_min)`` and ``B(t) = int_0^t beta``: drift ``-1/2 beta(t) x``, diffusion
``g(t) = sqrt(beta(t) (1 - exp(-2 B(t))))``, marginal ``x_t = exp(-B/2) x_0 + (1 - exp(-B)) z``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-3  # score_sde's sampling eps for VP/subVP (LMD's recon_utils.get_sde_and_eps)
TRAIN_EPS = 1e-5  # score_sde's losses.get_sde_loss_fn: t ~ U(eps, 1)
TIME_LABEL_SCALE = 999.0  # the network's time input is 999 t (continuous VP/subVP models)


@dataclass(frozen=True)
class SubVPSDE:
    """score-SDE's subVP-SDE (``beta_min`` -> ``beta_max`` linearly over t in [0, 1])."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral(self, t: torch.Tensor) -> torch.Tensor:
        """``B(t) = int_0^t beta(s) ds``."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean coefficient ``exp(-B/2)`` and std ``1 - exp(-B)`` of ``x_t | x_0``."""
        big_b = self.integral(t)
        return torch.exp(-0.5 * big_b), 1.0 - torch.exp(-big_b)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """``g(t) = sqrt(beta(t) (1 - exp(-2 B(t))))``."""
        return torch.sqrt(self.beta(t) * (1.0 - torch.exp(-2.0 * self.integral(t))))

    def em_step(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor, z: torch.Tensor, n: int) -> torch.Tensor:
        """One reverse-time Euler-Maruyama step from ``t`` with ``dt = -1/n`` (``t``: one value per row)."""
        dt = -1.0 / n
        view = (-1,) + (1,) * (x.dim() - 1)
        beta, g = self.beta(t).view(view), self.diffusion(t).view(view)
        drift = -0.5 * beta * x - g**2 * score
        return x + drift * dt + g * math.sqrt(-dt) * z
