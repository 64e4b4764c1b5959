"""Figures: ROC and histograms per run (what they plot), LMD grids of the scored inpaintings, AUROC vs cost."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_script
from PIL import Image
from sklearn.metrics import roc_curve
from test_make_tables import write_run

from ood_bench.cache import ArtifactCache
from ood_bench.distances import build_distance
from ood_bench.figures.ood import HIST_PNG, INPAINT_PNG, ROC_PNG, lmd_inpaintings, plot_histogram, plot_roc
from ood_bench.methods import Context, build_method
from ood_bench.metrics import ood_metrics
from ood_bench.runner import run


def test_roc_plots_sklearns_curve_and_the_fpr95_point():
    rng = np.random.default_rng(0)
    s_id, s_ood = rng.normal(0, 1, 300), rng.normal(1.2, 1, 200)
    fig = plot_roc(s_id, s_ood)
    x, y = fig.axes[0].lines[0].get_data()
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(300), np.ones(200)], np.r_[s_id, s_ood])
    assert np.array_equal(x, fpr) and np.array_equal(y, tpr)
    point = fig.axes[0].lines[2].get_data()
    assert point[0][0] == 0.05 and point[1][0] == pytest.approx(1 - ood_metrics(s_id, s_ood)["fpr95"])
    hist = plot_histogram(s_id, s_ood)
    bars = hist.axes[0].containers
    widths = [b.get_width() for b in bars[0]]
    assert sum(b.get_height() * w for b, w in zip(bars[0], widths)) == pytest.approx(1.0)  # a density
    assert "n=300" in hist.axes[0].get_legend().get_texts()[0].get_text()


def test_run_folder_holds_its_figures(cfg_tiny):
    record = run(cfg_tiny)
    folder = Path(cfg_tiny.paths.results_dir) / record["method"] / record["data"] / record["config_hash"]
    for name in (ROC_PNG, HIST_PNG, INPAINT_PNG):
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
    assert (folder / "DONE").is_file()


def test_lmd_grid_shows_the_inpaintings_that_were_scored(tiny_diffusion, tmp_path):
    """The grid's inpaintings are those of the scoring: their distances are the run's per-repeat distances."""
    lmd = build_method({"name": "lmd", "distance": "mse", "reps": 3, "steps": 4, "batch_size": 5, "num_blocks": 2})
    lmd.model, lmd.distance = tiny_diffusion, build_distance("mse")  # what fit() sets
    ctx = Context(device=torch.device("cpu"), cache=ArtifactCache(tmp_path), seed=3, progress=False)
    images = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    indices = np.arange(100, 107)
    dists = lmd.score(images, ctx, indices=indices).extras["dist_rep"]
    masks, recons = lmd_inpaintings(lmd, images[[1, 4]], indices[[1, 4]], ctx)  # two of them, another batch
    assert len(masks) == len(recons) == 3
    for r in range(3):
        got = lmd.distance(images[[1, 4]], recons[r]).double().numpy()
        assert np.allclose(got, dists[[1, 4], r], rtol=1e-5, atol=1e-7)
    assert not np.allclose(recons[0], recons[1])  # the repeats differ (alternating masks, own noise)


def test_make_figures_writes_auroc_vs_nfe_and_fills_in_run_figures(tmp_path, caplog):
    results = tmp_path / "results"
    for s in range(2):
        write_run(results, score="mfsim", seed=s, shift=1.5, as_paper=False, n=40)
    write_run(results, score="mse", seed=0, shift=2.0, as_paper=True, n=40)
    caplog.set_level(logging.INFO)
    assert load_script("make_figures").main(["--results", str(results)]) == 0
    for name in ("auroc_vs_nfe.png", "auroc_vs_seconds.png"):
        with Image.open(results / "figures" / name) as im:
            assert im.format == "PNG"
    points = pd.read_csv(results / "figures" / "auroc_vs_cost.csv")
    assert len(points) == 2 and sorted(points["n_seeds"]) == [1, 2]  # one point per setting, seeds averaged
    assert set(points["nfe_per_image"]) == {4.0}
    runs = list((results / "dlsr" / "cifar10_mnist").iterdir())
    assert all((r / ROC_PNG).is_file() and (r / HIST_PNG).is_file() for r in runs)
    assert "added to 3 run folders" in caplog.text
