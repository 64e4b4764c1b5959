"""ood_bench: one honest protocol for diffusion-based OOD and anomaly detection.

The Python API (``ood_bench/api.py``): ``evaluate``, ``score``, ``load_runs``, ``compare`` (imported on first use,
so that ``import ood_bench`` stays light).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["compare", "evaluate", "load_runs", "score"]


def __getattr__(name: str) -> Any:
    if name == "compare":
        from ood_bench.report.compare import compare

        return compare
    if name in __all__:
        from ood_bench import api

        return getattr(api, name)
    raise AttributeError(f"module 'ood_bench' has no attribute {name!r}")
