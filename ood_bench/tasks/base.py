"""The task contract: a task family owns its data loading, its fit/score protocol, its metrics and its columns.

The runner does the same for every task (validate, hash the settings, skip a complete run, write the results, log
them) and hands the middle of the path to the data's task:
``task.run(cfg, method, build, ctx, identity, scoring) -> TaskResult``, where ``scoring`` (``tasks/shards.py``) is the
kind of work: the whole cell, one shard of it, or the merge of its shards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from omegaconf import DictConfig

from ood_bench.methods import Context, Method
from ood_bench.results import format_table
from ood_bench.tasks.shards import WHOLE, Scoring


@dataclass
class TaskResult:
    """What a task hands back to the runner.

    ``record`` is the run's headline row (summary.csv, runs.csv, the W&B summary); ``rows`` the run's full table
    when it has more than one row (anomaly: one per category and shot seed, plus mean and std rows); ``files``
    extra run-folder files (name -> file to copy, or text), ``images`` the W&B keys of figure files among them.
    File contents are text (``str``) or bytes (a PNG). ``write_extra(folder, record)`` may write more files (figures
    drawn from the full record) into the run folder before it is marked done.
    """

    record: dict[str, Any]
    per_sample: dict[str, np.ndarray]
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str | bytes] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    describe: dict[str, Any] | None = None  # the method's settings as run (None: the runner's instance describes)
    write_extra: Callable[[Path, dict[str, Any]], Any] | None = None


def extra_columns(extras: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A method's per-sample extras as scores.csv columns (``[N, K]`` becomes K columns ``<name>_<k>``)."""
    cols: dict[str, np.ndarray] = {}
    for key, v in extras.items():
        v = np.asarray(v)
        if v.ndim == 1:
            cols[key] = v
        else:
            cols.update({f"{key}_{k}": v[:, k] for k in range(v.shape[1])})
    return cols


class Task(ABC):
    """One task family (``data.task``)."""

    name: ClassVar[str]
    #: the ``Method.tasks`` entry a method needs to serve this task (``None``: the task's own name)
    method_task: ClassVar[str | None] = None
    #: metric columns a sweeper may optimise (``optimized_metric``); the first is the default
    metrics: ClassVar[tuple[str, ...]]
    #: columns of the printed table and the convention printed under it
    table_columns: ClassVar[list[str]]
    convention: ClassVar[str]

    @abstractmethod
    def validate(self, data: DictConfig) -> None:
        """Fail at start on bad data settings, naming the key and the valid values."""

    @abstractmethod
    def data_identity(self, data: DictConfig) -> dict[str, Any]:
        """The data settings that determine the numbers (paths and download switches do not)."""

    @abstractmethod
    def run(
        self,
        cfg: DictConfig,
        method: Method,
        build: Callable[[], Method],
        ctx: Context,
        identity: dict[str, Any],
        scoring: Scoring = WHOLE,
    ) -> TaskResult | None:
        """Load the data, fit and score (``method``, or fresh ones from ``build``), compute the metrics.

        ``identity`` is the run's config identity (what its hash covers), for the keys of cached artefacts.
        Every fit and score goes through ``scoring`` (the whole cell, a shard, or the merge of the shards); a
        shard run (``scoring.partial``) returns ``None``: its scores are in the cache, its merge has the metrics.
        """

    @property
    def serves(self) -> str:
        """The ``Method.tasks`` entry of the methods that can run this task."""
        return self.method_task or self.name

    def format(self, rows: list[Mapping[str, Any]]) -> str:
        """The printed table of ``rows`` with the task's metric convention under it."""
        return format_table(rows, self.table_columns, self.convention)
