"""Score your own images with a method of the suite: no config file, no results folder (docs/api.md).

    python examples/api_score.py

Inputs may be torch tensors or numpy arrays ([N,H,W], [N,H,W,C] or [N,C,H,W]; uint8 or floats in [0, 1]) or
image folders. Here: scikit-learn's 8x8 digits, 0-4 as ID and 5-9 as OOD.
"""

import numpy as np
import torch
from sklearn.datasets import load_digits

import ood_bench as ob

digits = load_digits()
x = (digits.images / 16.0).astype(np.float32)  # [N, 8, 8] in [0, 1]
id_x, ood_x = x[digits.target < 5], x[digits.target >= 5]

result = ob.score("dlsr", id_x[:500], id_x[500:], ood_x, image_size=32, input_size=32, epochs=1)
print(result)  # AUROC with OOD positive, higher score = more OOD
print(result.frame())

as_tensors = ob.score(
    "dlsr",
    torch.from_numpy(id_x[:500]),
    torch.from_numpy(id_x[500:]),
    torch.from_numpy(ood_x),
    image_size=32,
    input_size=32,
    epochs=1,
)
assert np.array_equal(as_tensors.id_scores, result.id_scores)  # the same numbers, whatever the container
