"""Re-score the terms of AnomalySD's map from a finished run's cache, without any UNet call.

    python scripts/anomalysd_terms.py --cache .cache --category magnetic_tile [--image-size 128 --n-test 200]

AnomalySD caches, per test batch, the K per-scale difference maps, the prototype-guided map and the prototype kNN
distance (``anomalysd_maps/<key>/array.npy``, ``[n, K + 2, H, W]``), keyed by the fine-tuned model. For every
fine-tuned model whose cached maps cover the category's test subset, this prints image and pixel AUROC of: S_ms
alone (alpha 0), the default fusion (alpha 0.5), S_pg alone (alpha 1), mean instead of harmonic fusion, no smoothing,
and the prototype kNN map, then their mean and std over the models (one model per shot seed).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from ood_bench.data.anomaly import load_category
from ood_bench.methods.anomalysd import fuse, image_scores, smooth

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="the run's paths.cache_dir")
    p.add_argument("--category", required=True, help="a conf/category/<name>.yaml")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="data.seed (the test subset draw)")
    p.add_argument("--sigma", type=float, default=4.0)
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
        by_model.setdefault(spec["model"], {}).update(zip(map(int, spec["indices"]), maps))
    results = []
    for model, maps in by_model.items():
        if not all(r in maps for r in rows):
            continue
        arr = np.stack([maps[r] for r in rows]).astype(np.float64)
        k = arr.shape[1] - 2
        for name, m in variants(arr[:, :k], arr[:, k], arr[:, k + 1], args.sigma).items():
            results.append(
                {
                    "model": model,
                    "variant": name,
                    "image_auroc": roc_auc_score(cat.test_labels, image_scores(m, "max", 0.0)),
                    "pixel_auroc": roc_auc_score(cat.test_masks.ravel(), m.ravel()),
                }
            )
    if not results:
        print(f"no cached AnomalySD maps in {args.cache} cover the {args.category} test subset")
        return 1
    frame = pd.DataFrame(results)
    summary = frame.groupby("variant", sort=False)[["image_auroc", "pixel_auroc"]].agg(["mean", "std"])
    print(f"{args.category}: {frame['model'].nunique()} fine-tuned models, {len(rows)} test images")
    print(summary.round(3).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
