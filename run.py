"""ood_bench entry point: ``python run.py [method=lmd] [data=digits] [key=value ...]`` (``-m`` sweeps)."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ood_bench.faults import Job, task_wrapper

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@task_wrapper
def main(cfg: DictConfig, job: Job) -> float:
    """Run one cell and return ``optimized_metric`` (null: the task's headline, auroc or image_auroc) for sweepers."""
    from ood_bench.runner import optimized_value, run

    return optimized_value(cfg, run(cfg, on_store=job.on_store))


if __name__ == "__main__":
    main()
