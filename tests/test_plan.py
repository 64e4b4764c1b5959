"""The cost planner (``plan=true``, ``ood_bench/plan.py``): its FLOP and memory counts against analytic values and
a real forward, and a planned paper overlay that runs no network beyond the counting. Timing is never asserted."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import CONF_DIR
from omegaconf import OmegaConf
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ood_bench import plan
from ood_bench.bench import compose_run_config
from ood_bench.errors import ConfigError


def _mlp_probe(key: str) -> plan.Probe:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    return plan.Probe(key, build, lambda rows, device: ((torch.zeros(rows, 8, device=device),), {}))


def test_flops_of_a_tiny_mlp_equal_the_analytic_count() -> None:
    fwd = plan.measure(_mlp_probe("test_mlp_a"), "forward")
    assert fwd.device == "meta" and fwd.params == 8 * 16 + 16 + 16 * 4 + 4
    assert fwd.flops == 2 * (8 * 16 + 16 * 4) and fwd.conv_flops == 0
    # training: forward + weight gradients of both layers + the input gradient of the second (not of the first:
    # the input needs no gradient)
    train = plan.measure(_mlp_probe("test_mlp_a"), "train")
    assert train.flops == 2 * (8 * 16 + 16 * 4) + 2 * (8 * 16 + 16 * 4) + 2 * 16 * 4
    # the input gradient instead of the weight gradients
    grad = plan.measure(_mlp_probe("test_mlp_a"), "input_grad")
    assert grad.flops == 2 * (8 * 16 + 16 * 4) * 2


def test_activation_bytes_of_a_tiny_mlp_are_the_live_outputs() -> None:
    # no_grad forward: Linear's output (16 floats) is alive while ReLU makes its own (16), then the last Linear
    # makes 4 while ReLU's is alive: peak 32 floats per row
    cost = plan.measure(_mlp_probe("test_mlp_b"), "forward")
    assert cost.act_bytes_per_row == 32 * 4


def test_meta_count_of_the_cpu_unet_equals_flop_counter_on_a_real_forward() -> None:
    model = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "unet_small.yaml"), resolve=True)
    probe = plan.unet_probe(model, 16, 1, class_embeds=11)
    planned = plan.measure(probe, "forward")
    assert planned.device == "meta"
    torch.manual_seed(0)
    unet = probe.build().eval()
    args, kwargs = probe.example(1, torch.device("cpu"))
    # CPU's fused attention kernel has no FLOP formula in FlopCounterMode (the meta device runs the math path):
    # the reference forward takes the math path too
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(*args, **kwargs)
    assert planned.flops == counter.get_total_flops() > 0
    assert planned.params == sum(p.numel() for p in unet.parameters())
    assert 0 < planned.conv_flops < planned.flops  # the attention block's products are not convolutions


def _count_forwards(calls: dict[str, int]):
    def hook(module, args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if tensors:
            calls[tensors[0].device.type] = calls.get(tensors[0].device.type, 0) + 1

    return nn.modules.module.register_module_forward_pre_hook(hook)


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=lmd_table10", "data=cifar10_svhn"],
        ["experiment=diffguard_table2", "data=imagenet_species", "method.combine=mls"],
    ],
)
def test_a_paper_overlay_plans_without_running_a_network(tmp_path, overrides) -> None:
    from ood_bench.runner import optimized_value, run

    cfg = compose_run_config(CONF_DIR, [*overrides, "plan=true"], tmp_path)
    calls: dict[str, int] = {}
    handle = _count_forwards(calls)
    try:
        total = run(cfg)
    finally:
        handle.remove()
    assert set(calls) == {"meta"}  # every network call was a count on the meta device: no arithmetic
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()  # nothing trained or scored
    rows = pd.read_csv(tmp_path / "output" / "plan.csv")
    stages, cell = rows[rows["phase"] != "total"], rows[rows["phase"] == "total"].iloc[0]
    assert cell["total_pflops"] == pytest.approx(stages["total_pflops"].sum())
    assert cell["H100_hours"] == pytest.approx(total["H100_hours"]) and total["H100_hours"] > 0
    assert optimized_value(cfg, total) == total["H100_hours"]
    unet = stages[stages["network"].str.startswith("unet (")].iloc[0]
    if cfg.method.name == "lmd":  # the paper protocol: 10 repeats of 1000 steps on the full test sets
        assert unet["evals_per_image"] == 10 * 1000 and unet["images"] == 10000 + 26032
        train = stages[stages["phase"] == "train"].iloc[0]
        assert train["images"] * train["evals_per_image"] == 200000 * 128
        assert train["gflops_per_eval"] == pytest.approx(3 * unet["gflops_per_eval"], rel=0.01)
    else:  # ADM-256 (not on disk: its published architecture): 90 inversion, 92 guided + 92 unguided steps
        assert unet["evals_per_image"] == 90 + 92 + 92 and unet["images"] == 2000 + 2000
        assert unet["params_m"] == pytest.approx(552.8, rel=0.01)
        assert unet["gflops_per_eval"] == pytest.approx(2 * 1120, rel=0.01)  # DiT's Table 4: ADM 1120 GMACs
        assert set(stages["phase"]) == {"score"}  # pretrained diffusion model and classifier: no training


def test_planner_errors_name_the_bad_value(tmp_path) -> None:
    from ood_bench.runner import run

    cfg = compose_run_config(CONF_DIR, ["method=lmd", "data=digits", "plan=true", "+plan_utilisation=2"], tmp_path)
    with pytest.raises(ConfigError, match="plan_utilisation=2"):
        run(cfg)
    cfg = compose_run_config(CONF_DIR, ["method=lmd", "data=digits", "plan=true"], tmp_path)
    cfg.model.pretrained = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="absent"):
        run(cfg)


def test_sweep_summary_sums_the_cells_and_names_them(tmp_path) -> None:
    probe = _mlp_probe("test_mlp_c")
    for job, n in (("0", 10), ("1", 30)):
        stage = plan.Stage("score", "mlp", probe, "forward", n, 2, 4)
        cell = plan.CellPlan("lmd", "digits", f"data=digits seed={job} plan=true", {"n_id": n}, [stage])
        plan.write_csv(tmp_path / job / "plan.csv", plan.cell_rows(cell, 0.5))
    rows = plan.summarize_sweep(tmp_path)
    cells = [r for r in rows if r["phase"] == "cell"]
    sweep = rows[-1]
    assert [c["network"] for c in cells] == ["seed=0", "seed=1"] and sweep["phase"] == "sweep"
    flops = 2 * (8 * 16 + 16 * 4)
    assert sweep["total_pflops"] == pytest.approx((10 + 30) * 2 * flops / 1e15)
    assert sweep["H100_hours"] == pytest.approx(sum(c["H100_hours"] for c in cells))
    # fp32 matrix products at H100's FP32 peak and the given utilisation
    assert cells[0]["H100_hours"] == pytest.approx(10 * 2 * flops / (67e12 * 0.5) / 3600)
    assert (tmp_path / "plan.csv").is_file()
