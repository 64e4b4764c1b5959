"""Latent inpainting with a 9-channel SD-inpainting UNet from noise level ``strength * T`` (AnomalySD's λ).

The loop follows diffusers' ``StableDiffusionInpaintPipeline`` for 9-channel UNets: the UNet sees
``[z_t; mask; masked-image latents]`` with mask 1 = repaint, the masked image is the input with the hidden pixels
set to 0 (mid-grey in ``[-1, 1]``), and the img2img ``strength`` rule picks the steps: of ``steps`` DDIM steps over
the whole schedule, the last ``int(steps * strength)`` run, starting from the image latents noised to the first of
them (pure noise when ``strength = 1``). Differences from the pipeline: no classifier-free guidance (one UNet
call per step; the pipeline's ``guidance_scale=1``) and, in AnomalySD, latents from the VAE posterior mean (the
pipeline samples it; the latents are the caller's choice). ``replace_known`` additionally re-imposes the noised
known latents after every step (the pipeline does that only for 4-channel UNets). All noise comes from per-sample
generators. Fed the pipeline's inputs (posterior samples, ``replace_known=False``), the loop gives
``StableDiffusionInpaintPipeline(..., guidance_scale=1, output_type="latent")``'s latents to 1e-5
(tests/test_sd_inpaint_diffusers.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ood_bench.models.sd_stack import SDStack
from ood_bench.utils import randn_per_sample


def unet_input(latents: torch.Tensor, known: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """The inpainting UNet's 9-channel input ``[z_t; mask; masked-image latents]``.

    ``known`` is the suite's mask (1 = known) at latent resolution; the UNet's channel is 1 = repaint, so it is
    flipped here, the one place where the two conventions meet.
    """
    repaint = 1.0 - known.to(latents.dtype)
    return torch.cat([latents, repaint, masked_latents.to(latents.dtype)], dim=1)


def latent_mask(known: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask ``[N, 1, H, W]`` (1 = known) at latent resolution (nearest, as diffusers' pipeline)."""
    h, w = known.shape[-2] // factor, known.shape[-1] // factor
    return F.interpolate(known.float(), size=(h, w), mode="nearest")


def inference_timesteps(stack: SDStack, steps: int, strength: float):
    """A DDIM scheduler set to ``steps`` steps and the timesteps that run for ``strength`` (img2img rule)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"method.strength={strength} is not valid; valid: 0 < strength <= 1 (the paper's lambda)")
    sched = stack.ddim()
    sched.set_timesteps(steps)
    n_run = min(int(steps * strength), steps)
    if n_run < 1:
        raise ValueError(f"method.steps={steps} x method.strength={strength} runs no step; raise either")
    return sched, sched.timesteps[steps - n_run :]


@torch.no_grad()
def sd_inpaint(
    stack: SDStack,
    z0: torch.Tensor,
    masked_latents: torch.Tensor,
    known_latent: torch.Tensor,
    text: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    steps: int,
    strength: float,
    eta: float = 0.0,
    replace_known: bool = False,
    autocast_dtype: torch.dtype | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Inpaint latents; returns the final latents and the number of UNet calls per image.

    ``z0``: scaled latents of the images; ``masked_latents``: latents of the masked images; ``known_latent``:
    ``[N, 1, h, w]`` (1 = known); ``text``: ``[N, L, D]`` prompt embeddings; one generator per image, which
    draws the initial noise (unless ``noise`` is given) and, with ``eta > 0``, each step's noise. The pipeline
    draws, per image: the image's posterior sample, the initial noise, the masked image's posterior sample, then
    the steps' noise; passing ``noise`` drawn between the two samples reproduces that order
    (tests/test_sd_inpaint_diffusers.py).
    """
    sched, timesteps = inference_timesteps(stack, steps, strength)
    device = z0.device
    if noise is None:
        noise = randn_per_sample(z0.shape, generators, device, z0.dtype)
    elif noise.shape != z0.shape:
        raise ValueError(f"noise of shape {tuple(noise.shape)} does not match the latents {tuple(z0.shape)}")
    if strength >= 1.0:
        lat = noise * sched.init_noise_sigma
    else:
        lat = sched.add_noise(z0, noise, timesteps[:1].repeat(z0.shape[0]))
    for i, t in enumerate(timesteps):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            eps = stack.unet(unet_input(lat, known_latent, masked_latents), t, encoder_hidden_states=text).sample
        var_noise = randn_per_sample(z0.shape, generators, device, z0.dtype) if eta > 0 else None
        lat = sched.step(eps.float(), t, lat, eta=eta, variance_noise=var_noise).prev_sample
        if replace_known and i + 1 < len(timesteps):
            known_t = sched.add_noise(z0, noise, timesteps[i + 1 : i + 2].repeat(z0.shape[0]))
            lat = known_latent * known_t + (1 - known_latent) * lat
    if replace_known:
        lat = known_latent * z0 + (1 - known_latent) * lat
    return lat, len(timesteps)
