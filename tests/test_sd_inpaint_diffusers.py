"""Our SD-inpainting loop (``samplers/sd_inpaint.py``) against diffusers' ``StableDiffusionInpaintPipeline``.

On a tiny random SD-inpainting stack (the scratch builder, AutoencoderKL latents), ``sd_inpaint`` run with the
pipeline's settings (latents drawn from the VAE posterior, no known-region replacement, guidance scale 1, DDIM
with the same steps, strength and eta) gives the pipeline's latents (``output_type="latent"``) with the same
per-image generators. Our deliberate differences, the posterior mean and ``replace_known``, change the result.
"""

from __future__ import annotations

import pytest
import torch

from ood_bench.models.sd_stack import SDStack, build_scratch_stack
from ood_bench.samplers.sd_inpaint import latent_mask, sd_inpaint
from ood_bench.utils import randn_per_sample

TINY_KL_STACK = {
    "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4},
    "unet": {
        "block_out_channels": [16, 32],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "attention_head_dim": 8,
    },
    "text": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2, "max_length": 16},
}
SIZE, N, STEPS = 16, 3, 6  # the pipeline wants sides divisible by 8
SEEDS = [11, 12, 13]  # one generator per image


@pytest.fixture(scope="module")
def stack() -> SDStack:
    sd = build_scratch_stack(TINY_KL_STACK, ["a", "perfect", "tile"], seed=0).eval()
    sd.vae.register_to_config(scaling_factor=0.7)  # a non-unit scale, so that it has to be applied alike
    sd.unet.register_to_config(sample_size=SIZE // 2)  # the pipeline reads it (the scratch UNet leaves it unset)
    return sd


@pytest.fixture(scope="module")
def inputs(stack):
    g = torch.Generator().manual_seed(0)
    x01 = torch.rand(N, 3, SIZE, SIZE, generator=g)
    repaint = torch.zeros(N, 1, SIZE, SIZE)  # the pipeline's mask: 1 = repaint
    repaint[0, :, 4:12, 4:12] = 1
    repaint[1, :, :, 8:] = 1
    repaint[2, :, ::4, :] = 1
    with torch.no_grad():
        text = stack.encode_prompts(["a perfect tile"] * N)
    return x01, repaint, text


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def pipeline_latents(stack, x01, repaint, text, strength: float, eta: float) -> torch.Tensor:
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(
        vae=stack.vae,
        text_encoder=stack.text_encoder,
        tokenizer=stack.tokenizer,
        unet=stack.unet,
        scheduler=stack.ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt_embeds=text,
        image=x01,
        mask_image=repaint,
        height=SIZE,
        width=SIZE,
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        eta=eta,
        generator=generators(),
        output_type="latent",
    )
    return out.images


@torch.no_grad()
def our_latents(stack, x01, repaint, text, strength, eta, posterior="sample", replace_known=False) -> torch.Tensor:
    """``sd_inpaint`` fed as the pipeline feeds its loop. With ``posterior="sample"`` each image's generator draws
    in the pipeline's order: the image's posterior sample (only when strength < 1), the initial noise, the masked
    image's posterior sample, then (``eta > 0``) each step's noise inside ``sd_inpaint``."""
    x = 2 * x01 - 1
    known = 1 - repaint
    gens = generators()
    sample = posterior == "sample"

    def encode(images: torch.Tensor) -> torch.Tensor:
        if not sample:
            return stack.encode(images)
        return torch.cat([stack.encode(images[i : i + 1], gens[i], sample=True) for i in range(len(images))])

    z0 = encode(x) if strength < 1 else stack.encode(x)
    noise = randn_per_sample(z0.shape, gens, z0.device, z0.dtype) if sample else None
    masked = encode(x * known)
    lat, nfe = sd_inpaint(
        stack,
        z0,
        masked,
        latent_mask(known, stack.vae_scale_factor),
        text,
        gens,
        steps=STEPS,
        strength=strength,
        eta=eta,
        replace_known=replace_known,
        noise=noise,
    )
    assert nfe == min(int(STEPS * strength), STEPS)
    return lat


@pytest.mark.parametrize("strength, eta", [(0.5, 0.0), (1.0, 0.0), (0.5, 1.0)])
def test_sd_inpaint_equals_the_diffusers_pipeline(stack, inputs, strength, eta):
    x01, repaint, text = inputs
    ref = pipeline_latents(stack, x01, repaint, text, strength, eta)
    ours = our_latents(stack, x01, repaint, text, strength, eta)
    assert ours.shape == ref.shape == (N, 4, SIZE // 2, SIZE // 2)
    assert (ours - ref).abs().max() <= 1e-5
    # our deliberate differences are not the pipeline's: each changes the latents
    mean = our_latents(stack, x01, repaint, text, strength, eta, posterior="mean")
    assert (mean - ref).abs().max() > 1e-2
    replaced = our_latents(stack, x01, repaint, text, strength, eta, replace_known=True)
    known = latent_mask(1 - repaint, stack.vae_scale_factor).bool().expand_as(ref)
    assert (replaced - ref)[known].abs().max() > 1e-2  # the known cells are the image's latents, not repainted
