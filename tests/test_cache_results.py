"""The artefact cache, the diffusion-model cache (real training of a tiny UNet), pretrained loading, RunStore."""

from __future__ import annotations

import copy
import csv
import json
import logging

import numpy as np
import pytest
import torch
from conftest import tiny_unet_kwargs
from diffusers import DDPMScheduler, UNet2DModel

from ood_bench.cache import ArtifactCache
from ood_bench.metrics import CONVENTION
from ood_bench.models.diffusion import CACHE_KIND, cache_spec, get_diffusion_model, load_pretrained
from ood_bench.results import RESULT_COLUMNS, RunStore, format_table

# ---------------------------------------------------------------------------------------------------------------
# ArtifactCache
# ---------------------------------------------------------------------------------------------------------------


def _entries(root, kind):
    """(visible entries, hidden leftovers) of one cache kind."""
    folder = root / kind
    if not folder.exists():
        return [], []
    items = list(folder.iterdir())
    return [p for p in items if not p.name.startswith(".")], [p for p in items if p.name.startswith(".")]


def test_get_or_create_builds_once_then_hits(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []

    def build(d):
        calls.append(d)
        (d / "payload.txt").write_text("built")

    spec = {"data": "abc", "n": 3}
    entry, created = cache.get_or_create("things", spec, build)
    assert created and len(calls) == 1
    assert calls[0] != entry  # built in a temporary folder, then moved into place
    assert (entry / "payload.txt").read_text() == "built"
    assert json.loads((entry / "spec.json").read_text()) == spec
    assert cache.has("things", cache.key("things", spec))

    again, created2 = cache.get_or_create("things", {"n": 3, "data": "abc"}, build)  # key order does not matter
    assert again == entry and not created2 and len(calls) == 1

    other, created3 = cache.get_or_create("things", {"data": "abd", "n": 3}, build)
    assert other != entry and created3 and len(calls) == 2
    assert cache.key("things", spec) != cache.key("other_kind", spec)
    visible, hidden = _entries(tmp_path, "things")
    assert len(visible) == 2 and not hidden


def test_failed_build_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)

    def build(d):
        (d / "half.bin").write_bytes(b"\0" * 100)
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError, match="training diverged"):
        cache.get_or_create("models", {"x": 1}, build)
    visible, hidden = _entries(tmp_path, "models")
    assert visible == [] and hidden == []
    assert not cache.has("models", cache.key("models", {"x": 1}))

    # the next attempt builds again and succeeds
    entry, created = cache.get_or_create("models", {"x": 1}, lambda d: (d / "ok").write_text("1"))
    assert created and (entry / "ok").is_file()


def test_concurrent_writer_wins(tmp_path):
    """If another process publishes the entry while we build, theirs is kept and our temporary folder removed."""
    cache = ArtifactCache(tmp_path)
    spec = {"y": 2}
    final = cache.entry("models", cache.key("models", spec))

    def build(d):
        (d / "mine").write_text("mine")
        final.mkdir(parents=True)
        (final / "theirs").write_text("theirs")
        (final / "spec.json").write_text(json.dumps(spec))

    entry, _ = cache.get_or_create("models", spec, build)
    assert entry == final and (entry / "theirs").is_file() and not (entry / "mine").exists()
    visible, hidden = _entries(tmp_path, "models")
    assert len(visible) == 1 and not hidden


# ---------------------------------------------------------------------------------------------------------------
# Diffusion model: train once, then load from the cache
# ---------------------------------------------------------------------------------------------------------------


def tiny_model_cfg(**train):
    cfg = {
        "name": "tiny",
        "pretrained": None,
        "subfolder": None,
        "unet": {
            "block_out_channels": [8, 16],
            "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"],
            "norm_num_groups": 4,
            "attention_head_dim": 8,
            "dropout": 0.0,
        },
        "scheduler": {
            "num_train_timesteps": 100,
            "beta_schedule": "linear",
            "beta_start": 1e-4,
            "beta_end": 0.02,
            "prediction_type": "epsilon",
        },
        "train": {
            "steps": 5,
            "batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 1,
            "weight_decay": 0.0,
            "ema_decay": 0.9,
            "hflip": False,
            "grad_clip": 1.0,
            "precision": "fp32",
            "seed": 0,
        },
        "sample_size": 8,
        "channels": 1,
    }
    cfg["train"].update(train)
    return cfg


@pytest.fixture(scope="module")
def train_images():
    return torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _state(model):
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusion_model_trains_once_then_loads_from_cache(tmp_path, train_images, caplog):
    caplog.set_level(logging.INFO, logger="ood_bench")
    cache = ArtifactCache(tmp_path / "cache")
    cfg = tiny_model_cfg()
    dev = torch.device("cpu")

    first = get_diffusion_model(cfg, train_images, cache, dev, progress=False)
    visible, hidden = _entries(tmp_path / "cache", CACHE_KIND)
    assert len(visible) == 1 and not hidden
    entry = visible[0]
    assert first.source == f"trained:{entry.name}"
    assert "training UNet" in caplog.text and "using cached diffusion model" not in caplog.text
    with open(entry / "loss.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert json.loads((entry / "train_info.json").read_text())["n_images"] == 16
    # the training moved the weights away from a fresh initialisation with the same seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = UNet2DModel(**tiny_unet_kwargs())
    assert not all(torch.equal(v, fresh.state_dict()[k]) for k, v in first.unet.state_dict().items())
    assert first.scheduler_config["num_train_timesteps"] == 100

    caplog.clear()
    mtime = (entry / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    second = get_diffusion_model(copy.deepcopy(cfg), train_images.clone(), cache, dev, progress=False)
    assert "using cached diffusion model" in caplog.text and "training UNet" not in caplog.text
    assert len(_entries(tmp_path / "cache", CACHE_KIND)[0]) == 1
    assert (entry / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime
    assert second.source == first.source
    assert _same_weights(_state(first), _state(second))
    x, t = torch.rand(2, 1, 8, 8), torch.tensor([3, 50])
    with torch.no_grad():
        assert torch.equal(first.unet(x, t).sample, second.unet(x, t).sample)


def test_diffusion_cache_key_follows_data_and_settings(tmp_path, train_images, caplog):
    caplog.set_level(logging.INFO, logger="ood_bench")
    cache = ArtifactCache(tmp_path / "cache")
    dev = torch.device("cpu")
    a = get_diffusion_model(tiny_model_cfg(steps=2), train_images, cache, dev, progress=False)
    b = get_diffusion_model(tiny_model_cfg(steps=2), train_images.flip(-1), cache, dev, progress=False)
    c = get_diffusion_model(tiny_model_cfg(steps=3), train_images, cache, dev, progress=False)
    assert len({a.source, b.source, c.source}) == 3
    assert len(_entries(tmp_path / "cache", CACHE_KIND)[0]) == 3
    assert caplog.text.count("training UNet") == 3


def test_training_precision_is_in_the_key_and_fp32_keeps_the_old_key(tmp_path, train_images):
    """bf16 training (autocast) is its own cache entry with other weights; fp32 is the loop it always was, so its
    key is the key of a config without the setting (models trained before the setting existed stay valid)."""
    dev = torch.device("cpu")
    cache = ArtifactCache(tmp_path / "cache")
    old = tiny_model_cfg(steps=3)
    del old["train"]["precision"]
    fp32, bf16 = tiny_model_cfg(steps=3, precision="fp32"), tiny_model_cfg(steps=3, precision="bf16")
    assert cache.key(CACHE_KIND, cache_spec(fp32, train_images)) == cache.key(CACHE_KIND, cache_spec(old, train_images))
    a = get_diffusion_model(fp32, train_images, cache, dev, progress=False)
    b = get_diffusion_model(bf16, train_images, cache, dev, progress=False)
    assert a.source != b.source and len(_entries(tmp_path / "cache", CACHE_KIND)[0]) == 2
    sa, sb = _state(a), _state(b)
    assert not _same_weights(sa, sb)  # autocast really ran
    assert all(v.dtype == torch.float32 for v in sb.values())  # weights stay float32
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 0.05  # three small steps apart
    with pytest.raises(ValueError, match=r"model.train.precision=fp16 needs a CUDA device.*bf16 or fp32"):
        get_diffusion_model(tiny_model_cfg(precision="fp16"), train_images, cache, dev, progress=False)
    with pytest.raises(
        ValueError, match=r"model.train.precision='half' is not valid; valid: \['fp32', 'bf16', 'fp16'\]"
    ):
        get_diffusion_model(tiny_model_cfg(precision="half"), train_images, cache, dev, progress=False)


def test_training_is_reproducible(tmp_path, train_images):
    """Same data and settings (same cache key) must give the same weights, whatever the global RNG state:
    ``model.train.seed`` has to determine the initial weights too, not only the batches and the noise."""
    dev = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        a = get_diffusion_model(tiny_model_cfg(steps=3), train_images, ArtifactCache(tmp_path / "a"), dev, False)
        torch.manual_seed(456)
        b = get_diffusion_model(tiny_model_cfg(steps=3), train_images, ArtifactCache(tmp_path / "b"), dev, False)
    assert a.source == b.source  # the same key in two caches
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.allclose(sa[k], sb[k], atol=1e-6)]
    assert not differ, f"{len(differ)} of {len(sa)} tensors differ, e.g. {differ[:3]}"


# ---------------------------------------------------------------------------------------------------------------
# Pretrained models from local folders
# ---------------------------------------------------------------------------------------------------------------


def _saved_unet(folder, seed=1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**tiny_unet_kwargs())
    unet.save_pretrained(folder)
    return unet


def test_pretrained_flat_folder(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ood_bench")
    unet = _saved_unet(tmp_path / "flat")
    cfg = tiny_model_cfg()
    cfg["pretrained"] = str(tmp_path / "flat")
    model = get_diffusion_model(cfg, torch.zeros(1, 1, 8, 8), ArtifactCache(tmp_path / "cache"), torch.device("cpu"))
    assert model.source == f"pretrained:{tmp_path / 'flat'}"
    assert _same_weights(model.unet.state_dict(), unet.state_dict())
    # no scheduler next to the weights: the config's schedule is used, with a warning
    assert model.scheduler_config == cfg["scheduler"]
    assert "no scheduler config" in caplog.text
    assert not (tmp_path / "cache").exists()  # nothing trained, nothing cached


def test_pretrained_pipeline_folder_uses_its_scheduler(tmp_path):
    unet = _saved_unet(tmp_path / "pipe" / "unet", seed=2)
    sched = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    sched.save_pretrained(tmp_path / "pipe" / "scheduler")
    cfg = tiny_model_cfg()
    cfg["pretrained"] = str(tmp_path / "pipe")
    model = load_pretrained(cfg, torch.device("cpu"))
    assert _same_weights(model.unet.state_dict(), unet.state_dict())
    assert model.scheduler_config["num_train_timesteps"] == 50
    assert model.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert model.ddim().config.num_train_timesteps == 50


def test_cache_entry_loads_as_pretrained(tmp_path, train_images):
    """A trained cache entry has the pipeline layout (unet/, scheduler/): it can be shared as model.pretrained."""
    trained = get_diffusion_model(
        tiny_model_cfg(steps=1), train_images, ArtifactCache(tmp_path / "cache"), torch.device("cpu"), progress=False
    )
    entry = _entries(tmp_path / "cache", CACHE_KIND)[0][0]
    cfg = tiny_model_cfg()
    cfg["pretrained"] = str(entry)
    loaded = load_pretrained(cfg, torch.device("cpu"))
    assert _same_weights(loaded.unet.state_dict(), trained.unet.state_dict())
    assert loaded.scheduler_config == trained.scheduler_config


def test_missing_pretrained_names_path_and_manual_step(tmp_path):
    missing = tmp_path / "no_such_model"
    cfg = tiny_model_cfg()
    cfg["pretrained"] = str(missing)
    with pytest.raises(FileNotFoundError) as err:
        load_pretrained(cfg, torch.device("cpu"))
    msg = str(err.value)
    assert str(missing) in msg
    assert "huggingface-cli download" in msg and "model.pretrained=<dir>" in msg


def test_pretrained_size_mismatch(tmp_path):
    _saved_unet(tmp_path / "flat")
    cfg = tiny_model_cfg()
    cfg.update(pretrained=str(tmp_path / "flat"), sample_size=16)
    with pytest.raises(ValueError, match="data.image_size"):
        load_pretrained(cfg, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------
# RunStore
# ---------------------------------------------------------------------------------------------------------------


def _record(config_hash, **extra):
    rec = {
        "method": "lmd",
        "data": "digits",
        "config_hash": config_hash,
        "n_id": 3,
        "n_ood": 2,
        "auroc": 0.75,
        "fpr95": 0.5,
        "aupr_in": 0.8,
        "aupr_out": 0.7,
        "fpr95_oodpos": 0.25,
        "fpr95_pct": 0.5,
        "seconds": 1.5,
        "fit_seconds": 1.0,
        "score_seconds": 0.5,
        "nfe_per_image": 8.0,
        "images_per_s": 10.0,
        "cpu_seconds": 1.4,
        "train_seconds": 0.8,
        "features_seconds": 0.0,
        "sampling_seconds": 0.4,
        "peak_rss_mb": 512.0,
        "peak_cuda_mb": 0.0,
        "precision": "fp32",
        "train_precision": "fp32",
        "device": "cpu",
        "git_commit": "abc",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "method.reps": 2,
        "method.distance_used": "mse",
    }
    rec.update(extra)
    return rec


def _per_sample():
    return {
        "split": np.array(["id", "id", "id", "ood", "ood"]),
        "label": np.array([0, 1, 2, 7, 8]),
        "sample_index": np.array([10, 11, 12, 5, 6]),
        "score": np.array([0.1, 0.2, 0.3, 0.4, 0.05]),
        "dist_rep_0": np.array([0.1, 0.2, 0.3, 0.4, 0.05]),
    }


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_runstore_writes_run_folder(tmp_path):
    store = RunStore(tmp_path, "lmd", "digits", "h1")
    assert not store.done
    out = store.write(_record("h1"), _per_sample(), "seed: 0\n")
    assert out == tmp_path / "lmd" / "digits" / "h1" == store.dir
    assert store.done
    assert {p.name for p in out.iterdir()} == {"scores.csv", "summary.csv", "config.yaml", "DONE"}
    assert (out / "config.yaml").read_text() == "seed: 0\n"
    assert json.loads((out / "DONE").read_text())["convention"] == CONVENTION

    summary = _read_csv(out / "summary.csv")
    assert len(summary) == 1
    header = list(summary[0])
    assert header[: len(RESULT_COLUMNS)] == RESULT_COLUMNS
    assert float(summary[0]["auroc"]) == 0.75 and summary[0]["method.distance_used"] == "mse"
    assert store.load_record() == summary[0]

    scores = _read_csv(out / "scores.csv")
    assert len(scores) == 5
    assert list(scores[0]) == ["split", "label", "sample_index", "score", "dist_rep_0"]
    assert [r["split"] for r in scores] == ["id"] * 3 + ["ood"] * 2
    assert [float(r["score"]) for r in scores] == _per_sample()["score"].tolist()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_runs_csv_accumulates_rows(tmp_path):
    RunStore(tmp_path, "lmd", "digits", "h1").write(_record("h1"), _per_sample(), "")
    RunStore(tmp_path, "lmd", "digits", "h2").write(_record("h2", auroc=0.6), _per_sample(), "")
    rows = _read_csv(tmp_path / "runs.csv")
    assert [r["config_hash"] for r in rows] == ["h1", "h2"]
    # a row with a new column: the index keeps every column, earlier rows get an empty cell
    RunStore(tmp_path, "dlsr", "digits", "h3").write(_record("h3", **{"method.t": 3}), _per_sample(), "")
    rows = _read_csv(tmp_path / "runs.csv")
    assert [r["config_hash"] for r in rows] == ["h1", "h2", "h3"]
    assert rows[0]["method.t"] == "" and rows[2]["method.t"] == "3"
    assert float(rows[1]["auroc"]) == 0.6


def test_rewrite_replaces_run_folder(tmp_path):
    store = RunStore(tmp_path, "lmd", "digits", "h1")
    store.write(_record("h1"), _per_sample(), "")
    (store.dir / "stale.txt").write_text("old")
    store.write(_record("h1", auroc=0.9), _per_sample(), "")
    assert not (store.dir / "stale.txt").exists()
    assert float(store.load_record()["auroc"]) == 0.9
    assert len(_read_csv(tmp_path / "runs.csv")) == 2


def test_failed_write_leaves_nothing(tmp_path):
    store = RunStore(tmp_path, "lmd", "digits", "h1")
    bad = _per_sample()
    bad["score"] = bad["score"][:4]
    with pytest.raises(ValueError, match="differ in length"):
        store.write(_record("h1"), bad, "")
    assert not store.done and not store.dir.exists()
    assert not list((tmp_path / "lmd" / "digits").iterdir())
    assert not (tmp_path / "runs.csv").exists()


def test_format_table_prints_convention():
    text = format_table([_record("h1"), _record("h2", auroc=0.5)])
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")][:3] == ["method", "data", "n_id"]  # Markdown
    assert set(lines[1]) <= set("|:- ")
    assert "0.7500" in lines[2] and "0.5000" in lines[3]
    assert lines[-1] == f"convention: {CONVENTION}"
