"""The entry point owns failures: FAILED markers, one clear message for the user's errors, sweeps that go on.

``task_wrapper`` wraps ``run.py``'s task function (as lightning-hydra-template's ``task_wrapper``):

* a failing job writes a ``FAILED`` marker (JSON: error type, message, traceback, overrides) into its Hydra job
  folder and into its results run folder when that is known, and closes an open W&B run;
* a user error (``ood_bench.errors``) prints one message (what, where, how to fix) without a traceback unless
  ``HYDRA_FULL_ERROR=1``; any other exception is a bug and keeps its traceback;
* single run: the process exits non-zero (user error) or the exception propagates to Hydra (bug);
* multirun: the failure is logged and the sweep goes on with the other cells; ``SweepSummary`` (a Hydra
  callback) lists the failed cells at the end and exits non-zero. A rerun skips the completed cells (``DONE``)
  and retries the failed and unfinished ones;
* Ctrl-C stops the sweep at once; the interrupted cell is left unfinished (no marker) and a rerun redoes it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ood_bench.errors import is_user_error
from ood_bench.utils import atomic_write_text

log = logging.getLogger("ood_bench")

FAILED = "FAILED"


def full_error() -> bool:
    """Whether the user asked for full tracebacks (Hydra's ``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def failure_record(err: BaseException, overrides: list[str] | None = None) -> dict[str, Any]:
    """What a FAILED marker holds."""
    return {
        "error": type(err).__name__,
        "message": str(err),
        "user_error": is_user_error(err),
        "overrides": list(overrides or []),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
    }


def write_failed(folder: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write (atomically) the FAILED marker into ``folder``."""
    path = Path(folder) / FAILED
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def read_failed(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The FAILED marker of ``folder``, or ``None``."""
    path = Path(folder) / FAILED
    return json.loads(path.read_text()) if path.is_file() else None


def close_wandb(exit_code: int = 0) -> None:
    """Finish the W&B run left open by this process, if any (a failed job must not leak into the next one)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


class Job:
    """What the wrapper learns about the running job: its results run folder, once the runner knows it."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None

    def on_store(self, store: Any) -> None:
        """Called by the runner with its ``RunStore`` as soon as the config hash is known."""
        self.run_dir = Path(store.dir)


def _hydra_job() -> tuple[bool, Path | None, list[str]]:
    """(multirun?, job output folder, task overrides) of the running Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False, None, []
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN, Path(hc.runtime.output_dir), list(hc.overrides.task)


def task_wrapper(task: Callable[[DictConfig, Job], float]) -> Callable[[DictConfig], float]:
    """Wrap ``task(cfg, job)``: FAILED markers, clean user errors, W&B closed and GPU released whatever happens."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> float:
        job = Job()
        multirun, job_dir, overrides = _hydra_job()
        try:
            return task(cfg, job)
        except Exception as err:
            record = failure_record(err, overrides)
            markers = [write_failed(job_dir, record)] if job_dir is not None else []
            if job.run_dir is not None and not (job.run_dir / "DONE").is_file():
                markers.append(write_failed(job.run_dir, record))  # a complete earlier run is left as it was
            close_wandb(exit_code=1)
            where = ", ".join(str(m) for m in markers) or "(no job folder)"
            if record["user_error"] and not full_error():
                log.error("%s: %s", record["error"], record["message"])
                log.error("FAILED marker: %s (HYDRA_FULL_ERROR=1 shows the traceback)", where)
                if not multirun:
                    raise SystemExit(1) from None
            elif multirun:
                log.exception("cell failed (FAILED marker: %s)", where)
            else:
                log.error("FAILED marker: %s", where)
                raise
            log.error("the sweep goes on with the other cells; rerun the same command to retry the failed ones")
            return float("nan")
        except KeyboardInterrupt:
            log.warning("interrupted: completed cells are kept; rerun the same command to resume the rest")
            raise
        finally:
            from ood_bench.devices import release_device

            close_wandb()
            release_device()

    return wrapped


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, list the cells that left a FAILED marker and exit non-zero."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        jobs = sorted(p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir())
        failed = [(job, read_failed(job)) for job in jobs if (job / FAILED).is_file()]
        if not failed:
            log.info("sweep finished: %d cells, none failed (%s)", len(jobs), sweep_dir)
            return
        for job, rec in failed:
            log.error("failed cell %s [%s]: %s: %s", job.name, " ".join(rec["overrides"]), rec["error"], rec["message"])
        log.error(
            "%d of %d cells failed (FAILED markers in their folders under %s); rerun the same command to retry "
            "them: completed cells are skipped",
            len(failed),
            len(jobs),
            sweep_dir,
        )
        raise SystemExit(1)
