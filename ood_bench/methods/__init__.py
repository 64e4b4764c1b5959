"""Methods: one file each, registered by name."""

from ood_bench.methods import (  # noqa: F401  (registration side effects)
    classifier_scores,
    diffguard,
    dlsr,
    lmd,
    patch_knn,
)
from ood_bench.methods.base import METHODS, Context, Method, Scores, build_method, get_method, register

__all__ = ["METHODS", "Context", "Method", "Scores", "build_method", "get_method", "register"]
