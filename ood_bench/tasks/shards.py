"""One cell, many workers: how a task fits and scores, for a whole cell, one shard of it, or the merge of its shards.

``shard.count=N shard.index=i`` makes a run score only shard ``i`` of every test split: the contiguous block
``shard_bounds(n, N, i)`` of sample positions (``np.array_split``), the same whatever the batch size. The method is
handed those samples with their ORIGINAL indices, so its per-sample randomness (seeded by sample index) and therefore
every score equal the unsharded run's. A shard run fits as usual (a trained model is built once, under the cache's
entry lock: the other shards wait, then reuse it), stores its per-sample scores in the artefact cache (kind
``shard_scores``, keyed by the cell's config hash, the shard and the part: ``shard.*`` never joins the config hash)
and writes no results folder. The merge run (a run without ``shard.index`` once the cell has shards in the cache,
or ``shard.merge=true``) builds no model and evaluates no network: it concatenates the shards' scores in the
original order and the task computes the metrics and writes the normal results folder and row.

A task calls the same four methods whatever the kind of work (``Scoring``): ``fit``, ``score``, ``describe`` and,
through the runner, ``finish``; the part names (``"id"``, ``"ood"``; ``"<seed>:<group>:<category>"``) identify what
is scored, so the merge finds each part's shards.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ood_bench.cache import ArtifactCache
from ood_bench.errors import UserError
from ood_bench.methods import Context, Method, Scores

log = logging.getLogger(__name__)

SCORES_KIND = "shard_scores"
PLAN_KIND = "shard_plan"
SHARD_VERSION = 1
DONE_PART = "__done__"
MERGE_CHOICES = (None, True, False)


class MissingShardsError(UserError):
    """A merge run found shards of the cell missing from the cache (the message names them)."""


def shard_bounds(n: int, count: int, index: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of shard ``index`` of ``count`` over ``n`` samples: contiguous, balanced blocks
    (``np.array_split``), so the shards concatenate in the original order and a lazy image set can slice them."""
    base, extra = divmod(n, count)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def check_shard_cfg(shard: Mapping[str, Any] | None) -> None:
    """Fail at start on bad ``shard.*`` values, naming the key and the valid ones."""
    shard = shard or {}
    count, index, merge = shard.get("count"), shard.get("index"), shard.get("merge")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ValueError(f"shard.count={count!r} is not valid; use a positive integer or null (no sharding)")
    if index is not None:
        if count is None:
            raise ValueError(f"shard.index={index!r} needs shard.count (the number of shards)")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
            raise ValueError(f"shard.index={index!r} is not valid; valid: 0..{count - 1} (shard.count={count})")
    if merge not in MERGE_CHOICES:
        raise ValueError(f"shard.merge={merge!r} is not valid; valid: null (auto), true, false")
    if merge is True and index is not None:
        raise ValueError("shard.merge=true assembles all shards; drop shard.index (or set shard.merge=null)")


# ---------------------------------------------------------------------------------------------------------------
# The three kinds of work
# ---------------------------------------------------------------------------------------------------------------


class Scoring:
    """A whole cell: fit, then score every sample (the default)."""

    #: True for a shard run: its scores go to the cache and the task returns no results
    partial = False
    #: True when a shard run finds its shard complete in the cache (nothing to do)
    done = False

    def fit(
        self, method: Method, part: str, images: torch.Tensor, ctx: Context, labels: np.ndarray | None = None
    ) -> float:
        """Fit ``method``; returns the seconds it took."""
        t0 = time.perf_counter()
        method.fit(images, ctx, labels=labels)
        return time.perf_counter() - t0

    def score(
        self,
        method: Method,
        part: str,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> tuple[Scores, float]:
        """Score ``images`` (the part's samples); returns the scores and the seconds it took."""
        t0 = time.perf_counter()
        s = method.score(images, ctx, indices=indices, labels=labels, split=split)
        return s, time.perf_counter() - t0

    def describe(self, method: Method, part: str) -> dict[str, Any]:
        """The method's settings as run, after scoring ``part``."""
        return method.describe()

    def finish(self) -> dict[str, Any]:
        """Called once the task has scored everything (a shard marks itself complete)."""
        return {}


WHOLE = Scoring()


class _ShardStore:
    """The cache entries of one cell's shards."""

    def __init__(self, cache: ArtifactCache, cell: str, count: int) -> None:
        self.cache, self.cell, self.count = cache, cell, count

    def spec(self, part: str, index: int) -> dict[str, Any]:
        return {"version": SHARD_VERSION, "cell": self.cell, "count": self.count, "index": index, "part": part}

    def entry(self, part: str, index: int) -> Path | None:
        key = self.cache.key(SCORES_KIND, self.spec(part, index))
        return self.cache.entry(SCORES_KIND, key) if self.cache.has(SCORES_KIND, key) else None

    def missing(self, part: str) -> list[int]:
        return [i for i in range(self.count) if self.entry(part, i) is None]

    def put(self, part: str, index: int, meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> Path:
        def build(tmp: Path) -> None:
            if arrays is not None:
                np.savez(tmp / "arrays.npz", **arrays)
            (tmp / "meta.json").write_text(json.dumps(meta, default=str))

        entry, _ = self.cache.get_or_create(SCORES_KIND, self.spec(part, index), build)
        return entry


def plan_count(cache: ArtifactCache, cell: str) -> int | None:
    """The number of shards the cell was split into (``None``: never sharded)."""
    spec = {"version": SHARD_VERSION, "cell": cell}
    key = cache.key(PLAN_KIND, spec)
    if not cache.has(PLAN_KIND, key):
        return None
    return int(json.loads((cache.entry(PLAN_KIND, key) / "plan.json").read_text())["count"])


def _record_plan(cache: ArtifactCache, cell: str, count: int) -> None:
    """Record (once) how many shards the cell is split into; a shard of another count is refused."""
    spec = {"version": SHARD_VERSION, "cell": cell}

    def build(tmp: Path) -> None:
        (tmp / "plan.json").write_text(json.dumps({"count": count}))

    entry, _ = cache.get_or_create(PLAN_KIND, spec, build)
    planned = int(json.loads((entry / "plan.json").read_text())["count"])
    if planned != count:
        raise UserError(
            f"shard.count={count} is not valid for cell {cell}: its shards in the cache split it into {planned} "
            f"(use shard.count={planned}, or delete {entry} and the cell's {SCORES_KIND} entries to split it anew)"
        )


def _scores_arrays(s: Scores) -> dict[str, np.ndarray]:
    arrays = {"values": s.values}
    for k, v in s.extras.items():
        v = np.asarray(v)
        arrays[f"extra:{k}"] = v.astype(str) if v.dtype == object else v  # npz without pickles
    if s.maps is not None:
        arrays["maps"] = s.maps
    return arrays


class ShardPart(Scoring):
    """Shard ``index`` of ``count``: fit, score the shard's block of every part, store it in the cache."""

    partial = True

    def __init__(self, cache: ArtifactCache, cell: str, count: int, index: int) -> None:
        self.store = _ShardStore(cache, cell, count)
        self.count, self.index = count, index
        _record_plan(cache, cell, count)

    @property
    def done(self) -> bool:
        return self.store.entry(DONE_PART, self.index) is not None

    def fit(
        self, method: Method, part: str, images: torch.Tensor, ctx: Context, labels: np.ndarray | None = None
    ) -> float:
        seconds = super().fit(method, part, images, ctx, labels)
        self.store.put(f"fit:{part}", self.index, {"seconds": seconds})
        return seconds

    def score(
        self,
        method: Method,
        part: str,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> tuple[Scores, float]:
        n = len(images)
        lo, hi = shard_bounds(n, self.count, self.index)
        log.info("shard %d of %d, part %s: samples %d..%d of %d", self.index, self.count, part, lo, hi - 1, n)
        meta: dict[str, Any] = {"n": n, "lo": lo, "hi": hi, "seconds": 0.0, "nfe_per_image": 0.0}
        if hi == lo:  # more shards than samples: this shard has none of this part
            s = Scores(np.zeros(0))
            meta["describe"] = {}
            self.store.put(part, self.index, meta, _scores_arrays(s))
            return s, 0.0
        rows = slice(lo, hi)
        y = None if labels is None else labels[rows]
        block = images.subset(np.arange(lo, hi)) if hasattr(images, "subset") else images[rows]  # lazy sets stay lazy
        s, seconds = super().score(method, part, block, ctx, np.asarray(indices)[rows], y, split)
        meta.update(seconds=seconds, nfe_per_image=s.nfe_per_image, describe=method.describe())
        self.store.put(part, self.index, meta, _scores_arrays(s))
        return s, seconds

    def finish(self) -> dict[str, Any]:
        self.store.put(DONE_PART, self.index, {"count": self.count})
        log.info(
            "shard %d of %d of cell %s is in the cache; the merge run (without shard.index) writes the results",
            self.index,
            self.count,
            self.store.cell,
        )
        return {"shard_count": self.count, "shard_index": self.index}


class ShardMerge(Scoring):
    """Assemble a cell from its shards in the cache: no fit, no network evaluation."""

    def __init__(self, cache: ArtifactCache, cell: str, count: int) -> None:
        self.store = _ShardStore(cache, cell, count)
        self.count = count
        # per part, in the order merged: every non-empty shard's description after it and its number of samples
        self._describes: dict[str, list[tuple[dict[str, Any], int]]] = {}
        self._order: list[str] = []
        self._require(DONE_PART)
        log.info("cell %s: merging its %d shards from the cache (no fit, no network evaluation)", cell, count)

    def _require(self, part: str) -> list[Path]:
        missing = self.store.missing(part)
        if missing:
            what = "have not completed" if part == DONE_PART else f"have no scores for part {part!r}"
            raise MissingShardsError(
                f"cell {self.store.cell}: shard(s) {missing} of shard.count={self.count} {what}; run them first, "
                f"e.g. `python run.py <same settings> shard.count={self.count} shard.index={missing[0]}` "
                f"(or a sweep: shard.index={','.join(map(str, missing))})"
            )
        return [self.store.entry(part, i) for i in range(self.count)]

    def fit(
        self, method: Method, part: str, images: torch.Tensor, ctx: Context, labels: np.ndarray | None = None
    ) -> float:
        """No fit: the shards' scores are in the cache. Returns the shards' fit seconds, summed."""
        entries = self._require(f"fit:{part}")
        return float(sum(json.loads((e / "meta.json").read_text())["seconds"] for e in entries))

    def score(
        self,
        method: Method,
        part: str,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> tuple[Scores, float]:
        """The shards' scores of ``part`` concatenated in the original order; the shards' seconds, summed."""
        metas, arrays = [], []
        for i, entry in enumerate(self._require(part)):
            meta = json.loads((entry / "meta.json").read_text())
            expected = shard_bounds(len(images), self.count, i)
            if (meta["n"], meta["lo"], meta["hi"]) != (len(images), *expected):
                raise MissingShardsError(
                    f"cell {self.store.cell}: shard {i} of part {part!r} scored samples {meta['lo']}..{meta['hi'] - 1} "
                    f"of {meta['n']}, but this run has {len(images)} samples (shard {i} = {expected[0]}.."
                    f"{expected[1] - 1}): the data changed; rerun the shards"
                )
            with np.load(entry / "arrays.npz") as z:
                arrays.append({k: z[k] for k in z.files})
            metas.append(meta)
        full = [(m, a) for m, a in zip(metas, arrays) if m["hi"] > m["lo"]]
        values = np.concatenate([a["values"] for _, a in full])
        keys = [k for k in full[0][1] if k.startswith("extra:") and all(k in a for _, a in full)]
        extras = {k.removeprefix("extra:"): np.concatenate([a[k] for _, a in full]) for k in keys}
        maps = np.concatenate([a["maps"] for _, a in full]) if all("maps" in a for _, a in full) else None
        nfe = sum(m["nfe_per_image"] * (m["hi"] - m["lo"]) for m, _ in full) / max(len(values), 1)
        self._describes[part] = [(m["describe"], m["hi"] - m["lo"]) for m, _ in full]
        self._order.append(part)
        return Scores(values, extras=extras, nfe_per_image=nfe, maps=maps), float(sum(m["seconds"] for m in metas))

    def describe(self, method: Method, part: str) -> dict[str, Any]:
        """The method's description after ``part``, from the shards' (each stored one after every part it scored).

        A value every shard reports is kept. A number that differs between shards is a per-sample statistic of the
        part that produced it (the first part after which every shard reports its final value: ``id`` for a
        classifier's ID accuracy, ``ood`` for the NFE per OOD image): the shards' values are averaged weighted by
        the number of samples each scored in that part, which is the whole run's value (to the method's rounding)
        for per-sample means. Anything else is listed per shard, joined by ';'.
        """
        order = self._order[: self._order.index(part) + 1]
        final = self._describes[part]
        out: dict[str, Any] = {}
        for key in final[0][0] if final and final[0] else {}:
            values = [d.get(key) for d, _ in final]
            if all(v == values[0] for v in values):
                out[key] = values[0]
                continue
            producer = next((p for p in order if [d.get(key) for d, _ in self._describes[p]] == values), part)
            weights = [n for _, n in self._describes[producer]]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if numeric and len(weights) == len(values) and sum(weights) > 0:
                out[key] = round(float(np.average(np.asarray(values, dtype=np.float64), weights=weights)), 6)
            else:
                out[key] = ";".join(map(str, values))
        return out

    def finish(self) -> dict[str, Any]:
        return {"shard_count": self.count}


def scoring_for(shard: Mapping[str, Any] | None, cache: ArtifactCache, cell: str) -> Scoring:
    """The kind of work of a run: a shard (``shard.index`` set), the merge of the cell's shards (``shard.merge=true``,
    or by default when the cache holds a shard plan for the cell), or the whole cell."""
    shard = shard or {}
    count, index, merge = shard.get("count"), shard.get("index"), shard.get("merge")
    if index is not None:
        return ShardPart(cache, cell, int(count), int(index))
    if merge is False:
        return WHOLE
    planned = plan_count(cache, cell)
    if count is not None and planned is not None and planned != count:
        raise UserError(
            f"shard.count={count} is not valid for cell {cell}: its shards in the cache split it into {planned}"
        )
    count = count if count is not None else planned
    if count is None:
        if merge is True:
            raise MissingShardsError(
                f"shard.merge=true, but cell {cell} has no shards in the cache; run them first "
                f"(`shard.count=N shard.index=i` for i in 0..N-1)"
            )
        return WHOLE
    return ShardMerge(cache, cell, int(count))
