"""LMD method contract: shapes, aggregation, batch-size invariance per precision, the inpainting cache (resumable
scoring, re-scoring without network calls), clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import standin_weights

from ood_bench.cache import ArtifactCache
from ood_bench.distances import build_distance
from ood_bench.methods import Context, build_method
from ood_bench.methods.lmd import INPAINT_KIND, LMD
from ood_bench.samplers import inpaint, lmd_mask
from ood_bench.utils import count_calls, sample_generators


def _ready_lmd(tiny_diffusion, **kwargs) -> LMD:
    lmd = LMD(distance="mse", reps=3, steps=3, **kwargs)
    lmd.model, lmd.distance = tiny_diffusion, build_distance("mse")
    return lmd


def _ctx(tmp_path: Path, seed: int = 0) -> Context:
    return Context(device=torch.device("cpu"), cache=ArtifactCache(tmp_path / "cache"), seed=seed, progress=False)


def _images(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def test_scores_are_median_of_repeats_and_count_nfe(tiny_diffusion, tmp_path: Path) -> None:
    s = _ready_lmd(tiny_diffusion, num_blocks=4).score(_images(), _ctx(tmp_path), indices=np.arange(5))
    assert s.extras["dist_rep"].shape == (5, 3)
    np.testing.assert_allclose(s.values, np.median(s.extras["dist_rep"], axis=1))
    assert s.nfe_per_image == 9.0
    # alternating boards: repeat 0 and 1 inpaint complementary halves, so their distances differ
    assert not np.allclose(s.extras["dist_rep"][:, 0], s.extras["dist_rep"][:, 1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_scores_do_not_depend_on_batch_size_or_how_repeats_are_batched(tiny_diffusion, tmp_path, precision) -> None:
    """All repeats of a batch in one pass (eval_batch >= batch_size * reps), one repeat per pass (the per-repeat
    path: eval_batch = batch_size) and odd splits give the same scores, at each precision."""
    x, idx = _images(), np.arange(10, 15)
    settings = [(5, 1000), (5, 5), (2, 3), (1, 1)]  # (batch_size, eval_batch)
    runs = [
        _ready_lmd(tiny_diffusion, num_blocks=4, batch_size=bs, eval_batch=eb, precision=precision).score(
            x, _ctx(tmp_path / f"{bs}-{eb}"), indices=idx
        )
        for bs, eb in settings
    ]
    for s in runs[1:]:
        np.testing.assert_allclose(s.extras["dist_rep"], runs[0].extras["dist_rep"], rtol=1e-5, atol=1e-7)
    c = _ready_lmd(tiny_diffusion, num_blocks=4, precision=precision).score(x, _ctx(tmp_path / "c", 1), indices=idx)
    assert not np.allclose(runs[0].values, c.values)  # another seed, other noise


def test_precision_runs_the_unet_under_autocast(tiny_diffusion, tmp_path) -> None:
    x, idx = _images(), np.arange(5)
    full = _ready_lmd(tiny_diffusion, num_blocks=4).score(x, _ctx(tmp_path / "a"), indices=idx)
    half = _ready_lmd(tiny_diffusion, num_blocks=4, precision="bf16").score(x, _ctx(tmp_path / "b"), indices=idx)
    assert not np.array_equal(full.extras["dist_rep"], half.extras["dist_rep"])  # bf16 really ran
    np.testing.assert_allclose(half.extras["dist_rep"], full.extras["dist_rep"], rtol=0.1)  # and stays close
    lmd = LMD(distance="mse", reps=2, steps=2, num_blocks=4, precision="fp16")
    with pytest.raises(ValueError, match=r"method.precision=fp16 needs a CUDA device.*bf16 or fp32"):
        lmd.fit(torch.rand(4, 1, 8, 8), _ctx(tmp_path / "c"))


def test_scoring_resumes_from_cached_batches(tiny_diffusion, tmp_path: Path, caplog) -> None:
    ctx = _ctx(tmp_path)
    first = _ready_lmd(tiny_diffusion, num_blocks=4, batch_size=2).score(_images(), ctx, indices=np.arange(5))
    entries = [p for p in (tmp_path / "cache" / INPAINT_KIND).iterdir() if not p.name.startswith(".")]
    assert len(entries) == 3 * 3  # 3 batches x 3 repeats
    with caplog.at_level(logging.INFO, logger="ood_bench"), count_calls(tiny_diffusion.unet) as calls:
        again = _ready_lmd(tiny_diffusion, num_blocks=4, batch_size=2).score(_images(), ctx, indices=np.arange(5))
    assert "cache write" not in caplog.text and caplog.text.count("cache hit") == 9 and calls[0] == 0
    np.testing.assert_array_equal(first.values, again.values)


def test_inpaintings_are_stored_compactly_and_scored_as_stored(tiny_diffusion, tmp_path: Path) -> None:
    """An entry holds one batch's inpainted pixels for one repeat as float16 (known pixels are the input): a fresh
    and a cached run score exactly the same values."""
    ctx, x = _ctx(tmp_path), _images()
    lmd = _ready_lmd(tiny_diffusion, num_blocks=4)
    fresh = lmd.score(x, ctx, indices=np.arange(5))
    entries = sorted((tmp_path / "cache" / INPAINT_KIND).glob("*/inpainted.npy"))
    assert len(entries) == 3
    stored = np.load(entries[0])
    assert stored.dtype == np.float16 and stored.shape == (5, 1, 32)  # 5 images, 1 channel, half of 8 x 8 pixels
    recons = lmd.inpaintings(x, np.arange(5), ctx)
    for r, mask in enumerate(lmd.masks(8)):
        known = mask.bool().expand_as(x)
        assert torch.equal(recons[r][known], x[known])
        assert torch.equal(recons[r][~known], recons[r][~known].half().float())
    cached = _ready_lmd(tiny_diffusion, num_blocks=4).score(x, ctx, indices=np.arange(5))
    np.testing.assert_array_equal(fresh.extras["dist_rep"], cached.extras["dist_rep"])


@pytest.mark.parametrize("change", [{"distance": "ssim"}, {"aggregate": "mean"}, {"reps": 2}])
def test_rescoring_with_another_distance_aggregate_or_fewer_repeats_evaluates_no_network(
    tiny_diffusion, tmp_path: Path, change: dict
) -> None:
    ctx, x, idx = _ctx(tmp_path), _images(), np.arange(5)
    first = _ready_lmd(tiny_diffusion, num_blocks=4, batch_size=2).score(x, ctx, indices=idx)
    lmd = LMD(**{"distance": "mse", "reps": 3, "steps": 3, "num_blocks": 4, "batch_size": 2, **change})
    lmd.model, lmd.distance = tiny_diffusion, build_distance(lmd.distance_name)
    with count_calls(tiny_diffusion.unet) as calls:
        again = lmd.score(x, ctx, indices=idx)
    assert calls[0] == 0
    reps = change.get("reps", 3)
    if "distance" in change:
        assert not np.allclose(again.extras["dist_rep"], first.extras["dist_rep"])
    else:
        np.testing.assert_array_equal(again.extras["dist_rep"], first.extras["dist_rep"][:, :reps])
    expected = again.extras["dist_rep"].mean(1) if "aggregate" in change else np.median(again.extras["dist_rep"], 1)
    np.testing.assert_array_equal(again.values, expected)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"mask": "stripes"}, r"method.mask='stripes'.*checkerboard_alt"),
        ({"reps": 0}, r"method.reps=0"),
        ({"sampler": "euler"}, r"method.sampler='euler'.*ddim.*ddpm"),
        ({"distance": "l1"}, r"method.distance='l1'.*lpips"),
        ({"lpips_net": "resnet"}, r"method.lpips_net='resnet'.*alex"),
        ({"eta": 2.0}, r"method.eta=2.0"),
        ({"clip": "yes"}, r"method.clip='yes'.*true or false"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build_method({"name": "lmd", **kwargs})


def test_distance_receives_images_in_0_1(tiny_diffusion, tmp_path: Path) -> None:
    """LMD inpaints in [-1, 1] and hands originals and inpaintings in [0, 1] to LPIPS (normalize=True), which is
    the official detect.py call: lpips(x * 2 - 1, recon * 2 - 1) on the raw [0, 1] images (our inpaintings are
    stored with float16 inpainted pixels, the deviation docs/deviations.md names). The AlexNet is a random stand-in:
    what is checked is the call, not what ImageNet features see."""
    weights = standin_weights()
    lmd = LMD(reps=2, steps=3, num_blocks=4, distance="lpips", weights_dir=str(weights))
    lmd.model, lmd.distance = tiny_diffusion, build_distance("lpips", weights_dir=weights)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    idx = np.array([4, 7, 9])
    s = lmd.score(x, _ctx(tmp_path), indices=idx)
    for rep in range(2):
        gens = sample_generators(0, idx, rep)
        mask = lmd_mask("checkerboard_alt", 32, 4, rep)
        recon = inpaint(tiny_diffusion, x * 2 - 1, mask, gens, steps=3, clip=False)
        # as stored: the inpainted pixels rounded to float16, the known ones the input itself
        recon01 = torch.where(mask.bool(), x, ((recon + 1) / 2).half().float())
        assert float(recon01.min()) < 0 or float(recon01.max()) > 1  # unclipped, as the official recon
        official = lmd.distance.model(x.repeat(1, 3, 1, 1) * 2 - 1, recon01.repeat(1, 3, 1, 1) * 2 - 1)
        np.testing.assert_allclose(s.extras["dist_rep"][:, rep], official.flatten().double().numpy(), rtol=1e-5)


def test_images_at_another_size_fail_clearly(tiny_diffusion, tmp_path: Path) -> None:
    """Under data.resize_protocol=native the two sides keep their own sizes; LMD's one model cannot take both."""
    lmd = _ready_lmd(tiny_diffusion, num_blocks=4)
    lmd.image_size = 8
    with pytest.raises(ValueError, match=r"LMD got 16px images.*data.image_size=8px.*resize_protocol=native"):
        lmd.score(torch.rand(2, 1, 16, 16), _ctx(tmp_path))
