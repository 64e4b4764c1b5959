"""ood_bench: one honest protocol for diffusion-based OOD and anomaly detection."""

__version__ = "0.1.0"
