"""Evaluate a method of the suite on a benchmark from Python, then read every run back (docs/api.md).

    python examples/api_evaluate.py

Same configs, cache and results folder as ``python run.py method=dlsr data=fashionmnist_bench``; the subset sizes
below keep it to about a minute on one CPU core (drop them for the full test sets).
"""

import ood_bench as ob

SMALL = ["data.n_train=500", "data.n_id_test=100", "data.n_ood_test=100", "threads=1", "progress=false"]

table = ob.evaluate(method="dlsr", data="fashionmnist_bench", overrides=SMALL)
print(table[["method", "ood_set", "group", "auroc", "auroc_ci_low", "auroc_ci_high", "fpr95"]])

runs = ob.load_runs()  # results/runs.csv, numbers as numbers
print(runs[["method", "data", "auroc", "config_hash"]].tail())
