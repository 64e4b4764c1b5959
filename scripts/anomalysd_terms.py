"""Re-score the terms of AnomalySD's map from a finished run's cache, without any UNet call.

    python scripts/anomalysd_terms.py --cache .cache --category magnetic_tile [--image-size 128 --n-test 200]

AnomalySD caches, per test batch, the K per-scale difference maps, the prototype-guided map and the prototype kNN
distance (``anomalysd_maps/<key>/array.npy``, ``[n, K + 2, H, W]``), keyed by the fine-tuned model. For every
fine-tuned model whose cached maps cover the category's test subset, this prints image and pixel AUROC of: S_ms
alone (alpha 0), the default fusion (alpha 0.5), S_pg alone (alpha 1), mean instead of harmonic fusion, no smoothing,
and the prototype kNN map, then their mean and std over the models (one model per shot seed). For reading the maps
it also scores two maps of the input alone (no model): its local texture (the 7x7 standard deviation of the grey
values) and its flatness (the negated texture), and prints the Spearman correlation of S_ms with the texture, over
the test pixels and over the images (S_ms's image score against the image's mean texture).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from ood_bench.data.anomaly import load_category
from ood_bench.methods.anomalysd import fuse, image_scores, smooth
from ood_bench.utils import stable_hash

ROOT = Path(__file__).resolve().parents[1]


def variants(scales: np.ndarray, pg: np.ndarray, knn: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
    return {
        "S_ms only (alpha 0)": smooth(fuse(scales, pg, 0.0, "harmonic"), sigma),
        "default (harmonic, alpha 0.5)": smooth(fuse(scales, pg, 0.5, "harmonic"), sigma),
        "S_pg only (alpha 1)": smooth(fuse(scales, pg, 1.0, "harmonic"), sigma),
        "mean fusion, alpha 0.5": smooth(fuse(scales, pg, 0.5, "mean"), sigma),
        "alpha 0.5, no smoothing": fuse(scales, pg, 0.5, "harmonic"),
        "prototype kNN map (no inpainting)": smooth(knn, sigma),
    }


def grid(scales: np.ndarray, pg: np.ndarray, frac: float):
    """Yield ``((image_score, fusion, alpha, sigma), map)`` over the scoring settings that need no UNet call."""
    for fusion in ("harmonic", "mean"):
        for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
            fused = fuse(scales, pg, alpha, fusion)
            for sigma in (0.0, 2.0, 4.0, 8.0):
                m = smooth(fused, sigma)
                for score in ("max", "topk_mean"):
                    yield (score, fusion, alpha, sigma), m


def map_set(spec: dict) -> str:
    """One set of cached maps: the fine-tuned model and the inference settings that differ between runs."""
    keys = ("inference_prompts", "mask_layout", "mask_scales", "strength", "diff_layers", "diff_normalise")
    extra = [f"{k}={spec[k]}" for k in keys if k in spec]
    settings = {k: v for k, v in spec.items() if k not in ("images", "indices", "labels")}  # one batch's own keys
    return " ".join([spec["model"], *extra, f"maps={stable_hash(settings)[:8]}"])  # no two settings merge


def local_std(images: torch.Tensor, size: int = 7) -> np.ndarray:
    """``[N, H, W]``: the standard deviation of the grey values in a ``size`` x ``size`` window around each pixel."""
    g = images.double().mean(1, keepdim=True)  # float64: E[g²] - E[g]² cancels on flat regions
    pool = dict(kernel_size=size, stride=1, padding=size // 2, count_include_pad=False)
    mean = F.avg_pool2d(g, **pool)
    return (F.avg_pool2d(g * g, **pool) - mean**2).clamp_min(0).sqrt()[:, 0].numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="the run's paths.cache_dir")
    p.add_argument("--category", required=True, help="a conf/category/<name>.yaml")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="data.seed (the test subset draw)")
    p.add_argument("--sigma", type=float, default=4.0)
    p.add_argument("--image-score", choices=("max", "topk_mean"), default="max", help="as method.image_score")
    p.add_argument("--topk-fraction", type=float, default=0.01, help="as method.topk_fraction")
    p.add_argument(
        "--grid",
        action="store_true",
        help="instead of the terms: image and pixel AUROC over image_score x fusion x alpha x sigma",
    )
    p.add_argument("--filter", nargs="*", default=[], help="only map sets whose description contains each string")
    p.add_argument("--exclude", nargs="*", default=[], help="leave out map sets whose description contains one")
    args = p.parse_args(argv)

    cfg = OmegaConf.load(ROOT / "conf" / "category" / f"{args.category}.yaml")
    data_dir = os.environ.get("OOD_BENCH_DATA", str(ROOT.parent / "shared" / "data"))
    cfg = OmegaConf.merge({"paths": {"data_dir": data_dir}, "data": {"download": False}}, {"c": cfg})
    source = instantiate(cfg.c)
    cat = load_category(source, 0, image_size=args.image_size, aspect="resize", channels=3, n_test=args.n_test,
                        seed=args.seed)  # fmt: skip
    rows = [int(r) for r in cat.test_rows]
    by_model: dict[str, dict[int, np.ndarray]] = {}
    for spec_file in sorted((args.cache / "anomalysd_maps").glob("*/spec.json")):
        spec = json.loads(spec_file.read_text())
        maps = np.load(spec_file.parent / "array.npy")
        by_model.setdefault(map_set(spec), {}).update(zip(map(int, spec["indices"]), maps))
    if args.filter:
        by_model = {m: v for m, v in by_model.items() if all(f in m for f in args.filter)}
    by_model = {m: v for m, v in by_model.items() if not any(x in m for x in args.exclude)}
    texture = local_std(cat.test_images)
    pixels = np.random.default_rng(0).choice(texture.size, min(texture.size, 200_000), replace=False)
    how, frac = args.image_score, args.topk_fraction
    results, rho_pixels, rho_images = [], [], []
    for model, maps in by_model.items():
        if not all(r in maps for r in rows):
            continue
        arr = np.stack([maps[r] for r in rows]).astype(np.float64)
        k = arr.shape[1] - 2
        if args.grid:
            for (score, fusion, alpha, sigma), m in grid(arr[:, :k], arr[:, k], frac):
                results.append(
                    {
                        "model": model,
                        "variant": f"{score} {fusion} alpha={alpha} sigma={sigma}",
                        "image_auroc": roc_auc_score(cat.test_labels, image_scores(m, score, frac)),
                        "pixel_auroc": roc_auc_score(cat.test_masks.ravel(), m.ravel()),
                    }
                )
            continue
        terms = variants(arr[:, :k], arr[:, k], arr[:, k + 1], args.sigma)
        terms["input texture: 7x7 local std (no model)"] = texture
        terms["input flatness: -texture (no model)"] = -texture
        s_ms = terms["S_ms only (alpha 0)"]
        rho_pixels.append(spearmanr(s_ms.ravel()[pixels], texture.ravel()[pixels])[0])
        rho_images.append(spearmanr(image_scores(s_ms, how, frac), texture.mean(axis=(1, 2)))[0])
        for name, m in terms.items():
            results.append(
                {
                    "model": model,
                    "variant": name,
                    "image_auroc": roc_auc_score(cat.test_labels, image_scores(m, how, frac)),
                    "pixel_auroc": roc_auc_score(cat.test_masks.ravel(), m.ravel()),
                }
            )
    if not results:
        print(f"no cached AnomalySD maps in {args.cache} cover the {args.category} test subset")
        return 1
    frame = pd.DataFrame(results)
    summary = frame.groupby("variant", sort=False)[["image_auroc", "pixel_auroc"]].agg(["mean", "std"])
    print(f"{args.category}: {frame['model'].nunique()} map sets, {len(rows)} test images, image score {how}", end="")
    print(f" (top {frac:g})" if how == "topk_mean" or args.grid else "")
    for model in frame["model"].unique():
        print(f"  {model}")
    print(summary.round(3).to_markdown())
    for what, rho in (("test pixels", rho_pixels), ("images (image score vs mean texture)", rho_images)):
        if rho:
            spread = np.std(rho, ddof=1) if len(rho) > 1 else 0.0
            print(f"Spearman correlation of S_ms with the input texture over {what}: {np.mean(rho):.3f} ± {spread:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
