"""Build a benchmark: one ID dataset (train and test splits) against several OOD test sets, each ``near`` or ``far``.

The subsets are drawn as a pair draws them (``build_pair``: ID train, then ID test, then the OOD test set from the
same seeded generator), each OOD set from a copy of the generator's state after the ID draws. So a benchmark's row
for OOD set ``X`` scores exactly the samples of the pair ``<id>_X`` with the same sizes and seed. The resize protocol
spans the whole benchmark: every split passes through one intermediate size (``common_min``: the smallest native
size among the ID set and all OOD sets), so the ID splits are prepared, and scored, once for every OOD set.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ood_bench.data import transforms
from ood_bench.data.pair import Pair, Split, _select
from ood_bench.data.sources import Source
from ood_bench.errors import DataError
from ood_bench.utils import tensor_fingerprint

log = logging.getLogger(__name__)

GROUPS = ("near", "far")


@dataclass
class Bench:
    """ID train, ID test and the OOD test sets (name -> split, in config order) with their groups."""

    name: str
    id_train: Split
    id_test: Split
    oods: dict[str, Split]
    groups: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)

    def pair(self, ood_set: str) -> Pair:
        """The benchmark seen as the pair ``<id>_<ood_set>`` (figures and methods that want a ``Pair``)."""
        return Pair(f"{self.name}:{ood_set}", self.id_train, self.id_test, self.oods[ood_set], self.meta)


def build_bench(
    name: str,
    id_source: Source,
    ood_sources: Mapping[str, Source],
    groups: Mapping[str, str],
    *,
    image_size: int,
    channels: int,
    n_train: int | None = None,
    n_id_test: int | None = None,
    n_ood_test: int | None = None,
    id_classes: list[int] | None = None,
    ood_classes: Mapping[str, list[int] | None] | None = None,
    resize_protocol: str = "common_min",
    seed: int = 0,
) -> Bench:
    """Select the subsets (seeded as a pair would), decode them and apply one resize protocol to every split."""
    if channels not in (1, 3):
        raise ValueError(f"data.channels={channels} is not valid; valid: 1 or 3")
    if not ood_sources:
        raise ValueError(f"{name}: data.ood_sets is empty; a benchmark needs at least one OOD set")
    bad = {k: g for k, g in groups.items() if g not in GROUPS}
    if bad or set(groups) != set(ood_sources):
        raise ValueError(f"{name}: every OOD set needs a group in {list(GROUPS)}; got {dict(groups)}")
    ood_classes = ood_classes or {}
    rng = np.random.default_rng(seed)
    sel: dict[str, tuple[Source, str, list[int] | None, int | None, np.random.Generator]] = {
        "id_train": (id_source, "train", id_classes, n_train, rng),
        "id_test": (id_source, "test", id_classes, n_id_test, rng),
    }
    raw: dict[str, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
    skipped: dict[str, int] = {}
    for key, (src, split, classes, n, gen) in sel.items():
        raw[key], skipped[key] = _load(name, key, src, split, classes, n, gen)
    after_id = copy.deepcopy(rng.bit_generator.state)
    for key, src in ood_sources.items():
        gen = np.random.default_rng()
        gen.bit_generator.state = copy.deepcopy(after_id)  # as build_pair draws the OOD side of <id>_<key>
        raw[f"ood:{key}"], skipped[f"ood:{key}"] = _load(
            name, f"OOD set {key!r}", src, "test", ood_classes.get(key), n_ood_test, gen
        )
    native = sorted({int(x.shape[-1]) for x, _, _ in raw.values()})
    via = transforms.common_size(native, image_size, resize_protocol)
    splits = {
        key: Split(transforms.prepare(x, channels=channels, size=image_size, via=via), y, idx)
        for key, (x, y, idx) in raw.items()
    }
    oods = {key: splits[f"ood:{key}"] for key in ood_sources}
    meta = {
        "bench": name,
        "id": id_source.describe(),
        "oods": {k: s.describe() for k, s in ood_sources.items()},
        "image_size": image_size,
        "channels": channels,
        "resize_protocol": resize_protocol,
        "native_sizes": native,
        "resize_via": via,
        "seed": seed,
        "n_train": len(splits["id_train"]),
        "n_id": len(splits["id_test"]),
        "n_ood": {k: len(s) for k, s in oods.items()},
        "files_skipped": {"id": skipped["id_train"] + skipped["id_test"], **{k: skipped[f"ood:{k}"] for k in oods}},
        "fingerprint": {k: tensor_fingerprint(s.images) for k, s in splits.items()},
    }
    log.info(
        "bench %s: %d ID train, %d ID test, OOD sets %s (%d ch, %d px via %s, protocol %s)",
        name,
        meta["n_train"],
        meta["n_id"],
        {k: f"{groups[k]}, {n}" for k, n in meta["n_ood"].items()},
        channels,
        image_size,
        via,
        resize_protocol,
    )
    return Bench(name, splits["id_train"], splits["id_test"], oods, dict(groups), meta)


def _load(
    name: str,
    what: str,
    src: Source,
    split: str,
    classes: list[int] | None,
    n: int | None,
    rng: np.random.Generator,
) -> tuple[tuple[torch.Tensor, np.ndarray, np.ndarray], int]:
    idx = _select(src, split, classes, n, rng)
    if idx.size == 0:
        raise ValueError(
            f"{name}: the {what} selection from {src.name} ({split} split, classes={classes}) is empty; check the "
            f"dataset's split (test-only sets such as textures cannot be the ID side) and the classes"
        )
    images, kept = src.load(split, idx)
    if kept.size == 0:
        raise DataError(f"{name}: every file of the {what} selection from {src.name} was skipped as undecodable")
    return (images, src.labels(split)[kept], kept), int(idx.size - kept.size)
