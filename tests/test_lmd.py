"""LMD method contract: shapes, aggregation, batch-size invariance, resumable scoring, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_weight

from ood_bench.cache import ArtifactCache
from ood_bench.distances import build_distance
from ood_bench.methods import Context, build_method
from ood_bench.methods.lmd import LMD
from ood_bench.samplers import inpaint, lmd_mask
from ood_bench.utils import sample_generators


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


def test_scores_do_not_depend_on_batch_size(tiny_diffusion, tmp_path: Path) -> None:
    x, idx = _images(), np.arange(10, 15)
    a = _ready_lmd(tiny_diffusion, num_blocks=4, batch_size=5).score(x, _ctx(tmp_path / "a"), indices=idx)
    b = _ready_lmd(tiny_diffusion, num_blocks=4, batch_size=2).score(x, _ctx(tmp_path / "b"), indices=idx)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-7)
    c = _ready_lmd(tiny_diffusion, num_blocks=4).score(x, _ctx(tmp_path / "c", seed=1), indices=idx)
    assert not np.allclose(a.values, c.values)


def test_scoring_resumes_from_cached_batches(tiny_diffusion, tmp_path: Path, caplog) -> None:
    ctx = _ctx(tmp_path)
    first = _ready_lmd(tiny_diffusion, num_blocks=4, batch_size=2).score(_images(), ctx, indices=np.arange(5))
    entries = list((tmp_path / "cache" / "lmd_distances").iterdir())
    assert len(entries) == 3 * 3  # 3 batches x 3 repeats
    with caplog.at_level(logging.INFO, logger="ood_bench.cache"):
        again = _ready_lmd(tiny_diffusion, num_blocks=4, batch_size=2).score(_images(), ctx, indices=np.arange(5))
    assert "cache write" not in caplog.text and caplog.text.count("cache hit") == 9
    np.testing.assert_array_equal(first.values, again.values)


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
    the official detect.py call: lpips(x * 2 - 1, recon * 2 - 1) on the raw [0, 1] images."""
    weights = shared_weight("alexnet_features_imagenet.pth").parent
    lmd = LMD(reps=2, steps=3, num_blocks=4, distance="lpips", weights_dir=str(weights))
    lmd.model, lmd.distance = tiny_diffusion, build_distance("lpips", weights_dir=weights)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    idx = np.array([4, 7, 9])
    s = lmd.score(x, _ctx(tmp_path), indices=idx)
    for rep in range(2):
        gens = sample_generators(0, idx, rep)
        recon = inpaint(tiny_diffusion, x * 2 - 1, lmd_mask("checkerboard_alt", 32, 4, rep), gens, steps=3, clip=False)
        recon01 = (recon + 1) / 2
        assert float(recon01.min()) < 0 or float(recon01.max()) > 1  # unclipped, as the official recon
        official = lmd.distance.model(x.repeat(1, 3, 1, 1) * 2 - 1, recon01.repeat(1, 3, 1, 1) * 2 - 1)
        np.testing.assert_allclose(s.extras["dist_rep"][:, rep], official.flatten().double().numpy(), rtol=1e-5)


def test_images_at_another_size_fail_clearly(tiny_diffusion, tmp_path: Path) -> None:
    """Under data.resize_protocol=native the two sides keep their own sizes; LMD's one model cannot take both."""
    lmd = _ready_lmd(tiny_diffusion, num_blocks=4)
    lmd.image_size = 8
    with pytest.raises(ValueError, match=r"LMD got 16px images.*data.image_size=8px.*resize_protocol=native"):
        lmd.score(torch.rand(2, 1, 16, 16), _ctx(tmp_path))
