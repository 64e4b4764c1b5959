"""debug=fast_dev_run: the config rewrite (fast), random initialisation only in the mode (fast), and every experiment
overlay at full size on synthetic data in the real layouts (slow: scripts/fast_dev_run_all.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import synthetic_layouts
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ood_bench import fast_dev_run
from ood_bench.fast_dev_run import ParamCounter, changed_keys, rewrite

OVERLAYS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# settings a fast_dev_run must never change (the point of the mode: the GPU config as declared)
KEPT = (
    "data.image_size",
    "data.channels",
    "data.resize_protocol",
    "data.k_shot",
    "data.mode",
    "model.unet",
    "model.pretrained",
    "model.train.precision",
    "classifier.kind",
    "classifier.arch",
    "classifier.depth",
    "classifier.width",
    "classifier.checkpoint",
    "classifier.weights",
    "classifier.input_size",
    "method.sampler",
    "method.precision",
    "method.distance",
    "method.strength",
    "method.encoder",
    "method.input_size",
    "method.width",
    "method.num_blocks",
    "method.stack",
    "method.scratch",
    "method.reps",
    "method.t",
)


def _compose(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return _composed(overrides)


def _composed(overrides: list[str]):
    cfg = compose("config", overrides)
    OmegaConf.set_struct(cfg, False)
    del cfg.paths["output_dir"]  # ${hydra:...} resolves only inside a Hydra app
    return cfg


@pytest.fixture(scope="module")
def composed() -> dict[str, tuple]:
    """Per overlay: the composed config under debug=fast_dev_run, before and after the rewrite."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfgs = {name: _composed([f"experiment={name}", "debug=fast_dev_run"]) for name in OVERLAYS}
    return {name: (cfg, rewrite(cfg)) for name, cfg in cfgs.items()}


def test_rewrite_changes_only_sizes_and_steps(composed):
    assert len(OVERLAYS) == 18
    for name, (before, after) in composed.items():
        changed = changed_keys(before, after)
        outside = sorted(k for k in changed if not fast_dev_run.is_cut_key(k))
        assert not outside, f"{name}: changed {outside} outside CUT_KEYS"
        # under data.categories only whole categories go; the kept ones are untouched
        kept = set(after.data.get("categories") or {})
        assert not [k for k in changed if k.startswith("data.categories.") and k.split(".")[2] in kept], name
        for cat in kept:
            assert after.data.categories[cat] == before.data.categories[cat], (name, cat)
        for key in KEPT:
            assert OmegaConf.select(before, key) == OmegaConf.select(after, key), f"{name}: {key} changed"
        assert after.fast_dev_run is True
        assert after.paths.results_dir.endswith("fast_dev_run/results")
        assert after.paths.cache_dir.endswith("fast_dev_run/cache")


def test_rewrite_cuts_data_steps_and_batches(composed):
    for name, (before, after) in composed.items():
        if after.data.get("task") == "anomaly":
            assert after.data.n_test == fast_dev_run.N_TEST_ANOMALY and len(after.data.shot_seeds) == 1
            n_cats = min(len(before.data.categories), fast_dev_run.N_CATEGORIES)
            assert list(after.data.categories) == list(before.data.categories)[:n_cats], name
            assert after.data.mode == before.data.mode, name
        else:
            assert after.data.n_train == fast_dev_run.N_TRAIN, name
            assert after.data.n_id_test == after.data.n_ood_test == fast_dev_run.N_TEST, name
        if "unet_steps" not in after.method:  # (AnomalySD's own training, checked below)
            assert after.model.train.steps <= 2, name
        for key in ("steps", "unet_steps", "vae_steps", "epochs"):
            if isinstance(before.method.get(key), int):
                assert after.method[key] == min(before.method[key], 2), (name, key)
        for key in ("batch_size", "train_batch_size", "vae_batch_size"):
            if key in after.method:
                assert after.method[key] <= fast_dev_run.BATCH, (name, key)
    # the rule steps -> inversion steps is kept: 15 of 50 (0.3 T) -> 1 of 2; 90 of 100 -> 2 of 2
    assert composed["diffguard_table1"][1].method.inversion_steps == 1
    assert composed["diffguard_table2"][1].method.inversion_steps == 2
    lmd = composed["lmd_table10"][1].method
    assert (lmd.steps, lmd.sampler, lmd.reps, lmd.eval_batch) == (2, "ddpm", 10, 40)
    assert composed["dlsr_table3"][1].method.early_epoch == 1


def test_random_init_refused_outside_the_mode(tmp_path, caplog):
    from ood_bench.distances.dists import DISTSDistance
    from ood_bench.distances.lpips import LPIPSDistance
    from ood_bench.errors import WeightsNotFoundError
    from ood_bench.models.classifier import load_cifar_resnet
    from ood_bench.models.diffusion import load_pretrained
    from ood_bench.models.encoders import EncoderWeightsError, load_backbone

    model_cfg = OmegaConf.to_container(_compose(["model=ddpm_cifar10_pretrained"]).model, resolve=True)
    model_cfg.update(pretrained=str(tmp_path / "absent_unet"), sample_size=32, channels=3)
    clf_cfg = OmegaConf.to_container(_compose(["classifier=resnet20_cifar10"]).classifier, resolve=True)
    clf_cfg["checkpoint"] = "absent_resnet20.th"
    with pytest.raises(WeightsNotFoundError, match="absent_unet"):
        load_pretrained(model_cfg, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="absent_resnet20"):
        load_cifar_resnet(clf_cfg, tmp_path)
    with pytest.raises(EncoderWeightsError, match="absent_resnet18"):
        load_backbone("resnet18", str(tmp_path / "absent_resnet18.pth"))
    with pytest.raises(WeightsNotFoundError, match="absent_alex"):
        LPIPSDistance("alex", str(tmp_path / "absent_alex.pth"))
    with pytest.raises(WeightsNotFoundError, match="dists_alpha_beta.pt"):
        DISTSDistance(tmp_path)
    with fast_dev_run.mode(True), caplog.at_level("WARNING"):
        lp = LPIPSDistance("alex", str(tmp_path / "absent_alex.pth"))
        dists = DISTSDistance(tmp_path)
        unet = load_pretrained(model_cfg, torch.device("cpu")).unet
        clf = load_cifar_resnet(clf_cfg, tmp_path)
        enc, weights_id = load_backbone("resnet18", str(tmp_path / "absent_resnet18.pth"))
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307  # google/ddpm-cifar10-32's architecture
    assert clf.source == "random(fast_dev_run)" and weights_id.startswith("random(fast_dev_run")
    assert sum(p.numel() for p in enc.parameters()) == 11_689_512  # torchvision ResNet-18
    assert "random(fast_dev_run)" in dists.describe()
    assert 0 < float(dists(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))) < 1
    assert (
        lp.weights_source == "random(fast_dev_run)"
        and float(lp(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))) > 0
    )
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "FAST_DEV_RUN" in r.getMessage()]
    assert any("absent_unet" in m for m in warned) and any("absent_resnet20" in m for m in warned)
    assert any("absent_alex" in m for m in warned) and any("dists_alpha_beta.pt" in m for m in warned)
    assert not fast_dev_run.active()  # the mode ends with its block


def test_random_init_leaves_no_reference_cycle(tmp_path):
    """The handled load error's traceback held load_pretrained's frame, whose locals held the random UNet: a cycle
    that kept every cell's network (ADM-256: 2.2 GB) alive across an in-process sweep until a full collection."""
    import gc
    import weakref

    from ood_bench.models.diffusion import load_pretrained

    model_cfg = OmegaConf.to_container(_compose(["model=ddpm_cifar10_pretrained"]).model, resolve=True)
    model_cfg.update(pretrained=str(tmp_path / "absent_unet"), sample_size=32, channels=3)
    gc.collect()
    gc.disable()
    try:
        with fast_dev_run.mode(True):
            model = load_pretrained(model_cfg, torch.device("cpu"))
        ref = weakref.ref(model.unet)
        del model
        assert ref() is None, "the random UNet outlived its last reference (a reference cycle holds it)"
    finally:
        gc.enable()


def test_param_counter_counts_each_evaluated_parameter_once():
    a, b, unused = (
        torch.nn.Linear(3, 4),
        torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()),
        torch.nn.Linear(9, 9),
    )
    with ParamCounter() as counter:
        x = torch.zeros(1, 3)
        a(x)
        a(x)
        b(a(x))
    a(x)  # after the block: not counted
    assert counter.total == (3 * 4 + 4) + (4 * 2 + 2)
    assert sum(p.numel() for p in unused.parameters()) == 90


def test_synthetic_cifar100_loads_only_in_the_mode(tmp_path):
    from ood_bench.data.sources import DatasetNotFoundError, TorchvisionSource

    synthetic_layouts.write_cifar(tmp_path, True, np.random.default_rng(0))
    with pytest.raises(DatasetNotFoundError):  # torchvision's MD5 check: synthetic files are not CIFAR-100
        TorchvisionSource("cifar100", "CIFAR100", str(tmp_path)).labels("test")
    with fast_dev_run.mode(True):
        src = TorchvisionSource("cifar100", "CIFAR100", str(tmp_path))
        images = src.images("test", [0, 1])
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert len(src.labels("test")) == synthetic_layouts.N_TEST


# RAM an overlay's fast_dev_run needs beyond the others, measured (docs/fast_dev_run.md): the SD-inpainting UNet
# (860 M parameters) fine-tuned in fp32 with AdamW (no EMA copy at ema_decay 0): 17.6 GB peak RSS for the overlay
NEEDS_GB = {"anomalysd_mvtec_1shot": 19, "anomalysd_visa_1shot": 19}


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: line.split()[1] for line in f}
    return int(info.get("MemAvailable", 0)) / 2**20


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_runs_at_full_size(overlay, tmp_path_factory, record_property):
    """Every sweep cell of the overlay, at full size, finishes with finite metrics (scripts/fast_dev_run_all.py);
    the overlay's parameters, seconds and peak RSS are recorded (junit properties, fast_dev_run.md in its folder)."""
    if overlay in NEEDS_GB and Path("/proc/meminfo").is_file() and _available_gb() < NEEDS_GB[overlay]:
        pytest.skip(f"{overlay} needs ~{NEEDS_GB[overlay]} GB of free RAM (SD-inpainting fine-tuning at 512 px)")
    import importlib
    import sys

    sys.path.insert(0, str(CONF_DIR.parent / "scripts"))
    script = importlib.import_module("fast_dev_run_all")  # (a dataclass module: imported, not exec'd)
    data = synthetic_layouts.write_all(tmp_path_factory.getbasetemp() / "fast_dev_run_data")
    out = tmp_path_factory.mktemp(overlay)
    res = script.run_overlay(overlay, data, out)
    script.write_table([res], out)
    for key in ("cells", "expected_cells", "params", "seconds", "peak_rss_mb", "status"):
        record_property(key, getattr(res, key))
    print((out / "fast_dev_run.md").read_text().splitlines()[-1])  # the row, shown with -rA / -s
    assert res.returncode == 0, f"{overlay}: exit {res.returncode} (its log.txt under {tmp_path_factory.getbasetemp()})"
    assert res.cells == res.expected_cells, f"{overlay}: {res.cells} of {res.expected_cells} cells"
    assert res.finite and res.params > 0
    assert math.isfinite(res.seconds) and res.peak_rss_mb > 0
