"""An interrupted diffusion training resumes from its last checkpoint and ends with the same weights."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import REPO_ROOT
from test_cache_results import tiny_model_cfg

from ood_bench.cache import ArtifactCache
from ood_bench.models.diffusion import get_diffusion_model

STEPS, EVERY = 400, 10

TRAIN_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from ood_bench.cache import ArtifactCache
from ood_bench.models.diffusion import get_diffusion_model
cfg, cache = json.loads(sys.argv[1]), ArtifactCache(sys.argv[2])
images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
get_diffusion_model(cfg, images, cache, torch.device("cpu"), progress=False)
"""


def _cfg() -> dict:
    cfg = tiny_model_cfg(steps=STEPS, ema_decay=0.99)
    cfg.update(sample_size=8, channels=1, checkpoint_every=EVERY)
    return cfg


def test_interrupted_training_resumes_to_identical_weights(tmp_path: Path, caplog) -> None:
    cfg, images = _cfg(), torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(cfg), str(interrupted)], cwd=REPO_ROOT)
    deadline = time.monotonic() + 120
    while not list(interrupted.glob("diffusion/.partial-*/state.pt")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    state = torch.load(next(interrupted.glob("diffusion/.partial-*/state.pt")), weights_only=True)
    assert 0 < state["step"] < STEPS and state["step"] % EVERY == 0
    assert not [p for p in (interrupted / "diffusion").iterdir() if not p.name.startswith(".")]  # no entry yet

    with caplog.at_level("INFO", logger="ood_bench.models.diffusion"):
        resumed = get_diffusion_model(cfg, images, ArtifactCache(interrupted), torch.device("cpu"), progress=False)
    assert "resuming diffusion training at step" in caplog.text
    assert not list(interrupted.glob("diffusion/.partial-*"))  # checkpoints removed once the entry is complete

    fresh = get_diffusion_model(cfg, images, ArtifactCache(tmp_path / "fresh"), torch.device("cpu"), progress=False)
    for (name, a), (_, b) in zip(resumed.unet.state_dict().items(), fresh.unet.state_dict().items()):
        assert torch.equal(a, b), name
