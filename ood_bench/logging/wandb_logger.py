"""Send a run record (and optionally per-sample scores) to Weights & Biases."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")


def log_to_wandb(
    record: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    mode: str = "offline",
    project: str = "ood_bench",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    dir: str | Path | None = None,
    per_sample: Mapping[str, np.ndarray] | None = None,
    images: Mapping[str, str | Path] | None = None,
) -> str | None:
    """Create one W&B run holding ``record`` as summary and log; return the run's local directory.

    ``images`` maps a W&B key to a PNG file (e.g. the run folder's figures), logged as ``wandb.Image``.
    """
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={mode!r} is not valid; valid: {list(WANDB_MODES)}")
    import wandb

    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
    name = f"{record.get('method')}-{record.get('data')}-{record.get('config_hash')}"
    run = wandb.init(
        project=project,
        entity=entity,
        group=group,
        tags=list(tags or []),
        dir=str(dir) if dir else None,
        mode=mode,
        name=name,
        config=dict(config),
        reinit="finish_previous",
    )
    try:
        metrics = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        run.log(metrics)
        run.summary.update(dict(record))
        if per_sample:
            cols = list(per_sample)
            table = wandb.Table(columns=cols, data=[list(r) for r in zip(*(per_sample[c].tolist() for c in cols))])
            run.log({"scores": table})
        if images:
            run.log({key: wandb.Image(str(path)) for key, path in images.items()})
        run_dir = getattr(run, "dir", None)
    finally:
        run.finish()
    if mode != "disabled":
        log.info("W&B run (%s) written: %s", mode, run_dir)
    return str(Path(run_dir).parent) if run_dir else None
