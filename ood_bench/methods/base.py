"""The method contract and the registry that maps names to method classes.

A method never opens result files or talks to W&B. It receives images (float ``[N,C,H,W]`` in ``[0,1]``, or a lazy
``ImageSet`` of such rows when it sets ``lazy_images``),
optionally their integer labels, and a ``Context`` (device, cache, seeds, model settings) and returns ``Scores``
where a higher value means "more OOD" (or, for anomaly detection, "more anomalous"). A method whose natural
score is a similarity negates it inside ``score``.

Labels mean what the task says: class labels of an OOD pair's ID training split (a classifier-based method
trains on them; others ignore them), or the category index of each image in anomaly detection (one model may
serve several categories; ``ctx.data_meta["categories"]`` names them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ood_bench.cache import ArtifactCache


@dataclass
class Context:
    """What a method may use besides the images."""

    device: torch.device
    cache: ArtifactCache
    seed: int = 0
    weights_dir: Path | None = None
    model_cfg: dict[str, Any] | None = None
    data_meta: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    #: the ``classifier`` settings, handed only to methods with ``uses_classifier``
    classifier_cfg: dict[str, Any] | None = None


@dataclass
class Scores:
    """Per-sample scores (higher = more OOD) and optional per-sample extras.

    ``extras`` maps a column name to an array of shape ``[N]`` or ``[N, K]`` (written as K columns),
    e.g. LMD's per-repeat distances.
    """

    values: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    nfe_per_image: float = 0.0
    #: optional per-pixel maps ``[N, H, W]`` (higher = more anomalous), at the resolution of the input images
    maps: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64).ravel()
        for k, v in self.extras.items():
            if len(v) != len(self.values):
                raise ValueError(f"extra {k!r} has {len(v)} rows for {len(self.values)} scores")
        if self.maps is not None:
            self.maps = np.asarray(self.maps)
            if self.maps.ndim != 3 or len(self.maps) != len(self.values):
                raise ValueError(
                    f"maps must have shape [N, H, W] with N = {len(self.values)} scores, got {self.maps.shape}"
                )


class Method(ABC):
    """Fit on ID training images, then score any images."""

    name: ClassVar[str]
    #: the task families the method serves: "ood" (ID/OOD pairs) and/or "anomaly" (few-shot anomaly detection)
    tasks: ClassVar[tuple[str, ...]] = ("ood",)
    #: whether the method uses the image diffusion model of the ``model`` config group
    uses_image_model: ClassVar[bool] = False
    #: whether the method uses the classifier of the ``classifier`` config group (then it joins the config hash)
    uses_classifier: ClassVar[bool] = False
    #: whether ``fit``/``score`` accept a lazy ``ImageSet`` (``len``, ``shape``, indexing ``images[a:b]`` /
    #: ``images[idx]`` to float tensors, ``iter_batches``) instead of a float tensor; other methods get the splits
    #: materialised in memory
    lazy_images: ClassVar[bool] = False
    #: constructor arguments that do not change the numbers (left out of the config hash)
    runtime_keys: ClassVar[tuple[str, ...]] = ("batch_size", "weights_dir")

    def check(self, image_size: int, channels: int, model_cfg: dict[str, Any] | None) -> None:  # noqa: B027
        """Fail fast on settings that do not fit the data or model (called before any data is read)."""

    @abstractmethod
    def fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None = None) -> None:
        """Train or load (through the cache) everything the method needs; ``labels`` are the images' labels."""

    @abstractmethod
    def score(
        self,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> Scores:
        """Score ``images``; ``indices`` (stable sample ids) seed the per-sample randomness.

        ``labels`` are the images' labels when the data has them and ``split`` names the split being scored
        ("id" / "ood" for an OOD pair, "test" for anomaly detection). A detector must not use either to
        score (that would be cheating); they exist for bookkeeping (a classifier's ID accuracy, per-category
        prompts in anomaly detection) and for explicitly named oracle modes.
        """

    def describe(self) -> dict[str, Any]:
        """Flat settings that identify what really ran (written into the results row)."""
        return {}


def check_choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``method.<key>`` and the valid values when ``value`` is not one of them."""
    if value not in valid:
        raise ValueError(f"method.{key}={value!r} is not valid; valid: {list(valid)}")


def check_int(key: str, value: Any, low: int = 1) -> None:
    """Raise ``ValueError`` naming ``method.<key>`` unless ``value`` is an integer >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        need = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"method.{key}={value!r} is not valid; use {need}")


METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator that adds a method to the registry under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise KeyError(f"method name {name!r} is already registered to {METHODS[name].__qualname__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    """The class registered under ``name``; a clear error lists the valid names otherwise."""
    if name not in METHODS:
        raise KeyError(f"method.name={name!r} is not registered; valid: {sorted(METHODS)}")
    return METHODS[name]


def build_method(cfg: dict[str, Any]) -> Method:
    """Instantiate a method from its config: ``name`` picks the class, the other keys are its arguments."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    return get_method(name)(**cfg)
