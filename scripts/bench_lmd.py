"""Time LMD's inpainting loop (network evaluations per second) for a model size, image size and batch.

    python scripts/bench_lmd.py [--model unet_small] [--size 32] [--channels 1] [--batch 100] [--steps 10]
        [--precision fp32|bf16|fp16]

Uses an untrained UNet of the given architecture (timing does not depend on the weights) on random images.
``scripts/bench.py`` times whole runs of every method (and LMD's loop against a bare forward).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ood_bench.models.diffusion import DiffusionModel, build_unet
from ood_bench.samplers import inpaint, lmd_mask
from ood_bench.utils import resolve_device, sample_generators

log = logging.getLogger("bench_lmd")
CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="unet_small")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}"])
    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    device = resolve_device(args.device)
    unet = build_unet(mcfg["unet"], args.size, args.channels).to(device).eval()
    model = DiffusionModel(unet, dict(mcfg["scheduler"]), "untrained")
    x = torch.rand(args.batch, args.channels, args.size, args.size, device=device) * 2 - 1
    mask = lmd_mask("checkerboard_alt", args.size, 8, 0)
    gens = sample_generators(0, range(args.batch), 0)
    inpaint(model, x, mask, gens, steps=2, precision=args.precision)  # warm-up
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        inpaint(model, x, mask, gens, steps=args.steps, precision=args.precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    nfe = args.batch * args.steps
    log.info(
        "model=%s (%.2f M params) device=%s precision=%s threads=%d image=%dx%dx%d batch=%d steps=%d: best %.2f s, "
        "%.1f image-NFE/s, %.2f ms per image-NFE",
        args.model,
        sum(q.numel() for q in unet.parameters()) / 1e6,
        device,
        args.precision,
        torch.get_num_threads(),
        args.channels,
        args.size,
        args.size,
        args.batch,
        args.steps,
        best,
        nfe / best,
        1000 * best / nfe,
    )


if __name__ == "__main__":
    main()
