"""Your own method through the API: the class in examples/my_method.py, outside the package (docs/api.md).

    python examples/api_plugin.py

The same class runs from the command line with ``python run.py method=custom
method._target_=examples.my_method.PixelKNN`` (from the repository root).
"""

import numpy as np
from my_method import PixelKNN  # this script's folder is on sys.path
from sklearn.datasets import load_digits

import ood_bench as ob

# through the runner: the digits pair, results in results/pixel_knn/digits/<hash>/ and a runs.csv row
table = ob.evaluate(method=PixelKNN, data="digits", method_args={"k": 3}, overrides=["progress=false"])
print(table[["method", "data", "n_id", "n_ood", "auroc", "fpr95"]])

# on arrays, no config
digits = load_digits()
x = digits.images / 16.0
result = ob.score(PixelKNN, x[digits.target < 5][:500], x[digits.target < 5][500:], x[digits.target >= 5], k=3)
print(result)
assert np.isfinite(result.id_scores).all()
