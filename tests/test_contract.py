"""The method contract: optional pixel maps in ``Scores`` and labels / split handed to every method."""

from __future__ import annotations

import numpy as np
import pytest

from ood_bench.methods import Scores
from ood_bench.methods.base import METHODS, Method, register


def test_scores_maps_must_match_the_scores():
    s = Scores(np.zeros(3), maps=np.zeros((3, 4, 5)))
    assert s.maps.shape == (3, 4, 5)
    with pytest.raises(ValueError, match=r"maps must have shape \[N, H, W\] with N = 3"):
        Scores(np.zeros(3), maps=np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="maps must have shape"):
        Scores(np.zeros(3), maps=np.zeros((3, 4)))
    assert Scores(np.zeros(2)).maps is None


def test_runner_hands_labels_and_split_to_the_method(cfg_tiny):
    """A method that records what it receives, run through the real runner on the digits pair."""
    seen: dict[str, object] = {}

    @register("_contract_probe")
    class Probe(Method):
        def fit(self, id_train, ctx, labels=None):
            seen["fit_labels"] = None if labels is None else np.asarray(labels)

        def score(self, images, ctx, indices=None, labels=None, split=None):
            seen[f"{split}_labels"] = np.asarray(labels)
            return Scores(images.flatten(1).mean(1).double().numpy() * (1 if split == "id" else 2))

    try:
        from omegaconf import open_dict

        from ood_bench.runner import run

        with open_dict(cfg_tiny):
            cfg_tiny.method = {"name": "_contract_probe"}
        record = run(cfg_tiny)
    finally:
        METHODS.pop("_contract_probe", None)
    assert set(np.unique(seen["fit_labels"])) <= {0, 1, 2, 3, 4}  # digits 0-4 are the ID classes
    assert set(np.unique(seen["id_labels"])) <= {0, 1, 2, 3, 4}
    assert set(np.unique(seen["ood_labels"])) <= {5, 6, 7, 8, 9}
    assert len(seen["id_labels"]) == record["n_id"] and len(seen["ood_labels"]) == record["n_ood"]
