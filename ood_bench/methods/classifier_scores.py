"""Classifier baselines: maximum softmax probability (MSP), maximum logit (MLS) and energy (EBO).

The rows DiffGuard's Table 1 compares against. Each scores images with the classifier of the ``classifier``
config group (the one DiffGuard protects), negated so that higher = more OOD:

- ``msp``: ``-max_c softmax(z)_c`` (Hendrycks & Gimpel 2017)
- ``mls``: ``-max_c z_c`` (Hendrycks et al. 2022)
- ``ebo``: ``-T logsumexp(z / T)`` (Liu et al. 2020; OpenOOD's temperature T = 1)

``ClassifierMethod`` holds what every classifier-based method shares: fitting (loading or training, through the
cache) the classifier, and the bookkeeping of its ID test accuracy for the results row.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ood_bench.costs import phase
from ood_bench.methods.base import Context, Method, Scores, check_int, register
from ood_bench.models.classifier import Classifier, get_classifier

BASELINES = ("msp", "mls", "ebo")


def baseline_scores(name: str, logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Per-sample baseline score (higher = more OOD) of a logit matrix ``[N, K]``, computed in float64."""
    z = logits.detach().double().cpu()
    if name == "msp":
        s = -torch.softmax(z, dim=1).max(dim=1).values
    elif name == "mls":
        s = -z.max(dim=1).values
    elif name == "ebo":
        s = -temperature * torch.logsumexp(z / temperature, dim=1)
    else:
        raise ValueError(f"baseline={name!r} is not valid; valid: {list(BASELINES)}")
    return s.numpy()


class ClassifierMethod(Method):
    """A method built on the classifier of the ``classifier`` config group."""

    lazy_images = True

    uses_classifier = True

    def __init__(self, batch_size: int = 256) -> None:
        check_int("batch_size", batch_size)
        self.batch_size = batch_size
        self.classifier: Classifier | None = None
        self.classifier_name = ""
        self.id_accuracy: float | None = None

    def fit_classifier(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None) -> Classifier:
        if ctx.classifier_cfg is None:
            raise ValueError(f"method {self.name} needs a classifier: the `classifier` config group is missing")
        self.classifier_name = str(ctx.classifier_cfg.get("name", ctx.classifier_cfg["kind"]))
        self.classifier = get_classifier(
            ctx.classifier_cfg, id_train, labels, ctx.cache, ctx.device, ctx.weights_dir, ctx.progress
        )
        return self.classifier

    def classify(self, images: torch.Tensor, labels: np.ndarray | None, split: str | None) -> torch.Tensor:
        """Logits of ``images``; on the ID split with labels, the classifier's accuracy is recorded."""
        if self.classifier is None:
            raise RuntimeError("call fit() before score()")
        logits = self.classifier.logits(images, self.batch_size)
        if split == "id" and labels is not None:
            self.id_accuracy = self.classifier.accuracy(logits, labels)
        return logits

    def predicted_labels(self, logits: torch.Tensor) -> np.ndarray:
        """The dataset label of each argmax."""
        return np.asarray(self.classifier.classes)[logits.argmax(1).cpu().numpy()]

    def describe(self) -> dict[str, Any]:
        return {
            "classifier": self.classifier_name,
            "classifier_source": self.classifier.source if self.classifier else "",
            "classifier_acc": "" if self.id_accuracy is None else round(self.id_accuracy, 6),
        }


class BaselineScore(ClassifierMethod):
    """One of the classifier baselines; subclasses name it."""

    baseline: ClassVar[str]

    def __init__(self, temperature: float = 1.0, batch_size: int = 256) -> None:
        super().__init__(batch_size)
        if not temperature > 0:
            raise ValueError(f"method.temperature={temperature} is not valid; use a positive number")
        self.temperature = float(temperature)

    def fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None = None) -> None:
        with phase("train"):  # training the classifier, or loading it from the cache or a checkpoint
            self.fit_classifier(id_train, ctx, labels)

    def score(
        self,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> Scores:
        logits = self.classify(images, labels, split)
        values = baseline_scores(self.baseline, logits, self.temperature)
        extras = {
            "pred": self.predicted_labels(logits),
            "max_softmax": torch.softmax(logits.double(), 1).max(1).values.cpu().numpy(),
        }
        return Scores(values, extras=extras, nfe_per_image=0.0)

    def describe(self) -> dict[str, Any]:
        record = super().describe()
        if self.baseline == "ebo":
            record["temperature"] = self.temperature
        return record


@register("msp")
class MSP(BaselineScore):
    baseline = "msp"


@register("mls")
class MLS(BaselineScore):
    baseline = "mls"


@register("ebo")
class EBO(BaselineScore):
    baseline = "ebo"
