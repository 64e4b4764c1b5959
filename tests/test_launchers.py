"""The documented launchers, really launched (a step of ``.ci/run``).

Through ``hydra/launcher=submitit_local`` (submitit's local executor: the code path of ``slurm``) and
``hydra/launcher=ray_local`` (hydra-ray-launcher on a Ray instance started on this machine, loopback only): a
sweep of the two shards of one cell (two jobs sharing one cache: the model is trained once), then a sweep of two cells
(two jobs): the sharded cell merges with zero network evaluations, to the AUROC of a whole run in an empty cache.

Without the ``launchers`` extra the tests skip, unless ``OOD_BENCH_REQUIRE_LAUNCHERS=1`` (set by ``.ci/run``):
then a missing plugin fails.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from conftest import REPO_ROOT, TINY_RUN_OVERRIDES
from test_run import read_csv, run_cli, subprocess_env

from ood_bench.results import RunStore
from ood_bench.runner import run

pytestmark = [pytest.mark.slow, pytest.mark.launchers]

LAUNCHERS = {
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "ray_local": "hydra_plugins.hydra_ray_launcher",
}
TINY = [*TINY_RUN_OVERRIDES, "method.distance=mse", "figures.inpaint_images=1", "threads=1"]


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed (pip install -e '.[launchers]')"
        if os.environ.get("OOD_BENCH_REQUIRE_LAUNCHERS") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sharded_sweep_and_merge_sweep_through_the_launcher(launcher, hydra_conf, tmp_path):
    _require(LAUNCHERS[launcher])
    paths = [f"paths.{k}_dir={tmp_path / k}" for k in ("results", "cache", "log")]
    # Ray's workers import ood_bench from this checkout whatever the venv's editable install points at
    env = subprocess_env(PYTHONPATH=str(REPO_ROOT), RAY_DEDUP_LOGS="0")
    common = ["-m", f"hydra/launcher={launcher}", *TINY, *paths]
    # a sweep of two jobs: the two shards of one cell, at the same time (one trains, the other waits and reuses)
    _, out = run_cli([*common, "seed=0", "shard.count=2", "shard.index=0,1"], env=env, timeout=1200)
    assert "sweep finished: 2 cells, none failed" in out
    assert not (tmp_path / "results" / "runs.csv").exists()  # shards write no results
    logs = "".join(p.read_text() for p in (tmp_path / "log").rglob("*.log"))
    assert logs.count("training UNet") == 1
    assert logs.count("is in the cache; the merge run") == 2

    # a sweep of two cells: seed 0 merges its shards (no model, no network), seed 1 runs whole (the cached model)
    _, out = run_cli([*common, "seed=0,1"], env=env, timeout=1200)
    assert "sweep finished: 2 cells, none failed" in out
    rows = {r["seed"]: r for r in read_csv(tmp_path / "results" / "runs.csv")}
    assert sorted(rows) == ["0", "1"] and rows["0"]["shard_count"] == "2" and rows["1"]["shard_count"] == ""
    merge_sweep = sorted((tmp_path / "log").glob("*/multiruns/*"))[-1]  # the newest sweep folder
    job_logs = {p.parent.name: p.read_text() for p in merge_sweep.rglob("*.log")}
    merged_log = next(text for text in job_logs.values() if "merging its 2 shards" in text)
    assert "lmd_inpaint" not in merged_log and "diffusion model" not in merged_log  # no model, no inpainting
    for r in rows.values():
        assert RunStore(tmp_path / "results", "lmd", "digits", r["config_hash"]).done

    reference = run(hydra_conf([*TINY, "seed=0"], tmp_path / "whole"))  # the whole cell in an empty cache
    assert rows["0"]["config_hash"] == reference["config_hash"]
    assert float(rows["0"]["auroc"]) == reference["auroc"]
