"""``debug=fast_dev_run`` (lightning's name): run a config at its full size, on a few images, for a few steps.

The mode proves a GPU-sized configuration (every architecture, resolution, sampler, precision and distance it
declares) on any machine before the real run: shape, dtype and memory errors surface in minutes instead of hours
into a GPU job. ``rewrite`` changes only the keys in ``CUT_KEYS`` (data sizes, the anomaly categories kept,
training steps, sampling steps, batch sizes and the seeds swept), and keeps the rules that derive one setting from
another (DiffGuard's share of inverted steps, AnomalySD's strength lambda apply to the 2 sampling steps as they would
to 50).

Missing weights: where a checkpoint, converted folder or pretrained encoder is absent, ``random_init`` lets the
caller build the same architecture with random weights, with a WARNING naming the missing file; outside this mode
it re-raises the loader's error (the existing clear message). Results go to ``fast_dev_run/`` beside the repo's
``results/`` and ``.cache/`` (conf/debug/fast_dev_run.yaml: a random-init, 2-step model can never be read back by a
real run), the config hash carries ``fast_dev_run: true``, and every results row says ``fast_dev_run``.

``ParamCounter`` counts the parameters of every network the run evaluated (a global forward pre-hook: each module
called adds its own parameters once), written into the row as ``fast_dev_run_params``.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

N_TRAIN = 4  # ID training images (OOD pairs)
N_TEST = 3  # ID and OOD test images (OOD pairs)
N_TEST_ANOMALY = 4  # test images per category (stratified: normal and defective)
N_CATEGORIES = 2  # anomaly categories kept (the first ones in config order): a multi-class run stays multi-class
STEPS = 2  # training steps and sampling steps
BATCH = 4  # largest batch of any loop (a few images)
TRAIN_BATCH_ANOMALY = 1  # SD-inpainting fine-tuning batch (one shot per category; 860 M parameters at 512 px)

# Every key the rewrite may change (with what lies below it); tests/test_fast_dev_run.py checks that nothing else
# changes. data.categories: anomaly sweeps keep their first N_CATEGORIES categories (a few images per split: the 15
# MVTec categories x 4 test images would be 60 SD-inpainting scorings of ~4 min each on a CPU).
CUT_KEYS = frozenset(
    {
        "task_name",
        "progress",
        "fast_dev_run",
        "data.n_train",
        "data.n_id_test",
        "data.n_ood_test",
        "data.n_test",
        "data.categories",
        "data.shot_seeds",
        "model.train.steps",
        "model.train.warmup_steps",
        "model.train.batch_size",
        "classifier.train.steps",
        "classifier.train.batch_size",
        "method.steps",
        "method.inversion_steps",
        "method.unet_steps",
        "method.vae_steps",
        "method.warmup_steps",
        "method.epochs",
        "method.early_epoch",
        "method.batch_size",
        "method.train_batch_size",
        "method.vae_batch_size",
        "method.eval_batch",
    }
)

_ACTIVE = False


def active() -> bool:
    """True inside a run under ``debug=fast_dev_run``."""
    return _ACTIVE


@contextmanager
def mode(on: bool) -> Iterator[None]:
    """Switch the mode on (or off) for the duration of one run."""
    global _ACTIVE
    before, _ACTIVE = _ACTIVE, bool(on)
    try:
        yield
    finally:
        _ACTIVE = before


def random_init(what: str, missing: str, err: BaseException) -> None:
    """Allow a random-weight ``what`` in place of ``missing`` in this mode (loud WARNING); else raise ``err``."""
    if not _ACTIVE:
        raise err
    log.warning(
        "FAST_DEV_RUN: %s not found (%s: %s). RANDOM INITIALISATION of the same architecture; the numbers of this "
        "run mean nothing. This is allowed only under debug=fast_dev_run.",
        missing,
        type(err).__name__,
        str(err).splitlines()[0][:200] if str(err) else "",
    )
    log.warning("FAST_DEV_RUN: random weights for %s", what)
    # the error is handled here: drop its tracebacks, whose frames (the caller's among them) would otherwise keep the
    # random network the caller builds next alive in a reference cycle after the cell ends
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted, default=None)


def _set(cfg: DictConfig, dotted: str, value: Any) -> None:
    OmegaConf.update(cfg, dotted, value, merge=False, force_add=False)


def _cap(cfg: DictConfig, dotted: str, most: int) -> None:
    """``dotted`` = min(its value, most); null (= all) becomes ``most``; absent keys stay absent."""
    value = _get(cfg, dotted)
    parent, _, key = dotted.rpartition(".")
    node = _get(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or key not in node:
        return
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > most):
        _set(cfg, dotted, most)


def rewrite(cfg: DictConfig) -> DictConfig:
    """The fast_dev_run form of a composed config (a copy): few images, ``STEPS`` steps, capped batches."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(out, False)
    anomaly = _get(cfg, "data.task") == "anomaly"
    with open_dict(out):
        out.fast_dev_run = True
        out.progress = False
        if anomaly:
            seeds = list(_get(cfg, "data.shot_seeds") or [0])
            _set(out, "data.shot_seeds", seeds[:1])
            _cap(out, "data.n_test", N_TEST_ANOMALY)
            cats = _get(out, "data.categories")
            if isinstance(cats, DictConfig) and len(cats) > N_CATEGORIES:
                for key in list(cats.keys())[N_CATEGORIES:]:
                    del cats[key]
        else:
            _cap(out, "data.n_train", N_TRAIN)
            _cap(out, "data.n_id_test", N_TEST)
            _cap(out, "data.n_ood_test", N_TEST)
        for group in ("model", "classifier"):
            if _get(out, f"{group}.train.steps") is not None:
                _cap(out, f"{group}.train.steps", STEPS)
                _cap(out, f"{group}.train.warmup_steps", 1)
                _cap(out, f"{group}.train.batch_size", BATCH)
        m = out.get("method")
        if m is not None:
            steps, inv = m.get("steps"), m.get("inversion_steps")
            if isinstance(steps, int) and steps > STEPS:
                if isinstance(inv, int):  # the share of the schedule inverted stays (DiffGuard: 15 of 50 = 0.3 T)
                    m.inversion_steps = max(1, min(STEPS, round(STEPS * inv / steps)))
                m.steps = STEPS
            for key in ("unet_steps", "vae_steps"):
                if isinstance(m.get(key), int) and m[key] > 0:
                    _cap(out, f"method.{key}", STEPS)
            _cap(out, "method.warmup_steps", 1)
            if isinstance(m.get("epochs"), int):  # DLSR: N_TRAIN images in one batch = one step per epoch
                _cap(out, "method.epochs", STEPS)
                _cap(out, "method.early_epoch", STEPS - 1)
            _cap(out, "method.batch_size", BATCH)
            _cap(out, "method.train_batch_size", TRAIN_BATCH_ANOMALY if anomaly else BATCH)
            _cap(out, "method.vae_batch_size", TRAIN_BATCH_ANOMALY if anomaly else BATCH)
            if isinstance(m.get("eval_batch"), int):  # LMD: all repeats of a capped batch in one call
                _cap(out, "method.eval_batch", BATCH * int(m.get("reps") or 1))
    return out


def is_cut_key(path: str) -> bool:
    """Whether the rewrite may change the leaf at dotted ``path`` (a key of ``CUT_KEYS`` or below one)."""
    return any(path == k or path.startswith(k + ".") for k in CUT_KEYS)


def changed_keys(before: DictConfig, after: DictConfig) -> set[str]:
    """Dotted paths of the leaves that differ (or exist on one side only), interpolations resolved."""
    a = OmegaConf.to_container(before, resolve=True)
    b = OmegaConf.to_container(after, resolve=True)
    out: set[str] = set()

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in set(x) | set(y):
                walk(x.get(k, _MISSING), y.get(k, _MISSING), f"{path}.{k}" if path else str(k))
        elif x != y or type(x) is not type(y):
            out.add(path)

    walk(a, b, "")
    return out


_MISSING = object()


class ParamCounter:
    """Parameters of every network evaluated while the counter is on (each parameter counted once)."""

    def __init__(self) -> None:
        self._seen: dict[int, weakref.ref] = {}
        self.total = 0
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        for p in module._parameters.values():
            if p is None:
                continue
            ref = self._seen.get(id(p))
            if ref is not None and ref() is p:
                continue
            self._seen[id(p)] = weakref.ref(p)
            self.total += p.numel()

    def __enter__(self) -> ParamCounter:
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def fmt_params(n: int) -> str:
    """``1234567`` -> ``1.23 M``."""
    if n <= 0:
        return "0"
    units = ("", " k", " M", " G")
    i = min(len(units) - 1, int(math.log10(n) // 3))
    return f"{n / 10 ** (3 * i):.3g}{units[i]}"


def unverified_torchvision(cls: type) -> type:
    """A torchvision dataset class that checks its files exist but not their official MD5 sums (synthetic files in
    the real layout cannot match them); used by ``TorchvisionSource`` only in this mode."""
    import os
    import pickle

    def check(self: Any) -> bool:
        return os.path.isdir(os.path.join(self.root, getattr(self, "base_folder", ""))) or os.path.isfile(
            os.path.join(self.root, getattr(self, "filename", ""))
        )

    def load_meta(self: Any) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        self.classes = data[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    log.warning("FAST_DEV_RUN: torchvision.datasets.%s without its MD5 checks (synthetic data)", cls.__name__)
    extra: dict[str, Any] = {"_check_integrity": check}
    if hasattr(cls, "_load_meta"):
        extra["_load_meta"] = load_meta
    return type(f"Unverified{cls.__name__}", (cls,), extra)
