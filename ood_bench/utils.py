"""Small shared helpers: stable hashing, per-sample seeding, atomic file writes, device choice."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def _jsonable(obj: Any) -> Any:
    """Turn configs (OmegaConf containers included), paths and tuples into plain JSON values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object that does not depend on key order."""
    blob = json.dumps(_jsonable(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | os.PathLike[str], length: int = 16) -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks (``length=64`` gives the full SHA-256)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def tensor_fingerprint(t: torch.Tensor, length: int = 16) -> str:
    """Content hash of a tensor (shape, dtype and bytes); a lazy ``ImageSet`` hashes its rows chunk by chunk to the
    same digest as its materialised tensor."""
    if not isinstance(t, torch.Tensor) and hasattr(t, "fingerprint"):
        return t.fingerprint(length)
    h = hashlib.sha256()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:length]


def sample_seed(base_seed: int, *keys: int) -> int:
    """Deterministic 63-bit seed for one sample (and repeat), independent of batching."""
    blob = ",".join(str(int(k)) for k in (base_seed, *keys)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def split_key(split: str | None) -> int:
    """A stable integer for a split name (``None`` -> 0), to key per-sample randomness by split as well as index."""
    return zlib.crc32((split or "").encode()) if split else 0


def sample_generators(
    base_seed: int, indices: Sequence[int], *keys: int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One seeded generator per sample, so random draws do not depend on the batch size."""
    return [torch.Generator(device=device).manual_seed(sample_seed(base_seed, int(i), *keys)) for i in indices]


def randn_per_sample(
    shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal tensor of ``shape`` whose row ``i`` comes from ``generators[i]``."""
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per row: got {len(generators)} for batch {shape[0]}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(rows).to(device)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} asked for, but CUDA is not available; use device=auto or device=cpu")
    return dev


# One precision vocabulary for every network evaluation: diffusion training (model.train.precision), diffusion
# sampling and feature encoders (method.precision). fp32 = full precision; bf16 / fp16 = torch.autocast.
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(precision: str, device: torch.device, key: str = "method.precision") -> None:
    """Raise when ``precision`` is unknown or not supported on ``device``, naming ``key`` and what would work.

    ``fp16`` needs CUDA (CPUs run it emulated, slower than fp32); ``bf16`` runs on CPUs (fast with AVX-512 bf16 /
    AMX) and on GPUs that support it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{key}={precision!r} is not valid; valid: {list(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        from ood_bench import fast_dev_run

        if fast_dev_run.active():  # the GPU config's dtype path, emulated on this device (slow, but it runs)
            log.warning("FAST_DEV_RUN: %s=fp16 on %s (CPU autocast to float16; a GPU run uses CUDA's)", key, device)
            return
        raise ValueError(f"{key}=fp16 needs a CUDA device (running on {device}); use {key}=bf16 or fp32 here")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{key}=bf16 is not supported by this GPU; use {key}=fp16 or fp32")


def autocast(
    device: torch.device, precision: str = "fp32", key: str = "method.precision"
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` (``bf16`` / ``fp16``) on ``device``; a no-op context for ``fp32``."""
    check_precision(precision, device, key)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])


@contextmanager
def count_calls(*modules: torch.nn.Module) -> Iterator[list[int]]:
    """Count forward calls of ``modules`` inside the block; yields a one-element list holding the count."""
    count = [0]

    def hook(*_args: Any) -> None:
        count[0] += 1

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(final: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def git_commit(root: str | os.PathLike[str] | None = None) -> str:
    """Short commit hash of the working tree (``+dirty`` when it has changes), or ``unknown``."""
    cwd = Path(root) if root else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha
