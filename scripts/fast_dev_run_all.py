"""Run every experiment overlay under ``debug=fast_dev_run`` on synthetic data; tabulate parameters, time, memory.

Each overlay runs as ``python run.py experiment=<overlay> debug=fast_dev_run threads=1 -m`` (all its sweep cells) in
its own process, with its own results and cache folders (nothing is shared between overlays, so each starts cold),
on the synthetic datasets of ``tests/synthetic_layouts.py`` written in their real layouts into ``--data``.
Per overlay: the sweep cells done / expected, the parameters of the networks the largest cell evaluated
(``fast_dev_run_params``, counted in the run), wall seconds and the peak RSS of the process (``os.wait4``).
Writes ``<out>/fast_dev_run.csv`` and ``<out>/fast_dev_run.md``.

Usage: python scripts/fast_dev_run_all.py [--overlays lmd_cpu,dlsr_cpu] [--out /tmp/fdr] [--data /tmp/fdr/data]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

# cheapest first (measured here); overlays not listed run after these, alphabetically
ORDER = (
    "lmd_table1_cpu",
    "lmd_cpu",
    "dlsr_table1_cpu",
    "dlsr_cpu",
    "diffguard_table1_cpu",
    "anomalysd_cpu",
    "classifier_baselines_table1",
    "lmd_table10",
    "lmd_table1",
    "lmd_diffpath_table3",
    "diffguard_table1",
    "dlsr_table8",
    "dlsr_table10",
    "dlsr_table1",
    "dlsr_table3",
    "diffguard_table2",
    "anomalysd_visa_1shot",
    "anomalysd_mvtec_1shot",
)
METRICS = ("auroc", "image_auroc")  # the headline of each task (ood_bench/tasks/*.py)


@dataclass
class OverlayResult:
    overlay: str
    cells: int
    expected_cells: int
    params: int
    seconds: float
    peak_rss_mb: float
    returncode: int
    finite: bool
    status: str
    overrides: str = ""


def overlays() -> list[str]:
    names = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def expected_cells(overlay: str, extra: list[str] = ()) -> int:
    """The product of the overlay's sweep lists (``hydra.sweeper.params``); a key set in ``extra`` counts once."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", [f"experiment={overlay}"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params or {})
    fixed = {o.split("=", 1)[0] for o in extra}
    return math.prod(1 if k in fixed else len(str(v).split(",")) for k, v in params.items())


def read_rows(results: Path) -> list[dict[str, str]]:
    """The results rows (``summary.csv``) of every completed cell under ``results``."""
    rows = []
    for summary in sorted(results.glob("*/*/*/summary.csv")):
        if (summary.parent / "DONE").is_file():
            with summary.open() as f:
                rows += list(csv.DictReader(f))
    return rows


def run_overlay(
    overlay: str, data: Path, out: Path, timeout: float | None = None, extra: list[str] = ()
) -> OverlayResult:
    """One overlay, all cells (fewer when ``extra`` overrides narrow them), in a subprocess; its rows, seconds and
    peak RSS."""
    folder = out / overlay
    results = folder / "results"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        f"experiment={overlay}",
        "debug=fast_dev_run",
        "threads=1",
        "overwrite=true",
        f"paths.results_dir={results}",
        f"paths.cache_dir={folder / 'cache'}",
        f"hydra.sweep.dir={folder / 'multirun'}",
        *extra,
        "-m",
    ]
    env = {
        **os.environ,
        "OOD_BENCH_DATA": str(data),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PROJECT_ROOT": str(ROOT),
    }
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (folder / "log.txt").open("w") as log:
        proc = subprocess.Popen(["nice", "-n", "5", *cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0) if timeout is None else _wait(proc, timeout)
        except TimeoutError:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    rows = read_rows(results)
    finite = bool(rows) and all(math.isfinite(float(r[m])) for r in rows for m in METRICS if r.get(m) not in (None, ""))
    has_metric = all(any(r.get(m) not in (None, "") for m in METRICS) for r in rows)
    expected = expected_cells(overlay, list(extra))
    cells = len({r["config_hash"] for r in rows})
    ok = proc.returncode == 0 and cells == expected and finite and has_metric
    params = max((int(float(r.get("fast_dev_run_params") or 0)) for r in rows), default=0)
    return OverlayResult(
        overlay,
        cells,
        expected,
        params,
        round(seconds, 1),
        round(usage.ru_maxrss / 1024, 1),
        proc.returncode,
        finite,
        "ok" if ok else "FAILED (see log.txt)",
        " ".join(extra),
    )


def _wait(proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        time.sleep(1)
    raise TimeoutError


def write_table(results: list[OverlayResult], out: Path) -> None:
    from ood_bench.fast_dev_run import fmt_params

    with (out / "fast_dev_run.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    lines = [
        "| overlay | cells | parameters (largest cell) | seconds | peak RSS (MB) | status | extra overrides |",
        "|:--|--:|--:|--:|--:|:--|:--|",
    ]
    for r in results:
        lines.append(
            f"| {r.overlay} | {r.cells}/{r.expected_cells} | {fmt_params(r.params)} | {r.seconds:.0f} | "
            f"{r.peak_rss_mb:.0f} | {r.status} | {r.overrides} |"
        )
    (out / "fast_dev_run.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[OverlayResult]:
    from synthetic_layouts import write_all

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overlays", default=None, help="comma-separated overlay names (default: all, cheapest first)")
    p.add_argument("--out", type=Path, default=ROOT / "fast_dev_run" / "all")
    p.add_argument("--data", type=Path, default=None, help="synthetic data folder (default: <out>/data)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per overlay")
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        help="overrides for every overlay run (e.g. one sweep cell: method=anomalysd_sd); recorded in the table",
    )
    args = p.parse_args(argv)
    names = args.overlays.split(",") if args.overlays else overlays()
    unknown = sorted(set(names) - set(overlays()))
    if unknown:
        raise SystemExit(f"--overlays: {unknown} are not overlays; valid: {overlays()}")
    args.out.mkdir(parents=True, exist_ok=True)
    data = write_all(args.data or args.out / "data")
    results = []
    for name in names:
        res = run_overlay(name, data, args.out, args.timeout, args.extra)
        print(
            f"{name}: {res.status}, {res.cells}/{res.expected_cells} cells, {res.params} params, "
            f"{res.seconds} s, {res.peak_rss_mb} MB",
            flush=True,
        )
        results.append(res)
        previous = []
        if (args.out / "fast_dev_run.csv").is_file():  # keep the rows of overlays run before, one row each
            with (args.out / "fast_dev_run.csv").open() as f:
                previous = [r for r in csv.DictReader(f) if r["overlay"] not in {x.overlay for x in results}]
        merged = [_from_row(r) for r in previous] + results
        write_table(sorted(merged, key=lambda r: overlays().index(r.overlay)), args.out)
    print((args.out / "fast_dev_run.md").read_text())
    return results


def _from_row(row: dict[str, str]) -> OverlayResult:
    types = OverlayResult.__annotations__
    conv = {"int": int, "float": float, "bool": lambda v: v == "True", "str": str}
    return OverlayResult(**{k: conv[types[k]](v) for k, v in row.items()})


if __name__ == "__main__":
    main()
