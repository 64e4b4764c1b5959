"""Time every method on a fixed small setting: images/s, NFE per image, time per phase, peak memory, loop efficiency.

    python scripts/bench.py [--cases lmd,dlsr,patch_knn] [--threads 1] [--device auto] [--out results/bench]
    python scripts/bench.py --variants     # also: bare UNet forward / training step by precision, layout, compile

Each case (``ood_bench/bench.py``: ``CASES``) is one real run (``run.py`` in process, figures off) from an empty
cache in a temporary folder, so training and feature extraction are timed too. Columns: ``train_s`` (fitting
networks), ``features_s`` (feature extraction or diffusion inversion), ``scoring_s`` (the rest of fit and score:
sampling loops, distances, kNN, metrics), ``total_s`` (the whole run: data loading included; wall seconds) and
``cpu_s`` (its CPU seconds: at ``--threads 1`` on a shared machine, about what it takes alone), ``images_per_s``
(test images scored per second of scoring), ``nfe_per_image`` (network evaluations per test image),
``peak_rss_mb`` / ``peak_cuda_mb``, and for diffusion loops ``efficiency`` = the loop's image-evaluations/s
divided by a bare forward of the same network at the same batch (``rows``) and precision (limit 1.0), both timed
in CPU seconds on CPU (so other jobs on the cores do not skew the ratio) and in wall seconds on CUDA. Writes
``bench.csv`` (and ``variants.csv``) to ``--out`` and prints the table with the machine's load average.

Streaming (``--workers 0,1,2``; empty to skip): for each OOD case, the images/s of decoding and resizing its ID
training images through the lazy split's DataLoader at each ``data.num_workers``, beside the method's own images/s
(``streaming.csv``): where decoding is slower than the method, data loading is the bottleneck (raise
``data.num_workers``); otherwise the network is.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from ood_bench.bench import (
    CASES,
    BenchCase,
    bare_rate,
    clock,
    compose_run_config,
    decode_rate,
    load_average,
    unet_batch,
)
from ood_bench.costs import phase_cpu_seconds
from ood_bench.utils import autocast, resolve_device

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
log = logging.getLogger("bench")


def run_case(case: BenchCase, root: Path, threads: int, device: str) -> dict:
    """Run one case from an empty cache under ``root`` and turn its results row into a bench row."""
    from ood_bench.runner import run

    overrides = [*case.overrides, f"threads={threads}", f"device={device}", "progress=false", "figures.enabled=false"]
    cfg = compose_run_config(CONF, overrides, root)
    load_before = load_average()
    record = run(cfg)
    dev = torch.device(record["device"])
    n_scored = int(record.get("n_id", 0)) + int(record.get("n_ood", 0)) or int(record.get("n_test", 0)) * len(
        str(record.get("shot_seeds", "0")).split(";")
    )
    train_s, features_s = float(record["train_seconds"]), float(record["features_seconds"])
    row = {
        "case": case.name,
        "method": record["method"],
        "data": record["data"],
        "setting": case.note,
        "precision": record.get("precision", ""),
        "train_precision": record.get("train_precision", ""),
        "device": record["device"],
        "threads": threads,
        "n_scored": n_scored,
        "images_per_s": float(record["images_per_s"]),
        "nfe_per_image": float(record["nfe_per_image"]),
        "train_s": train_s,
        "features_s": features_s,
        "scoring_s": round(float(record["fit_seconds"]) + float(record["score_seconds"]) - train_s - features_s, 3),
        "total_s": float(record["seconds"]),
        "cpu_s": float(record["cpu_seconds"]),
        "peak_rss_mb": float(record["peak_rss_mb"]),
        "peak_cuda_mb": record.get("peak_cuda_mb", ""),
        "sampling_s": float(record["sampling_seconds"]),
        "rows": "",
        "loop_evals_per_s": "",
        "bare_evals_per_s": "",
        "efficiency": "",
    }
    if case.loop is not None and row["sampling_s"] > 0:
        make, rows = case.loop(cfg, record)
        # the same clock as bare_rate: CPU seconds on CPU, wall seconds on CUDA
        if dev.type == "cuda":
            loop_s = sum(float(record[f"{p}_seconds"]) for p in case.loop_phases)
        else:
            loop_s = sum(phase_cpu_seconds()[f"{p}_cpu_seconds"] for p in case.loop_phases)
        loop_rate = row["nfe_per_image"] * n_scored / loop_s
        bare = bare_rate(make(rows, dev), rows, dev, record.get("precision") or "fp32")
        row.update(
            rows=rows,
            loop_evals_per_s=round(loop_rate, 1),
            bare_evals_per_s=round(bare, 1),
            efficiency=round(loop_rate / bare, 3),
        )
    row["load_avg"] = f"{load_before} -> {load_average()}"
    return row


def variants(device: torch.device, rows: int = 100, train_rows: int = 64) -> pd.DataFrame:
    """The CPU-default UNet's bare forward (sampling, ``rows``) and training step (``train_rows``) by precision,
    memory layout and ``torch.compile``: what channels-last and compiling buy on this machine."""
    cfg = compose_run_config(CONF, ["method=lmd", "data=fashionmnist_mnist"], Path(tempfile.mkdtemp()))
    out = []
    precisions = ["fp32", "bf16"] if device.type == "cpu" else ["fp32", "bf16", "fp16"]
    for compiled in (False, True):
        for layout in ("contiguous", "channels_last"):
            if compiled and layout == "channels_last":
                continue
            for precision in precisions:
                unet, x, t = unet_batch(cfg, rows, device, channels_last=layout == "channels_last")
                net = torch.compile(unet) if compiled else unet
                now = clock(device)
                t0 = now()
                bare_rate(lambda net=net, x=x, t=t: net(x, t), rows, device, precision, repeats=0)  # compiles
                first_s = now() - t0
                rate = bare_rate(lambda net=net, x=x, t=t: net(x, t), rows, device, precision)
                row = dict(layout=layout, compile=compiled, precision=precision, forward=rate, first_call_s=first_s)
                if not compiled:
                    row["train_step"] = _train_rate(cfg, train_rows, device, precision, layout == "channels_last")
                out.append(row)
    frame = pd.DataFrame(out)
    frame["rows"], frame["train_rows"], frame["threads"] = rows, train_rows, torch.get_num_threads()
    return frame


def _train_rate(cfg, rows: int, device: torch.device, precision: str, channels_last: bool) -> float:
    """Training images per second of the UNet (forward, loss, backward, AdamW step), best of 3 after a warm-up."""
    unet, x, t = unet_batch(cfg, rows, device, channels_last=channels_last)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    times, now = [], clock(device)
    for i in range(4):
        t0 = now()
        with autocast(device, precision):
            loss = (unet(x, t).sample.float() - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(now() - t0)
    return rows / min(times)


def streaming_rows(case: BenchCase, row: dict, root: Path, workers: list[int]) -> list[dict]:
    """Decoding images/s of ``case``'s data at each worker count beside the method's images/s (OOD cases)."""
    cfg = compose_run_config(CONF, list(case.overrides), root)
    if cfg.data.get("task", "ood") != "ood":
        return []
    out = []
    for w in workers:
        rate = decode_rate(cfg.data, w)
        method_rate = float(row["images_per_s"])
        out.append(
            {
                "case": case.name,
                "data": row["data"],
                **rate,
                "decode_images_per_s": round(rate["decode_images_per_s"], 1),
                "method_images_per_s": method_rate,
                "bottleneck": "data" if rate["decode_images_per_s"] < method_rate else "network",
                "load_avg": load_average(),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: comparable on a shared machine)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--keep", type=Path, default=None, help="run folders and caches here (default: a temp dir)")
    parser.add_argument("--variants", action="store_true", help="also time the UNet by precision/layout/compile")
    parser.add_argument("--workers", default="0,1,2", help="data.num_workers to time decoding at ('': skip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        log.error("error: --cases %s not known; valid: %s", unknown, list(CASES))
        return 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    rows, stream = [], []
    with tempfile.TemporaryDirectory(prefix="ood_bench_bench_") as tmp:
        base = args.keep or Path(tmp)
        for name in names:
            log.info("bench case %s ...", name)
            rows.append(run_case(CASES[name], base / name, args.threads, args.device))
            stream += streaming_rows(CASES[name], rows[-1], base / name / "streaming", workers)
    args.out.mkdir(parents=True, exist_ok=True)
    if rows:
        table = pd.DataFrame(rows)
        table.to_csv(args.out / "bench.csv", index=False)
        shown = ["case", "data", "precision", "images_per_s", "nfe_per_image", "train_s", "features_s", "scoring_s"]
        shown += ["total_s", "cpu_s", "peak_rss_mb", "efficiency"]
        print(table[shown].to_markdown(index=False, floatfmt="g"))
        print(
            f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, threads={args.threads}, device={resolve_device(args.device)}; load average "
            f"(1/5/15 min) before -> after each case: " + "; ".join(f"{r['case']}: {r['load_avg']}" for r in rows)
        )
        print(f"written: {args.out / 'bench.csv'}")
    if stream:
        frame = pd.DataFrame(stream)
        frame.to_csv(args.out / "streaming.csv", index=False)
        shown = ["case", "data", "num_workers", "decoded", "decode_images_per_s", "method_images_per_s", "bottleneck"]
        print("\nstreaming: decoding + resizing the ID training images (wall seconds, worker start-up included)")
        print(frame[shown].to_markdown(index=False, floatfmt="g"))
        print(f"written: {args.out / 'streaming.csv'}")
    if args.variants:
        frame = variants(resolve_device(args.device))
        frame.to_csv(args.out / "variants.csv", index=False)
        print(frame.to_markdown(index=False, floatfmt=".1f"))
        print(f"written: {args.out / 'variants.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
