"""Benchmark cases and measurements behind ``scripts/bench.py`` (``make bench``) and ``scripts/lmd_cost_curve.py``.

A bench case is one real run (``python run.py <overrides>``, in process, from an empty cache) of a method on a
fixed small pair or category; its results row gives images/s, NFE per image, the time per phase (training,
features or inversion, scoring; ``ood_bench/costs.py``) and peak memory. A case whose scoring runs a diffusion
loop names its network (``loop``): the bench then times a bare forward of that network at the loop's batch and
precision, and reports the loop's efficiency = loop image-evaluations/s / bare image-evaluations/s (1.0 = no
overhead around the network). A new method is one ``register_case`` call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ood_bench.utils import autocast

# A loop probe: (cfg, results row) -> (make, rows), where make(rows, device) builds a bare forward of the loop's
# network (the run's architecture, random weights: timing does not depend on them) on one batch of `rows` rows.
LoopProbe = Callable[[DictConfig, dict[str, Any]], tuple[Callable[[int, torch.device], Callable[[], Any]], int]]


@dataclass(frozen=True)
class BenchCase:
    """One benchmark row: a method on a fixed small setting."""

    name: str
    overrides: tuple[str, ...]
    loop: LoopProbe | None = None
    note: str = ""
    loop_phases: tuple[str, ...] = ("sampling",)  # the phases (``ood_bench/costs.py``) the loop's NFE run in


CASES: dict[str, BenchCase] = {}


def register_case(case: BenchCase) -> BenchCase:
    if case.name in CASES:
        raise KeyError(f"bench case {case.name!r} is already registered")
    CASES[case.name] = case
    return case


def compose_run_config(conf_dir: Path, overrides: list[str], root: Path) -> DictConfig:
    """``config`` composed as ``run.py`` would, with every output folder under ``root`` (``HydraConfig`` set)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        for key in ("results", "cache", "log", "output"):
            cfg.paths[f"{key}_dir"] = str(root / key)
        cfg.hydra.runtime.output_dir = str(root / "output")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Bare forward passes (the efficiency ratio's denominator)
# --------------------------------------------------------------------------------------------------------------


def clock(device: torch.device) -> Callable[[], float]:
    """The clock the benchmark times with: CPU seconds of this process on CPU (robust to other jobs sharing the
    cores when torch runs one thread), wall seconds on CUDA."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def bare_rate(forward: Callable[[], Any], rows: int, device: torch.device, precision: str, repeats: int = 3) -> float:
    """Image-evaluations per second of ``forward()`` (one pass over ``rows`` rows) at ``precision``: best of
    ``repeats`` timed passes after one warm-up (``clock(device)``)."""
    now = clock(device)
    times = []
    with torch.no_grad(), autocast(device, precision):
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = now()
            forward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(now() - t0)
    return rows / min(times) if times else float("nan")


def unet_batch(
    cfg: DictConfig, rows: int, device: torch.device, channels_last: bool = False, num_class_embeds: int | None = None
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The run's image UNet (``model.unet`` at ``data.image_size``, seeded random weights; class embeddings when
    ``num_class_embeds`` is given), ``rows`` random images and timesteps."""
    from ood_bench.models.diffusion import build_unet

    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    size, ch = int(cfg.data.image_size), int(cfg.data.channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_unet(mcfg["unet"], size, ch, num_class_embeds=num_class_embeds).to(device).eval()
        x = torch.randn(rows, ch, size, size).to(device)
        t = torch.randint(0, int(mcfg["scheduler"]["num_train_timesteps"]), (rows,)).to(device)
    if channels_last:
        unet, x = unet.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return unet, x, t


def unet_forward(cfg: DictConfig, rows: int, device: torch.device) -> Callable[[], Any]:
    """A bare forward of the run's image UNet on ``rows`` random rows."""
    unet, x, t = unet_batch(cfg, rows, device)
    return lambda: unet(x, t)


def lmd_loop(cfg: DictConfig, record: dict[str, Any]):
    """LMD: the UNet at the rows of one batched pass (``min(eval_batch, images per batch * reps)``)."""
    m = cfg.method
    batch = min(int(m.batch_size), max(int(record["n_id"]), int(record["n_ood"])))
    rows = min(int(m.eval_batch), batch * int(m.reps))
    return (lambda r, device: unet_forward(cfg, r, device)), rows


def dlsr_loop(cfg: DictConfig, record: dict[str, Any]):
    """DLSR: the LFDN (an MLP on the feature vectors) at the scoring batch."""
    from ood_bench.models.lfdn import LFDN

    m = cfg.method
    dim = int(record["method.feature_dim"])
    rows = min(int(m.batch_size), int(record["n_id"]), int(record["n_ood"]))

    def make(r: int, device: torch.device) -> Callable[[], Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = LFDN(dim, width=m.width, num_blocks=m.num_blocks, time_embed_dim=m.time_embed_dim).to(device).eval()
            x = torch.randn(r, dim, device=device)
        t = torch.full((r,), int(m.t), device=device, dtype=torch.long)
        return lambda: net(x, t)

    return make, rows


def diffguard_loop(cfg: DictConfig, record: dict[str, Any]):
    """DiffGuard: the class-conditional UNet at the scoring batch (inversion and synthesis; a CFG step is one call
    on twice the rows and counts as two evaluations per image, as ``nfe_per_image`` does)."""
    batch = min(int(cfg.method.batch_size), max(int(record["n_id"]), int(record["n_ood"])))
    classes = 11  # 10 classes + the null class; the number of embeddings does not change the timing

    def make(rows: int, device: torch.device) -> Callable[[], Any]:
        unet, x, t = unet_batch(cfg, rows, device, num_class_embeds=classes)
        y = torch.arange(rows, device=device) % classes
        return lambda: unet(x, t, class_labels=y)

    return make, batch


# --------------------------------------------------------------------------------------------------------------
# The cases of the methods present
# --------------------------------------------------------------------------------------------------------------

SMALL_OOD = ("data=fashionmnist_mnist", "data.n_id_test=100", "data.n_ood_test=100")
register_case(
    BenchCase(
        "lmd",
        ("method=lmd", *SMALL_OOD, "model.train.steps=100"),
        lmd_loop,
        "CPU defaults, 100 training steps (training time scales with the steps)",
    )
)
register_case(BenchCase("dlsr", ("method=dlsr", *SMALL_OOD), dlsr_loop, "CPU defaults"))
SMALL_DIGITS = ("data=digits", "data.n_id_test=100", "data.n_ood_test=100")
register_case(
    BenchCase(
        "diffguard",
        ("method=diffguard", *SMALL_DIGITS, "model.train.steps=300"),
        diffguard_loop,
        "CPU defaults (CFG), 300 training steps of the class-conditional UNet (training time scales with the steps)",
        loop_phases=("features", "sampling"),
    )
)
register_case(BenchCase("msp", ("method=msp", *SMALL_DIGITS), None, "CPU defaults; classifier trained in the case"))
register_case(
    BenchCase(
        "anomalysd",
        (
            "method=anomalysd",
            "data=magnetic_tile",
            "data.n_test=20",
            "data.shot_seeds=[0]",
            "method.unet_steps=60",
        ),
        None,
        "CPU defaults (patch stack: no VAE to train), k = 1, one shot seed, 20 test images, 60 UNet steps",
    )
)
register_case(
    BenchCase(
        "patch_knn",
        ("method=patch_knn", "data=magnetic_tile", "data.n_test=50", "data.shot_seeds=[0]"),
        None,
        "k = 1, one shot seed",
    )
)


# --------------------------------------------------------------------------------------------------------------
# Streaming: decoding throughput of a case's data against the method's own images/s
# --------------------------------------------------------------------------------------------------------------


def decode_rate(data_cfg: DictConfig, num_workers: int, batch_size: int = 64, limit: int = 2048) -> dict[str, Any]:
    """Images/s of decoding and resizing (``ImageSet.batches`` through its DataLoader) the first ``limit`` ID
    training images of ``data_cfg`` with ``num_workers`` workers, in wall seconds (worker start-up included)."""
    import numpy as np

    from ood_bench.tasks.ood import load_pair

    with open_dict(data_cfg):
        data_cfg.num_workers = num_workers
    images = load_pair(data_cfg).id_train.images
    images = images.subset(np.arange(min(limit, len(images))))
    t0, n = time.perf_counter(), 0
    for x in images.batches(batch_size):
        n += len(x)
    seconds = time.perf_counter() - t0
    return {"num_workers": num_workers, "decoded": n, "decode_s": round(seconds, 3), "decode_images_per_s": n / seconds}


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return ""
