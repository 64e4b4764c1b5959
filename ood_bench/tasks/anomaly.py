"""The anomaly task: few-shot anomaly detection per category, judged per image and per pixel.

Protocol (``conf/data/_anomaly.yaml``):

* every category has a seeded, defect-type-stratified test subset (``data.n_test`` per category; null = all), drawn
  with ``data.seed`` once, so every shot seed is scored on the same images;
* for every shot seed in ``data.shot_seeds`` the runner draws ``data.k_shot`` normal images per category from
  ``train/good`` and builds a FRESH method: ``mode=per_category`` fits one per category, ``mode=multi_class`` one
  for all categories together (labels = category index into ``ctx.data_meta["categories"]``);
* the method scores each category's test images (``split="test"``) and returns image scores and maps;
* metrics per (category, shot seed), then mean and std rows over the seeds (and over categories: ``all``).

Each fit's results (image scores, metrics, timings, the figure's maps) go to the artefact cache (kind
``anomaly_fit``), keyed by the data settings, the shot files and the fingerprints of the shot and test images, the
method's settings and the run seed: an interrupted run resumes after its last finished fit, and a fit shared by two
runs (a category alone, or in ``per_category`` mode beside others) is computed once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ood_bench.data.anomaly import ASPECTS, AnomalySource, Category, load_category, load_shots
from ood_bench.figures.anomaly import Panel, overlay_grid, pick_rows
from ood_bench.methods import Context, Method, Scores
from ood_bench.metrics.anomaly import ANOMALY_CONVENTION, ANOMALY_METRICS, AnomalyMetrics
from ood_bench.tasks.base import Task, TaskResult, extra_columns
from ood_bench.tasks.shards import WHOLE, Scoring
from ood_bench.utils import tensor_fingerprint

log = logging.getLogger(__name__)

MODES = ("per_category", "multi_class")
FIT_VERSION = 1  # bump when the protocol or the metrics code change what a cached fit holds
# keys of an OOD pair config that mean nothing here (e.g. left by debug=default)
OOD_ONLY_KEYS = ("id", "ood", "n_train", "n_id_test", "n_ood_test", "id_classes", "ood_classes", "resize_protocol")
SOURCE_RUNTIME_KEYS = ("root", "download", "hint")
TIME_COLUMNS = ("fit_seconds", "score_seconds")
FIGURE_ROWS = 3  # images per group in the overlay figure


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class AnomalyTask(Task):
    """Few-shot anomaly detection (``data.task: anomaly``; ``conf/data/magnetic_tile.yaml``, ``mvtec/*``, ...)."""

    name = "anomaly"
    metrics = ANOMALY_METRICS
    table_columns = ["category", "shot_seed", "k_shot", "n_test", *ANOMALY_METRICS, *TIME_COLUMNS]
    convention = ANOMALY_CONVENTION

    def validate(self, data: DictConfig) -> None:
        misplaced = [k for k in OOD_ONLY_KEYS if k in data]
        if misplaced:
            raise ValueError(
                f"data.{misplaced[0]} is a setting of OOD pairs, but data={data.name!r} is anomaly data (settings: "
                f"n_test, k_shot, shot_seeds, mode, aspect, image_size, channels); tiny debug runs: debug=anomaly"
            )
        if data.aspect not in ASPECTS:
            raise ValueError(f"data.aspect={data.aspect!r} is not valid; valid: {list(ASPECTS)}")
        if data.mode not in MODES:
            raise ValueError(f"data.mode={data.mode!r} is not valid; valid: {list(MODES)}")
        if not _is_int(data.k_shot) or data.k_shot < 1:
            raise ValueError(f"data.k_shot={data.k_shot!r} is not valid; use a positive integer")
        seeds = data.shot_seeds
        valid = OmegaConf.is_list(seeds) and len(seeds) > 0 and all(_is_int(s) for s in seeds)
        if not valid or len(set(seeds)) < len(seeds):
            raise ValueError(f"data.shot_seeds={seeds!r} is not valid; use a non-empty list of distinct integers")
        if data.n_test is not None and (not _is_int(data.n_test) or data.n_test < 1):
            raise ValueError(f"data.n_test={data.n_test!r} is not valid; use a positive integer or null (all)")
        if not _is_int(data.image_size) or data.image_size < 16:
            raise ValueError(f"data.image_size={data.image_size!r} is not valid; use an integer >= 16")
        if data.channels not in (1, 3):
            raise ValueError(f"data.channels={data.channels!r} is not valid; valid: 1 or 3")
        if not data.categories:
            raise ValueError(f"data.categories of data={data.name!r} is empty; add a category (conf/category/)")
        names = []
        for key, src in data.categories.items():
            if "_target_" not in src or "name" not in src:
                raise ValueError(f"data.categories.{key} needs _target_ and name: pick a layout from conf/category/")
            target = get_class(src._target_)
            if not issubclass(target, AnomalySource):
                raise ValueError(f"data.categories.{key}._target_={src._target_} is not an AnomalySource")
            names.append(src.name)
        if len(set(names)) < len(names):
            raise ValueError(f"data.categories have repeated names {names}; every category needs its own name")

    def data_identity(self, data: DictConfig) -> dict[str, Any]:
        ident = OmegaConf.to_container(data, resolve=True)
        ident.pop("download", None)
        ident["categories"] = {
            key: {k: v for k, v in src.items() if k not in SOURCE_RUNTIME_KEYS}
            for key, src in ident["categories"].items()
        }
        return ident

    def run(
        self,
        cfg: DictConfig,
        method: Method,
        build: Callable[[], Method],
        ctx: Context,
        identity: dict[str, Any],
        scoring: Scoring = WHOLE,
    ) -> TaskResult | None:
        d = cfg.data
        geometry = dict(image_size=d.image_size, aspect=d.aspect, channels=d.channels)
        sources = [instantiate(src) for src in d.categories.values()]
        cats = [load_category(s, i, n_test=d.n_test, seed=d.seed, **geometry) for i, s in enumerate(sources)]
        groups = [[c] for c in cats] if d.mode == "per_category" else [cats]
        plan = [(int(seed), group) for seed in d.shot_seeds for group in groups]
        rows: list[dict[str, Any]] = []
        per_sample: list[dict[str, np.ndarray]] = []
        shots_log: list[dict[str, Any]] = []
        files: dict[str, str | bytes] = {}
        images: dict[str, str] = {}
        describe: dict[str, Any] | None = None
        fit_seconds = score_seconds = 0.0
        n_cached, nfe = 0, 0.0
        bar = tqdm(plan, desc="fits", disable=not ctx.progress)
        for seed, group in bar:
            bar.set_postfix_str(f"{'+'.join(c.name for c in group)} seed {seed}")
            shots = [load_shots(c, d.k_shot, seed, **geometry) for c in group]
            shot_files = {c.name: c.files(r) for c, (_, r) in zip(group, shots)}
            fit, cached = self._fit(cfg, identity, group, seed, shots, shot_files, build, ctx, scoring)
            if fit is None:  # a shard: its scores are in the cache
                continue
            describe, nfe = fit["describe"], fit["nfe_per_image"]
            n_cached += cached
            fit_seconds += fit["fit_seconds"]
            shots_log.append({"shot_seed": seed, "categories": [c.name for c in group], "shots": shot_files})
            for c in group:
                res = fit["categories"][c.name]
                score_seconds += res["score_seconds"]
                m = res["metrics"]
                rows.append(
                    {
                        "category": c.name,
                        "shot_seed": seed,
                        "k_shot": d.k_shot,
                        "mode": d.mode,
                        "n_test": len(c.test_rows),
                        "n_good": c.meta["n_good"],
                        "n_anomalous": c.meta["n_anomalous"],
                        **m,
                        "fit_seconds": round(fit["fit_seconds"], 3),
                        "score_seconds": round(res["score_seconds"], 3),
                        "cached": bool(cached),
                        "shots": ";".join(shot_files[c.name]),
                    }
                )
                log.info(
                    "%s shot_seed=%d k=%d: %s%s",
                    c.name,
                    seed,
                    d.k_shot,
                    ", ".join(f"{k} {m[k]:.4f}" for k in ANOMALY_METRICS),
                    " (cached fit)" if cached else "",
                )
                values = res["values"]
                per_sample.append(
                    {
                        "category": np.full(len(values), c.name),
                        "shot_seed": np.full(len(values), seed),
                        "sample_index": c.test_rows,
                        "file": np.array(c.files(c.test_rows)),
                        "defect": c.table["defect"].to_numpy()[c.test_rows],
                        "label": c.test_labels,
                        "score": values,
                        **extra_columns(res["extras"]),
                    }
                )
                if seed == int(d.shot_seeds[0]) and res["figure"] is not None:
                    name = f"figures/anomaly_{c.name}.png"
                    files[name] = self._figure(c, res, f"{method.name} on {c.name}, k={d.k_shot}, shot seed {seed}")
                    images[f"anomaly/{c.name}"] = name
        if scoring.partial:
            return None
        table = aggregate(rows, [c.name for c in cats], [int(s) for s in d.shot_seeds])
        head, std = table[-2], table[-1]  # the last mean and std rows: the category's, or 'all' over categories
        n_scored = sum(len(c.test_rows) for c in cats) * len(d.shot_seeds)
        record = {
            "category": head["category"],
            "shot_seed": head["shot_seed"],
            "k_shot": d.k_shot,
            "mode": d.mode,
            "n_test": sum(len(c.test_rows) for c in cats),
            "n_good": sum(c.meta["n_good"] for c in cats),
            "n_anomalous": sum(c.meta["n_anomalous"] for c in cats),
            **{k: head[k] for k in ANOMALY_METRICS},
            **{f"{k}_std": std[k] for k in ANOMALY_METRICS},
            "fit_seconds": round(fit_seconds, 3),
            "score_seconds": round(score_seconds, 3),
            "nfe_per_image": nfe,
            "images_per_s": round(n_scored / max(score_seconds, 1e-9), 4),
            "categories": ";".join(c.name for c in cats),
            "shot_seeds": ";".join(str(s) for s in d.shot_seeds),
            "n_fits": len(plan),
            "n_cached_fits": n_cached,
            "image_size": d.image_size,
            "channels": d.channels,
            "aspect": d.aspect,
        }
        files["shots.json"] = json.dumps(self._shots_json(d, cats, shots_log), indent=1)
        keys = [k for k in per_sample[0] if all(k in p for p in per_sample)]  # extras every fit returned
        columns = {k: np.concatenate([p[k] for p in per_sample]) for k in keys}
        return TaskResult(record, columns, rows=table, files=files, images=images, describe=describe)

    def _fit(
        self,
        cfg: DictConfig,
        identity: dict[str, Any],
        group: list[Category],
        seed: int,
        shots: list[tuple[torch.Tensor, np.ndarray]],
        shot_files: dict[str, list[str]],
        build: Callable[[], Method],
        ctx: Context,
        scoring: Scoring = WHOLE,
    ) -> tuple[dict[str, Any] | None, bool]:
        """One fit of a fresh method on the group's shots, its scores and metrics per category, through the cache.

        The entry holds the image scores, the metrics (computed from the full maps), the timings and, for the
        figure, the maps of the picked images only (full maps of a large test set would fill the cache).
        A shard run (``scoring.partial``) fits and scores its block of every category, stores it in the shard
        cache and returns ``(None, False)``; the merge run builds this entry from the shards.
        """
        d = cfg.data
        images = torch.cat([x for x, _ in shots])
        labels = np.repeat(np.arange(len(group)), [len(r) for _, r in shots])
        sources = list(identity["data"]["categories"].values())
        spec = {
            "version": FIT_VERSION,
            "data": {k: identity["data"][k] for k in ("image_size", "channels", "aspect", "k_shot", "n_test", "seed")},
            "categories": [sources[c.index] for c in group],
            "shot_seed": seed,
            "shots": shot_files,
            "fingerprints": {
                "shots": tensor_fingerprint(images),
                "test": [tensor_fingerprint(c.test_images) for c in group],
            },
            "method": identity["method"],
            "model": identity["model"],
            "seed": identity["seed"],
        }
        data_meta = {
            "task": "anomaly",
            "data": d.name,
            "categories": [c.name for c in group],
            "object_names": [c.source.object_name for c in group],
            "mode": d.mode,
            "image_size": d.image_size,
            "channels": d.channels,
            "aspect": d.aspect,
            "k_shot": d.k_shot,
            "shot_seed": seed,
            "shot_files": shot_files,
        }

        part = f"{seed}:{'+'.join(c.name for c in group)}"

        def fit_and_score() -> tuple[Method, float, Iterator[tuple[Scores, float]]]:
            method = build()
            fctx = replace(ctx, data_meta=data_meta)
            fit_seconds = scoring.fit(method, part, images, fctx, labels=labels)
            scored = (  # lazily: one category's maps at a time
                scoring.score(
                    method, f"{part}:{c.name}", c.test_images, fctx, c.test_rows, np.full(len(c.test_rows), j), "test"
                )
                for j, c in enumerate(group)
            )
            return method, fit_seconds, scored

        if scoring.partial:
            for _ in fit_and_score()[2]:
                pass
            return None, False

        def compute(tmp: Path) -> None:
            method, fit_seconds, scored = fit_and_score()
            meta: dict[str, Any] = {"fit_seconds": fit_seconds, "categories": {}}
            arrays: dict[str, np.ndarray] = {}
            for j, (c, (s, t_score)) in enumerate(zip(group, scored)):
                check_scores(method.name, s, c.test_images)
                acc = AnomalyMetrics()
                with_maps = s.maps is not None and c.has_masks
                acc.update(s.values, c.test_labels, *((s.maps, c.test_masks) if with_maps else ()))
                info: dict[str, Any] = {"metrics": acc.compute(), "score_seconds": t_score, "figure": None}
                arrays[f"values_{j}"] = s.values
                arrays.update({f"extra_{j}_{k}": np.asarray(v) for k, v in s.extras.items()})
                if s.maps is not None:
                    picked = pick_rows(s.values, c.test_labels, FIGURE_ROWS)
                    rows_ = np.array([i for _, i in picked], dtype=np.int64)
                    arrays[f"figure_maps_{j}"] = s.maps[rows_].astype(np.float32)
                    info["figure"] = {
                        "groups": [g for g, _ in picked],
                        "rows": rows_.tolist(),
                        "vmin": float(s.maps.min()),
                        "vmax": float(s.maps.max()),
                    }
                meta["categories"][c.name] = info
                meta["nfe_per_image"] = s.nfe_per_image
            meta["describe"] = scoring.describe(method, f"{part}:{group[-1].name}")
            np.savez(tmp / "arrays.npz", **arrays)
            (tmp / "fit.json").write_text(json.dumps(meta, default=str))

        entry, created = ctx.cache.get_or_create("anomaly_fit", spec, compute)
        fit = json.loads((entry / "fit.json").read_text())
        with np.load(entry / "arrays.npz") as z:
            for j, c in enumerate(group):
                res = fit["categories"][c.name]
                res["values"] = z[f"values_{j}"]
                prefix = f"extra_{j}_"
                res["extras"] = {k.removeprefix(prefix): z[k] for k in z.files if k.startswith(prefix)}
                if res["figure"] is not None:
                    res["figure"]["maps"] = z[f"figure_maps_{j}"]
        return fit, not created

    @staticmethod
    def _figure(c: Category, res: dict[str, Any], title: str) -> bytes:
        """The category's overlay grid from a fit's picked rows."""
        fig, values = res["figure"], res["values"]
        rank = np.empty(len(values), dtype=np.int64)
        rank[np.argsort(-values, kind="stable")] = np.arange(1, len(values) + 1)
        names = c.files(c.test_rows)
        panels = [
            Panel(
                group=g,
                image=c.test_images[i],
                mask=c.test_masks[i] if c.has_masks else None,
                amap=fig["maps"][k],
                score=float(values[i]),
                rank=int(rank[i]),
                file=names[i],
            )
            for k, (g, i) in enumerate(zip(fig["groups"], fig["rows"]))
        ]
        return overlay_grid(panels, title, fig["vmin"], fig["vmax"], len(values))

    @staticmethod
    def _shots_json(d: DictConfig, cats: list[Category], shots_log: list[dict]) -> dict[str, Any]:
        return {
            "k_shot": d.k_shot,
            "shot_draw": "first k of a permutation of train/good seeded by (shot_seed, crc32(category))",
            "test_draw": f"n_test={d.n_test} per category, stratified by defect type, seeded by (data.seed={d.seed}, "
            f"crc32(category))",
            "fits": shots_log,
            "test": {c.name: c.files(c.test_rows) for c in cats},
        }


def check_scores(name: str, s: Scores, images: torch.Tensor) -> None:
    """An anomaly method returns one score per image and maps ``[N, H, W]`` at the input size."""
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    if len(s.values) != n:
        raise ValueError(f"method {name} returned {len(s.values)} scores for {n} images")
    if s.maps is None:
        log.warning("method %s returned no maps: pixel metrics are NaN", name)
    elif s.maps.shape != (n, h, w):
        raise ValueError(f"method {name} returned maps of shape {s.maps.shape}; the task needs [N, H, W] = {(n, h, w)}")
    elif not np.all(np.isfinite(s.maps)):
        raise ValueError(f"method {name} returned maps with non-finite values")


def _agg(rows: list[dict[str, Any]], how: str, category: str) -> dict[str, Any]:
    out = {k: rows[0][k] for k in ("k_shot", "mode", "n_test", "n_good", "n_anomalous")}
    out.update(category=category, shot_seed=how)
    for k in (*ANOMALY_METRICS, *TIME_COLUMNS):
        v = np.array([float(r[k]) for r in rows], dtype=np.float64)
        if how == "mean":
            out[k] = float(v.mean())
        else:
            out[k] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return out


def aggregate(rows: list[dict[str, Any]], categories: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Per category: the seed rows, then their mean and std; with several categories, then ``all``: the mean over
    categories per seed, averaged (``mean``) and spread (``std``) over the seeds."""
    table: list[dict[str, Any]] = []
    for cat in categories:
        mine = [r for r in rows if r["category"] == cat]
        table += [*mine, _agg(mine, "mean", cat), _agg(mine, "std", cat)]
    if len(categories) > 1:
        per_seed = []
        for s in seeds:
            at = [r for r in rows if r["shot_seed"] == s]
            per_seed.append(
                {
                    **{k: float(np.mean([r[k] for r in at])) for k in (*ANOMALY_METRICS, *TIME_COLUMNS)},
                    "k_shot": at[0]["k_shot"],
                    "mode": at[0]["mode"],
                    "n_test": sum(r["n_test"] for r in at),
                    "n_good": sum(r["n_good"] for r in at),
                    "n_anomalous": sum(r["n_anomalous"] for r in at),
                }
            )
        table += [_agg(per_seed, "mean", "all"), _agg(per_seed, "std", "all")]
    return table
