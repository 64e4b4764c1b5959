"""OOD figures: ROC curve and ID/OOD score histograms per run, LMD inpainting grids, AUROC against cost.

File names are fixed (``roc.png``, ``score_hist.png``, ``lmd_inpainting.png`` in a run folder;
``auroc_vs_nfe.png`` and ``auroc_vs_seconds.png`` across runs), so a rerun replaces a figure instead of adding one.
Figures are built on ``matplotlib.figure.Figure`` (no pyplot state) with the Agg backend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ood_bench.metrics import ood_metrics  # noqa: E402
from ood_bench.utils import atomic_path  # noqa: E402

log = logging.getLogger(__name__)

ROC_PNG, HIST_PNG, INPAINT_PNG = "roc.png", "score_hist.png", "lmd_inpainting.png"
DPI = 120


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save atomically (a reader never sees half a PNG) with metadata that does not change between runs."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path


def _split_scores(per_sample: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    split = np.asarray(per_sample["split"]).astype(str)
    score = np.asarray(per_sample["score"], dtype=np.float64)
    return score[split == "id"], score[split == "ood"]


def roc_figure(s_id: np.ndarray, s_ood: np.ndarray, path: str | os.PathLike[str], title: str = "") -> Path:
    """ROC curve with OOD as the positive class, the AUROC and the FPR95 operating point, saved to ``path``."""
    return _save(plot_roc(s_id, s_ood, title), path)


def plot_roc(s_id: np.ndarray, s_ood: np.ndarray, title: str = "") -> Figure:
    """The ROC figure (line 0: the curve as scikit-learn computes it)."""
    y = np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))]
    s = np.r_[s_id, s_ood]
    fpr, tpr, _ = roc_curve(y, s)
    metrics = ood_metrics(s_id, s_ood)
    # at the threshold that keeps 95 % of ID (at most 5 % of ID flagged), fpr95 of OOD is accepted as ID
    tpr_at = 1 - metrics["fpr95"]
    fig = Figure(figsize=(4.2, 4.2))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=1.8, label=f"AUROC = {metrics['auroc']:.4f}")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.plot([0.05], [tpr_at], "o", ms=5, color="C3", label=f"95% ID kept: FPR95 = {1 - tpr_at:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="ID flagged as OOD (FPR)", ylabel="OOD detected (TPR)")
    ax.set_title(title or "ROC (OOD = positive)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def score_histogram(s_id: np.ndarray, s_ood: np.ndarray, path: str | os.PathLike[str], title: str = "") -> Path:
    """ID and OOD score histograms on shared bins (densities, so unequal sizes compare), saved to ``path``."""
    return _save(plot_histogram(s_id, s_ood, title), path)


def plot_histogram(s_id: np.ndarray, s_ood: np.ndarray, title: str = "") -> Figure:
    """The histogram figure (bar containers 0 and 1: ID and OOD)."""
    both = np.r_[s_id, s_ood]
    finite = both[np.isfinite(both)]
    bins = np.histogram_bin_edges(finite, bins="auto") if finite.size else np.linspace(0, 1, 11)
    if len(bins) > 61:  # "auto" follows the data's spread; keep the bars readable
        bins = np.linspace(bins[0], bins[-1], 61)
    fig = Figure(figsize=(5.2, 3.4))
    ax = fig.add_subplot()
    ax.hist(s_id[np.isfinite(s_id)], bins=bins, density=True, alpha=0.55, label=f"ID (n={len(s_id)})")
    ax.hist(s_ood[np.isfinite(s_ood)], bins=bins, density=True, alpha=0.55, label=f"OOD (n={len(s_ood)})")
    ax.set(xlabel="score (higher = more OOD)", ylabel="density")
    ax.set_title(title or "score distributions", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _title(record: Mapping[str, Any] | None) -> str:
    if not record:
        return ""
    return f"{record.get('method', '')} on {record.get('data', '')} ({record.get('config_hash', '')})"


def write_score_figures(
    folder: str | os.PathLike[str], per_sample: Mapping[str, Any], record: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """ROC curve and score histograms of one run into ``folder``."""
    folder = Path(folder)
    s_id, s_ood = _split_scores(per_sample)
    if not len(s_id) or not len(s_ood):
        return {}
    title = _title(record)
    return {
        "roc": roc_figure(s_id, s_ood, folder / ROC_PNG, title),
        "score_hist": score_histogram(s_id, s_ood, folder / HIST_PNG, title),
    }


# --------------------------------------------------------------------------------------------------------------
# LMD: what was masked and what the model filled in
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def lmd_inpaintings(lmd: Any, images: torch.Tensor, indices: np.ndarray, ctx: Any) -> tuple[list, list]:
    """Masks and inpaintings of ``images`` for every repeat, computed afresh exactly as ``LMD.score`` draws them.

    Same model, masks, sampler and per-sample generators (keyed by sample index and repeat) as the scoring, so
    they equal the scored inpaintings (the grid reads those from LMD's cache: ``LMD.inpaintings``). Returns
    ``(masks [reps] of [H,W], inpaintings [reps] of [N,C,H,W])``, nominally in [0,1] (without clipping the sampler
    may overshoot; the grid clamps for display).
    """
    from ood_bench.samplers import lmd_mask

    x = images.to(ctx.device)
    masks, recons = [], []
    for r in range(lmd.reps):
        mask = lmd_mask(lmd.mask, x.shape[-1], lmd.num_blocks, r)
        masks.append(mask.cpu())
        recons.append(lmd.reconstruct(x, indices, mask, r, ctx.seed).cpu())
    return masks, recons


def _mosaic(tiles: list[list[torch.Tensor]], pad: int = 2) -> np.ndarray:
    """Rows of equally sized ``[C,H,W]`` images in ``[0,1]`` as one ``[rows*(H+pad), cols*(W+pad), 3]`` array."""
    c, h, w = tiles[0][0].shape
    out = np.ones((len(tiles) * (h + pad), len(tiles[0]) * (w + pad), 3))
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            arr = img.expand(3, h, w).permute(1, 2, 0).float().numpy() if c == 1 else img.permute(1, 2, 0).numpy()
            out[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = arr
    return out


def lmd_inpainting_grid(
    lmd: Any, pair: Any, ctx: Any, path: str | os.PathLike[str], n: int = 4, scores: Mapping[str, Any] | None = None
) -> Path | None:
    """Grid of the first ``n`` ID and ``n`` OOD test images: input, then per repeat the masked input (grey =
    to be inpainted) and the inpainting; rows are labelled with the image's score when ``scores`` are given."""
    k_id, k_ood = min(n, len(pair.id_test)), min(n, len(pair.ood_test))
    if not k_id + k_ood:
        return None
    images = torch.cat([pair.id_test.images[:k_id], pair.ood_test.images[:k_ood]]).cpu()
    indices = np.r_[pair.id_test.indices[:k_id], pair.ood_test.indices[:k_ood]].astype(np.int64)
    splits = ["id"] * k_id + ["ood"] * k_ood
    # the scored inpaintings, read from LMD's cache (a scored run draws its grid without any network call)
    per_split = [
        lmd.inpaintings(split.images, split.indices, ctx, first=k)
        for split, k in ((pair.id_test, k_id), (pair.ood_test, k_ood))
    ]
    recons = [torch.cat([part[r][:k].cpu() for part, k in zip(per_split, (k_id, k_ood))]) for r in range(lmd.reps)]
    masks = [m.cpu() for m in lmd.masks(images.shape[-1])]
    tiles = []
    for j, x in enumerate(images):
        row = [x]
        for mask, recon in zip(masks, recons):
            m = mask.to(x.dtype).expand_as(x)
            row += [x * m + 0.5 * (1 - m), recon[j].clamp(0, 1)]  # unclipped samplers may overshoot
        tiles.append(row)
    lookup: dict[tuple[str, int], float] = {}
    if scores is not None:
        for s, i, v in zip(np.asarray(scores["split"]).astype(str), scores["sample_index"], scores["score"]):
            lookup[(s, int(i))] = float(v)
    size, pad = images.shape[-1], 2
    cols = 1 + 2 * lmd.reps
    inch = max(0.45, size / 40)  # one tile's size on the page
    fig = Figure(figsize=(inch * cols + 1.4, inch * len(tiles) + 0.9))
    ax = fig.add_axes((1.2 / (inch * cols + 1.4), 0.02, 1 - 1.3 / (inch * cols + 1.4), 0.85))
    ax.imshow(_mosaic(tiles, pad), interpolation="nearest")
    step = size + pad
    ax.set_xticks([step * c + size / 2 for c in range(cols)])
    ax.set_xticklabels(["input"] + [f"{kind} {r}" for r in range(lmd.reps) for kind in ("mask", "inpaint")], fontsize=6)
    ax.xaxis.tick_top()
    ax.tick_params(axis="x", rotation=90, length=0)
    labels = []
    for split, idx in zip(splits, indices):
        score = lookup.get((split, int(idx)))
        labels.append(f"{split.upper()} #{int(idx)}" + (f"  {score:.4g}" if score is not None else ""))
    ax.set_yticks([step * r + size / 2 for r in range(len(tiles))])
    ax.set_yticklabels(labels, fontsize=6)
    ax.tick_params(axis="y", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(
        f"LMD inpaintings ({lmd.mask}, {lmd.reps} repeats, {lmd.sampler} x {lmd.steps} steps); row label: score",
        fontsize=7,
    )
    return _save(fig, path)


def _lmd_figures(
    folder: Path, method: Any, pair: Any, ctx: Any, per_sample: Mapping[str, Any], inpaint_images: int = 4, **_: Any
) -> dict[str, Path]:
    if inpaint_images <= 0 or method.model is None:
        return {}
    path = lmd_inpainting_grid(method, pair, ctx, folder / INPAINT_PNG, n=inpaint_images, scores=per_sample)
    return {"lmd_inpainting": path} if path else {}


# Figures a method adds to its run folder, by method name: f(folder, method, pair, ctx, per_sample, **settings).
METHOD_FIGURES: dict[str, Callable[..., dict[str, Path]]] = {"lmd": _lmd_figures}


def write_run_figures(
    folder: str | os.PathLike[str],
    per_sample: Mapping[str, Any],
    method: Any = None,
    pair: Any = None,
    ctx: Any = None,
    *,
    enabled: bool = True,
    record: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Path]:
    """All figures of one run into ``folder``: ROC, histograms and the method's own (``METHOD_FIGURES``)."""
    if not enabled:
        return {}
    folder = Path(folder)
    out = write_score_figures(folder, per_sample, record)
    extra = METHOD_FIGURES.get(getattr(method, "name", ""))
    if extra is not None and pair is not None and ctx is not None:
        out.update(extra(folder, method, pair, ctx, per_sample, **settings))
    return out


# --------------------------------------------------------------------------------------------------------------
# Across runs
# --------------------------------------------------------------------------------------------------------------

COST_AXES = {
    "nfe": ("nfe_per_image", "network evaluations per image (nfe_per_image)"),
    "seconds": ("seconds_per_image", "scoring seconds per image (1 / images_per_s)"),
}


def auroc_vs_cost(points: pd.DataFrame, path: str | os.PathLike[str], cost: str = "nfe") -> Path:
    """AUROC against cost, one point per method and setting (mean over seeds, bar = std), a panel per pair.

    ``points`` has columns ``method, data, auroc_mean, auroc_std, nfe_per_image, seconds_per_image, label``.
    """
    column, xlabel = COST_AXES[cost]
    pairs = sorted(points["data"].unique())
    ncols = min(3, max(1, len(pairs)))
    nrows = max(1, -(-len(pairs) // ncols))
    fig = Figure(figsize=(4.4 * ncols, 3.6 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    methods = sorted(points["method"].unique())
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, pair in zip(axes.flat, pairs):
        sub = points[points["data"] == pair]
        for m, grp in sub.groupby("method"):
            x = grp[column].astype(float).clip(lower=1e-12)
            ax.errorbar(
                x, grp["auroc_mean"], yerr=grp["auroc_std"].fillna(0), fmt="o", color=colors[m], label=m, capsize=2
            )
            for xi, yi, lab in zip(x, grp["auroc_mean"], grp["label"]):
                ax.annotate(lab, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        low = float((sub["auroc_mean"] - sub["auroc_std"].fillna(0)).min())
        ax.set_ylim(max(0.0, min(low - 0.02, 0.95)), 1.005)  # AUROC lives in [0, 1]
        ax.set_title(pair, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("AUROC", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.set_visible(False)
    fig.suptitle(
        "AUROC vs cost: one point per method and setting, mean ± std over seeds\n"
        "(AUROC with OOD as the positive class, higher score = more OOD)",
        fontsize=8,
    )
    return _save(fig, path)


def lmd_cost_curve(
    points: pd.DataFrame, path: str | os.PathLike[str], reps_shown: tuple[int, ...] = (1, 2, 5, 10)
) -> Path:
    """LMD's AUROC against network evaluations per image (``scripts/lmd_cost_curve.py``), saved to ``path``.

    Left: the full test sets, one line per precision and number of repeats over the sampler steps, for the
    training setting with the most points. Middle: AUROC against the training budget (training steps) for every
    sampler setting shared by all training settings, one line per training precision. Right: the reference sampler
    (``sampler`` other than ddim, e.g. 1000 ancestral steps) on its subset beside our settings on the same subset.
    """
    pts = points.copy()
    full = pts[(pts["subset"] == "all") & (pts["sampler"] == "ddim")]
    main_label = full["label"].value_counts().idxmax() if len(full) else None
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    styles = {r: ls for r, ls in zip(reps_shown, ("-", "--", "-.", ":"))}
    colors = {"fp32": "C0", "bf16": "C3", "fp16": "C2"}
    ax = axes[0]
    for (prec, reps), grp in full[full["label"] == main_label].groupby(["precision", "reps"]):
        if reps not in styles:
            continue
        grp = grp.sort_values("steps")
        ax.plot(
            grp["nfe_per_image"],
            grp["auroc"],
            marker="o",
            ms=3,
            ls=styles[reps],
            color=colors.get(prec, "k"),
            label=f"{prec}, {reps} rep{'s' if reps > 1 else ''}",
        )
        for x, y, s in zip(grp["nfe_per_image"], grp["auroc"], grp["steps"]):
            if reps == max(reps_shown):
                ax.annotate(f"{s}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_title(f"sampler steps x repeats ({main_label}); labels: steps", fontsize=9)
    ax = axes[1]
    shared = full.groupby(["precision", "steps", "reps"])["label"].nunique()
    settings = shared[shared == full["label"].nunique()].index.tolist() if len(full) else []
    for prec, steps, reps in settings:
        if reps != max(full["reps"]):
            continue
        sub = full[(full["precision"] == prec) & (full["steps"] == steps) & (full["reps"] == reps)]
        for tprec, grp in sub.groupby("train_precision"):
            grp = grp.sort_values("train_steps")
            ax.plot(
                grp["train_steps"],
                grp["auroc"],
                marker="s",
                ms=4,
                color=colors.get(prec, "k"),
                ls="-" if tprec == "fp32" else "--",
                label=f"train {tprec}; sample {prec} {steps}x{reps}",
            )
    ax.set_xlabel("training steps (batch 64)", fontsize=8)
    ax.set_title("training budget", fontsize=9)
    ax = axes[2]
    ref = pts[pts["sampler"] != "ddim"]
    for subset, grp in ref.groupby("subset"):
        for (sampler, steps, prec), g in grp.groupby(["sampler", "steps", "precision"]):
            g = g[g["reps"].isin(reps_shown)]
            ax.plot(
                g["nfe_per_image"],
                g["auroc"],
                marker="*",
                ms=9,
                ls="",
                color="k",
                label=f"{sampler} x {steps} {prec} ({subset}; reps {', '.join(map(str, g['reps']))})",
            )
        ours = pts[(pts["subset"] == subset) & (pts["sampler"] == "ddim") & pts["reps"].isin(reps_shown)]
        for (prec, reps), g in ours.groupby(["precision", "reps"]):
            g = g.sort_values("steps")
            ax.plot(
                g["nfe_per_image"],
                g["auroc"],
                marker="o",
                ms=3,
                ls=styles.get(reps, "-"),
                color=colors.get(prec, "k"),
                label=f"ddim {prec}, {reps} reps ({subset})",
            )
    ax.set_title("reference sampler on a subset", fontsize=9)
    for i, ax in enumerate(axes):
        if i != 1:
            ax.set_xscale("log")
            ax.set_xlabel("network evaluations per image (steps x repeats)", fontsize=8)
        ax.set_ylabel("AUROC", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=6)
            low = min(float(np.nanmin(line.get_ydata())) for line in ax.lines)
            ax.set_ylim(max(0.0, min(low - 0.01, 0.95)), 1.002)
    fig.suptitle(
        f"LMD on {', '.join(sorted(pts['data'].unique()))}: AUROC (OOD = positive class) against cost", fontsize=9
    )
    return _save(fig, path)
