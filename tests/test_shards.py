"""One cell, many workers: ``shard.count=N shard.index=i`` scores a block of the test splits into the cache; the run
without ``shard.index`` merges the blocks with zero network evaluations and writes the same metrics as a whole run
in an empty cache (LMD, DiffGuard; an anomaly-detection cell too). In process, through ``ood_bench.runner.run``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from anomaly_layouts import write_mvtec
from conftest import TINY_MODEL_OVERRIDES, TINY_RUN_OVERRIDES
from diffusers import UNet2DModel
from test_run import read_csv

from ood_bench.errors import ConfigError, UserError
from ood_bench.runner import run
from ood_bench.tasks.shards import MissingShardsError, shard_bounds

LMD_TINY = [*TINY_RUN_OVERRIDES, "method.distance=mse", "figures.inpaint_images=1", "threads=1"]
DIFFGUARD_TINY = [
    "method=diffguard",
    *TINY_MODEL_OVERRIDES,
    "classifier.width=8",
    "classifier.train.steps=10",
    "method.steps=10",
    "method.inversion_steps=3",
    "method.batch_size=8",
    "threads=1",
]


@pytest.fixture
def unet_calls(monkeypatch) -> list[int]:
    """Counts the forward passes of every ``UNet2DModel`` (the real forward runs)."""
    calls = [0]
    forward = UNet2DModel.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", counting)
    return calls


def _folder(record: dict, results: Path) -> Path:
    return results / record["method"] / record["data"] / record["config_hash"]


def _sharded_and_whole(hydra_conf, tmp_path: Path, overrides: list[str], count: int, unet_calls: list[int]):
    """Run every shard, then the merge (counting its UNet calls), in one folder; the whole cell in an empty one."""
    shared = tmp_path / "sharded"
    for index in range(count):
        before = unet_calls[0]
        rec = run(hydra_conf([*overrides, f"shard.count={count}", f"shard.index={index}"], shared))
        assert rec["shard_index"] == index and "auroc" not in rec
        assert unet_calls[0] > before  # the shard really evaluated the network
        assert not (shared / "results" / "runs.csv").exists()  # a shard writes no results
    before = unet_calls[0]
    merged = run(hydra_conf(overrides, shared))
    merge_calls = unet_calls[0] - before
    whole = run(hydra_conf(overrides, tmp_path / "whole"))
    return merged, merge_calls, whole, shared / "results", tmp_path / "whole" / "results"


def assert_same_scores(path_a: Path, path_b: Path) -> None:
    """The same samples in the same order with the same labels and extras; every score equal up to the float effect
    of batch composition (a shard's batches hold other samples than the whole run's: the tolerance of the methods'
    batch-size invariance tests)."""
    a, b = pd.read_csv(path_a), pd.read_csv(path_b)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    floats = [c for c in a.columns if a[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(a.drop(columns=floats), b.drop(columns=floats))
    for c in floats:
        np.testing.assert_allclose(a[c], b[c], rtol=1e-5, atol=1e-7, err_msg=c)


def _assert_same_numbers(merged: dict, whole: dict, merged_dir: Path, whole_dir: Path, count: int) -> None:
    assert merged["config_hash"] == whole["config_hash"]  # shard.* never joins the config hash
    assert merged["shard_count"] == count and "shard_count" not in whole
    assert_same_scores(merged_dir / "scores.csv", whole_dir / "scores.csv")
    a, b = read_csv(merged_dir / "summary.csv")[0], read_csv(whole_dir / "summary.csv")[0]
    for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_oodpos", "n_id", "n_ood", "nfe_per_image"):
        assert a[key] == b[key], key
    method_cols = {k: v for k, v in b.items() if k.startswith("method.")}
    assert {k: a[k] for k in method_cols} == method_cols  # the method's settings as run


def test_shard_bounds_partition_every_size_into_contiguous_balanced_blocks():
    for n in (0, 1, 5, 16, 17, 101):
        for count in (1, 2, 3, 7):
            blocks = [shard_bounds(n, count, i) for i in range(count)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(hi == lo for (_, hi), (lo, _) in zip(blocks, blocks[1:]))  # contiguous, in order
            sizes = [hi - lo for lo, hi in blocks]
            assert max(sizes) - min(sizes) <= 1
            assert [len(b) for b in np.array_split(np.arange(n), count)] == sizes


def test_lmd_merge_equals_whole_run_without_a_unet_call(hydra_conf, tmp_path, unet_calls):
    merged, merge_calls, whole, merged_res, whole_res = _sharded_and_whole(
        hydra_conf, tmp_path, LMD_TINY, 2, unet_calls
    )
    assert merge_calls == 0
    _assert_same_numbers(merged, whole, _folder(merged, merged_res), _folder(whole, whole_res), 2)
    assert float(merged["auroc"]) == float(whole["auroc"])
    # the model was trained once, by the first shard, and reused by the second
    cache = tmp_path / "sharded" / "cache"
    assert len([p for p in (cache / "diffusion").iterdir() if not p.name.startswith(".")]) == 1
    # the merged folder is a normal run: a rerun skips it
    assert run(hydra_conf(LMD_TINY, tmp_path / "sharded"))["config_hash"] == merged["config_hash"]
    assert [r["config_hash"] for r in read_csv(merged_res / "runs.csv")] == [merged["config_hash"]]


@pytest.mark.slow  # ~20 s; CI's launcher step runs this file whole
def test_diffguard_merge_of_three_uneven_shards_equals_whole_run(hydra_conf, tmp_path, unet_calls):
    merged, merge_calls, whole, merged_res, whole_res = _sharded_and_whole(
        hydra_conf, tmp_path, DIFFGUARD_TINY, 3, unet_calls
    )
    assert merge_calls == 0
    _assert_same_numbers(merged, whole, _folder(merged, merged_res), _folder(whole, whole_res), 3)


def test_missing_shards_are_named_and_counts_must_agree(hydra_conf, tmp_path):
    run(hydra_conf([*LMD_TINY, "shard.count=3", "shard.index=1"], tmp_path))
    with pytest.raises(MissingShardsError, match=r"shard\(s\) \[0, 2\] of shard.count=3 have not completed"):
        run(hydra_conf(LMD_TINY, tmp_path))
    with pytest.raises(MissingShardsError, match=r"shard\(s\) \[0, 2\]"):
        run(hydra_conf([*LMD_TINY, "shard.merge=true"], tmp_path))
    with pytest.raises(UserError, match=r"shard.count=2 is not valid .* split it into 3"):
        run(hydra_conf([*LMD_TINY, "shard.count=2", "shard.index=0"], tmp_path))
    # shard.merge=false ignores the shards: the whole cell runs here
    rec = run(hydra_conf([*LMD_TINY, "shard.merge=false"], tmp_path))
    assert "shard_count" not in rec and 0.0 <= rec["auroc"] <= 1.0


def test_merge_without_shards_fails_and_bad_shard_settings_name_the_key(hydra_conf, tmp_path):
    with pytest.raises(MissingShardsError, match="shard.merge=true, but cell .* has no shards in the cache"):
        run(hydra_conf([*LMD_TINY, "shard.merge=true"], tmp_path))
    bad = {
        ("shard.count=2", "shard.index=2"): r"shard.index=2 is not valid; valid: 0..1",
        ("shard.index=0",): r"shard.index=0 needs shard.count",
        ("shard.count=0",): r"shard.count=0 is not valid",
        ("shard.merge=maybe",): r"shard.merge='maybe' is not valid; valid: null \(auto\), true, false",
        ("shard.count=2", "shard.index=0", "shard.merge=true"): r"drop shard.index",
    }
    for overrides, pattern in bad.items():
        with pytest.raises(ConfigError, match=pattern):
            run(hydra_conf([*LMD_TINY, *overrides], tmp_path))


@pytest.mark.slow  # ~20 s; CI's launcher step runs this file whole
def test_anomaly_cell_merges_to_the_whole_runs_rows(hydra_conf, tmp_path):
    data = tmp_path / "data"
    write_mvtec(data / "mvtec_anomaly_detection", "bottle", n_train=4, n_good=4, defects={"broken": 3, "hole": 3})
    overrides = ["method=patch_knn", "data=mvtec/bottle", "debug=anomaly", "data.n_test=null", "threads=1"]
    overrides.append(f"paths.data_dir={data}")
    shared = tmp_path / "sharded"
    for index in range(2):
        assert run(hydra_conf([*overrides, "shard.count=2", f"shard.index={index}"], shared))["shard_index"] == index
    merged = run(hydra_conf(overrides, shared))
    whole = run(hydra_conf(overrides, tmp_path / "whole"))
    a, b = _folder(merged, shared / "results"), _folder(whole, tmp_path / "whole" / "results")
    assert merged["config_hash"] == whole["config_hash"] and merged["shard_count"] == 2
    assert_same_scores(a / "scores.csv", b / "scores.csv")
    rows_a, rows_b = read_csv(a / "rows.csv"), read_csv(b / "rows.csv")
    metrics = ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "aupro", "pixel_f1_max")
    assert [{k: r[k] for k in metrics} for r in rows_a] == [{k: r[k] for k in metrics} for r in rows_b]
    assert (a / "shots.json").read_text() == (b / "shots.json").read_text()
