"""The Python API: the suite from a notebook or script (``import ood_bench as ob``).

* ``ob.evaluate(method="lmd", data="fashionmnist_bench", overrides=[...])`` composes the same Hydra configs as
  ``python run.py``, runs through the same runner (same cache, same results folder and ``runs.csv``) and returns the
  run's table as a ``pandas.DataFrame`` (a row per OOD set and the near/far/all means for a benchmark; one row for
  a pair; the category rows for anomaly data).
* ``ob.score(method, id_train, id_test, ood_test, **settings)`` scores your own arrays, tensors or image folders
  with a method of the suite or your own, without any config file or results folder.
* ``ob.load_runs()`` is ``runs.csv`` (every run, latest row per config hash) with numbers as numbers.

The configs are found next to the package (``ood_bench/conf`` in an installed wheel, ``conf/`` in a source checkout)
or where ``$OOD_BENCH_CONF`` points.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The Hydra config folder: ``$OOD_BENCH_CONF``, the package's own copy (wheel) or the checkout's ``conf/``."""
    env = os.environ.get("OOD_BENCH_CONF")
    candidates = [Path(env)] if env else [PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"]
    for folder in candidates:
        if (folder / "config.yaml").is_file():
            return folder.resolve()
    raise FileNotFoundError(
        f"no ood_bench configs (config.yaml) in {[str(c) for c in candidates]}: install the package from a wheel "
        f"(it ships conf/ as package data), run from a source checkout, or set OOD_BENCH_CONF to a conf/ folder"
    )


def project_root(conf: Path) -> Path:
    """Where results, cache and logs go by default: ``$PROJECT_ROOT``, the checkout (as ``run.py``), or the cwd."""
    if os.environ.get("PROJECT_ROOT"):
        return Path(os.environ["PROJECT_ROOT"])
    return conf.parent if conf == (PACKAGE_DIR.parent / "conf").resolve() else Path.cwd()


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python run.py <overrides>`` would get (without its ``hydra`` node; ``${hydra:...}`` resolves)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    conf = conf_dir()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        if not os.environ.get("PROJECT_ROOT"):
            cfg.paths.root_dir = str(project_root(conf))
        out = Path(cfg.paths.log_dir) / "api" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _method_overrides(method: Any) -> list[str]:
    """``method=<config>``, or ``method=custom method._target_=<dotted path>`` for a class or a dotted path."""
    from ood_bench.methods import Method

    if isinstance(method, type) and issubclass(method, Method):
        return ["method=custom", f"method._target_={method.__module__}.{method.__qualname__}"]
    if not isinstance(method, str):
        raise TypeError(f"method={method!r} is not valid; use a config name (e.g. 'lmd'), a dotted path or a class")
    if (conf_dir() / "method" / f"{method}.yaml").is_file():
        return [f"method={method}"]
    if "." in method:
        return ["method=custom", f"method._target_={method}"]
    valid = sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml"))
    raise ValueError(f"method={method!r} is not valid; valid: {valid}, a dotted path my_pkg.MyMethod or a class")


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Every column whose non-empty cells all parse as numbers becomes numeric (empty cells: NaN)."""
    frame = frame.copy()
    for col in frame.columns:
        values = frame[col].replace({"": np.nan})
        try:
            frame[col] = pd.to_numeric(values)
        except (ValueError, TypeError):
            continue
    return frame


def evaluate(
    method: Any = "lmd_mse",
    data: str = "digits",
    overrides: Sequence[str] = (),
    *,
    method_args: Mapping[str, Any] | None = None,
    results_dir: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Run ``method`` on ``data`` as ``python run.py method=<method> data=<data> <overrides>`` does and return the
    run's table (cached results are returned at once; ``overrides=["overwrite=true"]`` re-runs).

    ``method`` is a config name (``conf/method``), a dotted path or a ``Method`` subclass (your own);
    ``method_args`` sets its constructor arguments; ``results_dir`` replaces ``paths.results_dir``.
    """
    from ood_bench.results import RunStore
    from ood_bench.runner import run

    cfg = compose([*_method_overrides(method), f"data={data}", *overrides])
    with open_dict(cfg):
        for key, value in (method_args or {}).items():
            cfg.method[key] = value
        if results_dir is not None:
            cfg.paths.results_dir = str(results_dir)
    record = run(cfg)
    store = RunStore(cfg.paths.results_dir, str(record["method"]), str(record["data"]), str(record["config_hash"]))
    rows = store.load_rows()
    if rows:
        return typed(pd.DataFrame(rows))
    return typed(pd.DataFrame([{k: "" if v is None else v for k, v in record.items()}]).astype(str))


def load_runs(results_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """``runs.csv`` of ``results_dir`` (default: the configured ``paths.results_dir``): the latest row of each run
    (config hash), numeric columns as numbers."""
    from ood_bench.results.store import read_csv_text

    folder = Path(results_dir) if results_dir is not None else Path(compose().paths.results_dir)
    index = folder / "runs.csv"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: run `python run.py ...` or ood_bench.evaluate(...) first")
    runs = read_csv_text(index).drop_duplicates("config_hash", keep="last").reset_index(drop=True)
    return typed(runs)


# ---------------------------------------------------------------------------------------------------------------
# score: your arrays, no config files
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Scores (higher = more OOD) of the ID and OOD test images and the OOD metrics (AUROC with OOD positive)."""

    id_scores: np.ndarray
    ood_scores: np.ndarray
    metrics: dict[str, float]
    method: str

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def frame(self) -> pd.DataFrame:
        """The metrics as a one-row DataFrame."""
        return pd.DataFrame(
            [{"method": self.method, "n_id": len(self.id_scores), "n_ood": len(self.ood_scores), **self.metrics}]
        )

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in self.metrics.items())
        return f"ScoreResult({self.method}: n_id={len(self.id_scores)}, n_ood={len(self.ood_scores)}, {shown})"


def load_images(images: Any, name: str) -> torch.Tensor:
    """Float ``[N,C,H,W]`` in ``[0,1]`` from a tensor or array (``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]``; uint8
    0-255 or float 0-1), a pair's lazy ``ImageSet`` or an image folder (every image below it, sorted; class
    sub-folders allowed)."""
    from ood_bench.data import ImageFolderSource
    from ood_bench.data.imageset import ImageSet

    if isinstance(images, str | os.PathLike):
        folder = Path(images).resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"{name}={str(images)!r} is not a folder of images")
        src = ImageFolderSource(name, folder=str(folder), root="/", test_fraction=1.0)
        x, _ = src.load("test", np.arange(len(src.labels("test"))))
        return x.float().div_(255.0)
    if isinstance(images, ImageSet):  # a split of a pair (lazy): its prepared float images
        images = images.materialize()
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images.detach().cpu()
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [N,H,W], [N,H,W,C] or [N,C,H,W], C in (1, 3)")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0).contiguous()
    x = x.float()
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"{name} has values in [{float(x.min()):.3g}, {float(x.max()):.3g}]; give uint8 or [0, 1]")
    return x.contiguous()


def score(
    method: Any,
    id_train: Any,
    id_test: Any,
    ood_test: Any,
    *,
    id_labels: Sequence[int] | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    model: str | None = None,
    seed: int = 0,
    device: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    **settings: Any,
) -> ScoreResult:
    """Fit ``method`` on ``id_train`` and score ``id_test`` and ``ood_test`` (tensors, arrays or image folders).

    ``method``: a config name of the suite (``"dlsr"``, ``"lmd_mse"``; ``settings`` override its keys), a ``Method``
    subclass (built with ``settings``) or instance. Images are brought to ``channels`` and ``image_size`` (default:
    those of ``id_train``); ``model`` picks the diffusion model config for methods that train one; ``id_labels`` are
    the training labels classifier-based methods need. Trained models and features go to the suite's cache.
    """
    from ood_bench.cache import ArtifactCache
    from ood_bench.data.transforms import resize, set_channels
    from ood_bench.devices import claim_device
    from ood_bench.methods import Context, Method, build_method
    from ood_bench.metrics import ood_metrics
    from ood_bench.models.classifier import validate_classifier_cfg
    from ood_bench.models.diffusion import validate_model_cfg

    x_train, x_id, x_ood = (
        load_images(x, n) for x, n in ((id_train, "id_train"), (id_test, "id_test"), (ood_test, "ood_test"))
    )
    channels = channels or int(x_train.shape[1])
    size = image_size or int(x_train.shape[-1])
    x_train, x_id, x_ood = (resize(set_channels(x, channels), size) for x in (x_train, x_id, x_ood))

    cfg = compose(
        [*_method_overrides(method if isinstance(method, str) else "lmd_mse"), *([f"model={model}"] if model else [])]
    )
    if isinstance(method, str):
        method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
        unknown = sorted(set(settings) - set(method_cfg))
        if unknown:
            raise ValueError(f"settings {unknown} are not keys of method={method!r}; valid: {sorted(method_cfg)}")
        method_obj = build_method({**method_cfg, **settings})
    elif isinstance(method, type) and issubclass(method, Method):
        method_obj = method(**settings)
        method_obj.name = getattr(method, "name", None) or method.__name__
    elif isinstance(method, Method):
        if settings:
            raise ValueError(f"settings {sorted(settings)} given with a built method; pass the class instead")
        method_obj = method
    else:
        raise TypeError(f"method={method!r} is not valid; use a config name, a Method subclass or a Method instance")

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(sample_size=size, channels=channels)
    if method_obj.uses_image_model:
        validate_model_cfg(model_cfg)
    classifier_cfg = None
    if method_obj.uses_classifier:
        classifier_cfg = OmegaConf.to_container(cfg.classifier, resolve=True)
        validate_classifier_cfg(classifier_cfg)
        if id_labels is None:
            raise ValueError(f"method {method_obj.name!r} trains a classifier: pass id_labels (one per id_train image)")
    method_obj.check(size, channels, model_cfg if method_obj.uses_image_model else None)
    ctx = Context(
        device=claim_device(device),
        cache=ArtifactCache(cache_dir or cfg.paths.cache_dir),
        seed=seed,
        weights_dir=Path(cfg.paths.weights_dir),
        model_cfg=model_cfg,
        progress=False,
        classifier_cfg=classifier_cfg,
    )
    labels = np.asarray(id_labels) if id_labels is not None else None
    method_obj.fit(x_train, ctx, labels=labels)
    s_id = method_obj.score(x_id, ctx, indices=np.arange(len(x_id)), split="id")
    s_ood = method_obj.score(x_ood, ctx, indices=np.arange(len(x_ood)), split="ood")
    return ScoreResult(s_id.values, s_ood.values, ood_metrics(s_id.values, s_ood.values), str(method_obj.name))
