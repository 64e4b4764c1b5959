"""One run, one straight path: config -> task (data, method fit/score, metrics) -> results and loggers.

The data config's ``task`` (``ood`` when absent: an ID/OOD pair; ``anomaly``: few-shot anomaly detection) picks the
task layer (``ood_bench/tasks/``) that owns the data loading, the fit/score protocol, the metrics and the columns.
"""

from __future__ import annotations

import copy
import gc
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ood_bench.cache import ArtifactCache
from ood_bench.costs import PeakMemory, phase_seconds, reset_phases
from ood_bench.devices import claim_device, hydra_job_num
from ood_bench.errors import ConfigError, config_errors
from ood_bench.logging import log_to_wandb
from ood_bench.logging.wandb_logger import WANDB_MODES
from ood_bench.methods import METHODS, Context, Method, build_method
from ood_bench.models.classifier import validate_classifier_cfg
from ood_bench.models.diffusion import validate_model_cfg
from ood_bench.results import RunStore
from ood_bench.tasks import Task, get_task
from ood_bench.tasks.shards import check_shard_cfg, scoring_for
from ood_bench.utils import git_commit, stable_hash

log = logging.getLogger(__name__)

LOGGERS = ("csv", "wandb")


def validate(cfg: DictConfig) -> None:
    """Fail at start, naming the key and the valid values, before any data is read or model trained."""
    task = get_task(cfg.data)
    task.validate(cfg.data)
    if cfg.logger.name not in LOGGERS:
        raise ValueError(f"logger.name={cfg.logger.name!r} is not valid; valid: {list(LOGGERS)}")
    if cfg.logger.name == "wandb" and cfg.logger.mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={cfg.logger.mode!r} is not valid; valid: {list(WANDB_MODES)}")
    check_shard_cfg(cfg.get("shard"))
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r} is not valid; use a positive integer or null (torch's default)")
    metric = cfg.get("optimized_metric")
    if metric is not None and metric not in task.metrics:
        raise ValueError(
            f"optimized_metric={metric!r} is not a metric of the {task.name} task; valid: {list(task.metrics)} "
            f"or null (= {task.metrics[0]})"
        )


# Keys added to configs after results were stored under their hashes: at these values (the behaviour from before
# the key existed) they are left out of the identity, so existing config hashes stay valid.
NEW_KEY_DEFAULTS = ((("model", "train", "sde"), "ddpm"), (("method", "diff_normalise"), "unit"))


def config_identity(cfg: DictConfig, method_cfg: dict[str, Any], uses_model: bool, runtime_keys: set[str]) -> dict:
    """The settings that determine a run's numbers (batch size, paths and loggers do not)."""
    identity = {
        "data": get_task(cfg.data).data_identity(cfg.data),
        "method": {k: v for k, v in method_cfg.items() if k not in runtime_keys},
        "model": OmegaConf.to_container(cfg.model, resolve=True) if uses_model else None,
        "seed": cfg.seed,
    }
    for (*parents, key), default in NEW_KEY_DEFAULTS:
        node: Any = identity
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key, default) == default:
            node.pop(key, None)
    return identity


# The seeds in a run's identity: runs that differ only in these are replicates of one setting (mean ± std).
SEED_KEYS = (
    ("seed",),
    ("data", "seed"),
    ("model", "train", "seed"),
    ("method", "train_seed"),
    ("classifier", "train", "seed"),
)


def setting_hash(identity: dict[str, Any]) -> str:
    """The config hash with every seed (``SEED_KEYS``) left out: the same for all replicates of a setting."""
    ident = copy.deepcopy(identity)
    for *parents, key in SEED_KEYS:
        node = ident
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            node[key] = None
    return stable_hash(ident)


def optimized_value(cfg: DictConfig, record: dict[str, Any]) -> float:
    """The value a Hydra sweeper optimises: ``optimized_metric``, or the task's headline metric when null."""
    if cfg.get("plan"):  # plan=true: the cell's planned H100-hours (ood_bench/plan.py)
        return float(record["H100_hours"])
    if record.get("shard_index") is not None:  # a shard run has no metrics: its merge run has them
        return float("nan")
    key = cfg.get("optimized_metric") or get_task(cfg.data).metrics[0]
    if key not in record:
        numeric = [k for k, v in record.items() if isinstance(v, float)]
        raise ConfigError(f"optimized_metric={key!r} is not in the results row; valid: {numeric}")
    return float(record[key])


def run_precision(method: Method, model_cfg: dict[str, Any]) -> dict[str, str]:
    """The precision of the method's network evaluations and, for a trained image diffusion model, its training."""
    out = {"precision": str(getattr(method, "precision", "fp32"))}
    if method.uses_image_model and not model_cfg.get("pretrained"):
        out["train_precision"] = str(model_cfg["train"].get("precision", "fp32"))
    return out


def check_task(task: Task, method: Method, data_name: str) -> None:
    """Refuse a method that does not serve the data's task, naming both and the methods that would."""
    if task.serves not in method.tasks:
        serving = sorted(name for name, cls in METHODS.items() if task.serves in cls.tasks and not name.startswith("_"))
        raise ValueError(
            f"method.name={method.name!r} serves the task(s) {list(method.tasks)}, but data={data_name!r} is "
            f"'{task.name}' data (data.task); methods for the {task.name} task: {serving}"
        )


def run(cfg: DictConfig, on_store: Callable[[RunStore], None] | None = None) -> dict[str, Any]:
    """Run one (data, method, model) cell and return its results record.

    ``on_store`` is called with the run's ``RunStore`` once the config hash is known (the entry point uses it
    to leave a FAILED marker in the run folder when the run fails). ``plan=true`` plans the cell instead
    (``ood_bench/plan.py``: FLOPs, memory, hours) and runs nothing heavy. ``fast_dev_run=true``
    (``debug=fast_dev_run``) runs the cell's ``ood_bench/fast_dev_run.py`` form: full size, few images, 2 steps.
    """
    try:
        if not cfg.get("fast_dev_run"):
            return _run(cfg, on_store)
        from ood_bench import fast_dev_run

        with fast_dev_run.mode(True), fast_dev_run.ParamCounter() as counter:
            return _run(fast_dev_run.rewrite(cfg), on_store, counter)
    finally:
        release_memory()


def release_memory() -> None:
    """Free what the cell left in reference cycles before the next cell of an in-process sweep (Hydra's basic
    launcher runs every cell in one process): a network held by a cycle would otherwise live until a full garbage
    collection, and the cells' models pile up in host and accelerator memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(cfg: DictConfig, on_store: Callable[[RunStore], None] | None = None, counter: Any = None) -> dict[str, Any]:
    if cfg.get("plan"):
        from ood_bench.plan import plan_run

        with config_errors():
            validate(cfg)
        return plan_run(cfg)
    with config_errors():  # errors up to here are the user's: bad settings, found before any data is read
        validate(cfg)
        task = get_task(cfg.data)
        device = claim_device(cfg.device, job_num=hydra_job_num())
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
        method = build_method(method_cfg)
        check_task(task, method, cfg.data.name)
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        model_cfg.update(sample_size=cfg.data.image_size, channels=cfg.data.channels)
        if method.uses_image_model:
            validate_model_cfg(model_cfg)
        method.check(cfg.data.image_size, cfg.data.channels, model_cfg if method.uses_image_model else None)
        classifier_cfg = None
        if method.uses_classifier:  # only then: the config hashes of the other methods stay as they were
            classifier_cfg = OmegaConf.to_container(cfg.classifier, resolve=True)
            validate_classifier_cfg(classifier_cfg)
    identity = config_identity(cfg, method_cfg, method.uses_image_model, set(method.runtime_keys))
    if classifier_cfg is not None:
        identity["classifier"] = classifier_cfg
    if cfg.get("fast_dev_run"):  # only then: the hashes of real runs stay as they were
        identity["fast_dev_run"] = True
    config_hash = stable_hash(identity)
    store = RunStore(cfg.paths.results_dir, method.name, cfg.data.name, config_hash)
    if on_store is not None:
        on_store(store)
    if store.done and not cfg.overwrite:
        record = store.load_record()
        store.ensure_indexed(record)  # killed between DONE and the runs.csv row: the row is added now
        log.info("results for config %s are complete in %s; skipping (overwrite=true re-runs)", config_hash, store.dir)
        log.info("\n%s", task.format(store.load_rows() or [record]))
        return record
    cache = ArtifactCache(cfg.paths.cache_dir)
    # the kind of work (ood_bench/tasks/shards.py): the whole cell, one shard of it, or the merge of its shards
    scoring = scoring_for(cfg.get("shard"), cache, config_hash)
    if scoring.partial and scoring.done:
        log.info("shard %s of cell %s is complete in the cache; skipping", cfg.shard.index, config_hash)
        return {"method": method.name, "data": cfg.data.name, "config_hash": config_hash, **scoring.finish()}

    t_start = time.perf_counter()
    memory = PeakMemory(device).start()
    cpu_start = time.process_time()
    reset_phases()
    ctx = Context(
        device=device,
        cache=cache,
        seed=cfg.seed,
        weights_dir=Path(cfg.paths.weights_dir),
        model_cfg=model_cfg,
        data_meta={},
        progress=cfg.progress,
        classifier_cfg=classifier_cfg,
    )
    result = task.run(cfg, method, lambda: build_method(method_cfg), ctx, identity, scoring)
    shards = scoring.finish()  # a merged cell's row says how many shards it was scored in
    if result is None:  # a shard: its per-sample scores are in the cache; the merge run writes the results
        return {"method": method.name, "data": cfg.data.name, "config_hash": config_hash, **shards}
    # CPU seconds of all threads: with threads=1 on a shared machine, about what the run takes alone
    cpu = {"cpu_seconds": round(time.process_time() - cpu_start, 3)}
    costs = {**cpu, **phase_seconds(), **memory.record(), **run_precision(method, model_cfg)}
    common = {"method": method.name, "data": cfg.data.name, "config_hash": config_hash}
    record: dict[str, Any] = {
        **common,
        "setting_hash": setting_hash(identity),
        **result.record,
        "seconds": round(time.perf_counter() - t_start, 3),
        **costs,
        "device": str(device),
        "git_commit": git_commit(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": cfg.seed,
        "model": cfg.model.name if method.uses_image_model else "",
        "deviations": "; ".join(cfg.get("deviations") or []),
        **shards,
        **({"fast_dev_run": True, "fast_dev_run_params": counter.total} if counter is not None else {}),
        **{f"method.{k}": v for k, v in (result.describe or method.describe()).items()},
    }
    rows = [{**common, **row} for row in result.rows]
    store.write(
        record,
        result.per_sample,
        OmegaConf.to_yaml(cfg, resolve=True),
        rows=rows,
        files=result.files,
        convention=task.convention,
        extra=(lambda folder: result.write_extra(folder, record)) if result.write_extra else None,
    )
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
            per_sample=result.per_sample if cfg.logger.log_scores else None,
            images={**store.figures(), **{key: store.dir / name for key, name in result.images.items()}} or None,
        )
    log.info("\n%s", task.format(rows or [record]))
    return record
