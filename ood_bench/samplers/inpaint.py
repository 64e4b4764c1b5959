"""Replacement-based inpainting (score-SDE "replacement", as LMD's official code).

At every step the known pixels are replaced by the original image noised to the current step,
``sqrt(abar_t) x0 + sqrt(1 - abar_t) z``, and the whole image is denoised one step by the scheduler.
This is the order the official ``get_pc_inpainter`` runs with ``corrector='none'`` (all LMD configs): its
corrector wrapper re-injects the known pixels noised to t before the predictor (Euler-Maruyama) step; the
predictor wrapper's own re-injection after the step is overwritten by the next step's. No RePaint-style
resampling. All noise comes from per-sample generators.

``sampler="subvp_em"`` is LMD's official sampler itself (Euler-Maruyama on the subVP-SDE, ``samplers/sde.py``) for
models trained on that SDE; ``ddim``/``ddpm`` run diffusers' schedulers on the model's discrete VP schedule.

``clip=True`` clips the scheduler's x0 prediction to ``[-1, 1]`` at every step and clamps the result;
the official sampler never clips (``clip=False``). ``precision`` runs the network under autocast (``bf16`` /
``fp16``); the scheduler's arithmetic stays in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ood_bench.models.diffusion import DiffusionModel
from ood_bench.samplers.sde import inpaint_subvp_em
from ood_bench.utils import autocast, randn_per_sample

SAMPLERS = ("ddim", "ddpm", "subvp_em")
_LEARNED = ("learned", "learned_range")  # DDPMScheduler variance types that read the model's extra channels


def make_scheduler(model: DiffusionModel, sampler: str, steps: int, clip: bool = True) -> DDIMScheduler | DDPMScheduler:
    """A sampling scheduler from the model's training schedule with ``steps`` evenly spaced steps ("trailing":
    the first at t = T-1, the last at t = T/steps - 1, whose update lands on the clean image, abar = 1)."""
    n_train = int(model.scheduler_config["num_train_timesteps"])
    if not 1 <= steps <= n_train:
        raise ValueError(f"steps={steps} is not valid; valid: 1..{n_train} (the model's training timesteps)")
    if sampler == "ddim":
        sched = model.ddim(timestep_spacing="trailing", clip_sample=clip, set_alpha_to_one=True)
    elif sampler == "ddpm":
        sched = model.ddpm(timestep_spacing="trailing", clip_sample=clip)
    else:
        raise ValueError(f"sampler={sampler!r} is not valid for a scheduler; valid: ['ddim', 'ddpm']")
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def inpaint(
    model: DiffusionModel,
    x0: torch.Tensor,
    mask: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    sampler: str = "ddim",
    steps: int = 25,
    eta: float = 1.0,
    clip: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Fill the pixels where ``mask == 0`` of ``x0`` (in ``[-1, 1]``); known pixels are returned unchanged.

    ``mask`` broadcasts to ``x0`` (``[H, W]``, ``[1, 1, H, W]``, or one mask per row ``[N, 1|C, H, W]``), 1 = known.
    """
    if sampler == "subvp_em":
        if clip:
            raise ValueError(
                "clip=True is not valid with sampler='subvp_em' (Euler-Maruyama has no x0 prediction "
                "to clip; the official sampler never clips); valid: clip=False"
            )
        return inpaint_subvp_em(model, x0, mask, generators, steps=steps, precision=precision)
    sched = make_scheduler(model, sampler, steps, clip)
    device, dtype = x0.device, x0.dtype
    mask = mask.to(device=device, dtype=dtype).expand_as(x0)
    shape = tuple(x0.shape)
    x = randn_per_sample(shape, generators, device, dtype)
    for t in sched.timesteps:
        t_batch = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
        known_t = sched.add_noise(x0, randn_per_sample(shape, generators, device, dtype), t_batch)
        x = mask * known_t + (1 - mask) * x
        with autocast(device, precision):
            out = model.unet(x, t_batch).sample.float()
        if out.shape[1] == 2 * shape[1] and not (sampler == "ddpm" and sched.config.variance_type in _LEARNED):
            out = out[:, : shape[1]]  # learned-sigma model (ADM): epsilon first; only DDPM's scheduler uses sigma
        if sampler == "ddim":
            noise = randn_per_sample(shape, generators, device, dtype) if eta > 0 else None
            x = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        else:
            x = sched.step(out, t, x, generator=list(generators)).prev_sample
    if clip:
        x = x.clamp(-1, 1)
    return mask * x0 + (1 - mask) * x
