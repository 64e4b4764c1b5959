"""LMD's AUROC against its cost: sampler steps x repeats x precision, one trained model per training setting.

    python scripts/lmd_cost_curve.py --csv docs/speed/curve.csv [--steps 5,10,20,50,100] [--reps 10]
        [--precisions bf16,fp32] [--label name] [hydra overrides: model.train.steps=500 paths.cache_dir=...]
    python scripts/lmd_cost_curve.py --csv docs/speed/curve.csv --sampler ddpm --steps 1000 --subset 25  # reference
    python scripts/lmd_cost_curve.py --plot docs/speed/curve.csv --out docs/speed/lmd_cost_curve.png

Fits ``method=lmd`` on the pair once (the trained model comes from the cache when it is there), then scores the
test sets for every (precision, steps) with ``--reps`` repeats. Repeat r's inpaintings do not depend on how many
repeats a run has (mask and noise are keyed by r), so the curve for 1..reps repeats is the median over the first
k per-repeat distances of one run (``dist_rep``): exactly what ``method.reps=k`` scores. Every inpainting goes
through LMD's cache, so an interrupted curve resumes and a repeated one costs no network call. ``--subset n``
scores the first n ID and n OOD test images only (for the 1000-step reference) and adds our settings on the same
subset. Each pass also records its sampling seconds (wall) and CPU seconds (``score_cpu_s``: at ``--threads 1``
about what the pass takes on an idle core), the network calls it ran, the loop's and a bare UNet forward's
image-evaluations per CPU second at the same batch and precision (their ratio: the loop's efficiency) and the load
average.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from ood_bench.bench import bare_rate, compose_run_config, load_average, unet_forward
from ood_bench.cache import ArtifactCache
from ood_bench.costs import phase_cpu_seconds, phase_seconds, reset_phases
from ood_bench.methods import Context, build_method
from ood_bench.metrics import ood_metrics
from ood_bench.tasks.ood import load_pair
from ood_bench.utils import count_calls, resolve_device

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("lmd_cost_curve")


def curve(args: argparse.Namespace) -> pd.DataFrame:
    overrides = ["method=lmd", f"data={args.data}", f"method.reps={args.reps}", *args.overrides]
    cfg = compose_run_config(ROOT / "conf", overrides, Path(tempfile.mkdtemp(prefix="lmd_curve_")))
    if not any(o.startswith("paths.cache_dir=") for o in args.overrides):
        cfg.paths.cache_dir = str(ROOT / ".cache")
    for o in args.overrides:  # compose_run_config moved every path; put back the ones given
        if o.startswith("paths."):
            key, value = o.split("=", 1)
            OmegaConf.update(cfg, key, value)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pair = load_pair(cfg.data)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(sample_size=cfg.data.image_size, channels=cfg.data.channels)
    ctx = Context(
        device=device,
        cache=ArtifactCache(cfg.paths.cache_dir),
        seed=cfg.seed,
        weights_dir=Path(cfg.paths.weights_dir),
        model_cfg=model_cfg,
        progress=args.progress,
    )
    lmd = build_method(OmegaConf.to_container(cfg.method, resolve=True))
    lmd.sampler = args.sampler
    t0 = time.perf_counter()
    lmd.fit(pair.id_train.images, ctx)
    log.info("fit in %.1f s (model %s)", time.perf_counter() - t0, lmd.model.source)
    n = args.subset
    sides = [(s.images[:n], s.indices[:n]) if n else (s.images, s.indices) for s in (pair.id_test, pair.ood_test)]
    train = model_cfg["train"]
    rows = []
    for precision in args.precisions.split(","):
        for steps in [int(s) for s in args.steps.split(",")]:
            lmd.steps, lmd.precision = steps, precision
            reset_phases()
            load_before, cpu0 = load_average(), time.process_time()
            with count_calls(lmd.model.unet) as calls:
                dists = [lmd.score(images, ctx, indices=idx).extras["dist_rep"] for images, idx in sides]
            seconds, cpu_s = phase_seconds()["sampling_seconds"], time.process_time() - cpu0
            batch = min(lmd.eval_batch, min(lmd.batch_size, max(len(x) for x, _ in sides)) * lmd.reps)
            timing = {
                "fresh_calls": calls[0],
                "sampling_s": seconds,
                "score_cpu_s": cpu_s,  # the whole scoring pass (sampling and distances), CPU seconds of all threads
                "load_avg": f"{load_before} -> {load_average()}",
            }
            if calls[0]:
                rate = bare_rate(unet_forward(cfg, batch, device), batch, device, precision)
                fresh_evals = sum(len(d) for d in dists) * lmd.reps * steps
                loop_s = seconds if device.type == "cuda" else phase_cpu_seconds()["sampling_cpu_seconds"]
                timing.update(batch=batch, loop_evals_per_s=fresh_evals / loop_s, bare_evals_per_s=rate)
                timing["efficiency"] = timing["loop_evals_per_s"] / rate
            for k in range(1, lmd.reps + 1):
                s_id, s_ood = (np.median(d[:, :k], axis=1) for d in dists)
                m = ood_metrics(s_id, s_ood)
                rows.append(
                    {
                        "label": args.label,
                        "data": args.data,
                        "train_steps": train["steps"],
                        "train_precision": train.get("precision", "fp32"),
                        "model": lmd.model.source,
                        "sampler": args.sampler,
                        "steps": steps,
                        "reps": k,
                        "precision": precision,
                        "nfe_per_image": k * steps,
                        "auroc": m["auroc"],
                        "fpr95": m["fpr95"],
                        "n_id": len(s_id),
                        "n_ood": len(s_ood),
                        "subset": f"first{n}" if n else "all",
                        "threads": args.threads,
                        "device": str(device),
                        **(timing if k == lmd.reps else {}),
                    }
                )
            log.info(
                "%s %s x %d steps: AUROC %.4f (%d reps), %d fresh network calls in %.1f s (load %s)",
                precision,
                args.sampler,
                steps,
                rows[-1]["auroc"],
                lmd.reps,
                calls[0],
                seconds,
                timing["load_avg"],
            )
    return pd.DataFrame(rows)


def merge(csv: Path, new: pd.DataFrame) -> pd.DataFrame:
    """Add ``new`` to the CSV: a row with the same setting replaces the old one, unless the new one only re-read
    the cache (then the old timing columns are kept)."""
    key = ["label", "data", "train_steps", "train_precision", "sampler", "steps", "reps", "precision", "subset"]
    if not csv.is_file():
        return new
    old = pd.read_csv(csv)
    merged = pd.concat([old, new], ignore_index=True)
    fresh = merged["fresh_calls"].fillna(0) > 0
    merged["_order"] = np.where(fresh, 1, 0)
    merged = merged.sort_values("_order", kind="stable").drop_duplicates(key, keep="last")
    return merged.drop(columns="_order").sort_values(key).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--csv", type=Path, required=False, help="curve rows are merged into this CSV")
    p.add_argument("--data", default="fashionmnist_mnist")
    p.add_argument("--steps", default="5,10,20,50,100")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--subset", type=int, default=0, help="score only the first n ID and n OOD test images")
    p.add_argument("--label", default="", help="a name for the training setting")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--plot", type=Path, nargs="*", help="draw the curve from these CSVs instead of computing")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "speed" / "lmd_cost_curve.png")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (model.train.steps=500, paths.cache_dir=...)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.plot:
        from ood_bench.figures.ood import lmd_cost_curve

        points = pd.concat([pd.read_csv(c) for c in args.plot], ignore_index=True)
        log.info("written: %s", lmd_cost_curve(points, args.out))
        return 0
    if args.csv is None:
        p.error("--csv is required unless --plot is given")
    new = curve(args)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    merge(args.csv, new).to_csv(args.csv, index=False)
    log.info("written: %s (%d rows)", args.csv, len(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
