"""Resume of a real multirun killed midway (Ctrl-C, then SIGKILL): completed cells are skipped, every cached
model and LMD batch is reused, only unfinished cells are redone, and the numbers equal an uninterrupted sweep."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, TINY_RUN_OVERRIDES
from test_run import read_csv, subprocess_env

from ood_bench.cache import verify_manifest
from ood_bench.runner import run

SEEDS = (0, 1, 2)
# Tiny LMD on digits; 16 + 16 test images in one batch each, 2 repeats: 4 cached inpainting entries per cell
# (one per batch and repeat; a batch's repeats are inpainted together and written together, so the count goes
# 4 -> 6 -> 8 through cell 1). 100 steps make cell 1's second batch take about a second on an idle machine, so an
# interrupt sent once its first batch is cached lands inside cell 1 (with 15 steps CI's sweep finished first).
SWEEP = [*TINY_RUN_OVERRIDES, "method.distance=mse", "method.steps=100", "figures.enabled=false", "threads=1"]


def folders(root: Path) -> list[str]:
    return [f"paths.{k}_dir={root / k}" for k in ("results", "cache", "log")]


def lmd_entries(root: Path) -> dict[str, int]:
    """Complete LMD batch entries of the cache: name -> mtime."""
    base = root / "cache" / "lmd_inpaint"
    if not base.is_dir():
        return {}
    return {
        p.name: p.stat().st_mtime_ns
        for p in base.iterdir()
        if not p.name.startswith(".") and (p / "spec.json").is_file()
    }


def done_cells(root: Path) -> dict[str, int]:
    base = root / "results" / "lmd" / "digits"
    if not base.is_dir():
        return {}
    return {p.name: (p / "DONE").stat().st_mtime_ns for p in base.iterdir() if (p / "DONE").is_file()}


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C's default action. A test suite started in the background of a
    non-interactive shell (``.ci/run &``, ``nohup``) inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt, so the interrupt this test sends would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sweep(root: Path, log: Path, kill_when=None, sig=None, timeout: float = 400) -> tuple[int, str]:
    """``run.py -m seed=0,1,2`` with the tiny settings; ``sig`` is sent once ``kill_when(root)`` holds."""
    cmd = [sys.executable, "run.py", "-m", *SWEEP, f"seed={','.join(map(str, SEEDS))}", *folders(root)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_default_sigint,
        )
        t0 = time.monotonic()
        while proc.poll() is None:
            if kill_when is not None and kill_when(root):
                proc.send_signal(sig)
                kill_when = None
            if time.monotonic() - t0 > timeout:
                proc.kill()
                raise TimeoutError(f"sweep did not end in {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)
    return proc.returncode, log.read_text()


def scores_by_seed(root: Path) -> dict[int, np.ndarray]:
    out = {}
    for row in read_csv(root / "results" / "runs.csv"):
        scores = read_csv(root / "results" / "lmd" / "digits" / row["config_hash"] / "scores.csv")
        out[int(row["seed"])] = np.array([float(r["score"]) for r in scores])
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same three cells run in process, each to completion, in their own folders."""
    from conftest import CONF_DIR, compose_config
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    root = tmp_path_factory.mktemp("uninterrupted")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for seed in SEEDS:
            cfg = compose_config([*SWEEP, f"seed={seed}"], root)
            run(cfg)
    GlobalHydra.instance().clear()
    return scores_by_seed(root)


def test_killed_sweep_resumes_where_it_stopped(tmp_path, uninterrupted):
    # 1) Ctrl-C while cell 1 is inpainting (cell 0 complete, some of cell 1's four LMD batches cached)
    code, out1 = sweep(tmp_path, tmp_path / "1.log", lambda r: len(lmd_entries(r)) >= 4 + 1, signal.SIGINT)
    assert code != 0 and "interrupted" in out1, out1[-3000:]
    cells, batches = done_cells(tmp_path), lmd_entries(tmp_path)
    assert len(cells) == 1, "the interrupt should land in cell 1"
    assert 5 <= len(batches) < 8
    assert not [p for p in (tmp_path / "cache" / "lmd_inpaint").iterdir() if p.name.startswith(".")]  # cleaned up

    # 2) rerun: cell 0 skipped, cell 1 resumes from its cached batches; SIGKILL while cell 2 is inpainting
    code, out2 = sweep(tmp_path, tmp_path / "2.log", lambda r: len(lmd_entries(r)) >= 8 + 1, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert out2.count("are complete") == 1 and "training UNet" not in out2
    assert out2.count("cache hit: lmd_inpaint") == len(batches) - 4  # cell 1's batches cached before Ctrl-C
    assert {k: v for k, v in done_cells(tmp_path).items() if k in cells} == cells  # cell 0 not redone
    assert len(done_cells(tmp_path)) == 2
    kept = lmd_entries(tmp_path)
    assert all(kept[k] == v for k, v in batches.items())  # cached batches were reused, not rewritten

    # 3) rerun to the end: two cells skipped, cell 2 finishes from its cached batch(es)
    code, out3 = sweep(tmp_path, tmp_path / "3.log")
    assert code == 0, out3[-3000:]
    assert out3.count("are complete") == 2 and out3.count("results written to") == 1
    assert "training UNet" not in out3 and out3.count("cache hit: lmd_inpaint") == len(kept) - 8  # cell 2's
    final = lmd_entries(tmp_path)
    assert len(final) == 3 * 4 and all(final[k] == v for k, v in kept.items())
    for entry in (tmp_path / "cache").glob("*/*"):
        if entry.parent.name != ".locks" and not entry.name.startswith("."):
            assert verify_manifest(entry) is None, entry

    # one row per cell, and the same numbers as the uninterrupted cells
    rows = read_csv(tmp_path / "results" / "runs.csv")
    assert sorted(int(r["seed"]) for r in rows) == list(SEEDS)
    resumed = scores_by_seed(tmp_path)
    for seed in SEEDS:
        assert np.array_equal(resumed[seed], uninterrupted[seed]), seed


@pytest.mark.slow
def test_killed_dlsr_sweep_reuses_feature_sets(tmp_path):
    """DLSR: SIGKILL while cell 1 trains its LFDN; the rerun skips cell 0, reuses the cached feature sets (train,
    ID test, OOD test) and the numbers equal an uninterrupted sweep of the same cells."""
    cells = ["method.epochs=30,31"]
    base = [
        "debug=default",
        "method=dlsr",
        "method.encoder_weights=none",
        "method.input_size=32",
        "method.width=64",
        "method.num_blocks=1",
        "method.time_embed_dim=16",
        "data.n_train=null",
        "figures.enabled=false",
        "threads=1",
    ]

    def dlsr_sweep(root: Path, log: str, kill_when=None) -> tuple[int, str]:
        cmd = [sys.executable, "run.py", "-m", *base, *cells, *folders(root)]
        with open(root / log, "w") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=subprocess_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_default_sigint,
            )
            while proc.poll() is None:
                if kill_when is not None and kill_when((root / log).read_text()):
                    time.sleep(0.3)
                    proc.send_signal(signal.SIGKILL)
                    kill_when = None
                time.sleep(0.02)
        return proc.returncode, (root / log).read_text()

    ref = tmp_path / "ref"
    ref.mkdir()
    assert dlsr_sweep(ref, "ref.log")[0] == 0
    code, _ = dlsr_sweep(tmp_path, "1.log", lambda text: text.count("training LFDN") == 2)
    assert code == -signal.SIGKILL
    features = {p.name for p in (tmp_path / "cache" / "features").iterdir() if not p.name.startswith(".")}
    assert len(features) == 3 and len(done_cells_of(tmp_path, "dlsr")) == 1
    code, out = dlsr_sweep(tmp_path, "2.log")
    assert code == 0 and out.count("are complete") == 1
    assert out.count("features cache hit") == 3 and "extracting features" not in out
    assert out.count("training LFDN") == 1  # only the killed cell's model
    for row in read_csv(ref / "results" / "runs.csv"):
        resumed = read_csv(tmp_path / "results" / "dlsr" / "digits" / row["config_hash"] / "scores.csv")
        reference = read_csv(ref / "results" / "dlsr" / "digits" / row["config_hash"] / "scores.csv")
        assert [r["score"] for r in resumed] == [r["score"] for r in reference]


def done_cells_of(root: Path, method: str) -> list[Path]:
    base = root / "results" / method / "digits"
    return [p for p in base.iterdir() if (p / "DONE").is_file()] if base.is_dir() else []


def test_complete_run_missing_from_runs_csv_gets_its_row(cfg_tiny, caplog):
    """A process killed after a run folder's DONE but before its runs.csv row: the next call adds the row."""
    record = run(cfg_tiny)
    index = Path(cfg_tiny.paths.results_dir) / "runs.csv"
    index.unlink()
    again = run(cfg_tiny)  # skipped as complete
    rows = read_csv(index)
    assert len(rows) == 1 and rows[0]["config_hash"] == record["config_hash"] == again["config_hash"]
    assert "missing from" in caplog.text
    run(cfg_tiny)
    assert len(read_csv(index)) == 1  # not added twice
