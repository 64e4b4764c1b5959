"""Paired comparisons of two methods (``make tables ARGS="--compare lmd,dlsr"``, ``ood_bench.compare``).

For every data pair or benchmark both methods have run (the latest run of each, by ``runs.csv`` order), the
per-sample scores are joined on the samples they share (split, OOD set, sample index) and the AUROC difference
a - b is tested with DeLong's test for correlated ROC curves (``ood_bench/metrics/paired.py``); a benchmark gets a
row per OOD set and its near / far / all means (the mean's test accounts for the shared ID samples).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import pandas as pd

from ood_bench.metrics.paired import delong_mean_test
from ood_bench.report.tables import Table, _pct, is_anomaly, load_runs, run_dir

log = logging.getLogger(__name__)

KEYS = ["split", "ood_set", "sample_index"]


def _scores(folder: os.PathLike[str]) -> pd.DataFrame | None:
    path = os.path.join(folder, "scores.csv")
    if not os.path.isfile(path):
        return None
    frame = pd.read_csv(path, keep_default_na=False)
    if "split" not in frame or "sample_index" not in frame:
        return None
    if "ood_set" not in frame:
        frame["ood_set"] = ""
    frame["ood_set"] = frame["ood_set"].astype(str)
    return frame[[*KEYS, *(["group"] if "group" in frame else []), "score"]]


def paired_rows(a: pd.DataFrame, b: pd.DataFrame) -> list[dict[str, Any]]:
    """Tests on the samples both score tables share: a row per OOD set ("" for a pair), then the group means."""
    both = a.merge(b[[*KEYS, "score"]], on=KEYS, suffixes=("_a", "_b"))
    ids = both[both["split"] == "id"].sort_values("sample_index")
    oods = both[both["split"] == "ood"]
    sets = list(dict.fromkeys(oods["ood_set"]))
    groups = {s: str(oods.loc[oods["ood_set"] == s, "group"].iloc[0]) if "group" in oods else "" for s in sets}
    rows = []

    def test(name: str, group: str, members: list[str]) -> None:
        parts = [oods[oods["ood_set"] == s].sort_values("sample_index") for s in members]
        result = delong_mean_test(
            ids["score_a"].to_numpy(), [p["score_a"].to_numpy() for p in parts],
            ids["score_b"].to_numpy(), [p["score_b"].to_numpy() for p in parts],
        )  # fmt: skip
        rows.append(
            {"ood_set": name, "group": group, "n_id": len(ids), "n_ood": sum(len(p) for p in parts),
             **result.as_dict()}
        )  # fmt: skip

    if ids.empty or oods.empty:
        return rows
    for s in sets:
        test(s, groups[s], [s])
    if len(sets) > 1:
        for mean in ("near", "far", "all"):
            members = [s for s in sets if mean == "all" or groups[s] == mean]
            if members:
                test(mean, "mean", members)
    return rows


def compare_runs(results_dir: str | os.PathLike[str], method_a: str, method_b: str) -> pd.DataFrame:
    """Paired DeLong tests of ``method_a`` against ``method_b`` on every data both have (latest run of each)."""
    runs = load_runs(results_dir)
    runs = runs[~is_anomaly(runs)].copy()
    known = sorted(set(runs["method"]))
    runs["method"] = runs["method"].astype(str)
    picked = []
    for spec in (method_a, method_b):
        name, _, prefix = spec.partition("@")  # "dlsr@1a2b": only the runs whose config hash starts with 1a2b
        chosen = runs[(runs["method"] == name) & runs["config_hash"].astype(str).str.startswith(prefix)]
        if chosen.empty:
            raise ValueError(
                f"--compare: {spec!r} has no OOD runs in {results_dir}; methods with runs: {known} "
                f"(pick one setting of a method with <method>@<config hash prefix>)"
            )
        picked.append(chosen.assign(spec=spec))
    runs = pd.concat(picked, ignore_index=True)
    latest = runs.groupby(["spec", "data"], sort=False).tail(1)
    out = []
    shared = set(latest.loc[latest["spec"] == method_a, "data"]) & set(latest.loc[latest["spec"] == method_b, "data"])
    for data in sorted(shared):
        ra = latest[(latest["spec"] == method_a) & (latest["data"] == data)].iloc[0]
        rb = latest[(latest["spec"] == method_b) & (latest["data"] == data)].iloc[0]
        sa, sb = _scores(run_dir(results_dir, ra)), _scores(run_dir(results_dir, rb))
        if sa is None or sb is None:
            log.warning("%s: a run lacks scores.csv with split and sample_index; not compared", data)
            continue
        rows = paired_rows(sa, sb)
        if not rows:
            log.warning(
                "%s: the runs of %s and %s share no ID or no OOD sample; not compared", data, method_a, method_b
            )
        for r in rows:
            out.append({"data": data, **r, "config_a": ra["config_hash"], "config_b": rb["config_hash"]})
    return pd.DataFrame(out)


def _p_cell(p: float) -> str:
    return "" if p is None or (isinstance(p, float) and math.isnan(p)) else ("< 1e-4" if p < 1e-4 else f"{p:.4f}")


def compare_table(results_dir: str | os.PathLike[str], method_a: str, method_b: str) -> Table:
    """The comparison as a ``Table`` (``compare_<a>_vs_<b>.{md,tex,csv}``)."""
    data = compare_runs(results_dir, method_a, method_b)
    display = pd.DataFrame(
        [
            {
                "data": r["data"],
                "OOD set": r["ood_set"],
                "group": r["group"],
                f"AUROC {method_a}": _pct(r["auroc_a"]),
                f"AUROC {method_b}": _pct(r["auroc_b"]),
                "Δ (a − b)": f"{100 * r['delta']:+.2f}",
                "SE": _pct(r["se"]),
                "p (DeLong)": _p_cell(r["p_value"]),
                "n ID/OOD": f"{int(r['n_id'])}/{int(r['n_ood'])}",
            }
            for _, r in data.iterrows()
        ]
    )
    title = (
        f"Paired comparison {method_a} vs {method_b} on the samples both scored (%, Δ = {method_a} − {method_b}, "
        f"DeLong's test for correlated ROC curves, two-sided)"
    )
    notes = ["Latest run of each method per data; a benchmark's near/far/all rows test the mean over its OOD sets."]
    return Table(f"compare_{method_a}_vs_{method_b}", title, data, display, notes)


def compare(
    method_a: str, method_b: str, results_dir: str | os.PathLike[str] | None = None
) -> pd.DataFrame:  # the API's entry
    """``compare_runs`` on the configured results folder (``ood_bench.compare``)."""
    if results_dir is None:
        from ood_bench.api import compose

        results_dir = compose().paths.results_dir
    return compare_runs(results_dir, method_a, method_b)


__all__ = ["compare", "compare_runs", "compare_table", "paired_rows"]
