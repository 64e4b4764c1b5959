"""What a run costs: wall time per phase and peak memory (written into every results row).

Phases are named parts of a run that methods mark with ``with phase("train"):`` — ``train`` (fitting a network),
``features`` (feature extraction or diffusion inversion) and ``sampling`` (a diffusion sampling loop while
scoring). The runner resets them at the start of a run and writes ``<phase>_seconds`` into the row; the
benchmark (``scripts/bench.py``) splits a run's time with them. Peak memory: the process's resident-set peak
(Linux ``VmHWM``, reset at the start of the run through ``/proc/self/clear_refs``; elsewhere the lifetime peak of
``getrusage``) and, on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PHASES = ("train", "features", "sampling")
_seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
_cpu_seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the block's wall time (and CPU time) to phase ``name`` (CUDA work is waited for, so GPU time lands in
    its phase)."""
    if name not in _seconds:
        raise ValueError(f"phase {name!r} is not valid; valid: {list(PHASES)}")
    _sync()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        _sync()
        _seconds[name] += time.perf_counter() - t0
        _cpu_seconds[name] += time.process_time() - c0


def reset_phases() -> None:
    for name in _seconds:
        _seconds[name] = _cpu_seconds[name] = 0.0


def phase_seconds() -> dict[str, float]:
    """Seconds spent in each phase since the last reset (``<phase>_seconds`` columns)."""
    return {f"{name}_seconds": round(value, 3) for name, value in _seconds.items()}


def phase_cpu_seconds() -> dict[str, float]:
    """CPU seconds (all threads of this process) spent in each phase since the last reset: with one thread on a
    shared machine, about the phase's time on an idle core (the benchmark's efficiency ratio uses them on CPU)."""
    return {f"{name}_cpu_seconds": round(value, 3) for name, value in _cpu_seconds.items()}


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm_mb() -> float | None:
    """The resident-set peak from ``/proc/self/status`` (MiB), or ``None`` off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of this process from ``start()`` on: ``peak_rss_mb`` and, on CUDA, ``peak_cuda_mb``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_scope = "run"

    def start(self) -> PeakMemory:
        try:  # writing 5 resets the peak RSS to the current RSS (Linux >= 4.0)
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.rss_scope = "process"  # the peak since the process started
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def record(self) -> dict[str, float | str]:
        hwm = _vm_hwm_mb() if self.rss_scope == "run" else None
        if hwm is None:
            self.rss_scope = "process"
            # ru_maxrss: KiB on Linux, bytes on macOS
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)
        out: dict[str, float | str] = {"peak_rss_mb": round(hwm, 1), "peak_rss_scope": self.rss_scope}
        if self.device.type == "cuda":
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(self.device) / (1 << 20), 1)
        return out
