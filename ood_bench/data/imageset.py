"""A lazy image set: one split of a pair that decodes and resizes only the rows asked for.

An ``ImageSet`` stands where a float ``[N, C, H, W]`` tensor in ``[0, 1]`` used to: it has ``len``, ``shape``,
``dtype`` and ``dim()``, and indexing it (``images[a:b]``, ``images[idx]`` with an int array or tensor, ``images[i]``)
returns exactly the float rows the in-memory tensor held, bit for bit: each row is decoded from its source as uint8 and
passes through the same resize protocol (``transforms.prepare``), which works on every image on its own. Memory
therefore holds one batch of floats, never the split (array sources keep their uint8 array, image folders only the
file list).

``batches(batch_size)`` iterates the set in order through a ``torch.utils.data.DataLoader`` with ``num_workers``
worker processes (decoding and resizing run in the workers; ``pin_memory`` on CUDA). Decoding and the resize stay on
the CPU whatever the device, so the rows, the content fingerprint (``fingerprint``, equal to ``tensor_fingerprint`` of
the materialised tensor, hence the same cache keys as before) and the scores do not depend on the device or on the
number of workers. ``subset(positions)`` keeps the rows' source indices, so per-sample seeding is unchanged.
``materialize()`` builds the in-memory tensor (tests compare both paths).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ood_bench.data import transforms
from ood_bench.data.sources import Source
from ood_bench.errors import DataError

log = logging.getLogger(__name__)

#: rows decoded per chunk when the whole set is read (fingerprint, materialise)
CHUNK = 256


class _Rows(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: ``ds[positions]`` is the float batch of those rows."""

    def __init__(self, images: ImageSet) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, positions: Any) -> torch.Tensor:
        return self.images[positions]


class ImageSet:
    """Float images ``[N, C, H, W]`` in ``[0, 1]`` of ``source``'s ``split`` at ``indices``, decoded on demand.

    ``raw_shape`` is the uint8 ``(C, H, W)`` every sample decodes to (the pair checks it up front); ``channels``,
    ``size`` and ``via`` are the resize protocol's arguments (``via=None``: native size, as ``transforms.prepare``).
    """

    dtype = torch.float32

    def __init__(
        self,
        source: Source,
        split: str,
        indices: Sequence[int],
        *,
        raw_shape: tuple[int, int, int],
        channels: int,
        size: int,
        via: int | None,
        num_workers: int = 0,
    ) -> None:
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} is not valid; use an integer >= 0")
        self.source, self.split = source, split
        self.indices = np.asarray(indices, dtype=np.int64)
        self.raw_shape = tuple(int(v) for v in raw_shape)
        self.channels, self.size, self.via = channels, size, via
        self.num_workers = num_workers
        hw = self.raw_shape[1:] if via is None else (size, size)
        self.shape = torch.Size((len(self.indices), channels, *hw))
        self._fingerprints: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"ImageSet({self.source.name}/{self.split}, shape={tuple(self.shape)}, via={self.via})"

    def dim(self) -> int:
        return 4

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # -- rows ---------------------------------------------------------------------------------------------------------
    def positions(self, key: Any) -> np.ndarray:
        """Row positions selected by ``key`` (slice, int, int/bool array, list or tensor), as ``tensor[key]``."""
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key]
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        arr = np.asarray(key)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(f"boolean index of shape {arr.shape} for {n} images")
            return np.flatnonzero(arr)
        if arr.dtype.kind not in "iu":
            raise IndexError(f"images can be indexed by slices and integers, not {arr.dtype}")
        arr = arr.astype(np.int64)
        bad = arr[(arr >= n) | (arr < -n)]
        if bad.size:
            raise IndexError(f"index {int(bad[0])} is out of range for {n} images")
        return np.where(arr < 0, arr + n, arr)

    def uint8(self, positions: np.ndarray) -> torch.Tensor:
        """Decoded uint8 rows ``[k, C, H, W]`` at ``positions`` (in that order, repeats allowed)."""
        positions = np.asarray(positions, dtype=np.int64).ravel()
        if positions.size == 0:
            return torch.zeros((0, *self.raw_shape), dtype=torch.uint8)
        want = self.indices[positions]
        x, kept = self.source.load(self.split, want)
        if not np.array_equal(kept, want):
            lost = sorted(set(want.tolist()) - set(np.asarray(kept).tolist()))
            raise DataError(f"{self.source.name}: samples {lost[:5]} of the {self.split} split can no longer be read")
        if tuple(x.shape[1:]) != self.raw_shape:
            raise DataError(
                f"{self.source.name}: samples decode to {tuple(x.shape[1:])}, the set was built for {self.raw_shape}; "
                f"images of one source must share one size"
            )
        return x

    def __getitem__(self, key: Any) -> torch.Tensor:
        single = isinstance(key, int | np.integer) or (isinstance(key, torch.Tensor) and key.dim() == 0)
        pos = self.positions(np.asarray([int(key)]) if single else key)
        if pos.size == 0:
            out = torch.zeros((0, *self.shape[1:]), dtype=self.dtype)
        else:
            out = transforms.prepare(self.uint8(pos), channels=self.channels, size=self.size, via=self.via)
        return out[0] if single else out

    def subset(self, positions: Any) -> ImageSet:
        """The rows at ``positions`` as a new lazy set (their source indices, hence their seeds, are kept)."""
        out = ImageSet.__new__(ImageSet)
        out.__dict__.update(self.__dict__)
        out.indices = self.indices[self.positions(positions)]
        out.shape = torch.Size((len(out.indices), *self.shape[1:]))
        out._fingerprints = {}
        return out

    # -- whole-set passes -------------------------------------------------------------------------------------------
    def batches(self, batch_size: int, *, pin_memory: bool = False) -> Iterator[torch.Tensor]:
        """Float batches of ``batch_size`` rows in order (the last may be shorter), decoded by ``num_workers``."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        chunks = [np.arange(i, min(i + batch_size, len(self))) for i in range(0, len(self), batch_size)]
        if self.num_workers == 0 and not pin_memory:
            for pos in chunks:
                yield self[pos]
            return
        loader = torch.utils.data.DataLoader(
            _Rows(self),
            batch_size=None,  # the sampler yields whole batches of positions
            sampler=chunks,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
        yield from loader

    def fingerprint(self, length: int = 16) -> str:
        """``tensor_fingerprint`` of the materialised tensor, computed one chunk at a time (and remembered)."""
        if length not in self._fingerprints:
            h = hashlib.sha256()
            h.update(str((tuple(self.shape), str(self.dtype))).encode())
            for x in self.batches(CHUNK):
                h.update(x.contiguous().numpy().tobytes())
            self._fingerprints[length] = h.hexdigest()[:length]
        return self._fingerprints[length]

    def materialize(self) -> torch.Tensor:
        """The whole set as one float tensor, decoded and resized in one piece as the in-memory path always did
        (independent of the per-batch path, so tests can compare the two; memory grows with the set)."""
        return self[np.arange(len(self))]


def select_rows(images: torch.Tensor | ImageSet, positions: Any) -> torch.Tensor | ImageSet:
    """The rows of ``images`` at ``positions`` (a slice, or positions in order): still lazy for an ``ImageSet``
    (``subset``), indexed for a tensor. For a part of a split (a shard) that must not be decoded at once."""
    if isinstance(images, ImageSet):
        return images.subset(positions)
    if isinstance(positions, slice):
        return images[positions]
    return images[torch.as_tensor(np.asarray(positions, dtype=np.int64))]


def iter_batches(
    images: torch.Tensor | ImageSet, batch_size: int, device: torch.device | None = None
) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``images`` (a tensor or an ``ImageSet``), moved to ``device`` when given.

    An ``ImageSet`` streams through its DataLoader (pinned memory when ``device`` is CUDA); a tensor is sliced.
    """
    if isinstance(images, ImageSet):
        pin = device is not None and device.type == "cuda"
        for x in images.batches(batch_size, pin_memory=pin):
            yield x if device is None else x.to(device, non_blocking=pin)
        return
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        yield x if device is None else x.to(device)


class Prefetcher:
    """Reads ``images[idx]`` one batch ahead in a background thread, for training loops that draw random batches.

    The loop announces the next batch's indices (``ahead(idx)``, e.g. drawn from a copy of its generator, so its own
    random stream is unchanged) and later asks for them (``get(idx)``): the rows come from the thread when the
    indices match, else they are read now. Decoding (PIL) and resizing (torch) release the GIL, so they overlap the
    network step. A plain tensor is indexed directly (nothing to prefetch).
    """

    def __init__(self, images: torch.Tensor | ImageSet) -> None:
        self.images = images
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if isinstance(images, ImageSet) else None
        self.pending: tuple[torch.Tensor, Future] | None = None

    def ahead(self, idx: torch.Tensor) -> None:
        if self.pool is not None:
            self.pending = (idx.clone(), self.pool.submit(self.images.__getitem__, idx))

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if pending is not None and torch.equal(pending[0], idx):
            return pending[1].result()
        return self.images[idx]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
