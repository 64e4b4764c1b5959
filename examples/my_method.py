"""Your own OOD detector, outside the package: a class that implements ``ood_bench.methods.Method``.

Run it like any method of the suite (same data, cache, results folder, tables):

    python run.py method=custom method._target_=examples.my_method.PixelKNN data=fashionmnist_bench
    python run.py method=custom method._target_=examples.my_method.PixelKNN +method.k=10

or from Python (``examples/api_plugin.py``):

    import ood_bench as ob
    ob.evaluate(method=PixelKNN, data="digits", method_args={"k": 3})
    ob.score(PixelKNN(k=3), id_train, id_test, ood_test)

The score is the distance to the k-th nearest ID training image in pixel space (higher = more OOD), a classic
training-free baseline; it needs no weights and runs in seconds on a CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ood_bench.methods import Context, Method, Scores


class PixelKNN(Method):
    """k-th nearest-neighbour L2 distance to the ID training images, on the raw pixels."""

    name = "pixel_knn"  # results go to results/pixel_knn/<data>/<hash>/ (method.name=... overrides it)

    def __init__(self, k: int = 5, max_train: int = 5000, batch_size: int = 512) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"method.k={k!r} is not valid; use a positive integer")
        self.k, self.max_train, self.batch_size = k, max_train, batch_size
        self.train: torch.Tensor | None = None

    def fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None = None) -> None:
        x = id_train.flatten(1).double()
        if len(x) > self.max_train:  # a seeded subset keeps the memory bounded
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(ctx.seed))[: self.max_train]
            x = x[keep.sort().values]
        if len(x) < self.k:
            raise ValueError(f"method.k={self.k} needs at least {self.k} ID training images, got {len(x)}")
        self.train = x

    def score(
        self,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> Scores:
        if self.train is None:
            raise RuntimeError("PixelKNN.score called before fit")
        out = []
        for batch in images.flatten(1).double().split(self.batch_size):
            dist = torch.cdist(batch, self.train)
            out.append(dist.topk(self.k, dim=1, largest=False).values[:, -1])
        return Scores(torch.cat(out).numpy())

    def describe(self) -> dict[str, Any]:
        return {"k": self.k, "max_train": self.max_train}
