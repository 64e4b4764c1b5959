"""AnomalySD's fine-tuning trains the UNet on the latents it is scored on, and the fine-tuned model repaints a defect.

The first test guards issue 17 item 1: the training target was ``(mean + std·ε)·scale`` without the autoencoder's
shift while every scored latent is ``(z − shift)·scale`` (``SDStack.encode``). The second (item 3) fine-tunes a
small stack on a synthetic normal texture and checks that inpainting alone (``alpha=0``: no prototype term) puts a
planted blob above the rest of the image and above the same image without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_anomalysd import PATCH_STACK, TINY_STACK

from ood_bench.models.sd_finetune import Augment, FinetuneConfig, _normalise_latents, finetune, training_batch
from ood_bench.models.sd_stack import PatchAutoencoder, build_scratch_stack
from ood_bench.samplers.anomaly_masks import grid_masks, upsample_mask

SIZE = 32


def dark_texture(n: int, seed: int) -> torch.Tensor:
    """Dark, low-contrast shots (as magnetic tiles): their mean in [-1, 1] is far from 0 in latent stds."""
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.1 * torch.rand(n, 3, SIZE, SIZE, generator=g)


@pytest.mark.parametrize("kind", ["patch", "kl"])
def test_training_latents_are_the_latents_scored_at_inference(kind):
    """The UNet's target and masked latents of a training batch are ``stack.encode`` of the batch's images.

    The patch autoencoder is fitted as in ``finetune`` (shift = the shots' mean: −0.5 here, ~9 latent stds away
    from 0); the KL VAE gets an SD3-style shift (SD 1.x has none, where the old target happened to be right).
    """
    stack = build_scratch_stack(PATCH_STACK if kind == "patch" else TINY_STACK, ["perfect", "tile"], seed=0)
    shots = dark_texture(2, 0)
    device = torch.device("cpu")
    if kind == "patch":
        _normalise_latents(stack, shots, device, shift=True)
        assert stack.vae.config.shift_factor == pytest.approx(-0.5, abs=0.01)
    else:
        stack.vae.register_to_config(shift_factor=-0.5, scaling_factor=2.0)
    f = stack.vae_scale_factor
    grid = grid_masks(SIZE // f, 2, "checkerboard")
    fg = torch.ones(2, SIZE, SIZE, dtype=torch.bool)
    cfg = FinetuneConfig(batch_size=8, precision="fp32", augment=Augment(brightness=0.0, contrast=0.0))
    batch = training_batch(stack, shots, fg, [[0], [0]], grid, cfg, device, torch.Generator().manual_seed(1))

    assert batch.x.shape == (8, 3, SIZE, SIZE) and batch.known.shape == (8, 1, SIZE // f, SIZE // f)
    torch.testing.assert_close(batch.masked, stack.encode(batch.x * upsample_mask(batch.known, f)))
    mean = stack.encode(batch.x)  # the posterior mean, shifted and scaled: what inference sees
    if isinstance(stack.vae, PatchAutoencoder):  # a deterministic posterior: the sample is the mean, exactly
        torch.testing.assert_close(batch.z0, mean)
        # and it is standardised like the shots (the training target sits where inference puts its latents)
        assert abs(float(batch.z0.mean())) < 0.5 and 0.5 < float(batch.z0.std()) < 2.0
    else:  # a posterior sample around that mean: (z0 − mean) / (std · scale) is standard normal
        with torch.no_grad():
            post = stack.vae.encode(batch.x).latent_dist
        eps = (batch.z0 - mean) / (post.std * stack.scaling_factor)
        assert not torch.allclose(batch.z0, mean)
        assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05, (eps.mean(), eps.std())


def test_finetuning_refuses_a_stack_that_does_not_predict_the_noise(tmp_path):
    """The fine-tuning loss regresses the noise; a v-prediction stack would be trained on one target and stepped at
    inference (DDIM reads ``prediction_type``) as another, so it is refused before any training."""
    stack = build_scratch_stack(PATCH_STACK, ["perfect", "tile"], seed=0)
    stack.scheduler_config = {**stack.scheduler_config, "prediction_type": "v_prediction"}
    shots, grid = dark_texture(1, 0), grid_masks(SIZE // stack.vae_scale_factor, 2, "checkerboard")
    cfg = FinetuneConfig(batch_size=2, unet_steps=1, precision="fp32")
    args = (stack, shots, [["perfect tile"]], grid, cfg, None, torch.device("cpu"), tmp_path)
    with pytest.raises(ValueError, match="prediction_type='v_prediction'.*valid: 'epsilon'"):
        finetune(*args, progress=False)
    assert not (tmp_path / "unet").exists()


def test_hierarchical_inference_prompts_average_the_unets_noise_over_the_prompts(tmp_path):
    """``inference_prompts=hierarchical``: ε is the mean of one UNet call per prompt (NFE × prompts);
    ``hierarchical_embedding``: one call on the mean embedding; ``object``: the object-level prompt alone."""
    from test_anomalysd import images, tiny_ctx, tiny_method

    from ood_bench.methods.anomalysd import _PromptEnsemble

    method = tiny_method(scratch=PATCH_STACK, vae_mode="none")
    method.fit(images(1, 0), tiny_ctx(tmp_path), labels=np.array([0]))
    lab = np.array([0, 0])
    obj = method._test_text(lab)
    method.inference_prompts = "hierarchical"
    every = method._test_text(lab)
    nfe_all = method.nfe_per_image
    method.inference_prompts = "hierarchical_embedding"
    mean = method._test_text(lab)
    method.inference_prompts = "object"
    prompts = method.prompts_for(method.names[0])
    assert len(prompts) == 4 and every.shape == (2, 4, *obj.shape[1:])
    torch.testing.assert_close(every[:, 0], obj)  # the object-level prompt comes first
    torch.testing.assert_close(mean, every.mean(1))
    assert nfe_all == 4 * method.nfe_per_image

    unet = method.sd.unet
    c = unet.config.in_channels
    g = torch.Generator().manual_seed(0)
    sample, t = torch.randn(2, c, 16, 16, generator=g), torch.tensor(500)
    ens = _PromptEnsemble(unet)(sample, t, encoder_hidden_states=every).sample
    each = [unet(sample, t, encoder_hidden_states=every[:, p]).sample for p in range(4)]
    torch.testing.assert_close(ens, torch.stack(each).mean(0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(each[0], each[1])  # the prompts do condition the UNet
    scores = {}
    for how in ("object", "hierarchical"):
        method.inference_prompts = how
        scores[how] = method.score(images(2, 1), tiny_ctx(tmp_path), labels=lab)
    assert scores["hierarchical"].nfe_per_image == 4 * scores["object"].nfe_per_image
    assert not np.allclose(scores["hierarchical"].maps, scores["object"].maps)


def stripes(n: int, seed: int, period: int = 8, lo: float = 0.15, hi: float = 0.35) -> torch.Tensor:
    """A dark striped texture (horizontal stripes of random phase, a little pixel noise): the normal images."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.randint(period, (n,), generator=g)
    rows = ((torch.arange(SIZE)[None] + phase[:, None]) % period < period // 2).float()
    img = lo + (hi - lo) * rows[:, None, :, None].expand(n, 3, SIZE, SIZE)
    return img + 0.01 * torch.randn(n, 3, SIZE, SIZE, generator=g)


def plant_blobs(x: torch.Tensor, seed: int, radius: int = 4, value: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with a bright disk at a random place in each image, and the disks' masks ``[N, H, W]``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    out, masks = x.clone(), torch.zeros(len(x), SIZE, SIZE, dtype=torch.bool)
    for i in range(len(x)):
        cy, cx = (int(v) for v in torch.randint(radius + 2, SIZE - radius - 2, (2,), generator=g))
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        out[i][:, masks[i]] = value
    return out, masks


@pytest.mark.slow  # ~50 s of CPU (300 fine-tuning steps); minutes on a loaded machine
def test_finetuned_stack_repaints_a_planted_blob(tmp_path):
    """Fine-tuned on stripes, inpainting alone (``alpha=0``: the multi-scale term, no prototype-guided term, whose
    mask is placed by the patch kNN whether or not the UNet works) puts a planted blob above the rest of the image,
    and each planted image above the same image without its blob."""
    from sklearn.metrics import roc_auc_score
    from test_anomalysd import tiny_ctx, tiny_method

    method = tiny_method(
        scratch=PATCH_STACK, vae_mode="none", unet_steps=300, train_batch_size=8, warmup_steps=20, lr=2e-3,
        augment={"rot90": False, "crop_min": 1.0, "brightness": 0.0, "contrast": 0.0},
        mask_scales=[2, 4], steps=10, strength=0.5, alpha=0.0, sigma=2.0, diff_layers=[1, 2], feature_size=64,
    )  # fmt: skip
    ctx = tiny_ctx(tmp_path)
    method.fit(stripes(2, 0), ctx, labels=np.array([0, 0]))
    clean = stripes(8, 1)
    planted, masks = plant_blobs(clean, 2)
    s = method.score(torch.cat([planted, clean]), ctx, labels=np.zeros(16, dtype=np.int64))
    pixel_auroc = roc_auc_score(masks.numpy().ravel(), s.maps[:8].ravel())
    assert pixel_auroc >= 0.9, pixel_auroc
    assert (s.values[:8] > s.values[8:]).all(), (s.values[:8], s.values[8:])


def test_ema_decay_zero_trains_without_a_shadow_copy_and_equals_the_ema_path(tmp_path):
    """At ``ema_decay=0`` diffusers' EMA (with warm-up: decay = min(warm-up decay, 0)) copies the weights at every
    step, so fine-tuning keeps no shadow copy (3.4 GB for SD-1.5's UNet); the result equals a run that keeps one
    (decay 1e-12) and differs from a real EMA (decay 0.5)."""
    from diffusers.training_utils import EMAModel

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMAModel([p], decay=0.0, use_ema_warmup=True, power=0.75)
    for v in (1.0, -2.0, 5.0):
        p.data.fill_(v)
        ema.step([p])
        torch.testing.assert_close(ema.shadow_params[0], p.data, rtol=0, atol=0)

    def tuned(decay: float) -> dict[str, torch.Tensor]:
        """Fine-tuned weights; the resume state (saved every step) holds an EMA exactly when decay > 0."""
        stack = build_scratch_stack(PATCH_STACK, ["perfect", "tile"], seed=0)
        shots, grid = dark_texture(2, 0), grid_masks(SIZE // stack.vae_scale_factor, 2, "checkerboard")
        cfg = FinetuneConfig(
            batch_size=2, unet_steps=3, lr=1e-2, warmup_steps=1, ema_decay=decay, precision="fp32", vae_mode="none"
        )
        finetune(
            stack,
            shots,
            [["perfect tile"]] * 2,
            grid,
            cfg,
            None,
            torch.device("cpu"),
            tmp_path / str(decay),
            resume_dir=tmp_path / f"resume{decay}",
            checkpoint_every=1,
            progress=False,
        )
        state = torch.load(tmp_path / f"resume{decay}" / "unet_state.pt", weights_only=True)
        assert ("ema" in state) == (decay > 0), decay
        return {k: v.clone() for k, v in stack.unet.state_dict().items()}

    plain, shadow, real = tuned(0.0), tuned(1e-12), tuned(0.5)
    for k in plain:
        torch.testing.assert_close(plain[k], shadow[k], rtol=0, atol=1e-6)
    assert any(not torch.allclose(plain[k], real[k]) for k in plain)
