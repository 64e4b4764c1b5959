"""The documented launchers, really launched (CI's launcher step: ``pytest -m launchers``).

Through ``hydra/launcher=submitit_local`` (submitit's local executor: the code path of ``slurm``) and
``hydra/launcher=ray_local`` (hydra-ray-launcher on a Ray instance started on this machine, loopback only): a sweep of
two cells, each split into two shards (four jobs, sharing one cache: the model is trained once), then the merge
sweep of the two cells (two jobs, zero network evaluations), whose AUROC equals a whole run's in an empty cache.

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
def test_sharded_sweep_and_merge_sweep_through_the_launcher(launcher, tmp_path):
    _require(LAUNCHERS[launcher])
    paths = [f"paths.{k}_dir={tmp_path / k}" for k in ("results", "cache", "log")]
    # Ray's workers import ood_bench from this checkout whatever the venv's editable install points at
    env = subprocess_env(PYTHONPATH=str(REPO_ROOT), RAY_DEDUP_LOGS="0")
    common = ["-m", f"hydra/launcher={launcher}", *TINY, *paths]
    _, out = run_cli([*common, "seed=0,1", "shard.count=2", "shard.index=0,1"], env=env, timeout=900)
    assert "sweep finished: 4 cells, none failed" in out
    assert not (tmp_path / "results" / "runs.csv").exists()  # shards write no results
    logs = "".join(p.read_text() for p in (tmp_path / "log").rglob("*.log"))
    assert logs.count("training UNet") == 1  # one model for the four jobs (the seed is not the training seed)
    assert logs.count("is in the cache; the merge run") == 4

    _, out = run_cli([*common, "seed=0,1"], env=env, timeout=900)
    assert "sweep finished: 2 cells, none failed" in out
    rows = read_csv(tmp_path / "results" / "runs.csv")
    assert sorted(int(r["seed"]) for r in rows) == [0, 1] and all(r["shard_count"] == "2" for r in rows)
    merge_sweep = sorted((tmp_path / "log").glob("*/multiruns/*"))[-1]  # the newest sweep folder
    merge_logs = "".join(p.read_text() for p in merge_sweep.rglob("*.log"))
    assert merge_logs.count("merging its 2 shards from the cache") == 2
    assert "lmd_inpaint" not in merge_logs and "diffusion model" not in merge_logs  # no model, no inpainting
    for r in rows:
        assert RunStore(tmp_path / "results", "lmd", "digits", r["config_hash"]).done

    whole = tmp_path / "whole"
    run_cli([*TINY, "seed=0", *[f"paths.{k}_dir={whole / k}" for k in ("results", "cache", "log")]], env=env)
    (reference,) = read_csv(whole / "results" / "runs.csv")
    (merged,) = [r for r in rows if r["seed"] == "0"]
    assert merged["config_hash"] == reference["config_hash"] and merged["auroc"] == reference["auroc"]
