"""Figures written into run folders (matplotlib, headless Agg backend, deterministic file names).

``ood.py``: ROC curves, score histograms, inpainting grids, AUROC against cost across runs.
``anomaly.py``: input / ground-truth / anomaly-map overlay grids for anomaly detection runs.
"""

import matplotlib

matplotlib.use("Agg")
