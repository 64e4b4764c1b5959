"""Paper tables from ``results/runs.csv``: ours next to the papers' numbers, honestly.

* Runs that differ only in their seeds (same ``setting_hash``) are one setting: mean ± std over the seeds, and a
  seeded bootstrap 95 % interval of the mean AUROC from the run folders' per-sample scores.
* A run matches a paper row by method, data pair (``<id>_<ood>``, paper names mapped by ``DATASET_ALIASES``) and,
  for methods with score variants, the variant (``SETTING_COLUMN``).
* Every matched setting is checked against the paper's protocol (``PAPER_PROTOCOL``: encoder or model, sampler
  budget, resize protocol, precision) and the full test sets; a row that differs says how, its delta is shown in
  brackets, and the deviations its experiment overlay declared (``deviations`` in the results row) are footnotes.
  Such a row is never presented as a reproduction.
* Settings that match no paper row go to the ``ours`` table.
* Benchmark runs (``task`` = ``bench``) go to their own ``bench`` table: a row per OOD set and the near, far and all
  means, from each run's ``rows.csv``.
* Anomaly-detection runs (rows with ``image_auroc``) go to their own ``anomaly`` table: each run already holds the
  mean and std over its shot seeds (and categories), printed with the anomaly metric convention.

Values are percentages, as the papers print them; Δ = ours − paper in points.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ood_bench.metrics import ANOMALY_CONVENTION, CONVENTION
from ood_bench.metrics.anomaly import ANOMALY_METRICS
from ood_bench.metrics.bootstrap import auroc_ci
from ood_bench.results.store import read_csv_text

log = logging.getLogger(__name__)

PAPER_COLUMNS = ["paper", "table", "id_dataset", "ood_dataset", "method", "setting", "metric", "value", "source"]
METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_oodpos", "fpr95_pct")
NUMERIC = (*METRICS, "n_id", "n_ood", "seed", "seconds", "score_seconds", "nfe_per_image", "images_per_s")

# Dataset names in the papers' tables -> the suite's dataset names (as in conf/data/<id>_<ood>.yaml).
DATASET_ALIASES = {"lsun-c": "lsun", "lsun-r": "lsun_resize", "fashion-mnist": "fashionmnist", "dtd": "textures"}

# The results column that names a paper row's ``setting`` for methods whose settings are score variants.
# Methods not listed match every setting of their (method, pair) row.
SETTING_COLUMN = {"dlsr": "method.score"}


@dataclass(frozen=True)
class Check:
    """One setting of a paper's protocol: results column, the paper's value, a label; ``prefix``: startswith."""

    column: str
    paper: Any
    label: str
    prefix: bool = False

    def differs(self, row: Mapping[str, Any]) -> str | None:
        """How ``row`` differs from the paper here (``None``: as the paper; unknown values count as differing)."""
        ours = row.get(self.column, "")
        ours = "" if ours is None or (isinstance(ours, float) and math.isnan(ours)) else str(ours)
        if self.prefix:
            same = ours.startswith(str(self.paper))
        else:
            try:
                same = float(ours) == float(self.paper)
            except ValueError:
                same = ours == str(self.paper)
        if same:
            return None
        shown = ours.split("(")[0] if ours else "unknown"
        return f"{self.label} {shown} (paper {self.paper})"


# The settings that produced each method's published numbers (the official code's defaults, see
# docs/methods.md): a matched row whose run differs in any of them is marked, never silently compared.
PAPER_PROTOCOL: dict[str, list[Check]] = {
    "dlsr": [
        Check("method.encoder", "efficientnet-b4", "encoder"),
        Check("method.input_size", 224, "input size"),
        Check("resize_protocol", "direct", "resize protocol"),
        Check("precision", "fp16", "test-pass precision"),
    ],
    "lmd": [
        Check("model", "unet_ddpm", "diffusion model"),
        Check("method.sampler", "ddpm", "sampler"),
        Check("method.steps", 1000, "sampling steps"),
        Check("method.reps", 10, "repeats"),
        Check("method.mask", "checkerboard_alt", "mask"),
        Check("method.distance_used", "lpips-alex", "distance", prefix=True),
        Check("resize_protocol", "direct", "resize protocol"),
        Check("precision", "fp32", "sampling precision"),
        Check("train_precision", "fp32", "training precision"),
    ],
}


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def load_runs(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``runs.csv``: the latest row of each run (config hash), numbers as numbers."""
    index = Path(results_dir) / "runs.csv"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: run `python run.py ...` first (or pass --results)")
    runs = read_csv_text(index).drop_duplicates("config_hash", keep="last").reset_index(drop=True)
    if "setting_hash" not in runs:
        runs["setting_hash"] = ""
    runs["setting_hash"] = runs["setting_hash"].where(runs["setting_hash"] != "", runs["config_hash"])
    anomaly_cols = (*ANOMALY_METRICS, *(f"{m}_std" for m in ANOMALY_METRICS))
    for col in (*NUMERIC, *anomaly_cols):  # "" (a column another kind of run does not have) becomes NaN
        if col in runs:
            runs[col] = _numeric(runs[col])
    return runs


def _numeric(column: pd.Series) -> pd.Series:
    """A results column as numbers: empty cells and ``nan`` (a std over one shot seed) become NaN."""
    return pd.to_numeric(column.replace({"": np.nan, "nan": np.nan, "NaN": np.nan}))


def load_paper(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The papers' numbers (``PAPER_COLUMNS``) with the suite's pair name of each row (``pair``)."""
    paper = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in PAPER_COLUMNS if c not in paper]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing; expected {PAPER_COLUMNS}")
    paper["value"] = pd.to_numeric(paper["value"])
    ood = paper["ood_dataset"].str.lower().map(lambda d: DATASET_ALIASES.get(d, d))
    paper["pair"] = paper["id_dataset"].str.lower().map(lambda d: DATASET_ALIASES.get(d, d)) + "_" + ood
    paper.loc[paper["ood_dataset"] == "", "pair"] = paper["id_dataset"]
    return paper


def run_dir(results_dir: str | os.PathLike[str], row: Mapping[str, Any]) -> Path:
    return Path(results_dir) / str(row["method"]) / str(row["data"]) / str(row["config_hash"])


def is_anomaly(runs: pd.DataFrame) -> pd.Series:
    """Which rows of ``runs`` are anomaly-detection runs (they have ``image_auroc``; OOD rows leave it empty)."""
    return runs["image_auroc"].notna() if "image_auroc" in runs else pd.Series(False, index=runs.index)


def _scores(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """ID and OOD scores of an OOD run folder; ``None`` without ``scores.csv`` or without its ``split`` column
    (an anomaly run's per-image scores have no ID/OOD split)."""
    path = folder / "scores.csv"
    if not path.is_file():
        return None
    if "split" not in pd.read_csv(path, nrows=0).columns:
        return None
    frame = pd.read_csv(path, usecols=["split", "score"])
    split, score = frame["split"].astype(str).to_numpy(), frame["score"].to_numpy(dtype=np.float64)
    return score[split == "id"], score[split == "ood"]


def _test_caps(folder: Path) -> tuple[Any, Any]:
    """``data.n_id_test`` and ``data.n_ood_test`` the run was configured with (``"?"`` when unknown)."""
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())["data"]
        return data.get("n_id_test"), data.get("n_ood_test")
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "?", "?"


# ---------------------------------------------------------------------------------------------------------------
# One row per setting: replicates aggregated
# ---------------------------------------------------------------------------------------------------------------


def protocol_differences(row: Mapping[str, Any], caps: tuple[Any, Any]) -> list[str]:
    """How a run's settings differ from its paper's protocol (test-set subsets included)."""
    out = [d for c in PAPER_PROTOCOL.get(str(row["method"]).lower(), []) if (d := c.differs(row))]
    n_id, n_ood = row.get("n_id"), row.get("n_ood")
    if "?" in caps:
        out.append("test-set size unknown (no config.yaml)")
    elif any(cap is not None and n is not None and n >= cap for cap, n in zip(caps, (n_id, n_ood))):
        out.append(f"test subset {int(n_id)}/{int(n_ood)} (paper: full test sets)")
    return out


def summarise(
    runs: pd.DataFrame, results_dir: str | os.PathLike[str], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """One row per setting (``setting_hash``): metrics' mean and std over seeds, AUROC bootstrap CI (none when
    ``n_boot=0``), cost, protocol differences and declared deviations; ``row`` keeps the setting's latest row."""
    out = []
    for setting, group in runs.groupby("setting_hash", sort=False):
        latest = group.iloc[-1].to_dict()
        rec: dict[str, Any] = {
            "method": latest["method"],
            "data": latest["data"],
            "setting_hash": setting,
            "config_hashes": ",".join(group["config_hash"]),
            "n_seeds": len(group),
            "seeds": ",".join(str(int(s)) for s in group["seed"].dropna()) if "seed" in group else "",
            "n_id": latest.get("n_id"),
            "n_ood": latest.get("n_ood"),
        }
        for m in METRICS:
            if m in group:
                vals = group[m].dropna()
                rec[f"{m}_mean"] = vals.mean() if len(vals) else np.nan
                rec[f"{m}_std"] = vals.std(ddof=1) if len(vals) > 1 else np.nan
        for col in ("nfe_per_image", "seconds", "score_seconds", "images_per_s"):
            rec[col] = group[col].mean() if col in group else np.nan
        folders = [run_dir(results_dir, r) for _, r in group.iterrows()]
        scores = [s for f in folders if (s := _scores(f)) is not None]
        complete = n_boot > 0 and scores and len(scores) == len(folders)
        rec["auroc_ci_low"], rec["auroc_ci_high"] = auroc_ci(scores, n_boot, seed) if complete else (np.nan, np.nan)
        rec["differs"] = protocol_differences(latest, _test_caps(folders[-1]))
        declared = [d.strip() for v in group.get("deviations", pd.Series(dtype=str)) for d in str(v).split(";")]
        rec["declared"] = list(dict.fromkeys(d for d in declared if d and d != "nan"))
        rec["row"] = latest
        out.append(rec)
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "|": r"\textbar{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "−": "-",
    "—": "--",
    "–": "--",
}


def latex_text(text: Any) -> str:
    """``text`` for a LaTeX document: special characters escaped, the few non-ASCII signs in math mode."""
    return "".join(_LATEX.get(c, c) for c in str(text))


@dataclass
class Table:
    """One table: machine-readable ``data``, the formatted ``display`` and footnotes."""

    name: str
    title: str
    data: pd.DataFrame
    display: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    convention: str = CONVENTION

    def markdown(self) -> str:
        body = self.display.to_markdown(index=False, disable_numparse=True)
        notes = "".join(f"[{i}] {n}\n" for i, n in enumerate(self.notes, 1))
        return f"### {self.title}\n\n{body}\n\n{notes + chr(10) if notes else ''}convention: {self.convention}\n"

    def latex(self) -> str:
        """A ``table`` environment (booktabs rules) that compiles with plain pdflatex: text escaped, signs in math."""
        notes = " ".join(f"[{i}] {n}" for i, n in enumerate(self.notes, 1))
        caption = latex_text(f"{self.title}. {notes} Convention: {self.convention}")
        frame = self.display.map(latex_text).rename(columns=latex_text)
        return frame.to_latex(index=False, escape=False, caption=caption, label=f"tab:{self.name}")

    def write(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """``<name>.md``, ``<name>.tex`` and ``<name>.csv`` (the machine-readable columns) in ``out_dir``."""
        from ood_bench.utils import atomic_write_text

        out = Path(out_dir)
        paths = [out / f"{self.name}.{ext}" for ext in ("md", "tex", "csv")]
        atomic_write_text(paths[0], self.markdown())
        atomic_write_text(paths[1], self.latex())
        atomic_write_text(paths[2], self.data.to_csv(index=False, lineterminator="\n"))
        return paths


def _pct(x: Any, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.{digits}f}"


def _ours_cell(s: Mapping[str, Any], metric: str) -> str:
    mean, std = s.get(f"{metric}_mean"), s.get(f"{metric}_std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return _pct(mean) + (f" ± {_pct(std)}" if isinstance(std, float) and not math.isnan(std) else "")


def _ci_cell(s: Mapping[str, Any], metric: str) -> str:
    lo, hi = s.get("auroc_ci_low"), s.get("auroc_ci_high")
    if metric != "auroc" or lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""
    return f"[{_pct(lo)}, {_pct(hi)}]"


def _notes_marker(declared: list[str], notes: list[str]) -> str:
    marks = []
    for d in declared:
        if d not in notes:
            notes.append(d)
        marks.append(f"[{notes.index(d) + 1}]")
    return " ".join(marks)


def _matches(s: Mapping[str, Any], p: Mapping[str, Any]) -> bool:
    method = str(s["method"]).lower()
    if method != str(p["method"]).lower() or s["data"] != p["pair"]:
        return False
    col = SETTING_COLUMN.get(method)
    return col is None or str(s["row"].get(col, "")) == str(p["setting"])


def paper_table(paper_rows: pd.DataFrame, summary: pd.DataFrame) -> Table | None:
    """One paper table (``paper_rows`` in the paper's order) with our matching settings; ``None`` if none ran."""
    first = paper_rows.iloc[0]
    data_rows, shown, notes = [], [], []
    for _, p in paper_rows.iterrows():
        for _, s in summary.iterrows():
            if not _matches(s, p):
                continue
            metric = p["metric"]
            mean = s.get(f"{metric}_mean", np.nan)
            delta = 100 * mean - p["value"] if not (isinstance(mean, float) and math.isnan(mean)) else np.nan
            as_paper = not s["differs"]
            data_rows.append(
                {
                    "paper": p["paper"],
                    "table": p["table"],
                    "id_dataset": p["id_dataset"],
                    "ood_dataset": p["ood_dataset"],
                    "setting": p["setting"],
                    "metric": metric,
                    "ours_mean": 100 * mean,
                    "ours_std": 100 * s.get(f"{metric}_std", np.nan),
                    "n_seeds": s["n_seeds"],
                    "ci_low": 100 * s["auroc_ci_low"] if metric == "auroc" else np.nan,
                    "ci_high": 100 * s["auroc_ci_high"] if metric == "auroc" else np.nan,
                    "paper_value": p["value"],
                    "delta": delta,
                    "as_paper": as_paper,
                    "differs": "; ".join(s["differs"]),
                    "declared_deviations": "; ".join(s["declared"]),
                    "n_id": s["n_id"],
                    "n_ood": s["n_ood"],
                    "nfe_per_image": s["nfe_per_image"],
                    "seconds": s["seconds"],
                    "setting_hash": s["setting_hash"],
                    "config_hashes": s["config_hashes"],
                    "source": p["source"],
                }
            )
            delta_txt = "" if math.isnan(delta) else f"{delta:+.2f}"
            protocol = "as paper" if as_paper else "differs: " + "; ".join(s["differs"])
            marker = _notes_marker(s["declared"], notes)
            shown.append(
                {
                    "ID": p["id_dataset"],
                    "OOD": p["ood_dataset"],
                    "setting": p["setting"],
                    "metric": metric,
                    "ours": _ours_cell(s, metric),
                    "95% CI": _ci_cell(s, metric),
                    "seeds": str(s["n_seeds"]),
                    "paper": f"{p['value']:g}",
                    "Δ": delta_txt if as_paper or not delta_txt else f"({delta_txt})",
                    "n ID/OOD": f"{int(s['n_id'])}/{int(s['n_ood'])}",
                    "NFE": f"{s['nfe_per_image']:g}",
                    "protocol": f"{protocol} {marker}".strip(),
                }
            )
    if not data_rows:
        return None
    name = f"{first['paper']}_{first['table']}".replace("/", "-").replace(" ", "_")
    title = (
        f"{first['paper']} {first['table']} — ours vs paper (%, Δ = ours − paper in points; "
        f"(Δ) in brackets: our settings differ from the paper's, not a reproduction)"
    )
    return Table(name, title, pd.DataFrame(data_rows), pd.DataFrame(shown), notes)


def ours_table(summary: pd.DataFrame, paper: pd.DataFrame) -> Table | None:
    """The settings that match no paper row."""
    rows = [s for _, s in summary.iterrows() if not any(_matches(s, p) for _, p in paper.iterrows())]
    if not rows:
        return None
    notes: list[str] = []
    data = pd.DataFrame(
        [
            {
                "method": s["method"],
                "data": s["data"],
                "setting": str(s["row"].get(SETTING_COLUMN.get(str(s["method"]).lower(), ""), "")),
                **{k: s.get(k) for k in ("n_seeds", "n_id", "n_ood", "auroc_ci_low", "auroc_ci_high")},
                **{f"{m}_{a}": s.get(f"{m}_{a}") for m in ("auroc", "fpr95") for a in ("mean", "std")},
                "nfe_per_image": s["nfe_per_image"],
                "seconds": s["seconds"],
                "declared_deviations": "; ".join(s["declared"]),
                "setting_hash": s["setting_hash"],
                "config_hashes": s["config_hashes"],
            }
            for s in rows
        ]
    )
    display = pd.DataFrame(
        [
            {
                "method": s["method"],
                "data": s["data"],
                "setting": str(s["row"].get(SETTING_COLUMN.get(str(s["method"]).lower(), ""), "")),
                "AUROC": _ours_cell(s, "auroc"),
                "95% CI": _ci_cell(s, "auroc"),
                "FPR95": _ours_cell(s, "fpr95"),
                "seeds": str(s["n_seeds"]),
                "n ID/OOD": f"{int(s['n_id'])}/{int(s['n_ood'])}",
                "NFE": f"{s['nfe_per_image']:g}",
                "seconds": f"{s['seconds']:.1f}",
                "notes": _notes_marker(s["declared"], notes),
            }
            for s in rows
        ]
    )
    return Table("ours", "Runs without a paper number (%)", data, display, notes)


def build_tables(
    results_dir: str | os.PathLike[str],
    paper_csv: str | os.PathLike[str],
    method: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[list[Table], list[str]]:
    """Every paper table with at least one of our runs (paper order), then ``ours``; and the tables not run."""
    runs = load_runs(results_dir)
    if method is not None:
        runs = runs[runs["method"].str.lower() == method.lower()]
    anomaly_rows = is_anomaly(runs)
    anomaly, runs = runs[anomaly_rows], runs[~anomaly_rows]
    bench_rows = is_bench(runs)
    benches, runs = runs[bench_rows], runs[~bench_rows]
    paper = load_paper(paper_csv)
    summary = summarise(runs, results_dir, n_boot=n_boot, seed=seed) if len(runs) else pd.DataFrame()
    tables, missing = [], []
    for (name, table), rows in paper.groupby(["paper", "table"], sort=False):
        built = paper_table(rows, summary) if len(summary) else None
        if built is None:
            missing.append(f"{name} {table}")
        else:
            tables.append(built)
    if len(summary) and (ours := ours_table(summary, paper)) is not None:
        tables.append(ours)
    if len(benches):
        tables.append(bench_table(benches, results_dir))
    if len(anomaly):
        tables.append(anomaly_table(anomaly))
    return tables, missing


def is_bench(runs: pd.DataFrame) -> pd.Series:
    """Which rows of ``runs`` are benchmark runs (``task`` = ``bench``: one ID set against several OOD sets)."""
    return runs["task"].eq("bench") if "task" in runs else pd.Series(False, index=runs.index)


def bench_rows(runs: pd.DataFrame, results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The full tables (``rows.csv``) of benchmark runs: a row per OOD set, then the near, far and all means."""
    frames = []
    for _, r in runs.iterrows():
        path = run_dir(results_dir, r) / "rows.csv"
        if path.is_file():
            frame = read_csv_text(path)
            frame["config_hash"] = r["config_hash"]
            frames.append(frame)
        else:
            log.warning("benchmark run %s has no rows.csv: left out of the bench table", run_dir(results_dir, r))
    if not frames:
        return pd.DataFrame()
    rows = pd.concat(frames, ignore_index=True)
    for col in ("n_id", "n_ood", "n_sets", *METRICS, "auroc_ci_low", "auroc_ci_high"):
        if col in rows:
            rows[col] = _numeric(rows[col])
    return rows


def bench_table(runs: pd.DataFrame, results_dir: str | os.PathLike[str]) -> Table:
    """One row per benchmark run and OOD set, then its near / far / all means, each with its AUROC interval."""
    rows = bench_rows(runs, results_dir)
    cols = ["method", "data", "ood_set", "group", "n_id", "n_ood", *METRICS, "auroc_ci_low", "auroc_ci_high"]
    data = rows[[c for c in [*cols, "config_hash"] if c in rows]] if len(rows) else pd.DataFrame(columns=cols)
    display = pd.DataFrame(
        [
            {
                "method": r["method"],
                "data": r["data"],
                "OOD set": r["ood_set"],
                "group": r["group"],
                "AUROC": _pct(r["auroc"]),
                "95% CI": _ci_cell(
                    {"auroc_ci_low": r.get("auroc_ci_low"), "auroc_ci_high": r.get("auroc_ci_high")}, "auroc"
                ),
                "FPR95": _pct(r["fpr95"]),
                "n ID/OOD": f"{int(r['n_id'])}/{int(r['n_ood'])}",
            }
            for _, r in data.iterrows()
        ]
    )
    title = "Benchmarks: one ID set against several OOD sets (%, near / far / all = mean over the sets)"
    return Table("bench", title, data.reset_index(drop=True), display)


ANOMALY_SHOWN = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO",
    "image_f1_max": "image F1-max*",
    "pixel_f1_max": "pixel F1-max*",
}


def anomaly_table(runs: pd.DataFrame) -> Table:
    """One row per anomaly run: each metric as mean ± std over the run's shot seeds (the run's own summary)."""
    runs = runs.copy()
    for col in (*ANOMALY_METRICS, *(f"{m}_std" for m in ANOMALY_METRICS), "k_shot", "n_test"):
        if col in runs:
            runs[col] = _numeric(runs[col])
    keys = ["method", "data", "k_shot", "mode", "n_test"]
    data = runs[[c for c in [*keys, *ANOMALY_METRICS, *(f"{m}_std" for m in ANOMALY_METRICS), "seconds"] if c in runs]]
    display = pd.DataFrame(
        [
            {
                **{
                    k: "" if pd.isna(r.get(k)) else f"{r.get(k):g}" if isinstance(r.get(k), float) else str(r.get(k))
                    for k in keys
                },
                **{
                    label: _ours_cell({f"{m}_mean": r.get(m), f"{m}_std": r.get(f"{m}_std")}, m)
                    for m, label in ANOMALY_SHOWN.items()
                },
                "seconds": f"{r['seconds']:.1f}" if not pd.isna(r.get("seconds")) else "",
            }
            for _, r in runs.iterrows()
        ]
    )
    notes = ["* F1-max picks its threshold on the test set itself (an upper bound, not a deployable score)."]
    title = "Few-shot anomaly detection (%, mean ± std over shot seeds)"
    return Table("anomaly", title, data.reset_index(drop=True), display, notes, ANOMALY_CONVENTION)


# Results columns that tell a method's settings apart in a short label (figures).
LABEL_COLUMNS = {
    "lmd": ("method.distance_used", "method.sampler", "method.steps", "method.reps"),
    "dlsr": ("method.encoder", "method.input_size", "method.score"),
}


def setting_label(row: Mapping[str, Any]) -> str:
    """A short label of a setting, e.g. ``mse ddim 10 10`` or ``alexnet 64 mfsim``."""
    cols = LABEL_COLUMNS.get(str(row["method"]).lower())
    if not cols:
        return str(row.get("setting_hash", ""))[:8]
    return " ".join(str(row.get(c, "")).split("(")[0] for c in cols if str(row.get(c, "")) not in ("", "nan"))


def cost_points(summary: pd.DataFrame) -> pd.DataFrame:
    """One point per setting for AUROC-against-cost figures (mean and std over seeds)."""
    return pd.DataFrame(
        {
            "method": summary["method"],
            "data": summary["data"],
            "label": [setting_label({**s["row"], "setting_hash": s["setting_hash"]}) for _, s in summary.iterrows()],
            "auroc_mean": summary["auroc_mean"],
            "auroc_std": summary["auroc_std"],
            "n_seeds": summary["n_seeds"],
            "nfe_per_image": summary["nfe_per_image"],
            "seconds_per_image": 1.0 / summary["images_per_s"],
            "setting_hash": summary["setting_hash"],
        }
    )
