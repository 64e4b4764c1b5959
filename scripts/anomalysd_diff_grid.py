"""Score AnomalySD's inpaintings with a grid of difference functions D(x, x̂), inpainting each image only once.

    python scripts/anomalysd_diff_grid.py data=kolektor_sdd 'data.shot_seeds=[0]' threads=1 [--out grid.csv]

Any ``run.py`` overrides (``method=anomalysd`` unless given). The method is fitted as ``run.py`` fits it (a cached
fine-tune is reused), every test image is inpainted once per mask with the configured settings
(``AnomalySD.repaints``), and the same x̂ are compared with the reference by every difference in the grid:
``diff_normalise`` (unit, none) x ``feature_size`` (the config's, the image size) x ``diff_layers`` ({1}, {1, 2},
{1, 2, 3}, {1, ..., 5}) x ``diff_weighting`` (uniform, lpips), plus the grey-value squared and absolute difference.
Fusion, alpha, sigma and the image score are the config's; alpha 0 (S_ms alone) and 1 (S_pg alone) are printed
beside. The row of the config's own difference is marked ``*``: its numbers are ``run.py``'s for the same overrides
(the maps are the same computation). Image AUROC from ``ood_bench.metrics.anomaly``, pixel AUROC on the float32 maps
as the task computes it (AUPRO left out: too slow for a grid). One AlexNet pass per x̂ and feature size; the UNet
cost is one run's.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import lpips
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from ood_bench.api import compose
from ood_bench.cache import ArtifactCache
from ood_bench.data.anomaly import load_category, load_shots
from ood_bench.devices import claim_device
from ood_bench.methods import Context, build_method
from ood_bench.methods.anomalysd import AnomalySD, _rgb, fuse, image_scores, smooth
from ood_bench.metrics.anomaly import image_metrics

LAYER_SETS = ((1,), (1, 2), (1, 2, 3), (1, 2, 3, 4, 5))
WEIGHTINGS = ("uniform", "lpips")
NORMALISATIONS = ("unit", "none")

log = logging.getLogger("anomalysd_diff_grid")


def differences(method: AnomalySD, ref: torch.Tensor, xhat: torch.Tensor, hidden: torch.Tensor, sizes) -> dict:
    """``{(normalise, feature_size, layers, weighting): [n, H, W]}`` of one mask, kept where it hid the image.

    The layer sets are ``LAYER_SETS`` and the method's own ``diff_layers``."""
    layer_sets = list(dict.fromkeys([*LAYER_SETS, tuple(method.diff_layers)]))
    out, fm = {}, method.features
    own_size = fm.input_size
    for size in sizes:
        fm.input_size = size  # restored below: repaints() places the prototype-guided mask with these features
        try:
            raw_x, raw_y = fm.features(ref, "none"), fm.features(xhat, "none")
        finally:
            fm.input_size = own_size
        for norm in NORMALISATIONS:
            fx = [lpips.normalize_tensor(f) for f in raw_x] if norm == "unit" else raw_x
            fy = [lpips.normalize_tensor(f) for f in raw_y] if norm == "unit" else raw_y
            for weighting in WEIGHTINGS:
                per_layer = []
                for layer in range(1, 6):
                    d = (fx[layer - 1] - fy[layer - 1]) ** 2
                    d = fm.model.lins[layer - 1](d) if weighting == "lpips" else d.mean(1, keepdim=True)
                    per_layer.append(F.interpolate(d, size=ref.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
                for layers in layer_sets:
                    m = sum(per_layer[i - 1] for i in layers) / len(layers)
                    out[(norm, size, layers, weighting)] = hidden * m
    out[("-", "-", "pixel_sq", "-")] = hidden * ((ref - xhat) ** 2).mean(1)
    out[("-", "-", "pixel_abs", "-")] = hidden * (ref - xhat).abs().mean(1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="run.py overrides, e.g. data=kolektor_sdd 'data.shot_seeds=[0]'")
    p.add_argument("--out", type=Path, help="also write the table as CSV here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    default = [] if any(o.startswith("method=") for o in args.overrides) else ["method=anomalysd"]
    cfg = compose([*default, *args.overrides])
    d = cfg.data
    if d.get("task") != "anomaly" or d.mode != "per_category":
        raise ValueError(f"data={d.name}: an anomaly dataset in per_category mode is needed (mode={d.get('mode')})")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    geometry = dict(image_size=d.image_size, aspect=d.aspect, channels=d.channels)
    ctx = Context(
        device=claim_device(cfg.device, job_num=0),
        cache=ArtifactCache(cfg.paths.cache_dir),
        seed=cfg.seed,
        weights_dir=Path(cfg.paths.weights_dir),
        progress=cfg.progress,
    )
    rows = []
    for i, src in enumerate(d.categories.values()):
        cat = load_category(instantiate(src), i, n_test=d.n_test, seed=d.seed, **geometry)
        for seed in d.shot_seeds:
            method = build_method(method_cfg)
            if not isinstance(method, AnomalySD):
                raise ValueError(f"method={method.name}: this script compares AnomalySD's difference functions")
            shots, _ = load_shots(cat, d.k_shot, int(seed), **geometry)
            fctx = replace(ctx, data_meta={"categories": [cat.name], "object_names": [cat.source.object_name]})
            method.fit(shots, fctx, labels=np.zeros(len(shots), dtype=np.int64))
            n, size, k = len(cat.test_rows), d.image_size, len(method.mask_scales)
            sizes = list(dict.fromkeys([method.feature_size or size, size]))  # AlexNet input sizes in pixels
            acc: dict = {}
            for start in range(0, n, method.batch_size):
                sl = slice(start, start + method.batch_size)
                x = _rgb(cat.test_images[sl])
                lab = np.zeros(len(x), dtype=np.int64)
                ref, _, repaints = method.repaints(x, np.asarray(cat.test_rows[sl]), lab, fctx)
                for slot, known, xhat in repaints:
                    for key, m in differences(method, ref, xhat, 1 - known[:, 0], sizes).items():
                        if key not in acc:
                            acc[key] = np.zeros((n, k + 1, size, size), np.float32)
                        acc[key][sl, slot] += m.cpu().numpy()
                log.info("%s seed %s: %d / %d images inpainted", cat.name, seed, min(start + len(x), n), n)
            own = (method.diff_normalise, method.feature_size or size, tuple(method.diff_layers), method.diff_weighting)
            for (norm, fsize, layers, weighting), maps in acc.items():
                maps = maps.astype(np.float64)
                row = {
                    "category": cat.name,
                    "shot_seed": int(seed),
                    "normalise": norm,
                    "feature_size": fsize,
                    "layers": layers if isinstance(layers, str) else "+".join(map(str, layers)),
                    "weighting": weighting,
                    "config": "*" if (norm, fsize, layers, weighting) == own else "",
                }
                for alpha, name in ((method.alpha, ""), (0.0, "_ms"), (1.0, "_pg")):
                    s = smooth(fuse(maps[:, :k], maps[:, k], alpha, method.fusion), method.sigma)
                    values = image_scores(s, method.image_score, method.topk_fraction)
                    row[f"image_auroc{name}"] = image_metrics(values, cat.test_labels)["image_auroc"]
                    if not name:  # as the task computes it: on the float32 maps the method returns
                        masks = cat.test_masks.ravel()
                        row["pixel_auroc"] = roc_auc_score(masks, s.astype(np.float32).ravel().astype(np.float64))
                rows.append(row)
    table = pd.DataFrame(rows)
    settings = f"alpha={method.alpha}, fusion={method.fusion}, sigma={method.sigma}, image_score={method.image_score}"
    print(
        f"{settings}; higher = more anomalous; AUROC (scikit-learn, float64), anomalous image / defect pixel positive"
    )
    print(table.to_markdown(index=False, floatfmt=".3f"))
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
