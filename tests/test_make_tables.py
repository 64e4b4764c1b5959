"""Paper tables (ood_bench/report, scripts/make_tables.py): matching, seeds, bootstrap CIs, protocol marks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, SHARED, load_script
from sklearn.metrics import roc_auc_score

from ood_bench.metrics import CONVENTION, ood_metrics
from ood_bench.metrics.bootstrap import auroc_ci, auroc_replicates
from ood_bench.report.tables import PAPER_COLUMNS, build_tables, load_paper
from ood_bench.results import RunStore
from ood_bench.runner import setting_hash

PAPER_CSV = REPO_ROOT / "docs" / "paper_tables.csv"


def make_tables(*args: str, capsys) -> tuple[int, str]:
    """``scripts/make_tables.py ARGS`` in this process: (exit code, stdout)."""
    code = load_script("make_tables").main(list(args))
    return code, capsys.readouterr().out


def test_paper_numbers_are_the_shared_ones():
    shared = SHARED / "docs" / "paper_tables.csv"
    if not shared.is_file():
        pytest.skip(f"{shared} is absent: nothing to keep in sync with")
    assert PAPER_CSV.read_bytes() == shared.read_bytes(), "docs/paper_tables.csv differs from ../shared/docs/: copy it"
    paper = load_paper(PAPER_CSV)
    assert list(paper.columns[: len(PAPER_COLUMNS)]) == PAPER_COLUMNS and paper["source"].str.len().min() > 0
    assert set(paper.loc[paper["ood_dataset"] == "lsun-r", "pair"]) == {"cifar10_lsun_resize", "cifar100_lsun_resize"}


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------------------------


def test_bootstrap_replicates_equal_sklearn_on_the_same_resamples():
    rng = np.random.default_rng(1)
    s_id = np.round(rng.normal(0, 1, 37), 1)  # rounded: ties between and within the classes
    s_ood = np.round(rng.normal(0.8, 1, 23), 1)
    reps = auroc_replicates(s_id, s_ood, n_boot=50, seed=7)
    draw = np.random.default_rng(7)  # the same draws, one resample at a time (one chunk holds all 50)
    i0, i1 = draw.integers(0, 37, (50, 37)), draw.integers(0, 23, (50, 23))
    for b in range(50):
        y = np.r_[np.zeros(37), np.ones(23)]
        assert reps[b] == pytest.approx(roc_auc_score(y, np.r_[s_id[i0[b]], s_ood[i1[b]]]), abs=1e-12)
    assert np.array_equal(reps, auroc_replicates(s_id, s_ood, n_boot=50, seed=7))  # seeded
    assert not np.array_equal(reps, auroc_replicates(s_id, s_ood, n_boot=50, seed=8))


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    small = (rng.normal(0, 1, 40), rng.normal(1, 1, 40))
    large = (rng.normal(0, 1, 2000), rng.normal(1, 1, 2000))
    lo_s, hi_s = auroc_ci([small], n_boot=400)
    lo_l, hi_l = auroc_ci([large], n_boot=400)
    assert lo_s < ood_metrics(*small)["auroc"] < hi_s and lo_l < ood_metrics(*large)["auroc"] < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    # several seeds of one setting: the interval of their mean lies around the mean AUROC
    second = (small[0] + rng.normal(0, 0.1, 40), small[1] + rng.normal(0, 0.1, 40))
    lo, hi = auroc_ci([small, second], n_boot=400)
    assert lo < np.mean([ood_metrics(*small)["auroc"], ood_metrics(*second)["auroc"]]) < hi


def test_setting_hash_ignores_only_the_seeds():
    ident = {
        "data": {"name": "p", "seed": 0},
        "method": {"name": "dlsr", "t": 3, "train_seed": 0},
        "model": None,
        "seed": 0,
    }
    reseeded = {
        **ident,
        "seed": 5,
        "data": {"name": "p", "seed": 1},
        "method": {"name": "dlsr", "t": 3, "train_seed": 2},
    }
    assert setting_hash(ident) == setting_hash(reseeded)
    assert setting_hash(ident) != setting_hash({**ident, "method": {"name": "dlsr", "t": 4, "train_seed": 0}})
    with_model = {**ident, "model": {"train": {"seed": 0}, "unet": 1}}
    assert setting_hash(with_model) == setting_hash({**with_model, "model": {"train": {"seed": 9}, "unet": 1}})


# ---------------------------------------------------------------------------------------------------------------
# make_tables end to end on run folders
# ---------------------------------------------------------------------------------------------------------------


def write_run(results: Path, *, score: str, seed: int, shift: float, as_paper: bool, n: int = 150) -> dict:
    """A DLSR run on cifar10_mnist with real per-sample scores; ``as_paper``: the paper's encoder and protocol."""
    rng = np.random.default_rng(seed + 100 * int(as_paper) + (0 if score == "mfsim" else 50))
    s_id, s_ood = rng.normal(0, 1, n), rng.normal(shift, 1, n)
    setting = f"{score}-{as_paper}"
    record = {
        "method": "dlsr",
        "data": "cifar10_mnist",
        "config_hash": f"{setting}-{seed}",
        "setting_hash": setting,
        "seed": seed,
        "n_id": n,
        "n_ood": n,
        **ood_metrics(s_id, s_ood),
        "seconds": 10.0 + seed,
        "nfe_per_image": 4.0,
        "images_per_s": 100.0,
        "resize_protocol": "direct" if as_paper else "common_min",
        "method.encoder": "efficientnet-b4" if as_paper else "alexnet",
        "method.input_size": 224 if as_paper else 64,
        "method.score": score,
        "precision": "fp16" if as_paper else "fp32",
        "deviations": "" if as_paper else "encoder: ImageNet AlexNet instead of EfficientNet-B4",
    }
    caps = {"n_id_test": None if as_paper else n, "n_ood_test": None if as_paper else n}
    per_sample = {"split": np.array(["id"] * n + ["ood"] * n), "score": np.r_[s_id, s_ood]}
    RunStore(results, "dlsr", "cifar10_mnist", record["config_hash"]).write(
        record, per_sample, yaml.safe_dump({"data": caps})
    )
    return record


def test_make_tables_ours_paper_delta_seeds_ci_and_protocol(tmp_path, capsys):
    results = tmp_path / "results"
    cpu = [write_run(results, score="mfsim", seed=s, shift=1.5, as_paper=False) for s in range(3)]
    paper_like = write_run(results, score="mse", seed=0, shift=2.0, as_paper=True)
    write_run(results, score="lr", seed=0, shift=1.0, as_paper=False)  # Table 1 has no lr row for MNIST

    code, out = make_tables("--results", str(results), "--bootstrap", "300", capsys=capsys)
    assert code == 0
    assert "### DLSR Table1" in out and CONVENTION in out
    files = {p.name for p in (results / "tables").iterdir()}
    assert {"DLSR_Table1.md", "DLSR_Table1.tex", "DLSR_Table1.csv", "ours.md", "ours.csv", "ours.tex"} <= files
    tex = (results / "tables" / "DLSR_Table1.tex").read_text()
    assert "\\begin{table}" in tex and "$\\pm$" in tex and tex.isascii()  # compiles with plain pdflatex
    assert "%" not in tex.replace("\\%", "")  # an unescaped % would comment out the rest of a line

    table = pd.read_csv(results / "tables" / "DLSR_Table1.csv").fillna({"differs": "", "declared_deviations": ""})
    mfsim = table[table["setting"] == "mfsim"].iloc[0]
    aurocs = np.array([r["auroc"] for r in cpu]) * 100
    assert mfsim["ours_mean"] == pytest.approx(aurocs.mean()) and mfsim["ours_std"] == pytest.approx(aurocs.std(ddof=1))
    assert mfsim["n_seeds"] == 3 and mfsim["paper_value"] == 99.9
    assert mfsim["delta"] == pytest.approx(aurocs.mean() - 99.9)
    assert mfsim["ci_low"] < mfsim["ours_mean"] < mfsim["ci_high"]
    assert not mfsim["as_paper"]
    for part in ("encoder alexnet (paper efficientnet-b4)", "input size 64 (paper 224)", "resize protocol common_min"):
        assert part in mfsim["differs"]
    assert "test subset 150/150" in mfsim["differs"]

    mse = table[table["setting"] == "mse"].iloc[0]
    assert mse["as_paper"] and mse["differs"] == "" and mse["n_seeds"] == 1
    assert mse["ours_mean"] == pytest.approx(100 * paper_like["auroc"]) and mse["paper_value"] == 99.4

    # the printed table: brackets around the delta of the row that is not a reproduction, a footnote for the
    # deviation its overlay declared
    lines = out.splitlines()
    mf_line = next(line for line in lines if "| mfsim" in line and "mnist" in line)
    mse_line = next(line for line in lines if "| mse" in line and "| mnist" in line)
    assert f"({aurocs.mean() - 99.9:+.2f})" in mf_line and "differs:" in mf_line and "[1]" in mf_line
    cells = [c.strip() for c in mse_line.strip("|").split("|")]
    assert f"{100 * paper_like['auroc'] - 99.4:+.2f}" in cells and "as paper" in cells
    assert "[1] encoder: ImageNet AlexNet instead of EfficientNet-B4" in out
    ours = pd.read_csv(results / "tables" / "ours.csv", keep_default_na=False)
    assert list(ours["setting"]) == ["lr"]


def test_make_tables_without_runs_says_what_to_do(tmp_path, capsys, caplog):
    code, _ = make_tables("--results", str(tmp_path), capsys=capsys)
    assert code == 1 and "runs.csv not found" in caplog.text and "python run.py" in caplog.text


def test_build_tables_lists_tables_without_runs(tmp_path):
    write_run(tmp_path, score="mfsim", seed=0, shift=1.0, as_paper=False, n=30)
    tables, missing = build_tables(tmp_path, PAPER_CSV, n_boot=0)
    assert [t.name for t in tables] == ["DLSR_Table1"]
    assert "LMD Table10-of-DLSR" in missing and "DLSR Table3" in missing
    assert np.isnan(tables[0].data["ci_low"].iloc[0])  # no bootstrap asked for


def test_anomaly_runs_get_their_own_table_and_convention(tmp_path, capsys):
    """An anomaly run is not an empty OOD row: its own table, mean ± std over shot seeds, the anomaly convention."""
    from ood_bench.metrics import ANOMALY_CONVENTION

    write_run(tmp_path / "results", score="mfsim", seed=0, shift=1.0, as_paper=False)
    anomaly = {
        "method": "patch_knn",
        "data": "magnetic_tile",
        "config_hash": "a1",
        "k_shot": 4,
        "mode": "per_category",
        "n_test": 200,
        "image_auroc": 0.6248,
        "image_auroc_std": 0.0401,
        "pixel_auroc": 0.673,
        "seconds": 31.0,
    }
    RunStore(tmp_path / "results", "patch_knn", "magnetic_tile", "a1").write(anomaly, {"score": np.zeros(2)}, "{}")
    code, out = make_tables("--results", str(tmp_path / "results"), "--paper", str(PAPER_CSV), capsys=capsys)
    assert code == 0
    head, _, anomaly_part = out.partition("Few-shot anomaly detection")
    assert "magnetic_tile" not in head  # not among the OOD tables
    assert "cifar10_mnist" not in anomaly_part  # and the OOD run (an empty image_auroc in runs.csv) not among these
    row = next(line for line in anomaly_part.splitlines() if "magnetic_tile" in line)
    assert "62.48 ± 4.01" in row and "67.30" in row
    assert ANOMALY_CONVENTION in anomaly_part
    assert (tmp_path / "results" / "tables" / "anomaly.csv").is_file()
