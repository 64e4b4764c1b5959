"""AnomalySD on a tiny SD-inpainting stack built from configs: end to end, the 9-channel input and its mask
polarity, masks, fusion, batch-size independence, caching, resuming, and loading a saved stack folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_script, standin_weights

from ood_bench.cache import ArtifactCache
from ood_bench.distances.feature_maps import nearest_prototype_distance
from ood_bench.methods import Context, build_method
from ood_bench.methods import anomalysd as asd_module
from ood_bench.methods.anomalysd import fuse, harmonic_fusion, image_scores
from ood_bench.models.sd_stack import (
    PatchAutoencoder,
    StackNotFoundError,
    build_scratch_stack,
    build_tokenizer,
    check_stack,
    load_stack,
)
from ood_bench.samplers.anomaly_masks import (
    check_grid,
    foreground_mask,
    grid_masks,
    masks_per_scale,
    random_train_mask,
    top_fraction_mask,
    upsample_mask,
)
from ood_bench.samplers.sd_inpaint import latent_mask, sd_inpaint, unet_input
from ood_bench.utils import sample_generators

SIZE = 32  # the smallest size AlexNet's relu3 still sees (LPIPS-alex minimum)
TINY_STACK = {
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
TINY_SETTINGS = dict(
    scratch=TINY_STACK,
    unet_steps=4,
    vae_steps=2,
    train_batch_size=4,
    vae_batch_size=2,
    warmup_steps=1,
    steps=4,
    strength=0.5,
    mask_scales=[2, 4],
    checkpoint_every=0,
)
PATCH_STACK = {**TINY_STACK, "vae": {"kind": "patch", "patch_size": 2}}
NAMES = {"object_names": ["magnetic tile", "commutator"], "categories": ["magnetic_tile", "kolektor_sdd"]}


def tiny_method(**overrides):
    """A tiny AnomalySD; its AlexNet is a random stand-in (nothing here checks what ImageNet features see)."""
    weights = standin_weights()
    return build_method({"name": "anomalysd", **TINY_SETTINGS, "weights_dir": str(weights), **overrides})


def tiny_ctx(tmp_path, seed: int = 0) -> Context:
    return Context(
        torch.device("cpu"), ArtifactCache(tmp_path / "cache"), seed=seed, data_meta=dict(NAMES), progress=False
    )


def images(n: int, seed: int, channels: int = 3) -> torch.Tensor:
    return torch.rand(n, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


class UNetCalls:
    """Counts forward calls of a module (and keeps the inputs of the last one)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count, self.inputs = 0, []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        self.count += 1
        self.inputs.append(args[0].detach().clone())

    def remove(self) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny AnomalySD fitted on two categories (one shot each) in a module-wide cache."""
    tmp = tmp_path_factory.mktemp("asd")
    method = tiny_method()
    ctx = tiny_ctx(tmp)
    method.fit(images(2, 0), ctx, labels=np.array([0, 1]))
    return method, ctx, tmp


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------


def test_fit_and_score_end_to_end(fitted):
    method, ctx, _ = fitted
    x = images(5, 1, channels=1)  # grey images are repeated to RGB
    labels = np.array([0, 1, 0, 1, 1])
    calls = UNetCalls(method.sd.unet)
    try:
        s = method.score(x, ctx, indices=np.arange(5), labels=labels, split="test")
    finally:
        calls.remove()
    assert s.maps.shape == (5, SIZE, SIZE) and np.isfinite(s.maps).all()
    assert s.values.shape == (5,) and np.isfinite(s.values).all()
    assert (s.maps >= 0).all()
    # 2 checkerboard masks at each of 2 scales + 1 prototype mask, each int(4 * 0.5) = 2 DDIM steps
    assert method.masks_per_image == 5 and s.nfe_per_image == 10
    n_batches = -(-5 // method.batch_size)
    assert calls.count == 5 * 2 * n_batches  # one UNet call per (mask, step), batched over images
    assert sum(len(i) for i in calls.inputs) / 5 == s.nfe_per_image  # per image, counted from what ran
    for key in ("ms_max", "pg_max", "knn_max"):
        assert s.extras[key].shape == (5,) and np.isfinite(s.extras[key]).all()
    record = method.describe()
    assert record["nfe_per_image"] == 10 and record["masks_per_image"] == 5
    assert record["stack_source"].startswith("scratch:") and "+finetuned:" in record["stack_source"]
    assert record["categories"] == "magnetic tile|commutator" and record["latent_factor"] == 2
    assert record["vae"] == "AutoencoderKL" and record["params_vae"] > 0


def test_unknown_category_at_score_time_is_refused(fitted):
    method, ctx, _ = fitted
    with pytest.raises(ValueError, match=r"category labels \[5\].*no shots"):
        method.score(images(1, 2), ctx, labels=np.array([5]))


# ---------------------------------------------------------------------------------------------------------------
# The 9-channel input and the mask polarity
# ---------------------------------------------------------------------------------------------------------------


def test_unet_input_layout_and_polarity():
    lat = torch.full((1, 4, 4, 4), 7.0)
    masked = torch.full((1, 4, 4, 4), -3.0)
    known = torch.ones(1, 1, 4, 4)
    known[..., :2, :] = 0  # top half hidden
    x = unet_input(lat, known, masked)
    assert x.shape == (1, 9, 4, 4)
    assert (x[:, :4] == 7).all() and (x[:, 5:] == -3).all()
    # diffusers' inpainting UNet: mask channel 1 = repaint
    assert (x[0, 4, :2] == 1).all() and (x[0, 4, 2:] == 0).all()


def test_inpainting_feeds_repaint_mask_and_grey_holes_to_the_stack(fitted):
    """What the UNet and VAE really receive: where the suite's mask hides pixels (0) the UNet's mask channel is 1 and
    the masked image is 0 (mid-grey); the known pixels pass unchanged. A flipped polarity fails both checks."""
    method, ctx, tmp = fitted
    sd, f = method.sd, method.sd.vae_scale_factor
    x = images(1, 3)
    seen_pixels = []
    h_vae = sd.vae.encoder.register_forward_pre_hook(lambda _m, args: seen_pixels.append(args[0].detach().clone()))
    calls = UNetCalls(sd.unet)
    try:
        method.score(x, Context(ctx.device, ArtifactCache(tmp / "fresh"), data_meta=ctx.data_meta, progress=False))
    finally:
        h_vae.remove()
        calls.remove()
    board = grid_masks(SIZE, 2, "checkerboard")[0]  # the first mask of the first scale (generator keys 2, 0)
    hidden_pix = board == 0
    # pixels: the first encode is the whole image, the second the image under the first grid mask
    masked_img = seen_pixels[1][0]
    assert torch.equal(masked_img[:, hidden_pix], torch.zeros_like(masked_img[:, hidden_pix]))
    assert torch.allclose(masked_img[:, ~hidden_pix], (x[0] * 2 - 1)[:, ~hidden_pix])
    mask_channel = calls.inputs[0][0, 4]
    hidden_lat = board[::f, ::f] == 0
    assert (mask_channel[hidden_lat] == 1).all() and (mask_channel[~hidden_lat] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["checkerboard", "quad", "cells"])
@pytest.mark.parametrize("cells", [2, 4, 8])
def test_grid_masks_partition_the_image(layout, cells):
    m = grid_masks(32, cells, layout)
    assert m.shape == (masks_per_scale(layout, cells), 32, 32)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    # every pixel is hidden by exactly one mask of the scale
    assert torch.equal((1 - m).sum(0), torch.ones(32, 32))
    # each hole is a union of whole cells
    block = 32 // cells
    cellwise = (1 - m)[:, ::block, ::block].repeat_interleave(block, 1).repeat_interleave(block, 2)
    assert torch.equal(cellwise, 1 - m)


def test_grid_mask_counts_and_checkerboard_pattern():
    assert masks_per_scale("checkerboard", 8) == 2 and masks_per_scale("quad", 8) == 4
    assert masks_per_scale("cells", 8) == 64
    m = grid_masks(4, 2, "checkerboard")
    assert m[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize(
    "size, scales, layout, multiple, match",
    [
        (32, [3], "checkerboard", 1, "mask_scales: 3 "),  # does not divide 32
        (32, [8], "checkerboard", 8, "mask_scales: 8 "),  # 4-px cells are not whole 8-px latent cells
        (32, [], "checkerboard", 1, "empty"),
        (27, [3], "quad", 1, "odd"),
        (32, [4], "stripes", 1, "mask_layout='stripes'"),
    ],
)
def test_check_grid_names_the_bad_value(size, scales, layout, multiple, match):
    with pytest.raises(ValueError, match=match):
        check_grid(size, scales, layout, multiple)
    check_grid(32, [4, 8], "quad", 4)  # 8- and 4-px cells of 4-px latent cells


def test_prototype_mask_hides_the_top_share_and_dilates():
    score = torch.arange(16.0).view(1, 4, 4)
    m = top_fraction_mask(score, 0.25)
    assert m.shape == (1, 4, 4) and int((m == 0).sum()) == 4
    assert (m[0, 3] == 0).all()  # the 4 highest cells are the last row
    d = top_fraction_mask(score, 1 / 16, dilate=1)
    assert d[0].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="pg_ratio=0"):
        top_fraction_mask(score, 0.0)


def test_foreground_and_training_masks():
    img = torch.zeros(3, 32, 32)
    img[:, 8:24, 8:24] = 1.0  # a bright object on a dark background
    fg = foreground_mask(img)
    assert fg[16, 16] and not fg[0, 0] and 0.2 < fg.float().mean() < 0.3
    assert foreground_mask(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))).float().mean() > 0.1
    gen = torch.Generator().manual_seed(0)
    fg_lat = fg[::2, ::2]
    grid = grid_masks(16, 4, "checkerboard")
    for _ in range(30):
        m = random_train_mask(gen, fg_lat, grid, grid_prob=0.0, full_prob=0.0, max_boxes=2, box_range=(0.1, 0.2))
        holes = m == 0
        assert holes.any() and (holes & ~fg_lat).float().sum() <= holes.float().sum()
        assert holes[fg_lat].any()  # boxes are centred on the object
    assert (random_train_mask(gen, fg_lat, grid, 0.0, 1.0, 1, (0.1, 0.2)) == 0).all()
    g = random_train_mask(gen, fg_lat, grid, 1.0, 0.0, 1, (0.1, 0.2))
    assert any(torch.equal(g, gm) for gm in grid)


# ---------------------------------------------------------------------------------------------------------------
# Fusion and image scores against hand computations
# ---------------------------------------------------------------------------------------------------------------


def test_harmonic_fusion_and_alpha_by_hand():
    scales = np.array([[[[1.0, 2.0]], [[3.0, 2.0]]]])  # [N=1, K=2, H=1, W=2]
    pg = np.array([[[4.0, 0.0]]])
    hm = harmonic_fusion(scales, eps=0.0)
    assert np.allclose(hm, [[[2 / (1 + 1 / 3), 2.0]]])  # 1.5 and 2
    assert np.allclose(
        fuse(scales, pg, alpha=0.25, fusion="harmonic"), [[[0.75 * 1.5 + 1.0, 0.75 * 2 + 0.0]]], atol=1e-5
    )
    assert np.allclose(fuse(scales, pg, alpha=0.0, fusion="mean"), [[[2.0, 2.0]]])
    assert np.allclose(fuse(scales, pg, alpha=1.0, fusion="harmonic"), pg)
    # a scale that sees nothing (0) pulls the harmonic mean to ~0: the paper's "all scales must agree"
    assert harmonic_fusion(np.array([[[[0.0]], [[5.0]]]]))[0, 0, 0] < 1e-5


def test_image_scores_by_hand():
    maps = np.arange(200.0).reshape(2, 10, 10)
    assert image_scores(maps, "max", 0.0).tolist() == [99.0, 199.0]
    assert image_scores(maps, "topk_mean", 0.03).tolist() == [98.0, 198.0]  # mean of the top 3 pixels
    assert image_scores(maps, "topk_mean", 1e-6).tolist() == [99.0, 199.0]  # at least one pixel


# ---------------------------------------------------------------------------------------------------------------
# Batch-size independence and caching
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_scores_do_not_depend_on_batch_size(fitted, tmp_path, precision, rtol):
    """Noise is drawn per sample, so only float rounding may differ between batchings (bf16 kernels round more;
    with the random stand-in AlexNet, 0.5 % on one image score)."""
    method, ctx, _ = fitted
    x, idx, labels = images(5, 4), np.arange(10, 15), np.array([0, 1, 1, 0, 0])
    method.precision = precision
    runs = []
    try:
        for bs in (5, 2):
            method.batch_size = bs
            fresh = Context(ctx.device, ArtifactCache(tmp_path / f"bs{bs}"), data_meta=ctx.data_meta, progress=False)
            runs.append(method.score(x, fresh, indices=idx, labels=labels))
        # the seed and the sample index drive the noise: another run seed changes the maps
        other = Context(ctx.device, ArtifactCache(tmp_path / "seed1"), seed=1, data_meta=ctx.data_meta, progress=False)
        reseeded = method.score(x, other, indices=idx, labels=labels)
    finally:
        method.batch_size, method.precision = 32, "bf16"
    assert np.allclose(runs[0].values, runs[1].values, rtol=rtol, atol=1e-7)
    assert np.allclose(runs[0].maps, runs[1].maps, rtol=10 * rtol, atol=1e-6)
    assert not np.allclose(reseeded.maps, runs[0].maps, rtol=10 * rtol, atol=1e-6)


def test_second_fit_trains_nothing_and_rescoring_runs_no_unet(fitted, monkeypatch):
    method, ctx, tmp = fitted
    trained = []
    real = asd_module.finetune
    monkeypatch.setattr(asd_module, "finetune", lambda *a, **k: trained.append(1) or real(*a, **k))
    x, labels = images(4, 5), np.array([0, 1, 0, 1])
    first = method.score(x, ctx, labels=labels)
    again = tiny_method(alpha=0.0, image_score="topk_mean", topk_fraction=0.05, fusion="mean", sigma=0.0)
    again.fit(images(2, 0), ctx, labels=np.array([0, 1]))
    assert trained == []  # the fine-tuned stack came from the cache
    assert again.finetuned_key == method.finetuned_key
    calls = UNetCalls(again.sd.unet)
    try:
        second = again.score(x, ctx, labels=labels)
    finally:
        calls.remove()
    assert calls.count == 0  # the per-scale and prototype maps came from the cache
    assert not np.allclose(first.values, second.values)
    # what the cache gave back recombines by hand: mean over scales, alpha 0, no smoothing, top-5 % mean
    again.alpha, again.fusion = 0.5, "harmonic"
    again.sigma, again.image_score = method.sigma, "max"
    assert np.allclose(again.score(x, ctx, labels=labels).values, first.values)
    # other shots do train
    other = tiny_method()
    other.fit(images(2, 9), ctx, labels=np.array([0, 1]))
    assert trained == [1]


def test_interrupted_finetuning_resumes_to_the_same_weights(tmp_path):
    """A fit killed mid-training continues from its checkpoint and ends with the weights of an unbroken fit."""
    settings = dict(unet_steps=6, vae_steps=4, checkpoint_every=2)
    shots = images(2, 0)
    whole = tiny_method(**settings)
    whole.fit(shots, tiny_ctx(tmp_path / "a"), labels=np.array([0, 1]))

    broken = tiny_method(**settings)
    ctx = tiny_ctx(tmp_path / "b")
    real = asd_module.finetune

    def crash_after_four_unet_steps(stack, *args, **kwargs):
        seen = []

        def hook(_m, _a):
            seen.append(1)
            if len(seen) == 5:
                raise KeyboardInterrupt("simulated interruption")

        stack.unet.register_forward_pre_hook(hook)
        return real(stack, *args, **kwargs)

    asd_module.finetune, saved = crash_after_four_unet_steps, asd_module.finetune
    try:
        with pytest.raises(KeyboardInterrupt):
            broken.fit(shots, ctx, labels=np.array([0, 1]))
    finally:
        asd_module.finetune = saved
    partial = list((tmp_path / "b" / "cache" / "anomalysd_finetuned").glob(".partial-*"))
    assert partial and (partial[0] / "unet_state.pt").is_file() and (partial[0] / "vae_done").is_dir()
    broken.fit(shots, ctx, labels=np.array([0, 1]))
    for a, b in zip(whole.sd.unet.state_dict().values(), broken.sd.unet.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.sd.vae.state_dict().values(), broken.sd.vae.state_dict().values()):
        assert torch.equal(a, b)
    assert not list((tmp_path / "b" / "cache" / "anomalysd_finetuned").glob(".partial-*"))


# ---------------------------------------------------------------------------------------------------------------
# Loading a stack folder (the anomalysd_sd path) and the offline error for a hub id
# ---------------------------------------------------------------------------------------------------------------


def test_tokenizer_knows_the_prompt_words_and_spells_the_rest():
    tok = build_tokenizer(["perfect", "magnetic", "tile"], max_length=16)
    toks = tok.convert_ids_to_tokens(tok("A perfect magnetic tile.").input_ids)
    assert toks == ["<|startoftext|>", "a</w>", "perfect</w>", "magnetic</w>", "tile</w>", ".</w>", "<|endoftext|>"]
    assert tok.convert_ids_to_tokens(tok("xyz").input_ids)[1:-1] == ["x", "y", "z</w>"]


def test_saved_stack_loads_from_a_local_folder(tmp_path):
    stack = build_scratch_stack(TINY_STACK, ["perfect", "commutator"], seed=0)
    stack.save(tmp_path / "sd")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "sd" / part).is_dir()
    loaded = load_stack(str(tmp_path / "sd"))
    assert loaded.source == f"pretrained:{tmp_path / 'sd'}"
    assert loaded.unet.config.in_channels == 9 and loaded.vae_scale_factor == 2
    for a, b in zip(stack.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    prompt = ["A perfect commutator."]
    assert stack.tokenizer(prompt).input_ids == loaded.tokenizer(prompt).input_ids
    assert torch.allclose(stack.eval().encode_prompts(prompt), loaded.eval().encode_prompts(prompt))
    # the method runs on the folder as on a pretrained SD checkpoint: decoder-only VAE fine-tuning
    method = tiny_method(stack=str(tmp_path / "sd"), vae_mode="decoder", scratch=None)
    ctx = tiny_ctx(tmp_path)
    method.fit(images(1, 0), ctx, labels=np.array([1]))
    s = method.score(images(2, 1), ctx, labels=np.array([1, 1]))
    assert s.maps.shape == (2, SIZE, SIZE) and np.isfinite(s.values).all()
    assert method.describe()["stack_source"].startswith(f"pretrained:{tmp_path / 'sd'}+finetuned:")
    # the encoder was not touched by decoder-only fine-tuning
    for (name, a), b in zip(stack.vae.state_dict().items(), method.sd.vae.state_dict().values()):
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(a, b), name


def test_patch_autoencoder_is_exact_and_loads_through_the_stack_layout(tmp_path):
    stack = build_scratch_stack(PATCH_STACK, ["perfect", "tile"], seed=0)
    assert isinstance(stack.vae, PatchAutoencoder) and not list(stack.vae.parameters())
    assert stack.latent_channels == 12 and stack.vae_scale_factor == 2
    assert stack.unet.config.in_channels == 25 and stack.unet.config.out_channels == 12
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    stack.vae.register_to_config(shift_factor=-0.2, scaling_factor=3.0)
    z = stack.encode(x)
    assert z.shape == (2, 12, SIZE // 2, SIZE // 2)
    assert torch.allclose(z[:, :, 0, 0].reshape(2, 3, 4)[:, :, 0], (x[:, :, 0, 0] + 0.2) * 3.0)
    assert torch.allclose(stack.decode(z), x, atol=1e-6)  # lossless, unlike any trained VAE
    assert torch.equal(stack.encode(x, generator=torch.Generator(), sample=True), z)  # a deterministic posterior
    stack.save(tmp_path / "sd")
    loaded = load_stack(str(tmp_path / "sd"))
    assert isinstance(loaded.vae, PatchAutoencoder)
    assert loaded.scaling_factor == 3.0 and loaded.vae.config.shift_factor == -0.2
    assert torch.allclose(loaded.encode(x), z)


def test_patch_stack_fits_normalised_latents_and_its_reference_is_the_input(tmp_path):
    ctx = tiny_ctx(tmp_path)
    shots = images(2, 0)
    by_ref = {}
    for ref in ("input", "reconstruction"):
        method = tiny_method(scratch=PATCH_STACK, vae_mode="none", reference=ref)
        method.fit(shots, ctx, labels=np.array([0, 1]))
        by_ref[ref] = method.score(images(3, 1), ctx, labels=np.array([0, 1, 1])).maps
    cfg = method.sd.vae.config  # the shots' latents are standardised (what LDM's scaling rule does for a VAE)
    assert cfg.shift_factor == pytest.approx(float((shots * 2 - 1).mean()), abs=1e-5)
    assert cfg.scaling_factor == pytest.approx(1 / float((shots * 2 - 1).std()), rel=1e-4)
    assert method.train_info["scaling_factor"] == pytest.approx(cfg.scaling_factor)
    record = method.describe()
    assert record["latent_factor"] == 2 and record["vae"] == "PatchAutoencoder" and record["params_vae"] == 0
    assert np.isfinite(by_ref["input"]).all()
    np.testing.assert_allclose(by_ref["input"], by_ref["reconstruction"], rtol=1e-4, atol=1e-6)


def test_missing_stack_fails_with_the_manual_step(tmp_path):
    with pytest.raises(StackNotFoundError, match=r"huggingface-cli download nobody/no-sd-inpainting --local-dir"):
        load_stack("nobody/no-sd-inpainting")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StackNotFoundError, match=r"unet/, vae/, text_encoder/, tokenizer/, scheduler/"):
        load_stack(str(tmp_path / "empty"))
    with pytest.raises(StackNotFoundError, match="is not a folder"):
        load_stack(str(tmp_path / "nope"))


def test_text_to_image_unet_is_refused():
    from diffusers import UNet2DConditionModel

    stack = build_scratch_stack(TINY_STACK, ["a"], seed=0)
    u = dict(stack.unet.config)
    u["in_channels"] = 4
    stack.unet = UNet2DConditionModel.from_config(u)
    with pytest.raises(ValueError, match="takes 4 .*9 .*text-to-image checkpoint"):
        check_stack(stack)


# ---------------------------------------------------------------------------------------------------------------
# Settings fail at construction
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"alpha": 1.5}, r"method\.alpha=1\.5"),
        ({"strength": 0.0}, r"strength=0\.0"),
        ({"fusion": "geometric"}, r"method\.fusion='geometric'.*harmonic.*mean"),
        ({"image_score": "median"}, r"method\.image_score='median'.*max.*topk_mean"),
        ({"mask_layout": "rings"}, r"method\.mask_layout='rings'.*checkerboard.*quad.*cells"),
        ({"diff_layers": [0, 2]}, r"method\.diff_layers=\[0, 2\].*1 to 5"),
        ({"diff_normalise": "l2"}, r"method\.diff_normalise='l2'.*unit.*none"),
        ({"vae_mode": "encoder"}, r"method\.vae_mode='encoder'.*none.*decoder.*full"),
        ({"precision": "fp16"}, r"method\.precision='fp16'.*fp32.*bf16"),
        ({"object_prompt": "A perfect part."}, r"\{c\}"),
        ({"scratch": None}, r"method\.stack .*or method\.scratch"),
        ({"scratch": {**TINY_STACK, "vae": {"kind": "vq"}}}, r"method\.scratch\.vae\.kind='vq'.*kl.*patch"),
        ({"scratch": {**PATCH_STACK, "vae": {"kind": "patch"}}}, r"method\.scratch\.vae\.patch_size=None"),
        ({"scratch": PATCH_STACK, "vae_mode": "full"}, r"vae_mode='full' with method\.scratch\.vae\.kind=patch"),
    ],
)
def test_bad_settings_fail_at_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_method({"name": "anomalysd", **TINY_SETTINGS, **overrides})


def test_check_names_scales_that_do_not_fit_the_latent_grid():
    build_method({"name": "anomalysd", **TINY_SETTINGS, "mask_scales": [16]}).check(32, 3, None)  # 2-px cells
    method = build_method({"name": "anomalysd", **TINY_SETTINGS, "mask_scales": [32]})
    with pytest.raises(ValueError, match="mask_scales: 32 .*multiple of 2 px"):
        method.check(32, 3, None)  # 1-px cells split the 2-px latent cells


# ---------------------------------------------------------------------------------------------------------------
# Through the runner (in process): rows, figure, record; re-scoring another alpha trains and inpaints nothing
# ---------------------------------------------------------------------------------------------------------------

TINY_RUN = [
    "method=anomalysd",
    "data=mvtec/bottle",
    "debug=anomaly",
    "data.shot_seeds=[0]",
    "method.scratch.vae.block_out_channels=[8,16]",
    "method.scratch.vae.norm_num_groups=4",
    "method.scratch.unet.block_out_channels=[16,32]",
    "method.scratch.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
    "method.scratch.unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]",
    "method.scratch.unet.norm_num_groups=4",
    "method.scratch.text.hidden_size=16",
    "method.scratch.text.intermediate_size=32",
    "method.scratch.text.num_layers=1",
    "method.scratch.text.num_heads=2",
    "method.unet_steps=4",
    "method.vae_steps=2",
    "method.train_batch_size=4",
    "method.vae_batch_size=2",
    "method.steps=4",
    "method.feature_size=64",
]


def test_run_through_the_runner_and_rescore_from_cache(hydra_conf, tmp_path, monkeypatch):
    from anomaly_layouts import write_mvtec

    from ood_bench.runner import run

    data = tmp_path / "data"
    write_mvtec(data / "mvtec_anomaly_detection", "bottle", n_train=3, n_good=4, defects={"broken": 4})
    calls = {"finetune": 0, "inpaint": 0}
    real_ft, real_inpaint = asd_module.finetune, asd_module.sd_inpaint

    def finetune_spy(*a, **k):
        calls["finetune"] += 1
        return real_ft(*a, **k)

    def inpaint_spy(*a, **k):
        calls["inpaint"] += 1
        return real_inpaint(*a, **k)

    monkeypatch.setattr(asd_module, "finetune", finetune_spy)
    monkeypatch.setattr(asd_module, "sd_inpaint", inpaint_spy)
    standin = f"paths.weights_dir={standin_weights()}"  # a random AlexNet: nothing here checks ImageNet features
    cfg = hydra_conf([*TINY_RUN, f"paths.data_dir={data}", standin], tmp_path)
    record = run(cfg)
    assert calls["finetune"] == 1 and calls["inpaint"] == 5  # one batch x (2 + 2 grid masks + 1 prototype mask)
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= float(record[key]) <= 1.0, key
    assert record["method.nfe_per_image"] == 5 * 3 and record["method.stack"] == "scratch"
    run_dir = next((tmp_path / "results" / "anomalysd" / "mvtec_bottle").iterdir())
    assert (run_dir / "figures" / "anomaly_bottle.png").is_file()
    again = run(hydra_conf([*TINY_RUN, f"paths.data_dir={data}", standin, "method.alpha=0.0"], tmp_path))
    assert calls == {"finetune": 1, "inpaint": 5}  # cached fine-tuned stack and cached maps
    assert again["config_hash"] != record["config_hash"] and again["method.alpha"] == 0.0


def test_terms_script_texture_is_the_windowed_grey_std():
    terms = load_script("anomalysd_terms")
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    got = terms.local_std(x, size=5)
    grey = x.mean(1).numpy()
    assert got.shape == (2, 12, 12)
    assert got[1, 6, 6] == pytest.approx(grey[1, 4:9, 4:9].std(), abs=1e-5)  # interior: the full 5x5 window
    assert got[0, 0, 0] == pytest.approx(grey[0, :3, :3].std(), abs=1e-5)  # corner: only the pixels inside
    assert np.allclose(terms.local_std(torch.full((1, 3, 8, 8), 0.3)), 0, atol=1e-4)  # flat: no texture


def test_diff_normalise_none_keeps_the_feature_magnitude_and_has_its_own_cache_key():
    """``unit`` divides each pixel's features by their channel norm (LPIPS), ``none`` keeps the raw ReLUs: a faint
    change then counts for far less against a strong one. ``unit`` keeps the maps' cache key it had before."""
    import lpips

    from ood_bench.distances.feature_maps import AlexFeatureMaps

    feats = AlexFeatureMaps("auto", standin_weights())
    x = torch.full((1, 3, 64, 64), 0.5)
    stripes = (torch.arange(64) // 2 % 2).float().view(1, 1, 64, 1).expand(1, 3, 64, 64) - 0.5
    raw, unit = feats.features(x + 0.3 * stripes, "none"), feats.features(x + 0.3 * stripes, "unit")
    for r, u in zip(raw, unit):
        assert torch.allclose(lpips.normalize_tensor(r), u)
        assert not torch.allclose(r.norm(dim=1), torch.ones(()), atol=0.1)  # raw features are not unit vectors
    ratio = {}
    for how in ("unit", "none"):
        faint, strong = (feats.diff_map(x, x + a * stripes, (1,), "uniform", normalise=how).mean() for a in (0.02, 0.4))
        ratio[how] = float(strong / faint)
    assert ratio["none"] > 4 * ratio["unit"], ratio
    with pytest.raises(ValueError, match=r"method\.diff_normalise='l1'.*unit.*none"):
        feats.features(x, "l1")

    keys = {how: tiny_method(diff_normalise=how)._inference_identity() for how in ("unit", "none")}
    assert keys["none"] == {**keys["unit"], "diff_normalise": "none"} and "diff_normalise" not in keys["unit"]


def test_diff_normalise_reaches_the_inpainting_maps_and_not_the_prototypes(fitted, tmp_path):
    """The option changes every inpainting difference (the reference's features and the repaint's alike) and
    leaves the prototype kNN distance, which uses LPIPS-normalised patch features either way."""
    method, ctx, _ = fitted
    x, idx, labels = images(3, 6), np.arange(3), np.array([0, 1, 0])
    got = {}
    try:
        for how in ("unit", "none"):
            method.diff_normalise = how
            fresh = Context(ctx.device, ArtifactCache(tmp_path / how), data_meta=ctx.data_meta, progress=False)
            got[how] = method.score(x, fresh, indices=idx, labels=labels)
    finally:
        method.diff_normalise = "unit"
    assert np.array_equal(got["unit"].extras["knn_max"], got["none"].extras["knn_max"])
    for key in ("ms_max", "pg_max"):
        assert not np.allclose(got["unit"].extras[key], got["none"].extras[key], rtol=0.05), key
    # an unpainted image has no difference under either normalisation: the same features on both sides
    feats = method.features
    for how in ("unit", "none"):
        assert feats.diff_map(x, x.clone(), method.diff_layers, method.diff_weighting, normalise=how).abs().max() == 0


def test_maps_are_the_differences_of_the_repaints(fitted):
    """``_maps`` is D(reference, x̂) summed per slot over ``repaints`` (what scripts/anomalysd_diff_grid.py scores
    with other differences): one x̂ per mask, each scale hides every pixel once, x̂ keeps the known pixels."""
    method, ctx, _ = fitted
    x, idx, lab = images(3, 7), np.arange(3), np.array([0, 1, 0])
    maps = method._maps(x, idx, lab, ctx)
    ref, knn, repaints = method.repaints(x, idx, lab, ctx)
    repaints = list(repaints)
    assert len(repaints) == method.masks_per_image
    got, hidden = np.zeros_like(maps), np.zeros((len(method.mask_scales) + 1, 3, SIZE, SIZE))
    feats = method.features
    for slot, known, xhat in repaints:
        assert torch.equal(xhat * known, ref * known)
        d = feats.diff_map(ref, xhat, method.diff_layers, method.diff_weighting, normalise=method.diff_normalise)
        got[:, slot] += ((1 - known[:, 0]) * d).numpy()
        hidden[slot] += (1 - known[:, 0]).numpy()
    got[:, -1] = knn.numpy()
    np.testing.assert_allclose(got, maps, rtol=1e-5, atol=1e-7)
    assert (hidden[:-1] == 1).all() and 0 < hidden[-1].mean() < 0.5
    assert (maps[:, :-1] > 0).any(axis=(2, 3)).all()  # every slot's repaint differs somewhere

    # the first grid repaint and the prototype-guided mask rebuilt from the building blocks: noise keys (k, 0),
    # the pasted-back known pixels, the mask over the top share of the kNN distances at the latent grid
    sd, f, k = method.sd, method.sd.vae_scale_factor, method.mask_scales[0]
    known = grid_masks(SIZE, k, method.mask_layout)[0].expand(3, 1, SIZE, SIZE).contiguous()
    text, x2 = method._test_text(lab), x * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lat, _ = sd_inpaint(
            sd, sd.encode(x2).float(), sd.encode(x2 * known).float(), latent_mask(known, f), text,
            sample_generators(ctx.seed, idx, k, 0), steps=method.steps, strength=method.strength,
            autocast_dtype=torch.bfloat16,
        )  # fmt: skip
        xhat = (sd.decode(lat).float().clamp(-1, 1) + 1) / 2
    assert torch.equal(repaints[0][1], known)
    torch.testing.assert_close(repaints[0][2], known * ref + (1 - known) * xhat)
    grid = SIZE // f
    patches = method.features.patch_features(x, method.pg_layers, grid)
    protos = [method.prototypes[int(c)] for c in lab]
    dist = torch.stack([nearest_prototype_distance(p[None], proto)[0] for p, proto in zip(patches, protos)])
    pg = upsample_mask(top_fraction_mask(dist.view(3, grid, grid), method.pg_ratio, method.pg_dilate), f)[:, None]
    assert torch.equal(repaints[-1][1], pg)


def test_diff_grid_script_scores_the_methods_own_difference_as_the_method_does(fitted):
    """Every grid entry of scripts/anomalysd_diff_grid.py that names a method setting equals ``diff_map`` with that
    setting (so its ``*`` row is run.py's), and the script leaves the AlexNet input size as it found it."""
    grid = load_script("anomalysd_diff_grid")
    method, ctx, _ = fitted
    x, idx, lab = images(2, 8), np.arange(2), np.array([0, 1])
    ref, _, repaints = method.repaints(x, idx, lab, ctx)
    _, known, xhat = next(iter(repaints))
    hidden = 1 - known[:, 0]
    feats, size = method.features, SIZE
    before = feats.input_size
    got = grid.differences(method, ref, xhat, hidden, [2 * size, size])
    assert feats.input_size == before
    for norm, fsize, layers, weighting in [("unit", 2 * size, (1,), "uniform"), ("none", size, (1, 2), "lpips")]:
        feats.input_size = fsize
        try:
            want = hidden * feats.diff_map(ref, xhat, layers, weighting, normalise=norm)
        finally:
            feats.input_size = before
        torch.testing.assert_close(got[(norm, fsize, layers, weighting)], want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[("-", "-", "pixel_sq", "-")], hidden * ((ref - xhat) ** 2).mean(1))


def test_terms_script_keeps_map_sets_of_different_settings_apart():
    """Batches of one run form one set; maps of any other inference setting (here the weighting, which the
    description does not print) never merge into it."""
    terms = load_script("anomalysd_terms")
    spec = {"model": "m", "diff_layers": [1], "diff_weighting": "uniform", "images": "a", "indices": [0], "labels": [0]}
    other_batch = {**spec, "images": "b", "indices": [1]}
    assert terms.map_set(spec) == terms.map_set(other_batch)
    assert terms.map_set(spec) != terms.map_set({**spec, "diff_weighting": "lpips"})
    assert terms.map_set(spec) != terms.map_set({**spec, "diff_layers": [1, 2, 3, 4, 5]})
