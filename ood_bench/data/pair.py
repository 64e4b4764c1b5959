"""Build an OOD pair: ID train, ID test and OOD test, with subset sizes, a seed and one resize protocol."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ood_bench.data import transforms
from ood_bench.data.sources import Source
from ood_bench.errors import DataError
from ood_bench.utils import tensor_fingerprint

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Float images ``[N,C,H,W]`` in ``[0,1]``, their labels and their indices in the source split."""

    images: torch.Tensor
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Pair:
    """What every method sees: ID train, ID test and OOD test, plus a description."""

    name: str
    id_train: Split
    id_test: Split
    ood_test: Split
    meta: dict[str, Any] = field(default_factory=dict)


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
) -> Pair:
    """Select the subsets (seeded), decode them and apply the resize protocol to all three splits."""
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
    raw: dict[str, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
    skipped: dict[str, int] = {}
    for key, (src, split, classes, n) in sel.items():
        idx = _select(src, split, classes, n, rng)
        if idx.size == 0:
            raise ValueError(
                f"{name}: the {key} selection from {src.name} ({split} split, classes={classes}) is empty; "
                f"check the dataset's split (test-only sets such as textures cannot be the ID side) and the classes"
            )
        images, kept = src.load(split, idx)  # a source may skip undecodable files (on_bad_file=skip)
        if kept.size == 0:
            raise DataError(f"{name}: every file of the {key} selection from {src.name} was skipped as undecodable")
        skipped[key] = int(idx.size - kept.size)
        raw[key] = (images, src.labels(split)[kept], kept)
    native = sorted({int(x.shape[-1]) for x, _, _ in raw.values()})
    via = transforms.common_size(native, image_size, resize_protocol)
    splits = {
        key: Split(transforms.prepare(x, channels=channels, size=image_size, via=via), y, idx)
        for key, (x, y, idx) in raw.items()
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
        "fingerprint": {k: tensor_fingerprint(s.images) for k, s in splits.items()},
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
