"""Faults end cleanly or heal: user errors vs bugs, FAILED markers, sweeps that go on, corrupt cache entries,
undecodable images."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN_OVERRIDES
from PIL import Image
from test_run import read_csv, read_wandb_records, run_cli

from ood_bench.cache import MANIFEST, ArtifactCache
from ood_bench.data import ImageFolderSource
from ood_bench.errors import (
    BadImageError,
    ConfigError,
    DataError,
    MissingFileError,
    UserError,
    config_errors,
    is_user_error,
)
from ood_bench.faults import FAILED, Job, close_wandb, read_failed, task_wrapper
from ood_bench.models.diffusion import CACHE_KIND, get_diffusion_model
from ood_bench.runner import run


def paths(root: Path) -> list[str]:
    return [f"paths.{k}_dir={root / k}" for k in ("results", "cache", "log")]


def write_letters(folder: Path, per_class: int = 3, size: int = 28, bad: str | None = None) -> None:
    """A notMNIST-like folder: classes A..J of small grey PNGs; ``bad`` names a file with undecodable bytes."""
    rng = np.random.default_rng(0)
    for c in "ABCDEFGHIJ":
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / c / f"{i}.png")
    if bad:
        (folder / bad).write_bytes(b"this is not a PNG file, as some of notMNIST_small's files are not")


@pytest.fixture
def no_hydra():
    """No Hydra job around (other tests leave HydraConfig set): the wrapper acts as for a single run."""
    from hydra.core.hydra_config import HydraConfig

    saved, HydraConfig.instance().cfg = HydraConfig.instance().cfg, None
    yield
    HydraConfig.instance().cfg = saved


# ---------------------------------------------------------------------------------------------------------------
# The boundary: user errors vs bugs
# ---------------------------------------------------------------------------------------------------------------


def test_error_classes_and_config_phase():
    from ood_bench.data import DatasetNotFoundError
    from ood_bench.models.encoders import EncoderWeightsError

    for cls in (DatasetNotFoundError, EncoderWeightsError, BadImageError, ConfigError):
        assert issubclass(cls, UserError)
    assert issubclass(DatasetNotFoundError, FileNotFoundError) and issubclass(DatasetNotFoundError, MissingFileError)
    assert issubclass(BadImageError, DataError) and issubclass(ConfigError, ValueError)
    # inside the settings checks a plain ValueError / KeyError is the user's; outside it is a bug
    with pytest.raises(ConfigError, match=r"method\.reps=0") as err, config_errors():
        raise ValueError("method.reps=0 is not valid")
    assert isinstance(err.value.__cause__, ValueError) and is_user_error(err.value)
    with pytest.raises(ConfigError) as err, config_errors():
        raise KeyError("method.name='x' is not registered; valid: ['lmd']")
    assert str(err.value) == "method.name='x' is not registered; valid: ['lmd']"  # no KeyError quoting
    assert not is_user_error(ValueError("operands could not be broadcast"))
    assert not is_user_error(ZeroDivisionError())


def test_wrapper_single_run_user_error_exits_1_bug_propagates_ctrl_c_leaves_no_marker(tmp_path, caplog, no_hydra):
    caplog.set_level(logging.ERROR, logger="ood_bench")

    def fails_with(err):
        def task(cfg, job):
            job.run_dir = tmp_path / type(err).__name__
            job.run_dir.mkdir()
            raise err

        return task_wrapper(task)

    with pytest.raises(SystemExit) as ex:
        fails_with(ConfigError("method.reps=0 is not valid; use a positive integer"))({})
    assert ex.value.code == 1
    assert "ConfigError: method.reps=0 is not valid" in caplog.text and "Traceback" not in caplog.text
    marker = read_failed(tmp_path / "ConfigError")
    assert marker["user_error"] and marker["error"] == "ConfigError" and "Traceback" in marker["traceback"]

    with pytest.raises(ZeroDivisionError):  # a bug keeps its exception (Hydra prints the traceback)
        fails_with(ZeroDivisionError("division by zero"))({})
    assert read_failed(tmp_path / "ZeroDivisionError")["user_error"] is False

    with pytest.raises(KeyboardInterrupt):  # interrupted, not failed: no marker, a rerun redoes the cell
        fails_with(KeyboardInterrupt())({})
    assert not (tmp_path / "KeyboardInterrupt" / FAILED).exists()


def test_wrapper_leaves_a_complete_run_folder_alone(tmp_path, no_hydra):
    done = tmp_path / "run"
    done.mkdir()
    (done / "DONE").write_text("{}")

    def task(cfg, job):
        job.run_dir = done
        raise ConfigError("bad")

    with pytest.raises(SystemExit):
        task_wrapper(task)({})
    assert not (done / FAILED).exists()


def test_failed_job_closes_its_wandb_run(tmp_path, no_hydra):
    import wandb

    def task(cfg, job: Job):
        wandb.init(project="faults", dir=str(tmp_path), mode="offline", reinit="finish_previous")
        raise RuntimeError("a bug after the W&B run started")

    with pytest.raises(RuntimeError):
        task_wrapper(task)({})
    assert wandb.run is None
    log = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    for _ in range(60):  # the W&B service may still be writing the transaction log
        records = read_wandb_records(log)
        exits = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
        if exits:
            break
        time.sleep(0.5)
    assert exits and exits[-1].exit_code == 1, [r.WhichOneof("record_type") for r in records]
    close_wandb()  # nothing open: no error


def test_full_error_keeps_the_user_error_exception(tmp_path, no_hydra, monkeypatch):
    """With HYDRA_FULL_ERROR=1 the user error propagates (Hydra then prints its full traceback)."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")

    def task(cfg, job):
        raise ConfigError("method.reps=0 is not valid")

    with pytest.raises(ConfigError):
        task_wrapper(task)({})


def test_settings_errors_are_config_errors(hydra_conf, tmp_path):
    """The runner's settings checks raise ConfigError (a user error): the CLI prints it without a traceback
    (end to end in test_run.py::test_missing_dataset_fails_with_clear_message for a missing dataset)."""
    for override, message in (("method.reps=0", r"method\.reps=0"), ("method.name=nope", "not registered")):
        with pytest.raises(ConfigError, match=message):
            run(hydra_conf([override, f"paths.data_dir={tmp_path / 'none'}"], tmp_path))
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------------------------
# A sweep with a failing cell
# ---------------------------------------------------------------------------------------------------------------


def test_failing_cell_marks_itself_sweep_goes_on_rerun_retries_only_it(tmp_path):
    data = tmp_path / "data"
    args = [
        "-m",
        *TINY_RUN_OVERRIDES,
        "method.distance=mse",
        "figures.inpaint_images=1",
        "dataset@data.ood=digits,notmnist",
        f"paths.data_dir={data}",
        *paths(tmp_path),
    ]
    code, out = run_cli(args, check=False)
    assert code == 1, out[-3000:]
    assert "Traceback" not in out
    assert "1 of 2 cells failed" in out and "DatasetNotFoundError" in out
    runs = tmp_path / "results" / "lmd" / "digits"
    done = [p for p in runs.iterdir() if (p / "DONE").is_file()]
    failed = [p for p in runs.iterdir() if (p / FAILED).is_file()]
    assert len(done) == 1 and len(failed) == 1 and not (failed[0] / "DONE").exists()
    marker = read_failed(failed[0])
    assert marker["error"] == "DatasetNotFoundError" and str(data / "notMNIST_small") in marker["message"]
    assert "dataset@data.ood=notmnist" in marker["overrides"]
    job_markers = list((tmp_path / "log").rglob(FAILED))
    assert len(job_markers) == 1 and read_failed(job_markers[0].parent) == marker
    assert len(read_csv(tmp_path / "results" / "runs.csv")) == 1
    done_mtime = (done[0] / "DONE").stat().st_mtime_ns

    write_letters(data / "notMNIST_small")  # the user fixes the cause and reruns the same command
    code, out = run_cli(args)
    assert out.count("are complete") == 1 and out.count("results written to") == 1
    assert (done[0] / "DONE").stat().st_mtime_ns == done_mtime  # the completed cell was not redone
    assert (failed[0] / "DONE").is_file() and not (failed[0] / FAILED).exists()
    rows = read_csv(tmp_path / "results" / "runs.csv")
    assert len(rows) == 2 and rows[1]["config_hash"] == failed[0].name


# ---------------------------------------------------------------------------------------------------------------
# Undecodable images
# ---------------------------------------------------------------------------------------------------------------


def test_undecodable_image_fails_with_dataset_and_file_or_is_skipped(tmp_path):
    write_letters(tmp_path / "letters", per_class=2, bad="C/broken.png")
    src = ImageFolderSource("letters", "letters", str(tmp_path))
    files = [Path(f) for f in src._get("test")[0]]
    bad_index = files.index(tmp_path / "letters" / "C" / "broken.png")
    with pytest.raises(BadImageError) as err:
        src.images("test", range(len(files)))
    msg = str(err.value)
    assert msg.startswith("letters: cannot decode") and "broken.png" in msg and "on_bad_file=skip" in msg

    skip = ImageFolderSource("letters", "letters", str(tmp_path), on_bad_file="skip")
    images, kept = skip.load("test", np.arange(len(files)))
    assert len(images) == len(files) - 1 and bad_index not in kept.tolist()
    assert skip.skipped == [tmp_path / "letters" / "C" / "broken.png"]
    with pytest.raises(ValueError, match="on_bad_file='ignore'"):
        ImageFolderSource("letters", "letters", str(tmp_path), on_bad_file="ignore")


def test_skipped_files_are_counted_in_the_results_row(hydra_conf, tmp_path):
    data = tmp_path / "data"
    write_letters(data / "notMNIST_small", per_class=2, bad="G/broken.png")  # G = label 6, an OOD class here
    base = [*TINY_RUN_OVERRIDES, "method.distance=mse", "figures.enabled=false", "dataset@data.ood=notmnist"]
    cfg = hydra_conf([*base, f"paths.data_dir={data}"], tmp_path)
    with pytest.raises(BadImageError, match="broken.png"):
        run(cfg)
    cfg = hydra_conf([*base, f"paths.data_dir={data}", "data.ood.on_bad_file=skip"], tmp_path)
    record = run(cfg)
    assert record["ood_files_skipped"] == 1 and record["id_files_skipped"] == 0
    assert record["n_ood"] == 5 * 2  # letters F..J, two files each, the broken one left out


# ---------------------------------------------------------------------------------------------------------------
# Corrupt cache entries
# ---------------------------------------------------------------------------------------------------------------


def tiny_model_cfg() -> dict:
    from test_cache_results import tiny_model_cfg as cfg

    return cfg(steps=3)


def test_truncated_safetensors_is_detected_logged_and_rebuilt(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ood_bench")
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cache, dev = ArtifactCache(tmp_path / "cache"), torch.device("cpu")
    first = get_diffusion_model(tiny_model_cfg(), images, cache, dev, progress=False)
    entry = tmp_path / "cache" / CACHE_KIND / first.source.split(":")[1]
    sums = json.loads((entry / MANIFEST).read_text())
    assert {"unet/diffusion_pytorch_model.safetensors", "unet/config.json", "spec.json"} <= set(sums)

    before = {k: v.clone() for k, v in first.unet.state_dict().items()}
    weights = entry / "unet" / "diffusion_pytorch_model.safetensors"
    # a half-copied file (as a new file: the loaded model still maps the old one's pages)
    half = weights.read_bytes()[: weights.stat().st_size // 2]
    weights.unlink()
    weights.write_bytes(half)
    caplog.clear()
    second = get_diffusion_model(tiny_model_cfg(), images, ArtifactCache(tmp_path / "cache"), dev, progress=False)
    assert "is corrupt" in caplog.text and "diffusion_pytorch_model.safetensors" in caplog.text
    assert "training UNet" in caplog.text  # rebuilt ...
    assert second.source == first.source  # ... under the same key, with the same weights
    after = second.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert ArtifactCache(tmp_path / "cache").has(CACHE_KIND, entry.name)
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".corrupt")]


def test_corrupt_entry_is_not_trusted_by_has(tmp_path, caplog):
    cache = ArtifactCache(tmp_path)
    entry, _ = cache.get_or_create("features", {"x": 1}, lambda d: torch.save(torch.arange(1000.0), d / "f.pt"))
    key = entry.name
    assert cache.has("features", key)
    (entry / "f.pt").write_bytes(b"\0" * 10)
    assert not cache.has("features", key) and not entry.exists()
    assert "is corrupt" in caplog.text
    # an entry written before checksums existed is used as it is (with a warning)
    legacy, _ = cache.get_or_create("features", {"x": 2}, lambda d: (d / "v").write_text("1"))
    (legacy / MANIFEST).unlink()
    assert cache.has("features", legacy.name)
