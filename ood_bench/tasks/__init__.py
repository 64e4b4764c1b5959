"""Task families, picked by the data config's ``task`` key: ``ood`` (ID/OOD pairs; the default when the key is
absent, so OOD configs and their hashes are unchanged), ``bench`` (one ID set against several OOD sets) and
``anomaly`` (few-shot anomaly detection)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ood_bench.tasks.anomaly import AnomalyTask
from ood_bench.tasks.base import Task, TaskResult
from ood_bench.tasks.bench import BenchTask
from ood_bench.tasks.ood import OodTask

TASKS: dict[str, Task] = {"ood": OodTask(), "bench": BenchTask(), "anomaly": AnomalyTask()}


def get_task(data_cfg: Mapping[str, Any]) -> Task:
    """The task of a data config (``data.task``, default ``ood``); a clear error lists the valid names."""
    name = data_cfg.get("task", "ood")
    if name not in TASKS:
        raise ValueError(f"data.task={name!r} is not valid; valid: {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "AnomalyTask", "BenchTask", "OodTask", "Task", "TaskResult", "get_task"]
