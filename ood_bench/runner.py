"""One run, one straight path: config -> data pair -> method (fit, score) -> metrics -> results and loggers."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ood_bench.cache import ArtifactCache
from ood_bench.data import Pair, build_pair
from ood_bench.data.transforms import PROTOCOLS
from ood_bench.logging import log_to_wandb
from ood_bench.logging.wandb_logger import WANDB_MODES
from ood_bench.methods import Context, build_method
from ood_bench.metrics import ood_metrics
from ood_bench.models.classifier import validate_classifier_cfg
from ood_bench.models.diffusion import validate_model_cfg
from ood_bench.results import RunStore, format_table
from ood_bench.utils import git_commit, resolve_device, stable_hash

log = logging.getLogger(__name__)

LOGGERS = ("csv", "wandb")


def validate(cfg: DictConfig) -> None:
    """Fail at start, naming the key and the valid values, before any data is read or model trained."""
    if cfg.data.resize_protocol not in PROTOCOLS:
        raise ValueError(f"data.resize_protocol={cfg.data.resize_protocol!r} is not valid; valid: {list(PROTOCOLS)}")
    if cfg.logger.name not in LOGGERS:
        raise ValueError(f"logger.name={cfg.logger.name!r} is not valid; valid: {list(LOGGERS)}")
    if cfg.logger.name == "wandb" and cfg.logger.mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={cfg.logger.mode!r} is not valid; valid: {list(WANDB_MODES)}")
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r} is not valid; use a positive integer or null (torch's default)")
    for key in ("n_train", "n_id_test", "n_ood_test"):
        v = cfg.data[key]
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise ValueError(f"data.{key}={v!r} is not valid; use a positive integer or null (all)")


def load_pair(data_cfg: DictConfig) -> Pair:
    """Instantiate the two dataset sources and build the pair."""
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
    )


def config_identity(cfg: DictConfig, method_cfg: dict[str, Any], uses_model: bool, runtime_keys: set[str]) -> dict:
    """The settings that determine a run's numbers (batch size, paths and loggers do not)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for side in ("id", "ood"):
        data[side] = {k: v for k, v in data[side].items() if k not in ("root", "download")}
    return {
        "data": data,
        "method": {k: v for k, v in method_cfg.items() if k not in runtime_keys},
        "model": OmegaConf.to_container(cfg.model, resolve=True) if uses_model else None,
        "seed": cfg.seed,
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one (data, method, model) cell and return its results record."""
    validate(cfg)
    device = resolve_device(cfg.device)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method = build_method(method_cfg)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(sample_size=cfg.data.image_size, channels=cfg.data.channels)
    if method.uses_image_model:
        validate_model_cfg(model_cfg)
    method.check(cfg.data.image_size, cfg.data.channels, model_cfg if method.uses_image_model else None)
    identity = config_identity(cfg, method_cfg, method.uses_image_model, set(method.runtime_keys))
    classifier_cfg = None
    if method.uses_classifier:  # only then: the config hashes of the other methods stay as they were
        classifier_cfg = OmegaConf.to_container(cfg.classifier, resolve=True)
        validate_classifier_cfg(classifier_cfg)
        identity["classifier"] = classifier_cfg
    config_hash = stable_hash(identity)
    store = RunStore(cfg.paths.results_dir, method.name, cfg.data.name, config_hash)
    if store.done and not cfg.overwrite:
        record = store.load_record()
        log.info("results for config %s are complete in %s; skipping (overwrite=true re-runs)", config_hash, store.dir)
        log.info("\n%s", format_table([record]))
        return record

    t_start = time.perf_counter()
    pair = load_pair(cfg.data)
    ctx = Context(
        device=device,
        cache=ArtifactCache(cfg.paths.cache_dir),
        seed=cfg.seed,
        weights_dir=Path(cfg.paths.weights_dir),
        model_cfg=model_cfg,
        data_meta=pair.meta,
        progress=cfg.progress,
        classifier_cfg=classifier_cfg,
    )
    t0 = time.perf_counter()
    method.fit(pair.id_train.images, ctx, labels=pair.id_train.labels)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_id = method.score(pair.id_test.images, ctx, indices=pair.id_test.indices, labels=pair.id_test.labels, split="id")
    s_ood = method.score(
        pair.ood_test.images, ctx, indices=pair.ood_test.indices, labels=pair.ood_test.labels, split="ood"
    )
    t_score = time.perf_counter() - t0
    metrics = ood_metrics(s_id.values, s_ood.values)
    n_id, n_ood = len(s_id.values), len(s_ood.values)

    record: dict[str, Any] = {
        "method": method.name,
        "data": cfg.data.name,
        "config_hash": config_hash,
        "n_id": n_id,
        "n_ood": n_ood,
        **metrics,
        "seconds": round(time.perf_counter() - t_start, 3),
        "fit_seconds": round(t_fit, 3),
        "score_seconds": round(t_score, 3),
        "nfe_per_image": s_id.nfe_per_image,
        "images_per_s": round((n_id + n_ood) / max(t_score, 1e-9), 4),
        "device": str(device),
        "git_commit": git_commit(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": cfg.seed,
        "model": cfg.model.name if method.uses_image_model else "",
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "resize_protocol": cfg.data.resize_protocol,
        "resize_via": pair.meta["resize_via"],
        "n_train": pair.meta["n_train"],
        "id_files": pair.meta["id"].get("files", pair.meta["id"]["type"]),
        "ood_files": pair.meta["ood"].get("files", pair.meta["ood"]["type"]),
        **{f"method.{k}": v for k, v in method.describe().items()},
    }
    per_sample = _per_sample_columns(pair, s_id, s_ood)
    store.write(record, per_sample, OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.logger.name == "wandb":
        log_to_wandb(
            record,
            identity,
            mode=cfg.logger.mode,
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group,
            tags=list(cfg.logger.tags or []),
            dir=cfg.logger.dir,
            per_sample=per_sample if cfg.logger.log_scores else None,
        )
    log.info("\n%s", format_table([record]))
    return record


def _per_sample_columns(pair: Pair, s_id, s_ood) -> dict[str, np.ndarray]:
    """Long table: split, label, sample index, score and every extra (one column per repeat)."""
    n_id, n_ood = len(s_id.values), len(s_ood.values)
    cols: dict[str, np.ndarray] = {
        "split": np.array(["id"] * n_id + ["ood"] * n_ood),
        "label": np.r_[pair.id_test.labels, pair.ood_test.labels],
        "sample_index": np.r_[pair.id_test.indices, pair.ood_test.indices],
        "score": np.r_[s_id.values, s_ood.values],
    }
    for key in s_id.extras:
        both = np.concatenate([np.asarray(s_id.extras[key]), np.asarray(s_ood.extras[key])])
        if both.ndim == 1:
            cols[key] = both
        else:
            for j in range(both.shape[1]):
                cols[f"{key}_{j}"] = both[:, j]
    return cols
