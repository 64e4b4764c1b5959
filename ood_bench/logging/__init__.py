"""Loggers that receive the run record (CSV is always written by ``ood_bench.results``)."""

from ood_bench.logging.wandb_logger import log_to_wandb

__all__ = ["log_to_wandb"]
