"""DiffGuard: DDIM inversion and synthesis loops, guidance, adaptive early stop, CAM masks, oracle and combined
modes, and the method's bookkeeping. Real tiny UNets (seeded, or trained on sklearn digits) and real classifiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_OVERRIDES, small_cnn_cfg, tiny_unet_kwargs
from conftest import sklearn_digits as digits
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, UNet2DModel
from test_cache_results import tiny_model_cfg as base_model_cfg

from ood_bench.cache import ArtifactCache
from ood_bench.methods import Context, build_method
from ood_bench.methods.diffguard import DiffGuard
from ood_bench.models.classifier import get_classifier
from ood_bench.models.diffusion import DiffusionModel, get_diffusion_model
from ood_bench.samplers.guidance import ClassifierGuidance, cam_masks, cfg_eps, cutouts, unconditional_eps
from ood_bench.samplers.inversion import DDIMGrid, EarlyStop, invert, official_psnr, synthesize
from ood_bench.utils import sample_generators

SCHED = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def tiny_model_cfg(steps: int, conditioning: dict | None = None) -> dict:
    """test_cache_results' tiny model, a little wider, on the 1000-step schedule, trained for ``steps`` steps."""
    cfg = base_model_cfg(steps=steps, batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=0.99)
    cfg["unet"]["block_out_channels"] = [16, 32]
    cfg["scheduler"]["num_train_timesteps"] = 1000
    if conditioning:
        cfg["conditioning"] = conditioning
    return cfg


@pytest.fixture(scope="module")
def digit_classifier(tmp_path_factory):
    """A small CNN trained on 8-px digits 0 and 1 (about a second)."""
    x, y = digits((0, 1))
    cache = ArtifactCache(tmp_path_factory.mktemp("clf"))
    return get_classifier(small_cnn_cfg(), x, y, cache, torch.device("cpu"), progress=False)


def _eps(model: DiffusionModel):
    return lambda x, t, rows: unconditional_eps(model, x, t)


# ---------------------------------------------------------------------------------------------------------------
# The DDIM loops
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_ldm_convention_is_diffusers_ddim_inverse_and_ddim(tiny_diffusion) -> None:
    """The written-out ``ldm`` loops equal diffusers' DDIMInverseScheduler and DDIMScheduler (steps_offset=1,
    set_alpha_to_one=False, clip_sample=False set explicitly: its default is True)."""
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grid = DDIMGrid.make(SCHED.alphas_cumprod, 20, "ldm")
    latents, depth = invert(grid, x, 20, _eps(tiny_diffusion))
    assert depth.tolist() == [20, 20, 20]
    common = dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
    inv = DDIMInverseScheduler.from_config(SCHED.config, **common)
    inv.set_timesteps(20)
    z = x.clone()
    for t in inv.timesteps:
        z = inv.step(tiny_diffusion.unet(z, t).sample, t, z).prev_sample
    torch.testing.assert_close(latents, z, atol=1e-4, rtol=1e-4)
    fwd = DDIMScheduler.from_config(SCHED.config, **common)
    fwd.set_timesteps(20)
    r = latents.clone()
    for t in fwd.timesteps:
        r = fwd.step(tiny_diffusion.unet(r, t).sample, t, r, eta=0.0).prev_sample
    ours = synthesize(grid, latents, grid.start_level(depth), _eps(tiny_diffusion))
    torch.testing.assert_close(ours, r, atol=1e-3, rtol=1e-3)


def test_adm_grid_matches_guided_diffusion_respacing() -> None:
    grid = DDIMGrid.make(SCHED.alphas_cumprod, 100, "adm")
    assert grid.inv_t[:3] == (0, 10, 20) and grid.inv_t[-1] == 990
    ac = SCHED.alphas_cumprod.double()
    assert grid.levels[5] == pytest.approx(float(ac[50])) and grid.levels[-1] == 0.0
    assert grid.syn_to[0] == 1.0 and grid.syn_to[7] == grid.levels[6]
    # forback_skip_diff 3: a sample whose inversion stopped after index rev_t (depth rev_t+1) starts at rev_t+2
    assert grid.start_level(torch.tensor([41]), offset=1).item() == 42
    assert grid.synthesis_steps(torch.tensor([42])).item() == 43
    with pytest.raises(ValueError, match="steps=30 is not valid: it must divide"):
        DDIMGrid.make(SCHED.alphas_cumprod, 30, "adm")


@torch.no_grad()
@pytest.mark.parametrize("convention", ["ldm", "adm"])
def test_inversion_round_trip_returns_the_input(tiny_diffusion, convention: str) -> None:
    """Invert 20 of 100 steps, then regenerate without guidance: the input comes back within 0.1 (max abs, on
    [-1, 1] images; measured 0.038 with this seeded UNet), while the latent itself is far from it."""
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grid = DDIMGrid.make(SCHED.alphas_cumprod, 100, convention)
    latents, depth = invert(grid, x, 20, _eps(tiny_diffusion))
    back = synthesize(grid, latents, grid.start_level(depth), _eps(tiny_diffusion))
    assert (back - x).abs().max() < 0.1
    assert (latents - x).abs().mean() > 0.1


@torch.no_grad()
def test_early_stop_fires_per_sample_at_the_threshold(tiny_diffusion) -> None:
    """Each sample stops at the first level where its PSNR drops below the threshold, whatever else is in the
    batch: the same depths as inverting each alone, and the stop level is where the threshold was crossed."""
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.zeros(1, 1, 8, 8), torch.rand(2, 1, 8, 8, generator=gen) * 2 - 1, torch.ones(1, 1, 8, 8)])
    grid = DDIMGrid.make(SCHED.alphas_cumprod, 50, "adm")
    # every level's PSNR without stopping, per sample: a stop rule that records and never fires
    psnr = []

    def record(xk: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        psnr.append(official_psnr(xk, x0))
        return torch.zeros(len(xk), dtype=torch.bool)

    invert(grid, x, 45, _eps(tiny_diffusion), stop_fn=record)
    psnr = torch.stack(psnr, 1)  # [4, 45]
    threshold = float(psnr[:, 10].median())
    expected = [int(torch.nonzero(row < threshold)[0]) + 1 if (row < threshold).any() else 45 for row in psnr]
    assert len(set(expected)) > 1, expected  # the samples really stop at different depths
    stop = EarlyStop(psnr=threshold)
    latents, depth = invert(grid, x, 45, _eps(tiny_diffusion), stop_fn=stop)
    assert depth.tolist() == expected
    for i in range(4):
        alone, d = invert(grid, x[i : i + 1], 45, _eps(tiny_diffusion), stop_fn=stop)
        assert d.item() == expected[i]
        torch.testing.assert_close(alone, latents[i : i + 1], atol=1e-5, rtol=1e-5)
        assert official_psnr(alone, x[i : i + 1]).item() < threshold or expected[i] == 45


def test_official_psnr_has_the_42_11_db_offset() -> None:
    x = torch.zeros(1, 3, 4, 4)
    y = torch.full((1, 3, 4, 4), 0.2)  # [0,1] images differ by 0.1: true PSNR 20 dB
    true_psnr = 10 * np.log10(1 / 0.1**2)
    assert official_psnr(x, y).item() == pytest.approx(true_psnr + 20 * np.log10(127.5), abs=1e-4)
    assert 20 * np.log10(127.5) == pytest.approx(42.11, abs=0.01)


# ---------------------------------------------------------------------------------------------------------------
# Guidance and masks
# ---------------------------------------------------------------------------------------------------------------


def test_cutouts_follow_the_per_sample_generators() -> None:
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    a = cutouts(x, 3, 0.75, 16, sample_generators(0, [5, 6], 1))
    b = cutouts(x[1:], 3, 0.75, 16, sample_generators(0, [6], 1))
    assert a.shape == (6, 1, 16, 16)
    torch.testing.assert_close(a[[1, 3, 5]], b)  # image 1's crops do not depend on image 0 being in the batch
    shared = cutouts(x, 3, 0.75, 16, sample_generators(0, [0, 0], 1))
    assert not torch.equal(shared[0], shared[1])  # same crop window, different images
    assert not torch.equal(a[0], a[2])  # three different crops of one image


@torch.no_grad()
def test_classifier_guidance_moves_synthesis_toward_the_requested_class(tiny_diffusion, digit_classifier) -> None:
    """Fast variant on a seeded (untrained) UNet: the classifier gradient alone pulls each sample of a mixed batch
    toward its own requested class (the slow test below does it on a trained model)."""
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 8)
    grid = DDIMGrid.make(SCHED.alphas_cumprod, 10, "adm")
    start = torch.full((16,), grid.last_syn_level)

    def prob_of(requested: torch.Tensor, scale: float) -> torch.Tensor:
        guide = ClassifierGuidance(digit_classifier, requested, scale, sample_generators(0, range(16), 1), n_cutouts=4)
        out = synthesize(grid, noise, start, _eps(tiny_diffusion), clip=True, guide_fn=guide)
        probs = torch.softmax(digit_classifier.logits(((out + 1) / 2).clamp(0, 1)), 1)
        return probs[torch.arange(16), requested]

    unguided = prob_of(labels, 0.0)
    guided, swapped = prob_of(labels, 30.0), prob_of(1 - labels, 30.0)
    assert guided.mean() > unguided.mean() + 0.2
    assert swapped.mean() > (1 - unguided).mean() + 0.2  # the other label pulls the other way


def test_paper_clean_gradient_differentiates_through_eps(tiny_diffusion, digit_classifier) -> None:
    """clean_grad=paper is the derivative of log p(y | mix(x_t)) with respect to x_t, eps_theta included (a central
    finite difference along random directions agrees); the official gradient (the mix as a leaf) does not."""
    t, labels = 600, torch.tensor([0, 1, 0, 1])
    abar = float(SCHED.alphas_cumprod[t])
    fac = abar and (1 - abar) ** 0.5
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    rows, eps = torch.arange(4), _eps(tiny_diffusion)

    def objective(z: torch.Tensor) -> torch.Tensor:  # float64 sum over the batch of log p(y | mix(z))
        x0 = (z - fac * eps(z, t, rows)) / abar**0.5
        logits = digit_classifier((((x0 * fac + z * (1 - fac)) + 1) / 2).float())
        return torch.log_softmax(logits.double(), 1)[rows, labels].sum()

    x0_raw = (x - fac * eps(x, t, rows)) / abar**0.5
    grads = {}
    for mode in (True, "paper"):
        guide = ClassifierGuidance(digit_classifier, labels, 1.0, [], n_cutouts=0, clean_grad=mode, eps_fn=eps)
        grads[mode] = guide(x, x0_raw, abar, t, rows)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    h = 1e-3
    with torch.no_grad():
        fd = float(objective(x + h * v) - objective(x - h * v)) / (2 * h)
    assert float((grads["paper"] * v).sum()) == pytest.approx(fd, rel=0.05)
    assert abs(float((grads[True] * v).sum()) - fd) > 0.2 * abs(fd)  # the official gradient holds eps constant
    with pytest.raises(ValueError, match="eps_fn"):
        ClassifierGuidance(digit_classifier, labels, 1.0, [], clean_grad="paper")


@pytest.mark.slow
def test_guidance_on_a_trained_digit_model(tmp_path, digit_classifier) -> None:
    """A class-conditional UNet trained on 8-px digits 0/1 (300 steps, ~40 s): CFG and classifier guidance (with
    its null class as the unconditional model) both turn the same noise into the requested digit."""
    x, y = digits((0, 1))
    cfg = tiny_model_cfg(300, {"num_classes": 2, "label_dropout": 0.2})
    model = get_diffusion_model(cfg, x, ArtifactCache(tmp_path), torch.device("cpu"), False, torch.as_tensor(y))
    noise = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 16)
    mean0, mean1 = x[y == 0].mean(0) * 2 - 1, x[y == 1].mean(0) * 2 - 1

    def nearest_mean_is_label(img: torch.Tensor) -> float:
        is_one = ((img - mean1) ** 2).flatten(1).sum(1) < ((img - mean0) ** 2).flatten(1).sum(1)
        return float((is_one.long() == labels).float().mean())

    ldm = DDIMGrid.make(SCHED.alphas_cumprod, 10, "ldm")
    top = torch.full((32,), ldm.last_syn_level)
    with torch.no_grad():
        for w, low, high in ((0.0, 0.0, 0.7), (3.0, 0.95, 1.0)):
            out = synthesize(ldm, noise, top, lambda z, t, rows, w=w: cfg_eps(model, z, t, labels[rows], w))
            assert low <= nearest_mean_is_label(out) <= high, w
        adm = DDIMGrid.make(SCHED.alphas_cumprod, 10, "adm")
        guide = ClassifierGuidance(digit_classifier, labels, 3.0, sample_generators(0, range(32), 1), n_cutouts=4)
        out = synthesize(adm, noise, torch.full((32,), adm.last_syn_level), _eps(model), clip=True, guide_fn=guide)
    assert nearest_mean_is_label(out) >= 0.8


def test_cam_mask_shape_range_and_cut(digit_classifier) -> None:
    x, _ = digits((0, 1))
    imgs = x[:6]
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    low = cam_masks(digit_classifier, imgs, labels, cut=0.1)
    high = cam_masks(digit_classifier, imgs, labels, cut=0.8)
    assert low.shape == (6, 1, 8, 8) and low.dtype == torch.float32
    assert set(torch.unique(low).tolist()) <= {0.0, 1.0}
    assert bool((high <= low).all()) and high.sum() < low.sum()  # a higher cut keeps a subset
    assert bool((high.flatten(1).sum(1) >= 1).all())  # min-max scaling: every map reaches 1 somewhere
    inverse = cam_masks(digit_classifier, imgs, labels, cut=-0.8)
    torch.testing.assert_close(inverse, (1 - high) * (inverse + high > 0).float())


def test_masked_cfg_follows_the_label_only_inside_the_mask() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(**tiny_unet_kwargs(8, 1), num_class_embeds=3).eval()
    model = DiffusionModel(unet, dict(SCHED.config), "test")
    assert model.num_classes == 2
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        guided = cfg_eps(model, x, 500, labels, 4.0)
        masked = cfg_eps(model, x, 500, labels, 4.0, mask)
        null = unconditional_eps(model, x, 500)
    torch.testing.assert_close(masked[..., :4], guided[..., :4])
    torch.testing.assert_close(masked[..., 4:], null[..., 4:])
    assert not torch.allclose(guided, null)


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------


def _ctx(tmp_path, model_cfg: dict, seed: int = 0) -> Context:
    return Context(
        device=torch.device("cpu"),
        cache=ArtifactCache(tmp_path / "cache"),
        seed=seed,
        model_cfg=model_cfg,
        classifier_cfg=small_cnn_cfg(),
        progress=False,
    )


def _fitted(tmp_path, **kwargs) -> tuple[DiffGuard, Context, torch.Tensor, np.ndarray]:
    x, y = digits((0, 1, 2))
    kwargs = {"steps": 10, "inversion_steps": 5, **kwargs}
    dg = build_method({"name": "diffguard", **kwargs})
    ctx = _ctx(tmp_path, tiny_model_cfg(20))
    dg.fit(x, ctx, labels=y)
    return dg, ctx, x, y


def test_cfg_method_trains_a_conditional_model_and_counts_its_work(tmp_path) -> None:
    dg, ctx, x, y = _fitted(tmp_path, batch_size=16)
    assert dg.model.num_classes == 3 and dg.model.unet.config.num_class_embeds == 4
    ood, _ = digits((7,))
    s = dg.score(ood[:10], ctx, indices=np.arange(10), labels=np.full(10, 7), split="ood")
    assert s.values.shape == (10,) and np.isfinite(s.values).all() and (s.values >= 0).all()
    # 5 inversion steps + 5 synthesis steps of 2 model calls (conditional + null)
    assert s.nfe_per_image == 15.0
    np.testing.assert_array_equal(s.extras["depth"], 5)
    np.testing.assert_array_equal(s.extras["label_used"], s.extras["pred"])
    assert set(np.unique(s.extras["pred"])) <= {0, 1, 2}
    s_id = dg.score(x[:10], ctx, indices=np.arange(10), labels=y[:10], split="id")
    rec = dg.describe()
    assert rec["classifier_acc"] == pytest.approx(dg.classifier.accuracy(dg.classifier.logits(x[:10]), y[:10]))
    assert rec["guidance"] == "cfg" and rec["nfe_per_image_id"] == 15.0 and rec["mean_depth_ood"] == 5.0
    assert rec["oracle"] is False and rec["distance_used"] == "logit_l1"
    assert s_id.values.shape == (10,)


def test_cg_method_stops_early_per_sample_and_is_batch_size_invariant(tmp_path) -> None:
    kwargs = dict(
        guidance="cg",
        ddim_convention="adm",
        clip_denoised=True,
        synthesis_offset=1,
        inversion_steps=9,
        early_stop_psnr=60.0,  # 18 dB true PSNR: this barely trained model's latents cross it after 3-4 steps
        cutouts=2,
        uncond_aux=True,
        distance="l1",
    )
    dg, ctx, x, _ = _fitted(tmp_path, batch_size=7, **kwargs)
    assert dg.model.num_classes is None  # classifier guidance uses the unconditional model
    imgs = torch.cat([x[:6], torch.zeros(2, 1, 8, 8)])  # blank images stay close to the input for longer
    a = dg.score(imgs, ctx, indices=np.arange(8))
    depth = a.extras["depth"]
    assert len(set(depth.tolist())) > 1 and depth.max() <= 9
    # synthesis: from one level above the depth, down to alpha-bar 1 (start + 1 steps); uncond_aux doubles it
    np.testing.assert_array_equal(a.extras["synthesis_steps"], np.minimum(depth + 1, 9) + 1)
    expected_nfe = np.mean(depth + 2 * a.extras["synthesis_steps"])
    assert a.nfe_per_image == pytest.approx(expected_nfe)
    b_dg, b_ctx, _, _ = _fitted(tmp_path / "b", batch_size=3, **kwargs)
    b = b_dg.score(imgs, b_ctx, indices=np.arange(8))
    np.testing.assert_allclose(a.values, b.values, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a.extras["depth"], b.extras["depth"])


def test_distance_size_resizes_before_the_distance_and_paper_grad_counts_its_unet_pass(tmp_path) -> None:
    kwargs = dict(guidance="cg", ddim_convention="adm", clip_denoised=True, cutouts=2, distance="l1")
    dg, ctx, x, _ = _fitted(tmp_path, **kwargs)
    base = dg.score(x[:6], ctx, indices=np.arange(6))
    dg.distance_size = 4  # l1 of 4-px versions of the same synthesis and input: other, smaller-detail values
    small = dg.score(x[:6], ctx, indices=np.arange(6))
    assert not np.allclose(small.values, base.values) and small.nfe_per_image == base.nfe_per_image
    paper, ctx_p, _, _ = _fitted(tmp_path / "p", clean_grad="paper", **kwargs)
    p = paper.score(x[:6], ctx_p, indices=np.arange(6))
    assert p.nfe_per_image == pytest.approx(base.nfe_per_image + np.mean(base.extras["synthesis_steps"]))
    assert not np.allclose(p.values, base.values)


def test_bf16_runs_inversion_and_synthesis_under_autocast_and_stays_batch_size_invariant(tmp_path) -> None:
    ood, _ = digits((7,))
    imgs, idx = ood[:8], np.arange(8)
    full_dg, full_ctx, _, _ = _fitted(tmp_path / "fp32", batch_size=8)
    full = full_dg.score(imgs, full_ctx, indices=idx)
    runs = []
    for bs in (8, 3):
        dg, ctx, _, _ = _fitted(tmp_path / "fp32", batch_size=bs, precision="bf16")  # the same cached networks
        runs.append(dg.score(imgs, ctx, indices=idx))
    assert dg.describe()["precision"] == "bf16"
    np.testing.assert_allclose(runs[1].values, runs[0].values, rtol=1e-5, atol=1e-6)  # batch size: no effect
    assert not np.array_equal(runs[0].values, full.values)  # bf16 really ran (and has its own cache entries)
    np.testing.assert_allclose(runs[0].values, full.values, rtol=0.2, atol=0.05)  # and stays close to fp32
    dg = build_method({"name": "diffguard", "steps": 10, "inversion_steps": 5, "precision": "fp16"})
    with pytest.raises(ValueError, match=r"method.precision=fp16 needs a CUDA device.*bf16 or fp32"):
        dg.fit(*digits((0, 1, 2))[:1], _ctx(tmp_path / "c", tiny_model_cfg(20)), labels=digits((0, 1, 2))[1])


def test_oracle_modes_use_true_labels_for_id_and_random_ones_for_ood(tmp_path) -> None:
    dg, ctx, x, y = _fitted(tmp_path, label_mode="oracle")
    s_id = dg.score(x[:12], ctx, indices=np.arange(12), labels=y[:12], split="id")
    np.testing.assert_array_equal(s_id.extras["label_used"], y[:12])
    ood, _ = digits((7,))
    idx = np.arange(100, 130)
    s_ood = dg.score(ood[:30], ctx, indices=idx, labels=np.full(30, 7), split="ood")
    used = s_ood.extras["label_used"]
    assert set(np.unique(used)) <= {0, 1, 2} and len(np.unique(used)) > 1
    again = dg.score(ood[:30], ctx, indices=idx, labels=np.full(30, 7), split="ood")
    np.testing.assert_array_equal(again.extras["label_used"], used)  # seeded per sample
    assert dg.describe()["oracle"] is True and dg.describe()["label_mode"] == "oracle"
    dg.label_mode = "oracle_id"
    s = dg.score(ood[:30], ctx, indices=idx, labels=np.full(30, 7), split="ood")
    np.testing.assert_array_equal(s.extras["label_used"], s.extras["pred"])
    with pytest.raises(ValueError, match="unknown to the classifier"):
        dg.score(ood[:3], ctx, labels=np.full(3, 7), split="id")
    with pytest.raises(ValueError, match="needs the split"):
        dg.score(ood[:3], ctx)


def test_combination_trusts_the_baseline_on_confident_inputs(tmp_path) -> None:
    dg, ctx, x, y = _fitted(tmp_path, combine="msp", combine_quantile=0.5)
    mixed = torch.cat([x[:10], digits((7,))[0][:10]])
    s = dg.score(mixed, ctx, indices=np.arange(20))
    deferred = s.extras["deferred"].astype(bool)
    assert 0 < deferred.sum() < 20
    assert np.isnan(s.extras["dg_distance"][~deferred]).all() and np.isfinite(s.extras["dg_distance"][deferred]).all()
    assert s.values[~deferred].max() < s.values[deferred].min()  # every trusted input ranks as more ID
    msp = s.extras["msp_score"]
    assert (msp[~deferred] <= dg.combine_threshold).all() and (msp[deferred] > dg.combine_threshold).all()
    # within the trusted group the order is MSP's
    order = np.argsort(s.values[~deferred])
    assert (np.diff(msp[~deferred][order]) >= 0).all()
    assert s.nfe_per_image == pytest.approx(deferred.mean() * 15.0)  # only deferred inputs are synthesised


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"guidance": "gan"}, r"method.guidance='gan'.*cfg.*cg"),
        ({"inversion_steps": 30, "steps": 20}, r"method.inversion_steps=30.*1..steps=20"),
        ({"distance": "psnr"}, r"method.distance='psnr'.*logit_l1.*dists"),
        ({"label_mode": "gt"}, r"method.label_mode='gt'.*predicted.*oracle"),
        ({"combine": "knn"}, r"method.combine='knn'.*none.*msp.*mls.*ebo"),
        ({"cam_cut": 0.3, "guidance": "cg"}, r"cam_cut applies to guidance=cfg"),
        ({"ddim_convention": "ddpm"}, r"method.ddim_convention='ddpm'.*adm.*ldm"),
        ({"precision": "fp8"}, r"method.precision='fp8'.*fp32.*bf16.*fp16"),
        ({"clean_grad": "yes"}, r"method.clean_grad='yes'.*true.*false.*paper"),
        ({"distance_size": 0}, r"distance_size"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build_method({"name": "diffguard", **kwargs})


def test_steps_must_divide_the_schedule_before_data_is_read() -> None:
    dg = build_method({"name": "diffguard", "steps": 30, "inversion_steps": 10})
    with pytest.raises(ValueError, match=r"method.steps=30.*num_train_timesteps=1000"):
        dg.check(16, 1, tiny_model_cfg(5))


# ---------------------------------------------------------------------------------------------------------------
# End to end through run.py
# ---------------------------------------------------------------------------------------------------------------

TINY_DIFFGUARD = [
    "method=diffguard",
    *TINY_MODEL_OVERRIDES,
    "classifier.width=8",
    "classifier.train.steps=10",
    "method.steps=10",
    "method.inversion_steps=3",
]


def test_run_py_diffguard_writes_the_record(tmp_path) -> None:
    import csv

    from test_run import run_cli

    paths = [f"paths.results_dir={tmp_path / 'results'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    _, out = run_cli([*TINY_DIFFGUARD, *paths, f"paths.log_dir={tmp_path / 'logs'}"])
    assert "training small CNN" in out and "training UNet" in out
    (run_dir,) = (tmp_path / "results" / "diffguard" / "digits").iterdir()
    with open(run_dir / "summary.csv", newline="") as f:
        rec = next(csv.DictReader(f))
    assert rec["method.guidance"] == "cfg" and rec["method.classifier"] == "small_cnn"
    assert 0.0 <= float(rec["method.classifier_acc"]) <= 1.0
    assert int(rec["method.inversion_steps"]) == 3 and float(rec["method.mean_depth_id"]) == 3.0
    assert float(rec["nfe_per_image"]) == 3 + 2 * 3 and float(rec["images_per_s"]) > 0
    assert rec["method.oracle"] == "False" and rec["method.distance_used"] == "logit_l1"
    with open(run_dir / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 32 and {"depth", "pred", "label_used", "dg_distance"} <= set(rows[0])
    assert all(r["score"] == r["dg_distance"] for r in rows)
