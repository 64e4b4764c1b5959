"""Paired comparisons: DeLong's test (ood_bench/metrics/paired.py) against an independent implementation, the
pairwise definition and a paired bootstrap; ``make tables --compare`` on run folders."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import load_script
from sklearn.metrics import roc_auc_score

from ood_bench.metrics import ood_metrics
from ood_bench.metrics.paired import auroc_components, delong_mean_test, delong_test
from ood_bench.report.compare import compare_runs
from ood_bench.results import RunStore


def correlated(n: int, m: int, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (OOD = 1) and two correlated detectors' scores of the same samples (b rounded: ties)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n + m, 2))
    z[:, 1] = rho * z[:, 0] + np.sqrt(1 - rho**2) * z[:, 1]
    y = np.r_[np.zeros(n), np.ones(m)]
    return y, z[:, 0] + 0.8 * y, np.round(z[:, 1] + 0.5 * y, 1)


def test_components_are_the_pairwise_definition():
    _, a, _ = correlated(23, 17, 0.5, 0)
    s_id, s_ood = np.round(a[:23], 1), np.round(a[23:], 1)  # ties within and between the classes
    v10, v01 = auroc_components(s_id, s_ood)
    psi = (s_ood[:, None] > s_id[None, :]) + 0.5 * (s_ood[:, None] == s_id[None, :])
    assert np.allclose(v10, psi.mean(1), atol=1e-12) and np.allclose(v01, psi.mean(0), atol=1e-12)
    assert v10.mean() == pytest.approx(roc_auc_score(np.r_[np.zeros(23), np.ones(17)], np.r_[s_id, s_ood]), abs=1e-12)


@pytest.mark.parametrize(("n", "m", "rho", "seed"), [(40, 30, 0.5, 0), (300, 200, 0.8, 1), (100, 100, 0.2, 2)])
def test_delong_equals_an_independent_implementation(n, m, rho, seed):
    """MLstatkit's ``Delong_test`` (aligned with R pROC::roc.test; its z is signed b - a)."""
    delong = pytest.importorskip("MLstatkit.delong", reason="MLstatkit (dev extra) is the reference implementation")
    y, a, b = correlated(n, m, rho, seed)
    z_ref, p_ref, auc_a, auc_b = delong.Delong_test(y, a, b, return_ci=False, return_auc=True)
    ours = delong_test(a[:n], a[n:], b[:n], b[n:])
    assert ours.z == pytest.approx(-z_ref, rel=1e-9) and ours.p_value == pytest.approx(p_ref, rel=1e-9)
    assert (ours.auroc_a, ours.auroc_b) == pytest.approx((auc_a, auc_b), abs=1e-12)


def paired_bootstrap_se(s_id: list[np.ndarray], oods: list[list[np.ndarray]], n_boot: int, seed: int) -> float:
    """SD of the mean AUROC difference over resamples of the shared samples (same draws for both methods); the
    AUROC of a resample is the mean of its components (equal to scikit-learn's, test above)."""
    rng = np.random.default_rng(seed)
    n = len(s_id[0])
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        draws = [rng.integers(0, len(o), len(o)) for o in oods[0]]
        aucs = [
            np.mean([auroc_components(s_id[k][i], o[d])[0].mean() for o, d in zip(oods[k], draws)]) for k in range(2)
        ]  # fmt: skip
        diffs.append(aucs[0] - aucs[1])
    return float(np.std(diffs, ddof=1))


def test_delong_standard_error_agrees_with_a_paired_bootstrap():
    """One OOD set and the mean over two OOD sets sharing the ID samples (a benchmark's mean rows)."""
    y, a, b = correlated(150, 120, 0.6, 3)
    _, a2, b2 = correlated(150, 90, 0.6, 4)
    single = delong_test(a[:150], a[150:], b[:150], b[150:])
    boot = paired_bootstrap_se([a[:150], b[:150]], [[a[150:]], [b[150:]]], 400, 0)
    assert single.se == pytest.approx(boot, rel=0.15)
    mean = delong_mean_test(a[:150], [a[150:], a2[150:]], b[:150], [b[150:], b2[150:]])
    boot = paired_bootstrap_se([a[:150], b[:150]], [[a[150:], a2[150:]], [b[150:], b2[150:]]], 400, 1)
    assert mean.se == pytest.approx(boot, rel=0.15)
    assert mean.delta == pytest.approx((single.delta + delong_test(a[:150], a2[150:], b[:150], b2[150:]).delta) / 2)
    same = delong_test(a[:150], a[150:], a[:150], a[150:])
    assert same.delta == 0 and same.p_value == 1.0


def write_pair_run(results, method: str, scores: tuple[np.ndarray, np.ndarray], idx: tuple[np.ndarray, np.ndarray]):
    s_id, s_ood = scores
    record = {"method": method, "data": "cifar10_mnist", "config_hash": f"{method}-h", "seed": 0, "n_id": len(s_id),
              "n_ood": len(s_ood), **ood_metrics(s_id, s_ood), "seconds": 1.0, "nfe_per_image": 1.0,
              "images_per_s": 1.0}  # fmt: skip
    per_sample = {
        "split": np.array(["id"] * len(s_id) + ["ood"] * len(s_ood)),
        "sample_index": np.r_[idx[0], idx[1]],
        "score": np.r_[s_id, s_ood],
    }
    RunStore(results, method, "cifar10_mnist", record["config_hash"]).write(
        record, per_sample, yaml.safe_dump({"data": {}})
    )


def test_make_tables_compare_tests_the_shared_samples(tmp_path, capsys):
    y, a, b = correlated(80, 60, 0.5, 5)
    ids, oods = np.arange(80) * 3, np.arange(60) * 7
    write_pair_run(tmp_path, "lmd", (a[:80], a[80:]), (ids, oods))
    # dlsr scored the samples in another order and five fewer ID samples: the comparison uses the 75 shared ones
    order = np.random.default_rng(0).permutation(80)[5:]
    write_pair_run(tmp_path, "dlsr", (b[:80][order], b[80:]), (ids[order], oods))
    code = load_script("make_tables").main(["--results", str(tmp_path), "--compare", "lmd,dlsr"])
    out = capsys.readouterr().out
    assert code == 0 and "DeLong" in out
    row = compare_runs(tmp_path, "lmd", "dlsr").iloc[0]
    keep = np.sort(order)
    want = delong_test(a[:80][keep], a[80:], b[:80][keep], b[80:])
    assert row["n_id"] == 75 and row["n_ood"] == 60 and row["p_value"] == pytest.approx(want.p_value, rel=1e-12)
    assert f"{100 * want.delta:+.2f}" in out and (tmp_path / "tables" / "compare_lmd_vs_dlsr.csv").is_file()
    assert load_script("make_tables").main(["--results", str(tmp_path), "--compare", "lmd,nope"]) == 1
