"""The Python API (ood_bench/api.py), the examples/ scripts, your own method (method._target_ and entry points), and
the configs shipped in a non-editable install."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT, shared_path, shared_weight

import ood_bench as ob
from ood_bench.api import compose, load_images
from ood_bench.data.pair import Pair
from ood_bench.errors import ConfigError
from ood_bench.methods import Method, get_method
from ood_bench.results.store import read_csv_text
from ood_bench.runner import run
from ood_bench.tasks.ood import load_pair

EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Results, cache and logs of API calls under ``tmp_path`` (as ``PROJECT_ROOT`` does for run.py)."""
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("OOD_BENCH_CACHE", raising=False)
    monkeypatch.syspath_prepend(str(EXAMPLES))  # `import my_method`, as the example scripts do
    monkeypatch.syspath_prepend(str(REPO_ROOT))  # `examples.my_method`, as run.py from the checkout
    return tmp_path


def pixel_knn():
    from my_method import PixelKNN

    return PixelKNN


def test_evaluate_runs_the_runner_and_equals_score_on_the_same_images(project):
    PixelKNN = pixel_knn()
    table = ob.evaluate(method=PixelKNN, data="digits", method_args={"k": 3}, overrides=["progress=false"])
    assert len(table) == 1 and table["method"].iloc[0] == "pixel_knn" and table["auroc"].dtype == np.float64
    runs = ob.load_runs()
    row = runs[runs["config_hash"] == table["config_hash"].iloc[0]].iloc[0]
    assert row["auroc"] == table["auroc"].iloc[0] and row["method.k"] == 3
    assert (project / "results" / "pixel_knn" / "digits" / row["config_hash"] / "DONE").is_file()

    pair: Pair = load_pair(compose(["data=digits"]).data)  # the same images, handed to score() as arrays
    arrays = [s.images.materialize().numpy() for s in (pair.id_train, pair.id_test, pair.ood_test)]
    direct = ob.score(PixelKNN, *arrays, k=3)
    assert direct["auroc"] == table["auroc"].iloc[0] and direct.method == "pixel_knn"
    assert (
        ob.score(PixelKNN(k=3), *(s.images for s in (pair.id_train, pair.id_test, pair.ood_test)))["auroc"]
        == (direct["auroc"])
    )


def test_score_reads_image_folders_and_refuses_bad_input(project, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for side, level in (("id", 60), ("ood", 200)):
        (tmp_path / side / "any_class").mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(level, 20, (10, 10)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / side / "any_class" / f"{i}.png")
    x = load_images(tmp_path / "id", "id_test")
    assert x.shape == (12, 1, 10, 10) and 0.1 < float(x.mean()) < 0.4
    train = rng.normal(60, 20, (30, 10, 10)).clip(0, 255).astype(np.uint8)  # uint8, [N, H, W]
    result = ob.score(pixel_knn(), train, tmp_path / "id", str(tmp_path / "ood"), k=2)
    assert result["auroc"] == 1.0 and len(result.ood_scores) == 12
    with pytest.raises(ValueError, match=r"values in \[-1"):
        load_images(np.full((2, 8, 8), -1.0), "id_train")
    with pytest.raises(ValueError, match="has shape"):
        load_images(np.zeros((2, 5, 8, 8)), "id_train")
    with pytest.raises(ValueError, match=r"settings \['nope'\] are not keys of method='dlsr'"):
        ob.score("dlsr", train, train, train, nope=1)


@pytest.mark.parametrize(
    "script",
    [
        "api_plugin.py",
        pytest.param("api_score.py", marks=pytest.mark.slow),  # DLSR trains twice (28 s on the busy 2-core CPU)
        pytest.param("api_evaluate.py", marks=pytest.mark.slow),
    ],
)
def test_examples_run(project, script):
    """Every example script runs as written (in this process, results under a temporary project root)."""
    if script in ("api_evaluate.py", "api_score.py"):  # DLSR's ImageNet AlexNet: skipped without the offline file
        shared_weight("alexnet_features_imagenet.pth")
    if script == "api_evaluate.py":
        shared_path("FashionMNIST")  # skipped without the offline copy
    out = runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    if script == "api_evaluate.py":
        assert list(out["table"]["ood_set"]) == ["mnist", "cifar10", "textures", "near", "far", "all"]
        assert (out["table"]["auroc_ci_low"] <= out["table"]["auroc"]).all()
        assert "fashionmnist_bench" in set(out["runs"]["data"])
    elif script == "api_score.py":
        assert 0.0 <= out["result"]["auroc"] <= 1.0 and len(out["result"].ood_scores) == len(out["ood_x"])
    else:
        assert out["table"]["auroc"].iloc[0] > 0.9 and out["result"]["auroc"] > 0.9  # pixel kNN on digits


def test_own_method_through_the_runner_with_its_own_arguments(hydra_conf, tmp_path, project):
    """``method=custom method._target_=examples.my_method.PixelKNN``: the class outside the package runs, its
    arguments enter the config hash, and a target that is not a Method fails at start naming the key."""
    records = []
    for k in (1, 4):
        cfg = hydra_conf(["method=custom", "method._target_=examples.my_method.PixelKNN", f"+method.k={k}"], tmp_path)
        records.append(run(cfg))
    assert [r["method"] for r in records] == ["pixel_knn", "pixel_knn"] and records[0]["method.k"] == 1
    assert records[0]["config_hash"] != records[1]["config_hash"] and records[1]["auroc"] > 0.9
    named = hydra_conf(["method=custom", "method._target_=examples.my_method.PixelKNN", "method.name=mine"], tmp_path)
    assert run(named)["method"] == "mine"
    for target, message in (("examples.my_method.Nope", "cannot be imported"), ("numpy.ndarray", "not a subclass")):
        cfg = hydra_conf(["method=custom", f"method._target_={target}"], tmp_path)
        with pytest.raises(ConfigError, match=message):
            run(cfg)
    with pytest.raises(ConfigError, match="method._target_"):  # left unset
        run(hydra_conf(["method=custom"], tmp_path))


def test_own_method_from_an_entry_point(tmp_path, monkeypatch):
    """An installed package can publish its class in the entry point group ``ood_bench.methods``."""
    (tmp_path / "plug_mod.py").write_text(
        "from examples.my_method import PixelKNN\n\nclass Plugged(PixelKNN):\n    name = 'plugged'\n"
    )
    info = tmp_path / "plug_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ood_bench.methods]\nplugged = plug_mod:Plugged\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    cls = get_method("plugged")
    assert issubclass(cls, Method) and cls.__name__ == "Plugged"
    with pytest.raises(KeyError, match=r"from installed packages: \['plugged'\]"):
        get_method("not_there")


@pytest.mark.slow
def test_plugin_runs_through_run_py(tmp_path):
    """The command line itself: ``python run.py method=custom method._target_=examples.my_method.PixelKNN``."""
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("OOD_BENCH_CACHE", None)
    cmd = [
        sys.executable,
        "run.py",
        "method=custom",
        "method._target_=examples.my_method.PixelKNN",
        "+method.k=2",
        "threads=1",
        "progress=false",
    ]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = read_csv_text(tmp_path / "results" / "runs.csv")
    assert runs.iloc[-1]["method"] == "pixel_knn" and float(runs.iloc[-1]["auroc"]) > 0.9


# ---------------------------------------------------------------------------------------------------------------
# A non-editable install finds its configs
# ---------------------------------------------------------------------------------------------------------------

CONF_PROBE = "import ood_bench, ood_bench.api as a; print(ood_bench.__file__); print(a.conf_dir())"


def test_build_ships_the_configs_as_package_data(tmp_path):
    """``setup.py``'s build step copies conf/ into ``ood_bench/conf``; that copy is what the API then uses."""
    lib = tmp_path / "lib"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )
    shipped = {p.relative_to(lib / "ood_bench" / "conf") for p in (lib / "ood_bench" / "conf").rglob("*.yaml")}
    tracked = {p.relative_to(REPO_ROOT / "conf") for p in (REPO_ROOT / "conf").rglob("*.yaml")}
    assert shipped == {p for p in tracked if p.parts[0] != "local"}
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "OOD_BENCH_CONF")}
    env["PYTHONPATH"] = str(lib)
    out = subprocess.run([sys.executable, "-c", CONF_PROBE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    module, conf = out.stdout.split()
    assert Path(module).is_relative_to(lib) and Path(conf) == lib / "ood_bench" / "conf"


@pytest.mark.slow
def test_evaluate_from_an_installed_wheel(tmp_path):
    """Build the wheel, install it (no dependencies) outside the checkout and evaluate from another folder."""
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        check=True,
        capture_output=True,
    )
    wheel = next(wheels.glob("ood_bench-*.whl"))
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "OOD_BENCH_CONF", "OOD_BENCH_CACHE")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    code = (
        CONF_PROBE + "\nimport ood_bench as ob\n"
        "t = ob.evaluate(method='dlsr', data='digits', overrides=['method.epochs=1', 'method.input_size=32', "
        "'threads=1', 'progress=false'])\nprint('AUROC', float(t['auroc'].iloc[0]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert Path(lines[0]).is_relative_to(site) and Path(lines[1]) == site / "ood_bench" / "conf"
    assert 0.0 <= float(lines[-1].split()[1]) <= 1.0
    assert (work / "results" / "runs.csv").is_file()  # an installed package writes under the working directory
    assert len(pd.read_csv(work / "results" / "runs.csv")) == 1
