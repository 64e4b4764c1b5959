"""Benchmarks (data=<id>_bench): one fit, the ID test split scored once, each OOD set once (cached per set), a row
per set equal to the pair's, near/far/all means with bootstrap intervals; make tables/figures with every task family."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
from conftest import load_script, shared_path
from omegaconf import open_dict
from sklearn.metrics import roc_auc_score
from test_make_tables import PAPER_CSV, write_run
from test_tasks import probe, probe_cfg, two_categories  # noqa: F401  (fixtures)

from ood_bench.errors import ConfigError
from ood_bench.methods import METHODS, Method, Scores, register
from ood_bench.metrics.bootstrap import mean_auroc_ci, mean_auroc_replicates
from ood_bench.results.store import read_csv_text
from ood_bench.runner import run

CALLS: list[tuple[str, int]] = []


class Brightness(Method):
    """Score = mean brightness (FashionMNIST garments are brighter than MNIST strokes); counts its calls."""

    def fit(self, id_train, ctx, labels=None):
        CALLS.append(("fit", len(id_train)))

    def score(self, images, ctx, indices=None, labels=None, split=None):
        CALLS.append((split, len(images)))
        flat = images.flatten(1).double().numpy()
        return Scores(flat.mean(1), extras={"peak": flat.max(1)}, nfe_per_image=0.0)


@pytest.fixture
def brightness():
    register("_brightness")(Brightness)
    CALLS.clear()
    yield CALLS
    METHODS.pop("_brightness", None)


SIZES = ["data.n_train=60", "data.n_id_test=40", "data.n_ood_test=30", "data.bootstrap=200", "figures.enabled=false"]


def bench_cfg(hydra_conf, tmp_path, *overrides):
    shared_path("FashionMNIST")
    cfg = hydra_conf(["data=fashionmnist_bench", *SIZES, *overrides], tmp_path)
    with open_dict(cfg):
        cfg.method = {"name": "_brightness"}
    return cfg


def test_bench_scores_the_id_split_once_and_each_set_once(hydra_conf, tmp_path, brightness, caplog):
    caplog.set_level(logging.INFO)
    full = bench_cfg(hydra_conf, tmp_path)
    two = bench_cfg(hydra_conf, tmp_path)
    with open_dict(two):
        del two.data.ood_sets["textures"]
    record = run(two)
    assert sorted(brightness) == [("fit", 60), ("id", 40), ("ood", 30), ("ood", 30)]
    assert record["id_test_scored"] == 1 and record["ood_sets_scored"] == 2
    assert caplog.text.count("scoring the ID test split (40 images)") == 1

    # the benchmark gains an OOD set: only that set is scored (and the method fitted for it); the ID split is not
    brightness.clear()
    record = run(full)
    assert brightness == [("fit", 60), ("ood", 30)]
    assert record["id_test_scored"] == 0 and record["ood_sets_scored"] == 1
    folder = tmp_path / "results" / "_brightness" / "fashionmnist_bench" / record["config_hash"]
    rows = read_csv_text(folder / "rows.csv")
    assert list(rows["ood_set"]) == ["mnist", "cifar10", "textures", "near", "far", "all"]
    assert list(rows["group"]) == ["near", "far", "far", "mean", "mean", "mean"]
    auroc = dict(zip(rows["ood_set"], rows["auroc"].astype(float)))
    assert auroc["near"] == auroc["mnist"]
    assert auroc["far"] == pytest.approx((auroc["cifar10"] + auroc["textures"]) / 2)
    assert auroc["all"] == pytest.approx(np.mean([auroc[k] for k in ("mnist", "cifar10", "textures")]))
    assert record["auroc"] == pytest.approx(auroc["all"]) and record["auroc.textures"] == auroc["textures"]
    lo, hi = rows["auroc_ci_low"].astype(float), rows["auroc_ci_high"].astype(float)
    assert (lo <= rows["auroc"].astype(float) + 1e-12).all() and (rows["auroc"].astype(float) <= hi + 1e-12).all()
    assert (hi - lo > 0).any()
    # scores.csv: the ID split once, then each set; runs.csv: the wide row with the per-set and group columns
    scores = pd.read_csv(folder / "scores.csv", keep_default_na=False)
    assert (scores["split"] == "id").sum() == 40 and scores.groupby("ood_set").size()["textures"] == 30
    runs = read_csv_text(tmp_path / "results" / "runs.csv")
    assert {"auroc_near", "auroc_far", "auroc.mnist", "auroc_ci_low", "id_test_scored"} <= set(runs.columns)
    assert runs.iloc[-1]["task"] == "bench" and runs.iloc[-1]["ood_sets"] == "mnist:near,cifar10:far,textures:far"

    # every split cached: nothing is fitted or scored again (new bootstrap settings do not change the hash)
    brightness.clear()
    again = bench_cfg(hydra_conf, tmp_path, "overwrite=true", "data.bootstrap=0")
    assert run(again)["config_hash"] == record["config_hash"] and brightness == []

    # the set's row is the pair's: same samples, same preprocessing, same AUROC
    pair = hydra_conf(["data=fashionmnist_mnist", *SIZES[:3], "figures.enabled=false"], tmp_path)
    with open_dict(pair):
        pair.method = {"name": "_brightness"}
    pair_record = run(pair)
    assert pair_record["auroc"] == auroc["mnist"]
    pair_folder = tmp_path / "results" / "_brightness" / "fashionmnist_mnist" / pair_record["config_hash"]
    pair_scores = pd.read_csv(pair_folder / "scores.csv")
    mnist = scores[scores["ood_set"] == "mnist"]
    assert pair_scores.loc[pair_scores["split"] == "ood", "sample_index"].tolist() == mnist["sample_index"].tolist()
    assert np.allclose(pair_scores["score"].to_numpy(), np.r_[scores["score"][:40], mnist["score"]])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.ood_sets.mnist.__setattr__("group", "middle"), "data.ood_sets.mnist.group='middle'"),
        (lambda d: d.__setattr__("ood_sets", {}), "needs at least one OOD set"),
        (lambda d: d.__setattr__("ood_classes", [1]), "data.ood_sets.<name>.classes"),
        (lambda d: d.__setattr__("bootstrap", -1), "data.bootstrap=-1"),
    ],
)
def test_bad_bench_settings_fail_at_start(hydra_conf, tmp_path, change, message):
    cfg = hydra_conf(["data=fashionmnist_bench"], tmp_path)
    with open_dict(cfg):
        change(cfg.data)
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(cfg)


def test_mean_auroc_replicates_share_the_id_resample():
    rng = np.random.default_rng(3)
    s_id, oods = rng.normal(0, 1, 25), [rng.normal(1, 1, 17), np.round(rng.normal(0.5, 1, 11), 1)]
    reps = mean_auroc_replicates(s_id, oods, n_boot=20, seed=4)
    draw = np.random.default_rng(4)
    i0 = draw.integers(0, 25, (20, 25))
    i1 = [draw.integers(0, len(s), (20, len(s))) for s in oods]
    for b in range(20):
        want = [
            roc_auc_score(np.r_[np.zeros(25), np.ones(len(s))], np.r_[s_id[i0[b]], s[i1[k][b]]])
            for k, s in enumerate(oods)
        ]
        assert reps[b] == pytest.approx(np.mean(want), abs=1e-12)
    lo, hi = mean_auroc_ci(s_id, oods, n_boot=500, seed=0)
    full = np.mean([roc_auc_score(np.r_[np.zeros(25), np.ones(len(s))], np.r_[s_id, s]) for s in oods])
    assert lo < full < hi


def test_make_tables_and_figures_with_pair_bench_and_anomaly_runs(
    hydra_conf,
    tmp_path,
    brightness,
    probe,  # noqa: F811
    two_categories,  # noqa: F811
    capsys,
    caplog,
):
    """Issue 17 item 7: an anomaly run (scores.csv without a split column) next to OOD runs broke make figures."""
    results = tmp_path / "results"
    write_run(results, score="mfsim", seed=0, shift=1.0, as_paper=False, n=40)
    run(bench_cfg(hydra_conf, tmp_path))
    anomaly = run(probe_cfg(hydra_conf, tmp_path, two_categories, "data.shot_seeds=[0]"))
    assert (
        "split"
        not in pd.read_csv(
            results / "_anomaly_probe" / "surface_defects" / anomaly["config_hash"] / "scores.csv", nrows=0
        ).columns
    )
    caplog.set_level(logging.INFO)
    assert load_script("make_figures").main(["--results", str(results)]) == 0
    points = pd.read_csv(results / "figures" / "auroc_vs_cost.csv")
    assert set(points["data"]) == {"cifar10_mnist", "fashionmnist_bench"}
    assert "1 anomaly runs left out" in caplog.text
    code = load_script("make_tables").main(["--results", str(results), "--paper", str(PAPER_CSV), "--bootstrap", "50"])
    out = capsys.readouterr().out
    assert code == 0 and "Benchmarks: one ID set" in out and "Few-shot anomaly detection" in out
    bench = pd.read_csv(results / "tables" / "bench.csv")
    assert list(bench["ood_set"]) == ["mnist", "cifar10", "textures", "near", "far", "all"]
    assert "fashionmnist_bench" not in pd.read_csv(results / "tables" / "DLSR_Table1.csv")["id_dataset"].tolist()


def test_bench_config_hash_is_pinned_and_ignores_paths_and_bootstrap(hydra_conf, tmp_path):
    """Benchmark results folders and caches are named by this hash: a change must be deliberate (as for pairs;
    LMD here, whose pair hash is pinned in test_tasks.py too)."""
    from omegaconf import OmegaConf

    from ood_bench.runner import config_identity
    from ood_bench.utils import stable_hash

    def config_hash(*overrides: str) -> str:
        cfg = hydra_conf(["method=lmd", "data=fashionmnist_bench", *overrides], tmp_path)
        method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
        cls = METHODS[method_cfg["name"]]
        return stable_hash(config_identity(cfg, method_cfg, cls.uses_image_model, set(cls.runtime_keys)))

    assert config_hash() == "b0738816b003b1a7"
    assert config_hash("data.bootstrap=10", "data.id.root=/elsewhere") == "b0738816b003b1a7"
    assert config_hash("data.ood_sets.textures.group=near") != "b0738816b003b1a7"
