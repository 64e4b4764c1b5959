"""Build an OOD pair: ID train, ID test and OOD test, with subset sizes, a seed and one resize protocol."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ood_bench.data import transforms
from ood_bench.data.imageset import ImageSet
from ood_bench.data.sources import Source
from ood_bench.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Images ``[N,C,H,W]`` in ``[0,1]``, their labels and their indices in the source split.

    ``images`` is a lazy ``ImageSet`` (decoded batch by batch; ``images[a:b]`` is a float tensor) or, after
    ``materialize()`` / ``data.in_memory=true``, the float tensor itself; methods accept either.
    """

    images: ImageSet | torch.Tensor
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, positions: np.ndarray | list[int]) -> Split:
        """The rows at ``positions`` (0-based positions in this split, in the given order); each row keeps its
        source index (``indices``), so per-sample seeds and cache keys are those of the full split."""
        pos = np.asarray(positions, dtype=np.int64)
        images = self.images.subset(pos) if isinstance(self.images, ImageSet) else self.images[torch.from_numpy(pos)]
        return Split(images, self.labels[pos], self.indices[pos])

    def materialize(self) -> Split:
        """The same split with its images as one float tensor (the in-memory path)."""
        images = self.images.materialize() if isinstance(self.images, ImageSet) else self.images
        return Split(images, self.labels, self.indices)


@dataclass
class Pair:
    """What every method sees: ID train, ID test and OOD test, plus a description."""

    name: str
    id_train: Split
    id_test: Split
    ood_test: Split
    meta: dict[str, Any] = field(default_factory=dict)

    def materialize(self) -> Pair:
        """The same pair with every split held in memory as float tensors (``data.in_memory=true``)."""
        return Pair(
            self.name, self.id_train.materialize(), self.id_test.materialize(), self.ood_test.materialize(), self.meta
        )


def _select(
    source: Source, split: str, classes: list[int] | None, n: int | None, rng: np.random.Generator
) -> np.ndarray:
    labels = source.labels(split)
    idx = np.arange(len(labels))
    if classes is not None:
        unknown = sorted(set(classes) - set(np.unique(labels).tolist()))
        if unknown:
            raise ValueError(
                f"{source.name}: classes {unknown} not in the {split} split; valid: {np.unique(labels).tolist()}"
            )
        idx = idx[np.isin(labels, classes)]
    if n is not None and n >= 0:
        if n == 0:
            raise ValueError(f"{source.name}: a subset size of 0 leaves nothing to score; use null for all")
        if n < len(idx):
            idx = np.sort(rng.choice(idx, size=n, replace=False))
    return idx


def build_pair(
    name: str,
    id_source: Source,
    ood_source: Source,
    *,
    image_size: int,
    channels: int,
    n_train: int | None = None,
    n_id_test: int | None = None,
    n_ood_test: int | None = None,
    id_classes: list[int] | None = None,
    ood_classes: list[int] | None = None,
    resize_protocol: str = "common_min",
    seed: int = 0,
    num_workers: int = 0,
) -> Pair:
    """Select the subsets (seeded) and make each split a lazy ``ImageSet`` under the resize protocol.

    Only file headers are read here (all files are decoded once when a source skips undecodable ones); images are
    decoded when a batch is asked for, by ``num_workers`` DataLoader workers in ``ImageSet.batches``.
    """
    if channels not in (1, 3):
        raise ValueError(f"data.channels={channels} is not valid; valid: 1 or 3")
    if image_size < 8:
        raise ValueError(f"data.image_size={image_size} is too small; use at least 8")
    rng = np.random.default_rng(seed)
    sel = {
        "id_train": (id_source, "train", id_classes, n_train),
        "id_test": (id_source, "test", id_classes, n_id_test),
        "ood_test": (ood_source, "test", ood_classes, n_ood_test),
    }
    raw: dict[str, tuple[Source, str, tuple[int, int, int], np.ndarray, np.ndarray]] = {}
    skipped: dict[str, int] = {}
    for key, (src, split, classes, n) in sel.items():
        idx = _select(src, split, classes, n, rng)
        if idx.size == 0:
            raise ValueError(
                f"{name}: the {key} selection from {src.name} ({split} split, classes={classes}) is empty; "
                f"check the dataset's split (test-only sets such as textures cannot be the ID side) and the classes"
            )
        kept, shape = src.probe(split, idx)  # a source may skip undecodable files (on_bad_file=skip)
        if kept.size == 0:
            raise DataError(f"{name}: every file of the {key} selection from {src.name} was skipped as undecodable")
        skipped[key] = int(idx.size - kept.size)
        raw[key] = (src, split, shape, src.labels(split)[kept], kept)
    native = sorted({shape[-1] for _, _, shape, _, _ in raw.values()})
    via = transforms.common_size(native, image_size, resize_protocol)
    for src, _, shape, _, _ in raw.values():
        if via is not None and shape[-1] != shape[-2]:
            raise ValueError(f"{src.name}: images must be square before the resize protocol, got {tuple(shape[-2:])}")
    splits = {
        key: Split(
            ImageSet(
                src, split, idx, raw_shape=shape, channels=channels, size=image_size, via=via, num_workers=num_workers
            ),
            y,
            idx,
        )
        for key, (src, split, shape, y, idx) in raw.items()
    }
    meta = {
        "pair": name,
        "id": id_source.describe(),
        "ood": ood_source.describe(),
        "image_size": image_size,
        "channels": channels,
        "resize_protocol": resize_protocol,
        "native_sizes": native,
        "resize_via": via,
        "seed": seed,
        "n_train": len(splits["id_train"]),
        "n_id": len(splits["id_test"]),
        "n_ood": len(splits["ood_test"]),
        # undecodable files left out (on_bad_file=skip), per side of the pair
        "files_skipped": {"id": skipped["id_train"] + skipped["id_test"], "ood": skipped["ood_test"]},
    }
    sizes = {k: tuple(s.images.shape[-2:]) for k, s in splits.items()}
    log.info(
        "pair %s: %d ID train, %d ID test, %d OOD test, sizes %s (%d ch, via %s, protocol %s)",
        name,
        meta["n_train"],
        meta["n_id"],
        meta["n_ood"],
        sorted(set(sizes.values())),
        channels,
        via,
        resize_protocol,
    )
    return Pair(name, splits["id_train"], splits["id_test"], splits["ood_test"], meta)
