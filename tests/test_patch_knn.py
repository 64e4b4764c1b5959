"""patch_knn's options (issue 17, item 6): distances and image scores against brute-force references, shot
augmentation (bank sizes, exact views), AnomalyDINO's PCA foreground mask, a planted defect, the DINOv2 encoder
(loading an official-layout file made here, the error when it is absent) and the configs' hashes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import WEIGHTS_DIR, shared_weight
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from ood_bench.methods import METHODS
from ood_bench.methods.base import Context
from ood_bench.methods.patch_knn import PatchKNN, augment_shots, pca_foreground, rotate, top_mean
from ood_bench.models.encoders import FeatureEncoder
from ood_bench.runner import config_identity
from ood_bench.utils import stable_hash

CTX = Context(device=torch.device("cpu"), cache=None)


def stripes(n: int, size: int = 64, period: int = 8, seed: int = 0) -> torch.Tensor:
    """Grey vertical stripes with a random phase and a little noise: a defect-free texture."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(size, dtype=torch.float32)
    out = []
    for _ in range(n):
        phase = float(torch.randint(0, period, (1,), generator=g))
        row = 0.5 + 0.3 * torch.sin(2 * np.pi * (x + phase) / period)
        img = row.expand(size, size) + 0.02 * torch.randn(size, size, generator=g)
        out.append(img.clamp(0, 1).expand(3, -1, -1))
    return torch.stack(out)


@functools.cache
def alexnet(weights: str, size: int) -> FeatureEncoder:
    """One encoder per (weights, size) for the whole module: building AlexNet (61 M parameters) dominates otherwise."""
    return FeatureEncoder("alexnet", ["features.1", "features.4"], weights, WEIGHTS_DIR, input_size=size, stride=None)


def knn(size: int = 32, **kw) -> PatchKNN:
    """patch_knn on an untrained AlexNet's relu1 + relu2 (``encoder_weights="auto"``: the ImageNet one)."""
    kw = {"encoder": "alexnet", "encoder_weights": "none", "layers": ["features.1", "features.4"], **kw}
    m = PatchKNN(**kw)
    m.encoder = alexnet(kw["encoder_weights"], size)
    return m


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_nearest_distance_equals_brute_force(distance: str, chunked: bool, monkeypatch) -> None:
    import ood_bench.methods.patch_knn as patch_knn

    if chunked:  # 7 query rows per product (the bound that keeps a 512-px multi-class bank in memory)
        monkeypatch.setattr(patch_knn, "MATRIX_BYTES", 4 * 50 * 7)
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(50, 7, generator=g), torch.randn(30, 7, generator=g)
    m = knn(distance=distance)
    m.bank = F.normalize(bank, dim=1) if distance == "cosine" else bank
    b, q = bank.double().numpy(), query.double().numpy()
    if distance == "l2":
        ref = np.sqrt(((q[:, None] - b[None]) ** 2).sum(-1)).min(1)
    else:
        cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
        ref = (1 - cos).min(1)
    np.testing.assert_allclose(m._nearest(query).numpy(), ref, atol=2e-5)


def test_top_mean_is_anomalydinos_mean_top1p() -> None:
    """mean of the top int(1 % of n) values, the maximum when that is 0 (AnomalyDINO's post_eval.mean_top1p)."""
    rng = np.random.default_rng(0)
    for n in (50, 225, 1024, 16384):
        v = rng.random((3, n))
        k = int(n * 0.01)
        ref = v.max(1) if k == 0 else np.sort(v, 1)[:, ::-1][:, :k].mean(1)
        np.testing.assert_allclose(top_mean(v, 0.01), ref)


# ---------------------------------------------------------------------------------------------- shot augmentation
def test_rotation_is_exact_on_quarter_turns_and_reflects_borders() -> None:
    x = torch.rand(2, 3, 17, 17, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rotate(x, 0), x)
    for k in (1, 2, 3):  # counter-clockwise as displayed, like torch.rot90(k) on (H, W)
        torch.testing.assert_close(rotate(x, 90 * k), torch.rot90(x, k, dims=(-2, -1)), atol=1e-5, rtol=0)
    flat = torch.full((1, 1, 16, 16), 0.7)
    torch.testing.assert_close(rotate(flat, 45), flat)  # reflected corners: no black fill


OUTSIDE = {  # a view of the shot that the mode's set does not hold
    "none": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot90": lambda x: x.flip(-1),
    "flips_rot90": lambda x: rotate(x, 45),
    "rotations": lambda x: rotate(x, 30),
}


@pytest.mark.parametrize(("mode", "views"), [("none", 1), ("rot90", 4), ("flips_rot90", 8), ("rotations", 8)])
def test_shot_augment_multiplies_the_bank_and_holds_each_view(mode: str, views: int) -> None:
    shots = stripes(2, size=32)
    m = knn(shot_augment=mode, distance="cosine")
    m.fit(shots, CTX)
    gh, gw = m.grid
    assert m.bank.shape[0] == 2 * views * gh * gw and m.n_views == views
    # every view of a shot is in the bank (its patches at distance 0), a view outside the mode's set is not
    own = m.patch_distances(augment_shots(shots[1:], mode))
    assert own.shape[0] == views and own.max() < 1e-5
    assert m.patch_distances(OUTSIDE[mode](shots[1:])).max() > 1e-4


# ---------------------------------------------------------------------------------------------- foreground mask
def object_features(sign: float = 1.0, d: int = 16, h: int = 12) -> tuple[torch.Tensor, np.ndarray]:
    """Patch features [d, h, h]: a centred square object (direction +e0) on background (-e0), plus noise."""
    g = torch.Generator().manual_seed(1)
    obj = np.zeros((h, h), dtype=bool)
    obj[3:9, 3:9] = True
    f = 0.3 * torch.randn(d, h, h, generator=g)
    f[0] += torch.where(torch.from_numpy(obj), 30.0, -30.0)
    return sign * f, obj


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pca_foreground_keeps_the_object_whatever_the_components_sign(sign: float) -> None:
    feats, obj = object_features(sign)
    mask = pca_foreground(feats, threshold=10.0)
    # the object, dilated by one patch and closed as AnomalyDINO does it: cv2 on the [h*w, 1] column of patches, so
    # along the raster order only (left and right neighbours; checked against cv2 + scikit-learn on random masks)
    expected = np.zeros_like(obj)
    expected[3:9, 2:10] = True
    np.testing.assert_array_equal(mask, expected)
    assert not pca_foreground(feats, threshold=1e6).any()  # nothing passes an unreachable threshold


def test_foreground_mask_zeroes_background_patches() -> None:
    shots = stripes(1, size=64)
    test = stripes(1, size=64, seed=5)
    test[:, :, :, :32] = 0.0  # a dark half: a different texture, the first component separates it
    plain, masked = knn(size=64), knn(size=64, foreground_mask="pca", mask_threshold=0.0)
    plain.fit(shots, CTX)
    masked.fit(shots, CTX)
    d0, d1 = plain.patch_distances(test)[0], masked.patch_distances(test)[0]
    fg = pca_foreground(masked._embed(test, torch.device("cpu"))[0], 0.0)
    assert 0 < fg.sum() < fg.size
    assert torch.equal(d1[torch.from_numpy(~fg)], torch.zeros(int((~fg).sum())))
    torch.testing.assert_close(d1[torch.from_numpy(fg)], d0[torch.from_numpy(fg)])


# ---------------------------------------------------------------------------------------------- a planted defect
def test_planted_blob_is_found_and_the_cosine_recipe_separates_the_images() -> None:
    """ImageNet AlexNet (an untrained one has no meaningful cosine geometry) on stripes with a random phase: a bright
    disc raises every image's score under both recipes and the maps find it; only cosine + top-1 % + rotations ranks
    every planted image above every clean one (l2 + max: a clean image outscores planted ones)."""
    shared_weight("alexnet_features_imagenet.pth")
    shots, clean = stripes(1, size=64), stripes(4, size=64, seed=3)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    blob = ((yy - 36) ** 2 + (xx - 24) ** 2 < 64).float()
    planted = clean * (1 - blob) + 0.95 * blob
    masks = blob.expand(4, -1, -1).numpy().astype(bool)
    labels = np.r_[np.zeros(4), np.ones(4)]
    cosine = {
        "distance": "cosine",
        "image_score": "topk_mean",
        "image_score_on": "patches",
        "shot_augment": "rotations",
    }
    l2 = {"distance": "l2", "image_score": "max", "shot_augment": "none"}  # PatchCore's scoring, no augmentation
    recipes = {"l2-max": l2, "cosine": cosine}
    image_auroc = {}
    for name, options in recipes.items():
        m = knn(size=64, encoder_weights="auto", **options)
        m.fit(shots, CTX)
        s_clean, s_planted = m.score(clean, CTX), m.score(planted, CTX)
        assert (s_planted.values > s_clean.values).all(), name
        assert roc_auc_score(masks.ravel(), s_planted.maps.astype(np.float64).ravel()) > 0.8, name
        image_auroc[name] = roc_auc_score(labels, np.r_[s_clean.values, s_planted.values])
    assert image_auroc["cosine"] == 1.0 and image_auroc["l2-max"] < 1.0, image_auroc


# ---------------------------------------------------------------------------------------------- DINOv2
@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    """A random state dict in the official DINOv2 ViT-S/14 release's layout (518 px: 37 x 37 + 1 positions, a
    ``mask_token``; keys and shapes from timm's uninitialised model), saved as ``dinov2_vits14_pretrain.pth``."""
    timm = pytest.importorskip("timm", reason="DINOv2 needs timm (pip install 'ood_bench[dino]')")
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, weight_init="skip")
    g = torch.Generator().manual_seed(3)
    sd = {}
    for k, v in vit.state_dict().items():
        noise = torch.randn(v.shape, generator=g)
        sd[k] = 1.0 + 0.1 * noise if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.02 * noise
    sd["mask_token"] = torch.zeros(1, 384)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    return path, sd


def test_dinov2_loads_an_official_layout_file_and_matches_timms_forward(dinov2_file, tmp_path) -> None:
    from ood_bench.models.dinov2 import DinoPatchEncoder

    path, sd = dinov2_file
    enc = DinoPatchEncoder("dinov2_vits14", ["blocks.5", "norm"], weights_dir=path.parent, input_size=56)
    assert enc.weights_id.startswith("dinov2_vits14_pretrain.pth#")
    got = enc.backbone.state_dict()
    torch.testing.assert_close(got["blocks.7.attn.qkv.weight"], sd["blocks.7.attn.qkv.weight"])
    torch.testing.assert_close(got["blocks.3.ls2.gamma"], sd["blocks.3.ls2.gamma"])
    assert got["pos_embed"].shape == (1, 1 + 4 * 4, 384)  # resampled from 37 x 37 to the 56 px grid
    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    mid, last = enc.feature_maps(x)
    assert mid.shape == last.shape == (2, 384, 4, 4)
    vit, pre = enc.backbone, enc.preprocess(x)
    ref_last = vit.forward_features(pre)[:, 1:]  # timm's DINOv2 forward: final norm, class token dropped
    ref_mid = vit.get_intermediate_layers(pre, n=[5], norm=False)[0]
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), ref_last)
    torch.testing.assert_close(mid.flatten(2).transpose(1, 2), ref_mid)
    broken = {k: v for k, v in sd.items() if k != "blocks.11.mlp.fc2.weight"}  # a file that does not fit names itself
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="broken.pth"):
        DinoPatchEncoder("dinov2_vits14", weights=str(tmp_path / "broken.pth"), input_size=56)


def test_dinov2_preprocessing_equals_anomalydinos_transform() -> None:
    """AnomalyDINO's DINOv2 transform (torchvision on a PIL uint8 image: bicubic antialiased resize of the smaller
    edge, ToTensor, ImageNet Normalize) against ``preprocess`` on the same pixels as a [0, 1] tensor; they differ by
    PIL's uint8 resampling only (measured 0.015 at most in normalised units: 0.0035 of the pixel range)."""
    pytest.importorskip("timm", reason="DINOv2 needs timm (pip install 'ood_bench[dino]')")
    from PIL import Image
    from torchvision import transforms

    from ood_bench.models.dinov2 import DinoPatchEncoder

    yy, xx = np.mgrid[:70, :70] / 70
    img = np.stack([0.5 + 0.4 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in (0, 1, 2)], -1)
    u8 = (img * 255).round().astype(np.uint8)
    official = transforms.Compose(
        [
            transforms.Resize(28, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    ref = official(Image.fromarray(u8))
    enc = DinoPatchEncoder("dinov2_vits14", ["norm"], "none", input_size=28)
    got = enc.preprocess(torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255)[0]
    assert got.shape == ref.shape == (3, 28, 28)
    torch.testing.assert_close(got, ref, rtol=0, atol=0.025)
    grey = enc.preprocess(torch.full((1, 1, 28, 28), 0.5))[0, :, 0, 0]  # one channel: copied to R, G, B
    torch.testing.assert_close(grey, (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_dinov2_absent_offline_names_the_file_and_the_manual_step(tmp_path, monkeypatch) -> None:
    pytest.importorskip("timm", reason="DINOv2 needs timm (pip install 'ood_bench[dino]')")
    from ood_bench.models.encoders import EncoderWeightsError

    def offline(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    m = PatchKNN(encoder="dinov2_vits14", weights_dir=str(tmp_path / "weights"))
    with pytest.raises(EncoderWeightsError) as err:
        m.check(128, 3, None)
    msg = str(err.value)
    assert str(tmp_path / "weights" / "dinov2_vits14_pretrain.pth") in msg and "Manual step" in msg
    assert "dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in msg


def test_anomalydino_recipe_runs_end_to_end(dinov2_file) -> None:
    """The recipe of method=anomalydino (at 42 px) on the file above, given as encoder_weights=<path>."""
    m = PatchKNN(
        encoder="dinov2_vits14", encoder_weights=str(dinov2_file[0]), input_size=42, local_pool=1, distance="cosine",
        image_score="topk_mean", image_score_on="patches", shot_augment="rotations",
    )  # fmt: skip
    m.fit(stripes(1, size=48), CTX)
    assert m.bank.shape == (8 * 3 * 3, 384) and m.grid == (3, 3)
    out = m.score(stripes(2, size=48, seed=1), CTX)
    assert out.maps.shape == (2, 48, 48) and np.isfinite(out.values).all() and (out.values > 0).all()
    with pytest.raises(ValueError, match=r"input_size=50.*multiple of 14.*42 or 56"):
        PatchKNN(encoder="dinov2_vits14", encoder_weights="none", input_size=50).check(48, 3, None)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"distance": "manhattan"}, r"method\.distance='manhattan'.*l2.*cosine"),
        ({"shot_augment": "flip"}, r"method\.shot_augment='flip'.*rot90.*flips_rot90.*rotations"),
        ({"foreground_mask": "otsu"}, r"method\.foreground_mask='otsu'.*none.*pca"),
        ({"image_score_on": "pixels"}, r"method\.image_score_on='pixels'.*map.*patches"),
        ({"encoder": "dinov3"}, r"encoder='dinov3'.*dinov2_vits14"),
    ],
)
def test_bad_option_names_the_valid_ones(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PatchKNN(**kw)


# The anomaly config hashes name results folders: a change must be deliberate. Issue 17 (item 6) adds patch_knn's
# options and changes its default recipe on the measurements in docs/anomaly.md, which changes these on purpose
# (before: 97b34309ba3ddf56 magnetic_tile, 451c3c772d508528 kolektor_sdd; the old recipe, `method.distance=l2
# method.image_score=max method.shot_augment=none`, now hashes to fbbb4f6d4e88c0c6: the new keys enter the identity).
PINNED_ANOMALY_HASHES = {
    ("method=patch_knn", "data=magnetic_tile"): "daf2a9920fdbaa0b",
    ("method=anomalydino", "data=magnetic_tile"): "4d9eeab648eb9a82",
    # AnomalySD's acceptance command (docs/anomalysd.md); `diff_normalise` (added later) at `unit` kept it; the
    # default difference layers changed on purpose from relu1 (eed24e7471cea55d) to relu1-5 (issue 17)
    ("method=anomalysd", "data=kolektor_sdd"): "55816e1096f17147",
    # ... and the relu1 rows measured before stay reachable with the override
    ("method=anomalysd", "data=kolektor_sdd", "method.diff_layers=[1]"): "eed24e7471cea55d",
}


@pytest.mark.parametrize("overrides", list(PINNED_ANOMALY_HASHES), ids=" ".join)
def test_anomaly_config_hashes_are_pinned(hydra_conf, tmp_path, overrides) -> None:
    cfg = hydra_conf(list(overrides), tmp_path)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    cls = METHODS[method_cfg["name"]]
    identity = config_identity(cfg, method_cfg, cls.uses_image_model, set(cls.runtime_keys))
    assert stable_hash(identity) == PINNED_ANOMALY_HASHES[overrides]
