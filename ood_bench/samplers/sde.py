"""LMD's official sampler: Euler-Maruyama on score-SDE's subVP-SDE with replacement inpainting.

Written from the equations of Song et al. (ICLR 2021, eq. 29 and appendix B); the behaviour follows
``score_sde_pytorch`` as LMD runs it (``configs/subvp/*``: predictor ``euler_maruyama``, corrector ``none``,
``N = num_scales = 1000``, ``eps = 1e-3``). With ``beta(t) = beta_min + t (beta_max - beta_min)`` and
``B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2``:

- forward SDE  ``dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 B(t)))) dw``;
- marginal     ``x_t = exp(-B(t)/2) x_0 + (1 - exp(-B(t))) z``: mean coefficient ``exp(-B/2)``, std ``1 - exp(-B)``;
- score        ``s(x, t) = -net(x, 999 t) / std(t)`` (the network predicts the noise ``z`` of the marginal; its time
  input is the label ``999 t``: score_sde's ``get_score_fn`` for continuous VP/subVP models);
- reverse EM   on ``t_i = linspace(1, eps, N)``, fixed step ``dt = -1/N`` (score_sde's ``EulerMaruyamaPredictor``
  uses ``1/N``, not the grid spacing ``(1 - eps)/(N - 1)``):
  ``x_mean = x + (f(x, t) - g(t)^2 s(x, t)) dt``, ``x = x_mean + g(t) sqrt(-dt) z``.

Inpainting (``controllable_generation.get_pc_inpainter`` with corrector ``none``): start from ``x_0`` on the known
pixels and prior noise ``N(0, I)`` elsewhere; at every ``t_i`` the known pixels are replaced by ``x_0`` noised to
``t_i`` by the marginal (the corrector wrapper's replacement), then one EM step. The predictor wrapper's replacement
after the step is overwritten by the next step's, so it is not drawn here; the official output (``x_mean`` of the
predictor wrapper, ``noise_removal=True``) is the *noisy* EM sample on the unknown pixels, and that is what is
returned there (known pixels: ``x_0`` exactly, docs/deviations.md L5). All noise comes from per-sample generators.

Which model: one whose noisy inputs follow subVP marginals and whose time input is ``999 t``: a model trained here
with ``model.train.sde=subvp`` or a converted score_sde subVP checkpoint (``scripts/convert_score_sde.py``); both
carry ``_score_sde`` (sde, beta_min, beta_max) in their UNet config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ood_bench.models.subvp import EPS, TIME_LABEL_SCALE, SubVPSDE
from ood_bench.utils import autocast, randn_per_sample


def score_sde_info(model: Any) -> dict[str, Any] | None:
    """The ``_score_sde`` entry of the model's UNet config (what its time input and output mean), or None."""
    info = model.unet.config.get("_score_sde")
    return info if isinstance(info, dict) else None


def model_sde(model: Any) -> SubVPSDE:
    """The subVP-SDE a model was trained on; a clear error for any other model."""
    info = score_sde_info(model)
    if info is None or info.get("sde") != "subvpsde" or not info.get("continuous", False):
        what = "a discrete-time DDPM model" if info is None else f"a score-SDE model with {info}"
        raise ValueError(
            f"method.sampler=subvp_em needs a model trained on the continuous subVP-SDE; {model.source} is {what}. "
            "Train one with model.train.sde=subvp, or convert score_sde's subVP checkpoint "
            "(scripts/convert_score_sde.py); for this model use method.sampler=ddpm or ddim"
        )
    return SubVPSDE(float(info["beta_min"]), float(info["beta_max"]))


def sde_timesteps(steps: int, eps: float = EPS) -> torch.Tensor:
    """score_sde's sampling grid ``linspace(1, eps, steps)`` (float32, as ``torch.linspace`` there)."""
    return torch.linspace(1.0, eps, steps)


@torch.no_grad()
def inpaint_subvp_em(
    model: Any,
    x0: torch.Tensor,
    mask: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    steps: int = 1000,
    eps: float = EPS,
    precision: str = "fp32",
) -> torch.Tensor:
    """Fill the pixels where ``mask == 0`` of ``x0`` (in ``[-1, 1]``) by EM on the model's subVP-SDE.

    ``mask`` broadcasts to ``x0`` (1 = known). Per step: two draws per row (the known pixels' marginal noise, then
    the EM noise), from that row's generator. Returns the known pixels unchanged, the unknown ones as the EM sample
    after the last step (not clipped).
    """
    if steps < 1:
        raise ValueError(f"steps={steps} is not valid; valid: a positive integer (the SDE's N)")
    sde = model_sde(model)
    device, dtype = x0.device, x0.dtype
    mask = mask.to(device=device, dtype=dtype).expand_as(x0)
    shape, n = tuple(x0.shape), int(x0.shape[0])
    x = mask * x0 + (1 - mask) * randn_per_sample(shape, generators, device, dtype)
    view = (-1,) + (1,) * (x0.dim() - 1)
    for t in sde_timesteps(steps, eps):
        vec_t = torch.full((n,), float(t), device=device, dtype=dtype)
        mean, std = sde.marginal(vec_t)
        known_t = mean.view(view) * x0 + std.view(view) * randn_per_sample(shape, generators, device, dtype)
        x = mask * known_t + (1 - mask) * x
        with autocast(device, precision):
            out = model.unet(x, vec_t * TIME_LABEL_SCALE).sample.float()
        score = -out[:, : shape[1]] / std.view(view)
        x = sde.em_step(x, vec_t, score, randn_per_sample(shape, generators, device, dtype), steps)
    return mask * x0 + (1 - mask) * x
