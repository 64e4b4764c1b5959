"""What a run costs: phase timers, peak memory, precision in the results row; LMD re-scoring without the network."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import TINY_RUN_OVERRIDES
from diffusers import UNet2DModel

from ood_bench.costs import PeakMemory, phase, phase_seconds, reset_phases
from ood_bench.runner import run


def test_phases_add_up_and_reset() -> None:
    reset_phases()
    with phase("train"):
        time.sleep(0.02)
    with phase("train"):
        time.sleep(0.02)
    got = phase_seconds()
    assert got["train_seconds"] >= 0.04 and got["features_seconds"] == got["sampling_seconds"] == 0
    reset_phases()
    assert phase_seconds()["train_seconds"] == 0
    bad = r"phase 'inference' is not valid; valid: \['train', 'features', 'sampling'\]"
    with pytest.raises(ValueError, match=bad), phase("inference"):
        pass


def test_peak_memory_sees_a_temporary_allocation() -> None:
    memory = PeakMemory(torch.device("cpu")).start()
    before = memory.record()["peak_rss_mb"]
    block = np.ones(300 * 1024 * 1024 // 8)  # 300 MiB, touched, then freed
    del block
    after = memory.record()
    assert after["peak_rss_mb"] - before > 250 and after["peak_rss_scope"] == "run"
    assert PeakMemory(torch.device("cpu")).start().record()["peak_rss_mb"] < after["peak_rss_mb"] - 250  # reset


def test_rescoring_a_finished_lmd_run_with_another_distance_evaluates_no_network(hydra_conf, tmp_path) -> None:
    """Two runs into one cache: the second (another distance and aggregation, so another config hash) loads the
    trained model and reads every inpainting, the figure grid's included, from the cache: no UNet call."""
    calls: list[int] = []

    def count(module, _args):
        if isinstance(module, UNet2DModel):
            calls.append(1)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        first = run(hydra_conf([*TINY_RUN_OVERRIDES, "method.distance=mse"], tmp_path))
        n_first = len(calls)
        second = run(hydra_conf([*TINY_RUN_OVERRIDES, "method.distance=ssim", "method.aggregate=mean"], tmp_path))
    finally:
        handle.remove()
    assert n_first > 0 and len(calls) == n_first
    assert second["config_hash"] != first["config_hash"] and second["auroc"] != first["auroc"]
    # the costs of each run are in its row
    assert first["train_seconds"] > 0 and first["sampling_seconds"] > 0 and second["sampling_seconds"] == 0
    assert first["precision"] == "bf16" and first["train_precision"] == "bf16"  # the CPU defaults
    assert first["peak_rss_mb"] > 100 and first["peak_rss_scope"] == "run"
