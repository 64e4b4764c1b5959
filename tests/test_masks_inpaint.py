"""Checkerboard masks (LMD's pattern) and replacement inpainting with a real tiny diffusers UNet."""

from __future__ import annotations

import pytest
import torch

from ood_bench.samplers import MASK_TYPES, checkerboard_mask, inpaint, lmd_mask
from ood_bench.samplers.inpaint import make_scheduler
from ood_bench.utils import randn_per_sample, sample_generators

# ---------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, num_blocks", [(32, 8), (16, 4), (28, 7), (8, 2), (12, 3)])
def test_checkerboard_shape_blocks_and_half_known(size, num_blocks):
    m = checkerboard_mask(size, num_blocks)
    assert tuple(m.shape) == (size, size)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    block = size // num_blocks
    # every block is constant; adjacent blocks differ
    blocks = m.reshape(num_blocks, block, num_blocks, block)
    assert torch.all(blocks == blocks[:, :1, :, :1])
    grid = blocks[:, 0, :, 0]
    assert torch.all(grid[1:, :] != grid[:-1, :]) and torch.all(grid[:, 1:] != grid[:, :-1])
    known_blocks = (num_blocks * num_blocks + 1) // 2  # block (0, 0) is known: the odd extra block is known
    assert int(grid.sum()) == known_blocks
    if num_blocks % 2 == 0:
        assert float(m.mean()) == 0.5


def test_checkerboard_official_lmd_pattern():
    """LMD's get_checkerboard_mask: ones, then zeros at [1::2, ::2] and [::2, 1::2] -> block (0, 0) known."""
    m = checkerboard_mask(32, 8)
    assert torch.all(m[:4, :4] == 1)  # block (0, 0)
    assert torch.all(m[:4, 4:8] == 0)  # block (0, 1)
    assert torch.all(m[4:8, :4] == 0)  # block (1, 0)
    assert torch.all(m[4:8, 4:8] == 1)  # block (1, 1)
    i, j = torch.meshgrid(torch.arange(32) // 4, torch.arange(32) // 4, indexing="ij")
    assert torch.equal(m, ((i + j) % 2 == 0).float())


@pytest.mark.parametrize("size, num_blocks", [(32, 8), (16, 4), (8, 2)])
def test_inverted_is_complement_for_even_blocks(size, num_blocks):
    normal = checkerboard_mask(size, num_blocks)
    inverted = checkerboard_mask(size, num_blocks, inverted=True)
    assert torch.equal(inverted, 1 - normal)
    assert torch.all(inverted[: size // num_blocks, : size // num_blocks] == 0)


def test_checkerboard_alt_alternates_across_reps():
    normal = checkerboard_mask(16, 4)
    inverted = checkerboard_mask(16, 4, inverted=True)
    for rep in range(6):
        expected = normal if rep % 2 == 0 else inverted
        assert torch.equal(lmd_mask("checkerboard_alt", 16, 4, rep), expected), rep
        assert torch.equal(lmd_mask("checkerboard", 16, 4, rep), normal)
        assert torch.equal(lmd_mask("checkerboard_inv", 16, 4, rep), inverted)
    # over two repeats every pixel is inpainted once
    assert torch.equal(
        lmd_mask("checkerboard_alt", 16, 4, 0) + lmd_mask("checkerboard_alt", 16, 4, 1), torch.ones(16, 16)
    )


def test_center_mask():
    m = lmd_mask("center", 16, 4, 0)
    assert float(m.sum()) == 16 * 16 - 8 * 8
    assert torch.all(m[4:12, 4:12] == 0) and m[0, 0] == 1


@pytest.mark.parametrize("num_blocks", [0, 1, 3, 5])
def test_invalid_num_blocks(num_blocks):
    with pytest.raises(ValueError, match=f"num_blocks={num_blocks}"):
        checkerboard_mask(16, num_blocks)


def test_invalid_mask_kind_lists_valid():
    with pytest.raises(ValueError) as err:
        lmd_mask("stripes", 16, 4, 0)
    for kind in MASK_TYPES:
        assert kind in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Inpainting with a real (tiny, random) UNet2DModel
# ---------------------------------------------------------------------------------------------------------------

N, SIZE = 4, 8


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(123)
    return torch.rand(N, 1, SIZE, SIZE, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def mask():
    return checkerboard_mask(SIZE, 4)


def _run(model, x0, mask, indices, sampler, seed=0, rep=0, steps=5, eta=1.0, clip=True):
    gens = sample_generators(seed, indices, rep)
    return inpaint(model, x0, mask, gens, sampler=sampler, steps=steps, eta=eta, clip=clip)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_inpaint_keeps_known_and_changes_unknown(tiny_diffusion, images, mask, sampler, clip):
    out = _run(tiny_diffusion, images, mask, range(N), sampler, clip=clip)
    assert out.shape == images.shape and out.dtype == images.dtype
    known = mask.bool().expand_as(images)
    assert torch.equal(out[known], images[known])  # exactly, not approximately
    assert (out[~known] - images[~known]).abs().mean() > 0.05
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_clip_keeps_samples_in_range_and_official_default_does_not_clip(tiny_diffusion, images, mask, sampler):
    """The random tiny UNet overshoots [-1, 1], so the range check on the clipped run can fail; without clipping
    (the official sampler) values outside the range come back unchanged."""
    clipped = _run(tiny_diffusion, images, mask, range(N), sampler, clip=True)
    unclipped = _run(tiny_diffusion, images, mask, range(N), sampler, clip=False)
    assert float(unclipped.abs().max()) > 1.0
    assert float(clipped.min()) >= -1.0 and float(clipped.max()) <= 1.0
    # clipping acts at every step (the x0 prediction), not only on the result
    assert (clipped - unclipped.clamp(-1, 1)).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_inpaint_is_batch_size_invariant(tiny_diffusion, images, mask, sampler):
    idx = [10, 11, 12, 13]
    batch = _run(tiny_diffusion, images, mask, idx, sampler)
    single = torch.cat([_run(tiny_diffusion, images[i : i + 1], mask, [idx[i]], sampler) for i in range(N)])
    assert torch.allclose(batch, single, atol=1e-5, rtol=0)
    # the pair (2, 3) scored alone, in another order, gives the same rows
    part = _run(tiny_diffusion, images[[3, 2]], mask, [idx[3], idx[2]], sampler)
    assert torch.allclose(part, batch[[3, 2]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_inpaint_seeding(tiny_diffusion, images, mask, sampler):
    a = _run(tiny_diffusion, images, mask, range(N), sampler, seed=0)
    b = _run(tiny_diffusion, images, mask, range(N), sampler, seed=0)
    assert torch.equal(a, b)
    unknown = ~mask.bool().expand_as(images)
    c = _run(tiny_diffusion, images, mask, range(N), sampler, seed=1)
    assert (a - c)[unknown].abs().max() > 1e-3
    d = _run(tiny_diffusion, images, mask, range(N), sampler, seed=0, rep=1)
    assert (a - d)[unknown].abs().max() > 1e-3
    # a sample's result depends on its own index, not on its position in the batch
    e = _run(tiny_diffusion, images, mask, [0, 1, 2, 7], sampler)
    assert torch.allclose(e[:3], a[:3], atol=1e-5) and (e[3] - a[3])[unknown[3]].abs().max() > 1e-3


@pytest.mark.parametrize("eta, draws_per_step", [(0.0, 1), (1.0, 2)])
def test_ddim_eta_zero_draws_no_step_noise(tiny_diffusion, images, mask, eta, draws_per_step):
    """eta=0: each sample's generator gives the start noise and one replacement draw per step, no step noise
    (its state afterwards equals that of a fresh generator after exactly those draws); eta=1 also draws step noise."""
    steps = 4
    gens = sample_generators(0, range(N), 0)
    inpaint(tiny_diffusion, images, mask, gens, sampler="ddim", steps=steps, eta=eta)
    ref = sample_generators(0, range(N), 0)
    for _ in range(1 + draws_per_step * steps):
        randn_per_sample(images.shape, ref, images.device, images.dtype)
    for used, expected in zip(gens, ref):
        assert torch.equal(used.get_state(), expected.get_state())


def test_known_pixels_are_renoised_to_the_current_step_before_each_network_call(tiny_diffusion, images, mask):
    """The official replacement order (get_pc_inpainter with corrector='none'): the corrector wrapper re-injects the
    known pixels noised to t, then the predictor steps from t. The first network call therefore sees known pixels
    already noised to the first t (not the clean pixels the official loop starts from), the second call known
    pixels noised afresh to the second t."""
    calls: list[tuple[torch.Tensor, int]] = []

    def record(_module, args):
        calls.append((args[0].clone(), int(args[1][0])))

    steps = 3
    handle = tiny_diffusion.unet.register_forward_pre_hook(record)
    try:
        inpaint(tiny_diffusion, images, mask, sample_generators(0, range(N), 0), sampler="ddim", steps=steps, eta=1.0)
    finally:
        handle.remove()
    sched = make_scheduler(tiny_diffusion, "ddim", steps)
    ref = sample_generators(0, range(N), 0)
    draw = lambda: randn_per_sample(images.shape, ref, images.device, images.dtype)  # noqa: E731
    start, z_first = draw(), draw()
    draw()  # the first step's variance noise
    z_second = draw()
    known = mask.bool().expand_as(images)
    (first, t_first), (second, t_second) = calls[0], calls[1]
    assert (t_first, t_second) == tuple(int(t) for t in sched.timesteps[:2])
    expected_first = sched.add_noise(images, z_first, torch.tensor([t_first]))
    expected_second = sched.add_noise(images, z_second, torch.tensor([t_second]))
    torch.testing.assert_close(first[known], expected_first[known])
    torch.testing.assert_close(second[known], expected_second[known])
    assert torch.equal(first[~known], start[~known])


def test_full_mask_returns_input_and_broadcast_shapes(tiny_diffusion, images):
    ones = torch.ones(SIZE, SIZE)
    out = _run(tiny_diffusion, images, ones, range(N), "ddim", steps=2)
    assert torch.equal(out, images)
    m = checkerboard_mask(SIZE, 2)
    a = _run(tiny_diffusion, images, m, range(N), "ddim", steps=2)
    b = _run(tiny_diffusion, images, m.view(1, 1, SIZE, SIZE), range(N), "ddim", steps=2)
    c = _run(tiny_diffusion, images, m.expand(N, 1, SIZE, SIZE), range(N), "ddim", steps=2)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("sampler, steps", [("ddim", 25), ("ddpm", 10), ("ddim", 1), ("ddpm", 1000), ("ddim", 10)])
def test_scheduler_steps_end_at_zero(tiny_diffusion, sampler, steps):
    """Trailing spacing: the first step at t = T-1 (pure noise), equal strides of T/steps so every update lands on
    the next step run, the last network call at t = T/steps - 1 (39 at 25 steps) whose update lands on the clean
    image (abar = 1): given the true noise as the model output it returns x0 (the official sampler integrates
    down to t = 1e-3 and its last update is not exact either)."""
    sched = make_scheduler(tiny_diffusion, sampler, steps)
    ts = [int(t) for t in sched.timesteps]
    stride = 1000 // steps
    assert ts == [999 - k * stride for k in range(steps)]
    assert ts[-1] == stride - 1
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, SIZE, SIZE, generator=g) * 2 - 1
    eps = torch.randn(2, 1, SIZE, SIZE, generator=g)
    xt = sched.add_noise(x0, eps, torch.tensor([ts[-1]]))
    if sampler == "ddim":
        out = sched.step(eps, ts[-1], xt, eta=1.0).prev_sample
    else:
        out = sched.step(eps, ts[-1], xt, generator=g).prev_sample
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_scheduler_rejects_bad_steps_and_sampler(tiny_diffusion, images, mask):
    with pytest.raises(ValueError, match="steps=0"):
        make_scheduler(tiny_diffusion, "ddim", 0)
    with pytest.raises(ValueError, match="1..1000"):
        make_scheduler(tiny_diffusion, "ddpm", 1001)
    with pytest.raises(ValueError, match="valid: \\['ddim', 'ddpm'\\]"):
        make_scheduler(tiny_diffusion, "euler", 5)
    with pytest.raises(ValueError, match="one generator per row"):
        inpaint(tiny_diffusion, images, mask, sample_generators(0, [0, 1]), steps=2)
