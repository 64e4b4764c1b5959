"""Check the cost planner (``plan=true``) against finished runs: predicted vs measured CPU seconds on this machine.

    PYTHONPATH=. python scripts/plan_check.py RESULTS_DIR [...] [--calibrate [--rates FILE]] [--out FILE.csv]

Every complete run folder under the results folders (``<method>/<data>/<hash>/{summary.csv, config.yaml, DONE}``)
is planned again from its saved config (``ood_bench.plan.plan_cell``: no data decoded, no network run) and its
predicted CPU seconds on one core are put beside the run's measured ``cpu_seconds`` (process CPU time: with
``threads=1`` about what the run takes alone on a core, even on a shared machine). The prediction uses the FLOP/s
that ``make bench`` measured (``ood_bench.plan.cpu_rates``); ``--calibrate`` also times the same bare networks
now, in this process (CPU seconds, best of 3, one thread), and adds the prediction with those rates: a
calibration taken in the same conditions as the runs when the machine is loaded differently than during the bench.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from ood_bench import plan
from ood_bench.bench import bare_rate, load_average

log = logging.getLogger("plan_check")


def calibrate() -> dict[tuple[str, str], float]:
    """This machine's FLOP/s now, for the networks and batches behind ``plan.cpu_rates``."""
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    rates: dict[tuple[str, str], float] = {}
    nets = {
        "forward": (plan._unet_small_probe(32, 1), 200),  # LMD's bench loop network and rows
        "forward_mlp": (plan.lfdn_probe(1152, 512, 4, 256), 100),  # DLSR's LFDN (AlexNet features) at its batch
    }
    for key, (probe, rows) in nets.items():
        torch.manual_seed(0)
        net = probe.build().eval()
        args, kwargs = probe.example(rows, cpu)
        for precision in ("fp32", "bf16"):
            rate = bare_rate(lambda net=net, a=args, k=kwargs: net(*a, **k), rows, cpu, precision)
            rates[(key, precision)] = rate * plan.measure(probe, "forward").flops
    probe = plan._unet_small_probe(32, 1)  # the bench's --variants training step: batch 64
    torch.manual_seed(0)
    net = probe.build().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    args, kwargs = probe.example(64, cpu)
    for precision in ("fp32", "bf16"):
        times = []
        for i in range(4):
            t0 = time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = net(*args, **kwargs).sample.float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.process_time() - t0)
        rates[("train", precision)] = 64 / min(times) * plan.measure(probe, "train").flops
    return rates


def predicted_seconds(cell: plan.CellPlan, rates: dict[tuple[str, str], float] | None = None) -> dict[str, float]:
    """Predicted CPU seconds of a planned cell per phase, with the bench's rates or ``rates``."""
    saved = plan.cpu_rates
    if rates is not None:
        plan.cpu_rates = lambda: rates  # type: ignore[assignment]
    try:
        out = {"train": 0.0, "score": 0.0}
        for stage in cell.stages:
            out[stage.phase] += plan.cpu_seconds(stage)
    finally:
        plan.cpu_rates = saved
    out["total"] = out["train"] + out["score"]
    return out


def runs(folders: list[Path]) -> list[tuple[Path, dict]]:
    found = []
    for folder in folders:
        for done in sorted(folder.rglob("DONE")):
            run_dir = done.parent
            summary = pd.read_csv(run_dir / "summary.csv")
            found.append((run_dir, summary.iloc[0].to_dict()))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results folders (paths.results_dir of the runs)")
    parser.add_argument("--calibrate", action="store_true", help="also predict with FLOP/s measured now")
    parser.add_argument("--rates", type=Path, default=None, help="--calibrate: read the rates from / save them to")
    parser.add_argument("--out", type=Path, default=None, help="write the comparison as CSV here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    now = None
    if args.calibrate and args.rates is not None and args.rates.is_file():
        now = {tuple(k.split("/")): v for k, v in json.loads(args.rates.read_text()).items()}
    elif args.calibrate:
        t0, load = time.process_time(), load_average()
        now = calibrate()
        print(f"calibrated in {time.process_time() - t0:.1f} CPU s, load average before: {load}")
        if args.rates is not None:
            args.rates.write_text(json.dumps({"/".join(k): v for k, v in now.items()}, indent=1))
    rows = []
    for run_dir, record in runs([r for r in args.results if r.is_dir()]):
        cfg = OmegaConf.load(run_dir / "config.yaml")
        cell = plan.plan_cell(cfg)
        bench = predicted_seconds(cell)
        row = {
            "method": record["method"],
            "data": record["data"],
            "measured_cpu_s": float(record["cpu_seconds"]),
            "predicted_s": round(bench["total"], 1),
            "ratio": round(float(record["cpu_seconds"]) / bench["total"], 2),
            "predicted_train_s": round(bench["train"], 1),
            "predicted_score_s": round(bench["score"], 1),
            "measured_wall_s": float(record["seconds"]),
        }
        if now is not None:
            same = predicted_seconds(cell, now)
            row["predicted_now_s"] = round(same["total"], 1)
            row["ratio_now"] = round(float(record["cpu_seconds"]) / same["total"], 2)
        rows.append(row)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt="g"))
    if now is not None:
        bench = plan.cpu_rates()
        print("\nFLOP/s (GFLOP/s): " + ", ".join(
            f"{k[0]}/{k[1]}: bench {bench.get(k, float('nan')) / 1e9:.3g}, now {v / 1e9:.3g}" for k, v in now.items()
        ))  # fmt: skip
    print(f"load average (1/5/15 min): {load_average()}; {os.cpu_count()} cores")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
