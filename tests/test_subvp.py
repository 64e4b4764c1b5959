"""LMD's official sampler (``method.sampler=subvp_em``) and subVP training (``model.train.sde=subvp``).

References are transcriptions, written here in float64 NumPy, of score_sde_pytorch's formulas (``sde_lib.subVPSDE``:
``sde``, ``marginal_prob``; ``sampling.EulerMaruyamaPredictor``; ``models/utils.get_score_fn``: label ``999 t``,
score ``-net / std``; ``losses.get_sde_loss_fn``: ``t ~ U(1e-5, 1)``, loss ``(score * std + z)^2``).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import tiny_unet_kwargs
from diffusers import DDPMScheduler, UNet2DModel

from ood_bench.cache import ArtifactCache
from ood_bench.methods.lmd import LMD
from ood_bench.models.diffusion import DiffusionModel, cache_spec, get_diffusion_model, train_unet
from ood_bench.models.subvp import SubVPSDE
from ood_bench.samplers import inpaint, lmd_mask
from ood_bench.samplers.sde import model_sde

B0, B1 = 0.1, 20.0


# float64 transcription of score_sde's sde_lib.subVPSDE (beta_0 = 0.1, beta_1 = 20)
def ref_marginal(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    log_mean_coeff = -0.25 * t**2 * (B1 - B0) - 0.5 * t * B0
    return np.exp(log_mean_coeff), 1 - np.exp(2.0 * log_mean_coeff)


def ref_sde(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    beta_t = B0 + t * (B1 - B0)
    drift = -0.5 * beta_t[:, None, None, None] * x
    discount = 1.0 - np.exp(-2 * B0 * t - (B1 - B0) * t**2)
    return drift, np.sqrt(beta_t * discount)


def ref_em(x: np.ndarray, t: np.ndarray, score: np.ndarray, z: np.ndarray, n: int) -> np.ndarray:
    """EulerMaruyamaPredictor.update_fn on the reverse SDE (drift f - g^2 score, dt = -1/N)."""
    dt = -1.0 / n
    drift, g = ref_sde(x, t)
    drift = drift - g[:, None, None, None] ** 2 * score
    x_mean = x + drift * dt
    return x_mean + g[:, None, None, None] * np.sqrt(-dt) * z


def subvp_model(seed: int = 0) -> DiffusionModel:
    """A random tiny UNet declared as a continuous subVP model (what training with sde=subvp writes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**tiny_unet_kwargs(sample_size=8, channels=1)).eval()
    unet.register_to_config(_score_sde={"sde": "subvpsde", "continuous": True, "beta_min": B0, "beta_max": B1})
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return DiffusionModel(unet, dict(sched.config), "test:subvp")


def gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def test_marginal_diffusion_and_em_step_equal_the_score_sde_formulas():
    sde = SubVPSDE(B0, B1)
    t = np.array([1e-5, 1e-3, 0.01, 0.3, 0.77, 1.0])
    tt = torch.from_numpy(t)
    mean, std = sde.marginal(tt)
    ref_mean, ref_std = ref_marginal(t)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), ref_std, rtol=1e-12)
    np.testing.assert_allclose(sde.diffusion(tt).numpy(), ref_sde(np.zeros((6, 1, 1, 1)), t)[1], rtol=1e-12)
    rng = np.random.default_rng(0)
    x, score, z = (rng.standard_normal((6, 2, 3, 3)) for _ in range(3))
    for n in (10, 1000):
        got = sde.em_step(*(torch.from_numpy(a) for a in (x, t)), torch.from_numpy(score), torch.from_numpy(z), n)
        np.testing.assert_allclose(got.numpy(), ref_em(x, t, score, z, n), rtol=1e-12, atol=1e-14)


def test_marginal_std_solves_the_forward_sde_variance_equation():
    """For x0 = 0 the forward SDE's variance v obeys dv/dt = -beta v + g^2: the marginal and g must agree."""
    sde = SubVPSDE(B0, B1)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    v = lambda s: sde.marginal(s)[1] ** 2  # noqa: E731
    dv = (v(t + h) - v(t - h)) / (2 * h)
    np.testing.assert_allclose(dv.numpy(), (-sde.beta(t) * v(t) + sde.diffusion(t) ** 2).numpy(), rtol=1e-6)


def test_subvp_em_inpainting_equals_a_step_by_step_reference():
    """The whole sampler: prior noise, per step known pixels re-noised by the marginal, label 999 t, score -out/std,
    one EM step; compared with a float64 reference loop on the same network and the same per-sample draws."""
    model = subvp_model()
    torch.manual_seed(1)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    mask = lmd_mask("checkerboard_alt", 8, 4, 0)
    steps = 7
    got = inpaint(model, x0, mask, gens([5, 6, 7]), sampler="subvp_em", steps=steps, clip=False)

    g = gens([5, 6, 7])
    draw = lambda: torch.stack([torch.randn(1, 8, 8, generator=gi) for gi in g]).double().numpy()  # noqa: E731
    m = mask.double().numpy()[None, None]
    x0n = x0.double().numpy()
    x = m * x0n + (1 - m) * draw()
    for t in np.linspace(1.0, 1e-3, steps).astype(np.float32).astype(np.float64):  # torch.linspace in float32
        tv = np.full(3, t)
        mean, std = ref_marginal(tv)
        x = m * (mean[:, None, None, None] * x0n + std[:, None, None, None] * draw()) + (1 - m) * x
        with torch.no_grad():
            out = model.unet(torch.from_numpy(x).float(), torch.full((3,), 999.0 * t)).sample.double().numpy()
        x = ref_em(x, tv, -out / std[:, None, None, None], draw(), steps)
    expected = m * x0n + (1 - m) * x
    np.testing.assert_allclose(got.double().numpy(), expected, atol=2e-4)
    assert np.abs(expected - x0n).max() > 0.1  # the unknown pixels were filled with something else


def test_known_pixels_are_the_original_noised_to_each_t_and_labels_are_999_t():
    model = subvp_model()
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = lmd_mask("checkerboard", 8, 2, 0)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = model.unet.register_forward_pre_hook(lambda _m, args: seen.append((args[0].clone(), args[1].clone())))
    try:
        inpaint(model, x0, mask, gens([1, 2]), sampler="subvp_em", steps=5, clip=False)
    finally:
        hook.remove()
    replay = gens([1, 2])
    draw = lambda: torch.stack([torch.randn(1, 8, 8, generator=gi) for gi in replay])  # noqa: E731
    draw()  # the prior
    ts = torch.linspace(1.0, 1e-3, 5)
    known = mask.bool()
    assert len(seen) == 5
    for (x_in, label), t in zip(seen, ts, strict=True):
        mean, std = SubVPSDE().marginal(t)
        expected = mean * x0 + std * draw()
        torch.testing.assert_close(x_in[..., known], expected[..., known], rtol=0, atol=1e-6)
        torch.testing.assert_close(label, torch.full((2,), 999.0 * float(t)))
        draw()  # the EM noise


def test_subvp_em_scores_are_batch_size_invariant_and_seeded():
    model = subvp_model()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    mask = lmd_mask("checkerboard_alt", 8, 4, 1)
    full = inpaint(model, x0, mask, gens(range(4)), sampler="subvp_em", steps=6, clip=False)
    parts = [inpaint(model, x0[i : i + 1], mask, gens([i]), sampler="subvp_em", steps=6, clip=False) for i in range(4)]
    # float32 convolutions round differently per batch size; the score's 1/std(t) amplifies that to ~3e-5 here
    torch.testing.assert_close(full, torch.cat(parts), rtol=0, atol=2e-4)
    other = inpaint(model, x0, mask, gens(range(10, 14)), sampler="subvp_em", steps=6, clip=False)
    assert (other - full).abs().max() > 1e-2
    torch.testing.assert_close(full[..., mask.bool()], x0[..., mask.bool()], rtol=0, atol=0)


def test_subvp_em_refuses_a_discrete_model_and_clip(tiny_diffusion):
    x0, mask = torch.zeros(1, 1, 8, 8), lmd_mask("checkerboard", 8, 2, 0)
    with pytest.raises(ValueError, match="model.train.sde=subvp"):
        inpaint(tiny_diffusion, x0, mask, gens([0]), sampler="subvp_em", steps=3, clip=False)
    with pytest.raises(ValueError, match="clip"):
        inpaint(subvp_model(), x0, mask, gens([0]), sampler="subvp_em", steps=3, clip=True)
    with pytest.raises(ValueError, match="clip=false"):
        LMD(sampler="subvp_em", clip=True)
    model_cfg = {"pretrained": None, "scheduler": {"num_train_timesteps": 10}, "train": {"sde": "ddpm"}}
    with pytest.raises(ValueError, match="model.train.sde=subvp"):
        LMD(sampler="subvp_em").check(8, 1, model_cfg)
    LMD(sampler="subvp_em", steps=50).check(8, 1, {**model_cfg, "train": {"sde": "subvp"}})  # N > model steps: fine


def tiny_model_cfg(**train) -> dict:
    base = {
        "steps": 3,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        "weight_decay": 0.0,
        "ema_decay": 0.9,
        "hflip": False,
        "grad_clip": 1.0,
        "precision": "fp32",
        "seed": 0,
        "sde": "subvp",
    }
    return {
        "name": "tiny",
        "pretrained": None,
        "subfolder": None,
        "unet": {
            "block_out_channels": [8, 16],
            "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"],
            "norm_num_groups": 4,
            "attention_head_dim": 8,
            "dropout": 0.0,
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_schedule": "linear",
            "beta_start": 1e-4,
            "beta_end": 0.02,
            "prediction_type": "epsilon",
        },
        "train": {**base, **train},
        "sample_size": 8,
        "channels": 1,
    }


def test_subvp_training_uses_continuous_t_and_the_noise_target(tmp_path, monkeypatch):
    """Step 0 of subVP training, replayed from the training generator: the network sees the subVP marginal sample at
    label 999 t with continuous t in [1e-5, 1], and the logged loss is mean((net - z)^2) (score_sde's reduce_mean
    loss, likelihood_weighting=False)."""
    cfg = tiny_model_cfg(steps=2)
    images = torch.rand(6, 1, 8, 8)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    orig = UNet2DModel.forward

    def spy(self, sample, timestep, *args, **kwargs):
        out = orig(self, sample, timestep, *args, **kwargs)
        seen.append((sample.detach().clone(), torch.as_tensor(timestep).detach().clone(), out.sample.detach().clone()))
        return out

    monkeypatch.setattr(UNet2DModel, "forward", spy)  # records the real network's calls; computes the same
    train_unet(images, cfg, torch.device("cpu"), tmp_path, progress=False)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 6, (4,), generator=gen)
    noise = torch.randn((4, 1, 8, 8), generator=gen)
    t = (torch.rand(4, generator=gen) * (1 - 1e-5) + 1e-5).double()
    mean, std = ref_marginal(t.numpy())
    x0 = (images[idx] * 2 - 1).double().numpy()
    x_in, label, out = seen[0]
    np.testing.assert_allclose(
        x_in.numpy(), mean[:, None, None, None] * x0 + std[:, None, None, None] * noise.numpy(), atol=1e-6
    )
    assert label.dtype.is_floating_point and (label != label.round()).all()
    np.testing.assert_allclose(label.numpy(), 999 * t.numpy(), rtol=1e-6)
    with open(tmp_path / "loss.csv") as f:
        first = float(list(csv.DictReader(f))[0]["loss"])
    # score_sde: score = -out/std; loss = mean((score * std + z)^2)
    score = -out.double().numpy() / std[:, None, None, None]
    ref_loss = np.mean((score * std[:, None, None, None] + noise.double().numpy()) ** 2)
    assert first == pytest.approx(ref_loss, rel=1e-5)
    loaded = UNet2DModel.from_pretrained(tmp_path / "unet")
    assert loaded.config["_score_sde"]["sde"] == "subvpsde"
    assert model_sde(DiffusionModel(loaded, {}, "x")) == SubVPSDE(0.1, 20.0)


def test_cache_key_includes_the_sde_and_ddpm_keeps_old_keys():
    images = torch.zeros(2, 1, 8, 8)
    subvp = cache_spec(tiny_model_cfg(sde="subvp"), images)
    ddpm = cache_spec(tiny_model_cfg(sde="ddpm"), images)
    old = tiny_model_cfg()
    del old["train"]["sde"]
    assert subvp != ddpm and subvp["train"]["sde"] == "subvp"
    assert ddpm == cache_spec(old, images)


def test_subvp_training_rejects_bad_settings(tmp_path):
    from ood_bench.models.diffusion import validate_model_cfg

    with pytest.raises(ValueError, match="valid: \\['ddpm', 'subvp'\\]"):
        validate_model_cfg(tiny_model_cfg(sde="vp"))
    cfg = tiny_model_cfg()
    cfg["scheduler"]["prediction_type"] = "v_prediction"
    with pytest.raises(ValueError, match="prediction_type=epsilon"):
        validate_model_cfg(cfg)


@pytest.mark.slow
def test_a_trained_subvp_model_inpaints_a_toy_distribution_better_than_noise(tmp_path):
    """Toy data: constant images of intensity c ~ U(0.1, 0.9); half the pixels are known, so a model of the data
    fills the others with c. Trained for 400 steps (sde=subvp) and sampled with subvp_em (100 steps), its error on the
    unknown pixels must be well below filling them with the data mean (0.21), which no sampler that ignores the known
    pixels beats (an unconditional sample of the data scores twice that; prior noise, 1 + E[x0^2]). Measured
    2026-12-03: 0.136 (the untrained network diverges: 5e4)."""
    g = torch.Generator().manual_seed(0)
    c = torch.rand(512, generator=g) * 0.8 + 0.1
    train = c.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
    cfg = tiny_model_cfg(steps=400, batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=0.99)
    model = get_diffusion_model(cfg, train, ArtifactCache(tmp_path), torch.device("cpu"), progress=False)
    test_c = torch.linspace(0.15, 0.85, 8)
    x0 = (test_c.view(-1, 1, 1, 1).expand(-1, 1, 8, 8) * 2 - 1).contiguous()
    mask = lmd_mask("checkerboard", 8, 4, 0)
    unknown = ~mask.bool()
    out = inpaint(model, x0, mask, gens(range(8)), sampler="subvp_em", steps=100, clip=False)
    trained = float(((out - x0)[..., unknown] ** 2).mean())
    mean_fill = float(((x0 - x0.mean()) ** 2).mean())
    noise = torch.randn(x0.shape, generator=g)
    noise_fill = float(((noise - x0)[..., unknown] ** 2).mean())
    assert trained < 0.75 * mean_fill < noise_fill, (trained, mean_fill, noise_fill)
