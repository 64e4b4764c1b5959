"""The benchmark task: one ID dataset against several OOD sets (``conf/data/<id>_bench.yaml``, ``data.task: bench``).

One run fits the method once on the ID training split, scores the ID test split once and each OOD set once, and
reports a row per OOD set plus the ``near``, ``far`` and ``all`` means (OpenOOD v1.5's summary), each with a seeded
bootstrap 95 % interval of its AUROC. Scores are cached per split (``bench_scores`` entries keyed by the method's
settings, the ID training images and the scored images), so a benchmark that gains an OOD set later scores only
that set (and fits only if that set is new); the fit is skipped altogether when every split is cached.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ood_bench.data.bench import GROUPS, Bench, build_bench
from ood_bench.errors import UserError
from ood_bench.figures.ood import write_score_figures
from ood_bench.methods import Context, Method, Scores
from ood_bench.metrics import CONVENTION, ood_metrics
from ood_bench.metrics.bootstrap import auroc_ci, mean_auroc_ci
from ood_bench.tasks.base import Task, TaskResult, extra_columns
from ood_bench.tasks.ood import RUNTIME_DATA_KEYS, validate_split_settings
from ood_bench.tasks.shards import WHOLE, Scoring
from ood_bench.utils import stable_hash, tensor_fingerprint

log = logging.getLogger(__name__)

MEANS = ("near", "far", "all")  # the summary rows, in this order after the per-set rows
METRIC_KEYS = ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_oodpos")
BENCH_COLUMNS = [
    "method",
    "data",
    "ood_set",
    "group",
    "n_id",
    "n_ood",
    "auroc",
    "auroc_ci_low",
    "auroc_ci_high",
    "fpr95",
    "aupr_in",
    "aupr_out",
]
CACHE_KIND = "bench_scores"


def load_bench(d: DictConfig) -> Bench:
    """Instantiate the ID source and every OOD set's source and build the benchmark."""
    sets = d.ood_sets
    return build_bench(
        d.name,
        instantiate(d.id),
        {k: instantiate(v.source) for k, v in sets.items()},
        {k: v.group for k, v in sets.items()},
        image_size=d.image_size,
        channels=d.channels,
        n_train=d.n_train,
        n_id_test=d.n_id_test,
        n_ood_test=d.n_ood_test,
        id_classes=OmegaConf.to_container(d.id_classes) if d.id_classes is not None else None,
        ood_classes={k: OmegaConf.to_container(v.classes) if v.get("classes") else None for k, v in sets.items()},
        resize_protocol=d.resize_protocol,
        seed=d.seed,
    )


class BenchTask(Task):
    """One ID dataset against a list of OOD sets, each tagged ``near`` or ``far``."""

    name = "bench"
    method_task = "ood"  # every OOD detector serves a benchmark
    metrics = ("auroc", "auroc_near", "auroc_far", "fpr95", "aupr_in", "aupr_out", "fpr95_oodpos")
    table_columns = BENCH_COLUMNS
    convention = CONVENTION

    def validate(self, data: DictConfig) -> None:
        validate_split_settings(data)
        if data.get("ood_classes") is not None:
            raise ValueError("data.ood_classes is not used by a benchmark; set data.ood_sets.<name>.classes instead")
        sets = data.get("ood_sets")
        if not sets:
            raise ValueError(f"data.ood_sets of {data.name} is empty; a benchmark needs at least one OOD set")
        for key, entry in sets.items():
            if key in MEANS or "/" in key:
                raise ValueError(f"data.ood_sets.{key}: the name is reserved or invalid; not one of {list(MEANS)}")
            if entry is None or "source" not in entry or "_target_" not in (entry.source or {}):
                raise ValueError(f"data.ood_sets.{key} needs a `source` (a dataset config with _target_)")
            if entry.get("group") not in GROUPS:
                raise ValueError(f"data.ood_sets.{key}.group={entry.get('group')!r} is not valid; valid: {GROUPS}")
        n_boot = data.get("bootstrap", 1000)
        if not isinstance(n_boot, int) or n_boot < 0:
            raise ValueError(f"data.bootstrap={n_boot!r} is not valid; use an integer >= 0 (0: no intervals)")

    def data_identity(self, data: DictConfig) -> dict[str, Any]:
        ident = OmegaConf.to_container(data, resolve=True)
        ident.pop("bootstrap", None)  # the intervals' resamples do not change the scores
        for key in RUNTIME_DATA_KEYS:  # how images are decoded (workers, in memory) does not change them either
            ident.pop(key, None)
        drop = ("root", "download", "on_bad_file")
        ident["id"] = {k: v for k, v in ident["id"].items() if k not in drop}
        for entry in ident["ood_sets"].values():
            entry["source"] = {k: v for k, v in entry["source"].items() if k not in drop}
        return ident

    def run(
        self,
        cfg: DictConfig,
        method: Method,
        build: Callable[[], Method],
        ctx: Context,
        identity: dict[str, Any],
        scoring: Scoring = WHOLE,
    ) -> TaskResult:
        if scoring is not WHOLE:  # a benchmark caches each split's scores itself; shards are per pair for now
            raise UserError(
                f"shard.* is not supported for a benchmark (data={cfg.data.name!r}); run it whole, or shard the "
                f"pairs it is made of (data=<id>_<ood>)"
            )
        bench = load_bench(cfg.data)
        ctx = replace(ctx, data_meta=bench.meta)
        timing = {"fit": 0.0, "score": 0.0, "scored_images": 0}
        fitted = False
        # what the scores depend on besides the scored images: the method's settings and what it was fitted on
        fit_key = {
            "method": identity["method"],
            "model": identity["model"],
            "classifier": identity.get("classifier"),
            "seed": identity["seed"],
            "id_train": bench.meta["fingerprint"]["id_train"],
            "id_train_labels": stable_hash(np.asarray(bench.id_train.labels).tolist()),
        }

        def scores_of(split, split_name: str, what: str) -> tuple[Scores, bool]:
            def compute() -> Scores:
                nonlocal fitted
                if not fitted:
                    t0 = time.perf_counter()
                    method.fit(bench.id_train.images, ctx, labels=bench.id_train.labels)
                    timing["fit"] += time.perf_counter() - t0
                    fitted = True
                log.info("scoring %s (%d images)", what, len(split))
                t0 = time.perf_counter()
                out = method.score(split.images, ctx, indices=split.indices, labels=split.labels, split=split_name)
                timing["score"] += time.perf_counter() - t0
                timing["scored_images"] += len(split)
                return out

            spec = {
                **fit_key,
                "split": split_name,
                "images": tensor_fingerprint(split.images),
                "indices": stable_hash(np.asarray(split.indices).tolist()),
                "labels": stable_hash(np.asarray(split.labels).tolist()),
            }
            return cached_scores(ctx, spec, compute)

        s_id, id_new = scores_of(bench.id_test, "id", "the ID test split")
        log.info("ID test split: %s", "scored once for all OOD sets" if id_new else "scores from the cache")
        s_oods: dict[str, Scores] = {}
        sets_new = 0
        for key, split in bench.oods.items():
            s_oods[key], new = scores_of(split, "ood", f"OOD set {key!r} ({bench.groups[key]})")
            sets_new += int(new)
        n_boot, boot_seed = int(cfg.data.get("bootstrap", 1000)), int(cfg.seed)
        rows = bench_rows(s_id.values, {k: s.values for k, s in s_oods.items()}, bench.groups, n_boot, boot_seed)
        by_name = {r["ood_set"]: r for r in rows}
        headline = by_name["all"]
        record: dict[str, Any] = {
            "task": "bench",
            "n_id": len(s_id.values),
            "n_ood": headline["n_ood"],
            **{m: headline[m] for m in METRIC_KEYS},
            "auroc_ci_low": headline["auroc_ci_low"],
            "auroc_ci_high": headline["auroc_ci_high"],
            **{f"auroc_{g}": by_name[g]["auroc"] for g in ("near", "far") if g in by_name},
            **{
                f"auroc_{g}_ci_{e}": by_name[g][f"auroc_ci_{e}"]
                for g in ("near", "far")
                if g in by_name
                for e in ("low", "high")
            },
            **{f"{m}.{k}": by_name[k][m] for k in bench.oods for m in ("auroc", "fpr95")},
            "ood_sets": ",".join(f"{k}:{g}" for k, g in bench.groups.items()),
            "id_test_scored": int(id_new),
            "ood_sets_scored": sets_new,
            "fit_seconds": round(timing["fit"], 3),
            "score_seconds": round(timing["score"], 3),
            "nfe_per_image": s_id.nfe_per_image,
            "images_per_s": round(timing["scored_images"] / timing["score"], 4) if timing["score"] > 0 else "",
            "image_size": cfg.data.image_size,
            "channels": cfg.data.channels,
            "resize_protocol": cfg.data.resize_protocol,
            "resize_via": bench.meta["resize_via"],
            "n_train": bench.meta["n_train"],
            "id_files": bench.meta["id"].get("files", bench.meta["id"]["type"]),
            "files_skipped": sum(bench.meta["files_skipped"].values()),
        }
        per_sample = per_sample_columns(bench, s_id, s_oods)
        figures = OmegaConf.to_container(cfg.figures, resolve=True) if cfg.get("figures") else {}

        def write_figures(folder: Path, full_record: dict[str, Any]) -> None:
            if figures.get("enabled", True):  # ID against every OOD set pooled
                write_score_figures(folder, per_sample, full_record)

        return TaskResult(record, per_sample, rows=rows, write_extra=write_figures)


def cached_scores(ctx: Context, spec: dict[str, Any], compute: Callable[[], Scores]) -> tuple[Scores, bool]:
    """``compute()`` once per ``spec`` (a ``bench_scores`` cache entry); returns the scores and whether they are new."""

    def build(tmp: Path) -> None:
        s = compute()
        np.savez(tmp / "scores.npz", values=s.values, **{f"extra__{k}": np.asarray(v) for k, v in s.extras.items()})
        (tmp / "scores.json").write_text(json.dumps({"nfe_per_image": s.nfe_per_image, "extras": list(s.extras)}))

    entry, created = ctx.cache.get_or_create(CACHE_KIND, spec, build)
    meta = json.loads((entry / "scores.json").read_text())
    with np.load(entry / "scores.npz") as z:
        scores = Scores(z["values"], {k: z[f"extra__{k}"] for k in meta["extras"]}, meta["nfe_per_image"])
    return scores, created


def bench_rows(
    s_id: np.ndarray, s_oods: dict[str, np.ndarray], groups: dict[str, str], n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """A row per OOD set, then the near, far and all means (metrics averaged over the sets, AUROC intervals
    from ``mean_auroc_ci``: one ID resample shared by the sets); a mean over no set is left out."""
    rows = []
    for key, s in s_oods.items():
        lo, hi = auroc_ci([(s_id, s)], n_boot, seed) if n_boot else (np.nan, np.nan)
        rows.append(
            {
                "ood_set": key,
                "group": groups[key],
                "n_sets": 1,
                "n_id": len(s_id),
                "n_ood": len(s),
                **ood_metrics(s_id, s),
                "auroc_ci_low": lo,
                "auroc_ci_high": hi,
            }
        )
    for mean in MEANS:
        members = [r for r in rows[: len(s_oods)] if mean == "all" or r["group"] == mean]
        if not members:
            continue
        sets = [s_oods[r["ood_set"]] for r in members]
        lo, hi = mean_auroc_ci(s_id, sets, n_boot, seed) if n_boot else (np.nan, np.nan)
        rows.append(
            {
                "ood_set": mean,
                "group": "mean",
                "n_sets": len(members),
                "n_id": len(s_id),
                "n_ood": sum(r["n_ood"] for r in members),
                **{m: float(np.mean([r[m] for r in members])) for m in METRIC_KEYS},
                "auroc_ci_low": lo,
                "auroc_ci_high": hi,
            }
        )
    return rows


def per_sample_columns(bench: Bench, s_id: Scores, s_oods: dict[str, Scores]) -> dict[str, np.ndarray]:
    """Long table: split (``id``/``ood``), the OOD set and its group, label, sample index, score and every extra."""
    parts = [("id", "", "", bench.id_test, s_id)] + [
        ("ood", k, bench.groups[k], bench.oods[k], s) for k, s in s_oods.items()
    ]
    cols: dict[str, np.ndarray] = {
        "split": np.concatenate([[p[0]] * len(p[4].values) for p in parts]),
        "ood_set": np.concatenate([[p[1]] * len(p[4].values) for p in parts]),
        "group": np.concatenate([[p[2]] * len(p[4].values) for p in parts]),
        "label": np.concatenate([np.asarray(p[3].labels) for p in parts]),
        "sample_index": np.concatenate([np.asarray(p[3].indices) for p in parts]),
        "score": np.concatenate([p[4].values for p in parts]),
    }
    extras = {k: np.concatenate([np.asarray(p[4].extras[k]) for p in parts]) for k in s_id.extras}
    return {**cols, **extra_columns(extras)}
