"""Scale-out: launcher configs compose, parallel jobs share runs.csv and the cache safely, each job its own GPU."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import pytest
from conftest import CONF_DIR, TINY_RUN_OVERRIDES, compose_with_hydra
from test_run import read_csv, run_cli

from ood_bench.cache import MANIFEST, ArtifactCache, verify_manifest
from ood_bench.devices import choose_gpu, claim_device, release_device
from ood_bench.results import RESULT_COLUMNS, RunStore

PLUGINS = {
    "local_parallel": ("hydra_plugins.hydra_joblib_launcher", "JoblibLauncher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "SlurmLauncher"),
    "ray_cluster": ("hydra_plugins.hydra_ray_launcher", "RayLauncher"),
    "ray_local": ("hydra_plugins.hydra_ray_launcher", "RayLauncher"),
}


def launcher_choices() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))


def test_every_launcher_config_is_known():
    assert launcher_choices() == sorted(PLUGINS)


@pytest.mark.parametrize("choice", launcher_choices())
def test_launcher_config_composes_against_its_plugin(choice):
    module, cls = PLUGINS[choice]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[launchers]')")
    cfg = compose_with_hydra([f"hydra/launcher={choice}"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(cls)
    if choice == "local_parallel":
        assert launcher.n_jobs == 2 and launcher.backend == "loky"
    elif choice == "slurm":
        assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
        assert str(launcher.submitit_folder).startswith(str(cfg.hydra.sweep.dir))
    elif choice == "ray_cluster":
        assert launcher.ray.init.address == "auto" and launcher.ray.remote.num_gpus == 1
    else:  # a Ray instance of this machine, bound to loopback
        assert launcher.ray.init.address is None and launcher.ray.init._node_ip_address == "127.0.0.1"


def test_local_cluster_template_composes(tmp_path):
    """conf/local/default.yaml.example, copied to local/default.yaml, switches the launcher and the paths."""
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("hydra-submitit-launcher is not installed")
    (tmp_path / "local").mkdir()
    shutil.copy(CONF_DIR / "local" / "default.yaml.example", tmp_path / "local" / "default.yaml")
    cfg = compose_with_hydra([f"hydra.searchpath=[file://{tmp_path}]"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.partition == "gpu"
    assert cfg.paths.results_dir == "/shared/projects/ood_bench/results"
    assert cfg.hydra.launcher.setup == ["source /shared/projects/ood_bench/.venv/bin/activate"]


# ---------------------------------------------------------------------------------------------------------------
# Several processes on one results folder and one cache
# ---------------------------------------------------------------------------------------------------------------


def _write_runs(results: str, worker: int, n: int) -> None:
    import numpy as np

    for i in range(n):
        record = {c: f"{worker}-{i}" for c in RESULT_COLUMNS}  # every cell says who wrote it
        record.update(
            config_hash=f"w{worker}-{i}",
            auroc=0.5 + worker / 100 + i / 1000,
            note='a, quoted "cell"\nover two lines',
            worker=worker,
        )
        RunStore(results, "m", "d", f"w{worker}-{i}").write(record, {"score": np.arange(3.0)}, "")


def test_parallel_writers_lose_and_tear_no_row(tmp_path):
    ctx = mp.get_context("fork")  # fresh interpreters would spend their time importing torch
    procs = [ctx.Process(target=_write_runs, args=(str(tmp_path), w, 6)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = read_csv(tmp_path / "runs.csv")
    assert sorted(r["config_hash"] for r in rows) == sorted(f"w{w}-{i}" for w in range(4) for i in range(6))
    for r in rows:  # every cell intact, quoting included
        w, i = r["config_hash"][1:].split("-")
        assert r["method"] == f"{w}-{i}" and r["worker"] == w
        assert float(r["auroc"]) == pytest.approx(0.5 + int(w) / 100 + int(i) / 1000)
        assert r["note"] == 'a, quoted "cell"\nover two lines'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".runs.csv")]  # no temporary file left


def _build_shared_entry(root: str, log: str) -> str:
    def build(folder: Path) -> None:
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(1.0)  # long enough for the other process to find the entry being built
        (folder / "weights.bin").write_bytes(bytes(range(256)) * 1000)

    entry, _ = ArtifactCache(root).get_or_create("models", {"shared": True}, build)
    return str(entry)


def test_parallel_jobs_build_a_cache_entry_once(tmp_path):
    log = tmp_path / "builds.log"
    with mp.get_context("fork").Pool(3) as pool:
        entries = pool.starmap(_build_shared_entry, [(str(tmp_path / "cache"), str(log))] * 3)
    assert len(set(entries)) == 1
    assert log.read_text() == "built\n"  # the others waited on the lock, then reused the entry
    entry = Path(entries[0])
    assert verify_manifest(entry) is None and (entry / MANIFEST).is_file()
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]


def test_joblib_sweep_with_two_workers(tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None:
        pytest.skip("hydra-joblib-launcher is not installed")
    args = [
        "-m",
        "hydra/launcher=local_parallel",
        "hydra.launcher.n_jobs=2",
        *TINY_RUN_OVERRIDES,
        "method.distance=mse",
        "figures.inpaint_images=1",
        "seed=0,1,2",
        "threads=1",
        *[f"paths.{k}_dir={tmp_path / k}" for k in ("results", "cache", "log")],
    ]
    _, out = run_cli(args)
    assert "Joblib.Parallel(n_jobs=2" in out
    rows = read_csv(tmp_path / "results" / "runs.csv")
    assert sorted(int(r["seed"]) for r in rows) == [0, 1, 2]
    folders = sorted(p for p in (tmp_path / "results" / "lmd" / "digits").iterdir())
    assert sorted(r["config_hash"] for r in rows) == [p.name for p in folders]
    for r in rows:  # no torn row: every row complete and equal to its run folder's summary
        assert all(r[c] != "" for c in ("auroc", "fpr95", "n_id", "nfe_per_image", "git_commit"))
        assert RunStore(tmp_path / "results", "lmd", "digits", r["config_hash"]).load_record() == r
    # one model for the three jobs, trained once; every cache entry intact, no half-built leftovers
    logs = "".join(p.read_text() for p in (tmp_path / "log").rglob("*.log"))
    assert logs.count("training UNet") == 1
    entries = [p for p in (tmp_path / "cache").glob("*/*") if not p.name.startswith(".") and p.parent.name != ".locks"]
    assert len([p for p in entries if p.parent.name == "diffusion"]) == 1
    assert entries and all(verify_manifest(p) is None for p in entries)
    assert not [p for p in (tmp_path / "cache").glob("*/.*") if not p.name.startswith(".partial")]


# ---------------------------------------------------------------------------------------------------------------
# Each job its own GPU
# ---------------------------------------------------------------------------------------------------------------


def test_choose_gpu_gives_concurrent_jobs_their_own_gpus(tmp_path):
    held = []
    for preferred in (1, 1, 1):  # three jobs that all prefer cuda:1
        index, lock = choose_gpu(3, preferred, tmp_path)
        assert lock is not None
        held.append((index, lock))
    assert [i for i, _ in held] == [1, 2, 0]
    assert choose_gpu(3, 2, tmp_path) == (2, None)  # all taken: share the preferred one
    held[1][1].release()
    index, lock = choose_gpu(3, 0, tmp_path)
    assert index == 2 and lock is not None  # a released GPU is taken again
    for _, lk in (*held, (index, lock)):
        lk.release()


def test_claim_device(tmp_path):
    assert str(claim_device("auto", 5, cuda_count=0, lock_dir=tmp_path)) == "cpu"
    assert str(claim_device("auto", 5, cuda_count=1, lock_dir=tmp_path)) == "cuda:0"  # CUDA_VISIBLE_DEVICES=<one>
    assert str(claim_device("auto", 5, cuda_count=4, lock_dir=tmp_path)) == "cuda:1"  # job 5 prefers 5 mod 4
    assert (tmp_path / "cuda1.lock").exists()
    # the next job of the same process releases the previous claim first
    assert str(claim_device("auto", 1, cuda_count=4, lock_dir=tmp_path)) == "cuda:1"
    release_device()
    assert str(claim_device("cpu", 3, cuda_count=4, lock_dir=tmp_path)) == "cpu"
    with pytest.raises(ValueError, match="at least one"):
        choose_gpu(0, 0, tmp_path)
