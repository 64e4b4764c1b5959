"""The benchmark (scripts/bench.py, ood_bench/bench.py) and LMD's cost curve (scripts/lmd_cost_curve.py), on tiny
settings. Timing is never asserted: only that the numbers are there and consistent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import CONF_DIR, TINY_RUN_OVERRIDES, load_script
from PIL import Image

from ood_bench.bench import CASES, BenchCase, compose_run_config, lmd_loop
from ood_bench.methods import METHODS

TINY_LMD = (*TINY_RUN_OVERRIDES, "method.distance=mse", "method.reps=3")


def test_every_method_present_has_a_bench_case_that_composes(tmp_path) -> None:
    benched = {c.split("=")[1] for case in CASES.values() for c in case.overrides if c.startswith("method=")}
    # every registered method has a case; mls/ebo share msp's network and loop, diffguard_cg is diffguard's config
    assert benched >= {name for name in METHODS if not name.startswith("_")} - {"mls", "ebo"}
    for case in CASES.values():
        cfg = compose_run_config(CONF_DIR, list(case.overrides), tmp_path / case.name)
        assert cfg.method.name in METHODS and str(tmp_path) in cfg.paths.cache_dir


def test_a_bench_case_row_has_costs_and_the_loop_efficiency(tmp_path) -> None:
    bench = load_script("bench")
    row = bench.run_case(BenchCase("tiny_lmd", TINY_LMD, lmd_loop), tmp_path, threads=1, device="cpu")
    assert row["nfe_per_image"] == 3 * 4 and row["n_scored"] == 32 and row["precision"] == "bf16"  # the CPU default
    assert row["train_s"] > 0 and row["features_s"] == 0 and row["scoring_s"] > 0 and row["peak_rss_mb"] > 0
    assert row["rows"] == 3 * 16  # one batch of 16 test images, all three repeats in one pass
    assert row["efficiency"] == pytest.approx(row["loop_evals_per_s"] / row["bare_evals_per_s"], rel=1e-2)
    assert 0 < row["efficiency"] < 2
    assert bench.main(["--cases", "nope"]) == 1


def test_cost_curve_rows_per_repeat_prefix_and_plot(tmp_path) -> None:
    curve = load_script("lmd_cost_curve")
    csv = tmp_path / "curve.csv"
    args = ["--csv", str(csv), "--data", "digits", "--steps", "2,3", "--reps", "3", "--precisions", "fp32"]
    overrides = [*TINY_RUN_OVERRIDES[:-2], "method.distance=mse", f"paths.cache_dir={tmp_path / 'cache'}"]
    assert curve.main([*args, "--label", "tiny", *overrides]) == 0
    rows = pd.read_csv(csv)
    assert len(rows) == 2 * 3 and set(rows["nfe_per_image"]) == {2, 4, 6, 3, 9}
    last = rows[rows["reps"] == 3]
    assert (last["fresh_calls"] > 0).all() and np.isfinite(last["efficiency"]).all()
    # again: everything comes from the cache, the measured timing is kept
    assert curve.main([*args, "--label", "tiny", *overrides]) == 0
    again = pd.read_csv(csv)
    assert len(again) == 6 and again["auroc"].tolist() == rows["auroc"].tolist()
    assert again["sampling_s"].tolist() == pytest.approx(rows["sampling_s"].tolist(), nan_ok=True)
    out = tmp_path / "curve.png"
    assert curve.main(["--plot", str(csv), "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_streaming_rows_time_decoding_per_worker_count(tmp_path) -> None:
    bench = load_script("bench")
    case = BenchCase("tiny_digits", ("method=msp", "data=digits", "data.n_train=100"))
    rows = bench.streaming_rows(case, {"images_per_s": 1e12, "data": "digits"}, tmp_path, [0, 1])
    assert [r["num_workers"] for r in rows] == [0, 1]
    for r in rows:
        assert r["decoded"] == 100 and r["decode_images_per_s"] > 0 and r["method_images_per_s"] == 1e12
        assert r["bottleneck"] == "data"  # nothing decodes at 1e12 images/s
