"""The OOD task: an ID/OOD pair, one fit on the ID training split, image scores, ``ood_metrics``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ood_bench.data import Pair, build_pair
from ood_bench.data.transforms import PROTOCOLS
from ood_bench.figures.ood import write_run_figures
from ood_bench.methods import Context, Method, Scores
from ood_bench.metrics import CONVENTION, ood_metrics
from ood_bench.results import TABLE_COLUMNS
from ood_bench.tasks.base import Task, TaskResult, extra_columns
from ood_bench.tasks.shards import WHOLE, Scoring

#: data settings that change how images are read, never their values (left out of the config hash)
RUNTIME_DATA_KEYS = ("num_workers", "in_memory")


def load_pair(data_cfg: DictConfig) -> Pair:
    """Instantiate the two dataset sources and build the pair (lazy splits; in memory with ``data.in_memory``)."""
    d = data_cfg
    return build_pair(
        d.name,
        instantiate(d.id),
        instantiate(d.ood),
        image_size=d.image_size,
        channels=d.channels,
        n_train=d.n_train,
        n_id_test=d.n_id_test,
        n_ood_test=d.n_ood_test,
        id_classes=OmegaConf.to_container(d.id_classes) if d.id_classes is not None else None,
        ood_classes=OmegaConf.to_container(d.ood_classes) if d.ood_classes is not None else None,
        resize_protocol=d.resize_protocol,
        seed=d.seed,
        num_workers=d.get("num_workers", 0),
    )


def validate_split_settings(data: DictConfig) -> None:
    """Check the data settings every ID-vs-OOD task shares: resize protocol, split sizes, how images are read."""
    if data.resize_protocol not in PROTOCOLS:
        raise ValueError(f"data.resize_protocol={data.resize_protocol!r} is not valid; valid: {list(PROTOCOLS)}")
    for key in ("n_train", "n_id_test", "n_ood_test"):
        v = data[key]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"data.{key}={v!r} is not valid; use a positive integer or null (all)")
    workers = data.get("num_workers", 0)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"data.num_workers={workers!r} is not valid; use an integer >= 0 (0: decode in the run)")
    if not isinstance(data.get("in_memory", False), bool):
        raise ValueError(f"data.in_memory={data.get('in_memory')!r} is not valid; valid: true or false")


class OodTask(Task):
    """ID/OOD pairs (``conf/data/<id>_<ood>.yaml``); the default when ``data.task`` is absent."""

    name = "ood"
    metrics = ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_oodpos", "fpr95_pct")
    table_columns = TABLE_COLUMNS
    convention = CONVENTION

    def validate(self, data: DictConfig) -> None:
        validate_split_settings(data)

    def data_identity(self, data: DictConfig) -> dict[str, Any]:
        ident = OmegaConf.to_container(data, resolve=True)
        for key in RUNTIME_DATA_KEYS:  # how the images are read does not change them
            ident.pop(key, None)
        for side in ("id", "ood"):
            # where the files are, whether to download them, and the bad-file policy (a run that completes under
            # on_bad_file=fail would give the same numbers under skip) do not change the numbers
            ident[side] = {k: v for k, v in ident[side].items() if k not in ("root", "download", "on_bad_file")}
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
        pair = load_pair(cfg.data)
        if cfg.data.get("in_memory", False) or not method.lazy_images:
            pair = pair.materialize()  # float tensors, decoded once (memory grows with the data)
        ctx = replace(ctx, data_meta=pair.meta)
        t_fit = scoring.fit(method, "fit", pair.id_train.images, ctx, labels=pair.id_train.labels)
        scored = {}
        for name, split in (("id", pair.id_test), ("ood", pair.ood_test)):
            scored[name] = scoring.score(method, name, split.images, ctx, split.indices, split.labels, split=name)
        if scoring.partial:
            return None
        (s_id, t_id), (s_ood, t_ood) = scored["id"], scored["ood"]
        t_score = t_id + t_ood
        n_id, n_ood = len(s_id.values), len(s_ood.values)
        record: dict[str, Any] = {
            "n_id": n_id,
            "n_ood": n_ood,
            **ood_metrics(s_id.values, s_ood.values),
            "fit_seconds": round(t_fit, 3),
            "score_seconds": round(t_score, 3),
            "nfe_per_image": s_id.nfe_per_image,
            "images_per_s": round((n_id + n_ood) / max(t_score, 1e-9), 4),
            "image_size": cfg.data.image_size,
            "channels": cfg.data.channels,
            "resize_protocol": cfg.data.resize_protocol,
            "resize_via": pair.meta["resize_via"],
            "n_train": pair.meta["n_train"],
            "id_files": pair.meta["id"].get("files", pair.meta["id"]["type"]),
            "ood_files": pair.meta["ood"].get("files", pair.meta["ood"]["type"]),
            "id_files_skipped": pair.meta["files_skipped"]["id"],
            "ood_files_skipped": pair.meta["files_skipped"]["ood"],
        }
        per_sample = per_sample_columns(pair, s_id, s_ood)
        figures = OmegaConf.to_container(cfg.figures, resolve=True) if cfg.get("figures") else {}

        def write_figures(folder: Path, full_record: dict[str, Any]) -> None:
            write_run_figures(folder, per_sample, method, pair, ctx, record=full_record, **figures)

        return TaskResult(record, per_sample, describe=scoring.describe(method, "ood"), write_extra=write_figures)


def per_sample_columns(pair: Pair, s_id: Scores, s_ood: Scores) -> dict[str, np.ndarray]:
    """Long table: split, label, sample index, score and every extra (one column per repeat)."""
    n_id, n_ood = len(s_id.values), len(s_ood.values)
    cols: dict[str, np.ndarray] = {
        "split": np.array(["id"] * n_id + ["ood"] * n_ood),
        "label": np.r_[pair.id_test.labels, pair.ood_test.labels],
        "sample_index": np.r_[pair.id_test.indices, pair.ood_test.indices],
        "score": np.r_[s_id.values, s_ood.values],
    }
    both = {k: np.concatenate([np.asarray(s_id.extras[k]), np.asarray(s_ood.extras[k])]) for k in s_id.extras}
    return {**cols, **extra_columns(both)}
