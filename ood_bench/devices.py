"""Which device a job runs on: with ``device=auto`` every concurrent job on a multi-GPU machine takes its own GPU.

* ``CUDA_VISIBLE_DEVICES`` is honoured as torch honours it: a scheduler that gives each worker one GPU (SLURM
  with ``gpus_per_task``, Ray with ``num_gpus``) leaves one visible device, and the job takes ``cuda:0``.
* Several GPUs visible to several jobs at once (joblib workers on one machine): job ``n`` prefers
  ``cuda:<n mod count>`` and claims it with a file lock held until the job ends; a GPU claimed by another
  job is passed over for the next free one. When every GPU is taken the job shares its preferred one (logged).
  The locks live in ``$OOD_BENCH_GPU_LOCKS`` (default: a per-user folder in the system's temporary folder),
  so they are shared by all jobs of one machine, and the system releases them when a process dies.
* Anything other than ``auto`` (``cpu``, ``cuda``, ``cuda:1``) is used as given.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from ood_bench.utils import resolve_device

log = logging.getLogger(__name__)

_claim: FileLock | None = None  # the GPU lock of the job running in this process


def gpu_lock_dir() -> Path:
    """Folder of the per-GPU lock files (``$OOD_BENCH_GPU_LOCKS`` or ``<tmp>/ood_bench-gpus-<uid>``)."""
    env = os.environ.get("OOD_BENCH_GPU_LOCKS")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(env) if env else Path(tempfile.gettempdir()) / f"ood_bench-gpus-{uid}"


def choose_gpu(count: int, preferred: int, lock_dir: Path) -> tuple[int, FileLock | None]:
    """Claim a free GPU among ``count``: ``preferred`` first, then the next ones in turn.

    Returns ``(index, lock)``; the lock is held until released. When every GPU is claimed by another process,
    returns ``(preferred, None)``: the job shares that GPU.
    """
    if count < 1:
        raise ValueError(f"count={count} GPUs: need at least one")
    lock_dir.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        index = (preferred + k) % count
        lock = FileLock(str(lock_dir / f"cuda{index}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        return index, lock
    return preferred % count, None


def release_device() -> None:
    """Release the GPU this process claimed for its job (no-op when none was claimed)."""
    global _claim
    if _claim is not None:
        _claim.release()
        _claim = None


def claim_device(
    name: str = "auto", job_num: int | None = None, *, cuda_count: int | None = None, lock_dir: Path | None = None
) -> torch.device:
    """The device for one job: see the module docstring. ``cuda_count`` and ``lock_dir`` exist for tests."""
    global _claim
    if name != "auto":
        return resolve_device(name)
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if count == 0:
        return torch.device("cpu")
    if count == 1:
        return torch.device("cuda:0")
    release_device()
    preferred = (job_num or 0) % count
    index, _claim = choose_gpu(count, preferred, lock_dir or gpu_lock_dir())
    if _claim is None:
        log.warning("all %d GPUs are claimed by other jobs; job %s shares cuda:%d", count, job_num, index)
    else:
        log.info("job %s claimed cuda:%d of %d visible GPUs", job_num, index, count)
    return torch.device(f"cuda:{index}")


def hydra_job_num() -> int | None:
    """The number of the running Hydra job in its sweep (``None`` outside a Hydra multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    num = OmegaConf.select(HydraConfig.get(), "job.num", default=None, throw_on_missing=False)
    return int(num) if isinstance(num, int) else None
