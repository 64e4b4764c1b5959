"""Shared fixtures: paths to the offline data/weights, composed Hydra configs, a tiny real diffusion model."""

from __future__ import annotations

import atexit
import functools
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SHARED = Path(__file__).resolve().parents[2] / "shared"

os.environ.setdefault("OOD_BENCH_DATA", str(SHARED / "data"))
os.environ.setdefault("OOD_BENCH_WEIGHTS", str(SHARED / "weights"))
os.environ.setdefault("PROJECT_ROOT", str(REPO_ROOT))
# No network here: let huggingface_hub fail at once instead of retrying connections.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

# The test machine is a small shared CPU: with more torch threads than free cores, OpenMP spin-waiting makes
# the tiny models here 10-100x slower. One thread (override with OOD_BENCH_TEST_THREADS) keeps them fast;
# subprocesses get OMP_NUM_THREADS through ``subprocess_env`` in test_run.py.
TEST_THREADS = int(os.environ.get("OOD_BENCH_TEST_THREADS", "1"))


def pytest_configure(config):
    import torch

    torch.set_num_threads(TEST_THREADS)


DATA_DIR = Path(os.environ["OOD_BENCH_DATA"])
WEIGHTS_DIR = Path(os.environ["OOD_BENCH_WEIGHTS"])

# Settings that make a full run tiny on a 2-core CPU: a ~20 k parameter UNet without attention in the
# down/up path, a handful of training steps and a short sampler (the `cfg_tiny` fixture: in-process runs).
TINY_MODEL_OVERRIDES = [
    "debug=default",
    "model.unet.block_out_channels=[8,16]",
    "model.unet.down_block_types=[DownBlock2D,DownBlock2D]",
    "model.unet.up_block_types=[UpBlock2D,UpBlock2D]",
    "model.unet.norm_num_groups=4",
    "model.unet.attention_head_dim=8",
    "model.train.steps=5",
    "model.train.batch_size=8",
]
TINY_RUN_OVERRIDES = [*TINY_MODEL_OVERRIDES, "method.reps=2", "method.steps=4"]


def load_script(name: str):
    """``scripts/<name>.py`` as a module (its ``main(argv)`` runs in this process, with this checkout's package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# Offline files that may be absent: one way to need them (docs/testing.md)
# ---------------------------------------------------------------------------------------------------------------

# How a user gets each file or folder the tests read from $OOD_BENCH_WEIGHTS / $OOD_BENCH_DATA (the skip reason).
HOW_TO_GET = {
    "alexnet_features_imagenet.pth": "save torchvision.models.alexnet(weights='IMAGENET1K_V1').features.state_dict() "
    "with torch.save under this name",
    "vgg16_features_imagenet.pth": "save torchvision.models.vgg16(weights='IMAGENET1K_V1').features.state_dict() "
    "with torch.save under this name",
    "dists_alpha_beta.pt": "piq's DISTS release file dists_weights.pt (dict of 'alpha', 'beta'), renamed",
    "cifar10_resnet20-12fca82f.th": "resnet20-12fca82f.th of github.com/akamaster/pytorch_resnet_cifar10, renamed",
    "cifar10_resnet56-4bfd9763.th": "resnet56-4bfd9763.th of github.com/akamaster/pytorch_resnet_cifar10, renamed",
    "MNIST": "torchvision.datasets.MNIST(<folder>, download=True)",
    "FashionMNIST": "torchvision.datasets.FashionMNIST(<folder>, download=True)",
    "cifar10-jpeg": "CIFAR-10 as an image folder {train,test}/<class>/*.jpg (any CIFAR-10 export)",
    "textures-dtd10-jpeg32": "10 DTD classes as <class>/*.jpg at 32 px (docs/testing.md)",
    "iqa_calibration": "the LPIPS/DISTS calibration pairs {ref,dist}/I*.bmp + results_official.csv (docs/testing.md)",
    "magnetic_tile": "github.com/abin24/Magnetic-tile-defect-datasets in MVTec AD layout (conf/category/)",
    "kolektor_sdd": "www.vicos.si/resources/kolektorsdd/ in MVTec AD layout (conf/category/)",
}


def missing_reason(kind: str, *parts: str) -> str | None:
    """Why a test that needs ``<$OOD_BENCH_DATA or $OOD_BENCH_WEIGHTS>/<parts>`` cannot run, or None if it is there.

    ``kind`` is ``"data"`` (a file or folder) or ``"weights"`` (a file). The reason names the path, the variable it
    is looked for through and how to get it (``HOW_TO_GET``, by the first path part); every skip for an absent
    offline file reads ``needs <path>: absent ...`` so that CI can check them (``.ci/check_skips.py``).
    """
    if kind not in ("data", "weights"):
        raise ValueError(f"kind={kind!r} is not valid; valid: ['data', 'weights']")
    folder, var = (DATA_DIR, "OOD_BENCH_DATA") if kind == "data" else (WEIGHTS_DIR, "OOD_BENCH_WEIGHTS")
    path = folder.joinpath(*parts)
    if path.is_file() or (kind == "data" and path.exists()):
        return None
    how = HOW_TO_GET.get(parts[0] if parts else "", "see docs/testing.md")
    return f"needs {path}: absent (looked for in ${var}={folder}, default ../shared/{kind}); get it: {how}"


def shared_path(*parts: str) -> Path:
    """A file or folder under $OOD_BENCH_DATA; the calling test is skipped (``missing_reason``) when it is absent."""
    if reason := missing_reason("data", *parts):
        pytest.skip(reason)
    return DATA_DIR.joinpath(*parts)


def shared_weight(name: str) -> Path:
    """A file under $OOD_BENCH_WEIGHTS; the calling test is skipped (``missing_reason``) when it is absent."""
    if reason := missing_reason("weights", name):
        pytest.skip(reason)
    return WEIGHTS_DIR / name


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.needs_shared(data=[...], weights=[...])``: skip the test (before its fixtures run) when any
    of those offline files is absent, with ``missing_reason``. Entries are paths relative to $OOD_BENCH_DATA /
    $OOD_BENCH_WEIGHTS ("MNIST/raw", "alexnet_features_imagenet.pth"). Use it on tests and fixtures' users alike;
    inside a test body (e.g. one parameter of many) call ``shared_path`` / ``shared_weight`` instead."""
    for item in items:
        for mark in item.iter_markers("needs_shared"):
            if mark.args or set(mark.kwargs) - {"data", "weights"}:
                raise pytest.UsageError(f"{item.nodeid}: needs_shared takes only data=[...] and weights=[...]")
            wanted = [("data", p) for p in mark.kwargs.get("data", ())]
            wanted += [("weights", p) for p in mark.kwargs.get("weights", ())]
            reasons = [r for kind, p in wanted if (r := missing_reason(kind, *Path(p).parts))]
            if reasons:
                item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))


def random_alexnet_features(seed: int = 1) -> dict:
    """A state dict of the names and shapes of ``alexnet_features_imagenet.pth`` with random weights (seed 1: not
    the network of ``encoder_weights=none``, which is seed 0)."""
    import torch
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.alexnet(weights=None).features.state_dict()


@functools.cache
def standin_weights() -> Path:
    """A weights folder (one per test session) holding a random stand-in ``alexnet_features_imagenet.pth``.

    For tests whose check does not depend on ImageNet features (shapes, caching, file bookkeeping, runs that must
    finish): pass this folder as ``weights_dir`` / ``paths.weights_dir``, or its file as
    ``method.encoder_weights`` / ``method.lpips_weights``, instead of skipping without the offline weights. Also
    the fixture ``standin_weights_dir``.
    """
    import shutil
    import tempfile

    import torch

    folder = Path(tempfile.mkdtemp(prefix="ood_bench_standin_weights_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    torch.save(random_alexnet_features(), folder / "alexnet_features_imagenet.pth")
    return folder


@pytest.fixture(scope="session")
def standin_weights_dir() -> Path:
    """``standin_weights()`` as a fixture."""
    return standin_weights()


def compose_config(overrides: list[str], tmp_path: Path):
    """Compose ``config`` with ``overrides`` as ``run.py`` would and point every output folder at ``tmp_path``.

    The caller must be inside ``hydra.initialize_config_dir``. Returns the config without its ``hydra`` node
    (as ``@hydra.main`` hands it to the task), with ``HydraConfig`` set so ``${hydra:...}`` resolves.
    """
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.results_dir = str(tmp_path / "results")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "output")
        cfg.hydra.runtime.output_dir = str(tmp_path / "output")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def compose_with_hydra(overrides: list[str]):
    """``config`` composed as ``run.py`` would, with its ``hydra`` node (launcher, sweeper); outputs untouched."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def hydra_conf():
    """Initialise Hydra on ``<repo>/conf``; yields a function ``compose(overrides, tmp_path)``."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield compose_config
    GlobalHydra.instance().clear()


@pytest.fixture
def cfg_default(hydra_conf, tmp_path):
    """The default config (digits, lmd, unet_small, csv) with outputs in ``tmp_path``."""
    return hydra_conf([], tmp_path)


@pytest.fixture
def cfg_tiny(hydra_conf, tmp_path):
    """The debug config shrunk further (tiny UNet, few steps, MSE distance): a full run takes seconds."""
    return hydra_conf([*TINY_RUN_OVERRIDES, "method.distance=mse"], tmp_path)


def tiny_unet_kwargs(sample_size: int = 8, channels: int = 1) -> dict:
    """A tiny real ``UNet2DModel`` (two levels, no attention blocks in the down/up path)."""
    return dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )


@pytest.fixture(scope="module")
def tiny_diffusion():
    """A randomly initialised (seeded) tiny UNet wrapped with a 1000-step linear DDPM schedule."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from ood_bench.models.diffusion import DiffusionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(**tiny_unet_kwargs(sample_size=8, channels=1)).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return DiffusionModel(unet, dict(sched.config), "test:random")


# The DLSR paper's encoder file (lukemelas' release); not downloadable here, so tests write one of the same shapes.
EFFICIENTNET_B4_FILE = "efficientnet-b4-6ed6700e.pth"


def random_efficientnet_b4_state(seed: int = 0) -> dict:
    """A state dict with the shapes of lukemelas' EfficientNet-B4 checkpoint: random weights and BN statistics."""
    import torch
    from efficientnet_pytorch import EfficientNet

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in EfficientNet.from_name("efficientnet-b4").state_dict().items():
        if key.endswith("running_var"):
            value = torch.rand(value.shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            value = torch.randn(value.shape, generator=g) * 0.1
        elif value.is_floating_point():
            scale = float(value.std()) if value.numel() > 1 and float(value.std()) > 0 else 0.1
            value = torch.randn(value.shape, generator=g) * scale
        state[key] = value
    return state


@pytest.fixture(scope="session")
def weights_dir_with_b4(tmp_path_factory) -> Path:
    """A weights folder: the offline weights (linked; the stand-in AlexNet of ``standin_weights`` where the offline
    one is absent) plus an EfficientNet-B4 file of the paper's name and shapes (random)."""
    import torch

    folder = tmp_path_factory.mktemp("weights_b4")
    for source in (WEIGHTS_DIR, standin_weights()):
        for f in source.iterdir() if source.is_dir() else ():
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f.resolve())
    torch.save(random_efficientnet_b4_state(), folder / EFFICIENTNET_B4_FILE)
    return folder


def small_cnn_cfg(steps: int = 40) -> dict:
    """Settings of a width-8 small CNN classifier that trains in about a second on 8-px digits."""
    train = {"steps": steps, "batch_size": 32, "lr": 0.01, "weight_decay": 0.0, "shift": 1, "hflip": False, "seed": 0}
    return {
        "name": "small_cnn",
        "kind": "small_cnn",
        "width": 8,
        "mean": None,
        "std": None,
        "input_size": None,
        "cam_layer": "features.-1",
        "train": train,
    }


def sklearn_digits(classes: tuple[int, ...] = (0, 1)):
    """The 8x8 sklearn digits of ``classes`` as float ``[N, 1, 8, 8]`` in ``[0, 1]`` and their labels."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, classes)
    return torch.tensor(d.images[keep] / 16.0, dtype=torch.float32)[:, None], d.target[keep]
