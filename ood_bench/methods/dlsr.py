"""DLSR — Diffusion-based Layer-wise Semantic Reconstruction (Yang, Cheng, Fang et al.; NeurIPS 2024).

Fit: a frozen ImageNet CNN turns every ID training image into a vector of pooled, per-layer z-scored features;
an MLP diffusion model (LFDN) learns to denoise these vectors (x0-prediction, T=100).
Score: noise an image's features once to step ``t`` (paper: 3), reconstruct them with DDIM and compare:
MFsim = minus the mean per-layer cosine similarity, MSE = squared error, LR = MSE of the early checkpoint minus
MSE of the final one. ID features are reconstructed faithfully, OOD features drift: higher = more OOD.
``recon=official`` runs the official code's DDIM path (``t`` LFDN calls, coefficients one index off, returns
the sample at noise level abar_0); ``recon=ddim`` a consistent DDIM over t..0 that returns the clean estimate
(``t + 1`` calls). See docs/deviations.md.

Features are cached per split and encoder (kind ``features``), the LFDN per training features and settings
(kind ``lfdn``), so changing ``t``, ``eta`` or ``score`` re-runs only the cheap reconstruction.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from ood_bench.costs import phase
from ood_bench.data.imageset import iter_batches
from ood_bench.methods.base import Context, Method, Scores, check_choice, check_int, register
from ood_bench.models.encoders import FeatureEncoder, check_encoder_name
from ood_bench.models.lfdn import (
    LFDN,
    RECONS,
    DiffusionConfig,
    TrainConfig,
    noise_rows,
    read_loss_csv,
    reconstruct,
    reconstruct_official,
    train_lfdn,
    write_loss_csv,
)
from ood_bench.utils import (
    PRECISIONS,
    autocast,
    check_precision,
    count_calls,
    randn_per_sample,
    sample_generators,
    split_key,
    tensor_fingerprint,
)

log = logging.getLogger(__name__)

SCORES = ("mfsim", "mse", "lr")
MSE_REDUCTIONS = ("sum", "mean")
LR_NOISES = ("independent", "shared")
NOISE_KEYS = ("split", "index")
FEATURES_VERSION = 1  # bump when the extraction code changes its numbers
LFDN_VERSION = 1


def mfsim(rec: torch.Tensor, orig: torch.Tensor, sizes: list[int], skip_first: bool = False) -> torch.Tensor:
    """Minus the mean over layer blocks of the cosine similarity (optionally without the first block)."""
    blocks = list(zip(torch.split(rec, sizes, dim=1), torch.split(orig, sizes, dim=1)))
    if skip_first:
        blocks = blocks[1:]
    sims = torch.stack([F.cosine_similarity(r, o, dim=1) for r, o in blocks])
    return -sims.mean(0)


def mse(rec: torch.Tensor, orig: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Per-sample squared error, summed over features (official code) or averaged (paper text)."""
    err = (rec - orig).pow(2)
    return err.sum(1) if reduction == "sum" else err.mean(1)


@register("dlsr")
class DLSR(Method):
    """Multi-layer ImageNet features, an MLP feature diffusion, reconstruction distance as the score."""

    lazy_images = True

    uses_image_model = False
    runtime_keys = ("batch_size", "weights_dir")

    def __init__(
        self,
        encoder: str = "alexnet",
        encoder_weights: str = "auto",
        layers: list[str] | None = None,
        input_size: int = 64,
        pool_stride: int | None = 16,
        width: int = 512,
        num_blocks: int = 4,
        time_embed_dim: int | None = 256,
        dropout: float = 0.0,
        timesteps: int = 100,
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        beta_schedule: str = "scaled_linear",
        epochs: int = 3,
        train_batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        ema_decay: float = 0.0,
        early_epoch: int = 1,
        train_seed: int = 0,
        t: int = 3,
        eta: float = 1.0,
        recon: str = "official",
        score: str = "mfsim",
        lr_noise: str = "independent",
        noise_key: str = "split",
        precision: str = "fp32",
        mfsim_skip_first: bool = True,
        mse_reduction: str = "sum",
        batch_size: int = 256,
        weights_dir: str | None = None,
    ) -> None:
        check_encoder_name(encoder)
        check_choice("score", score, SCORES)
        check_choice("mse_reduction", mse_reduction, MSE_REDUCTIONS)
        check_choice("recon", recon, RECONS)
        check_choice("lr_noise", lr_noise, LR_NOISES)
        check_choice("noise_key", noise_key, NOISE_KEYS)
        check_choice("precision", precision, PRECISIONS)
        for key, val in (
            ("input_size", input_size),
            ("width", width),
            ("num_blocks", num_blocks),
            ("epochs", epochs),
            ("train_batch_size", train_batch_size),
            ("batch_size", batch_size),
            ("early_epoch", early_epoch),
        ):
            check_int(key, val)
        if not isinstance(t, int) or not 0 <= t < timesteps:
            raise ValueError(f"method.t={t!r} is not valid; use an integer in [0, timesteps-1] = [0, {timesteps - 1}]")
        if eta < 0:
            raise ValueError(f"method.eta={eta} is not valid; use eta >= 0 (0 = deterministic DDIM, 1 = paper)")
        if recon == "official" and (t < 1 or eta > 1):
            raise ValueError(
                f"method.recon=official needs 1 <= t and eta <= 1 (it runs DDIM steps t..1), got t={t}, eta={eta}; "
                f"method.recon=ddim also allows t=0"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"method.dropout={dropout} is not valid; use a value in [0, 1)")
        if score == "lr" and early_epoch >= epochs:
            raise ValueError(
                f"method.score=lr needs an early checkpoint before the last epoch: early_epoch={early_epoch} "
                f"must be < epochs={epochs}"
            )
        if layers is not None and (isinstance(layers, str) or not all(isinstance(x, str) for x in layers)):
            raise ValueError(f"method.layers={layers!r} is not valid; use a list of module names or null")
        self.diffusion = DiffusionConfig(timesteps, float(beta_start), float(beta_end), beta_schedule)
        self.train_cfg = TrainConfig(
            epochs, train_batch_size, float(lr), float(weight_decay), float(ema_decay), early_epoch, train_seed
        )
        self.lfdn_kwargs = {
            "width": width,
            "num_blocks": num_blocks,
            "time_embed_dim": time_embed_dim,
            "dropout": float(dropout),
        }
        self.t, self.eta, self.score_name = t, float(eta), score
        self.recon, self.lr_noise, self.precision = recon, lr_noise, precision
        self.noise_key = noise_key
        self.mfsim_skip_first, self.mse_reduction, self.batch_size = bool(mfsim_skip_first), mse_reduction, batch_size
        wdir = weights_dir or os.environ.get("OOD_BENCH_WEIGHTS")
        # Built here so that a bad layer name or missing weights fail before any data is read.
        self.encoder = FeatureEncoder(
            encoder,
            layers=list(layers) if layers else None,
            weights=str(encoder_weights),
            weights_dir=wdir,
            input_size=input_size,
            stride=pool_stride,
        )
        self.model: LFDN | None = None
        self.early: LFDN | None = None
        self.info: dict[str, Any] = {}
        self.features_extracted = 0

    # ---------------------------------------------------------------------------------------------------- features
    def features(self, images: torch.Tensor, ctx: Context, precision: str = "fp32") -> torch.Tensor:
        """Encoder features of ``images`` through the cache (kind ``features``; key: image content + encoder).

        ``precision`` runs the encoder under autocast (the official test pass: fp16); features are stored as float32.
        """
        spec = {
            "version": FEATURES_VERSION,
            "images": tensor_fingerprint(images),
            "n": len(images),
            "encoder": self.encoder.identity(),
            **({"precision": precision} if precision != "fp32" else {}),
        }
        key = ctx.cache.key("features", spec)
        if ctx.cache.has("features", key):
            log.info("features cache hit: %d images, encoder %s (features/%s)", len(images), self.encoder.name, key)
            return torch.load(ctx.cache.entry("features", key) / "features.pt", weights_only=True)

        def build(tmp: Path) -> None:
            log.info(
                "extracting features ... %d images, encoder %s at %dpx, layers %s",
                len(images),
                self.encoder.name,
                self.encoder.input_size,
                ",".join(self.encoder.layers),
            )
            with autocast(ctx.device, precision), phase("features"):
                feats = self._extract(images, ctx)
            torch.save(feats, tmp / "features.pt")
            self.features_extracted += 1

        entry, _ = ctx.cache.get_or_create("features", spec, build)
        return torch.load(entry / "features.pt", weights_only=True)

    def _extract(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        enc = self.encoder.to(ctx.device)
        out = []
        total = -(-len(images) // self.batch_size)
        batches = iter_batches(images, self.batch_size, ctx.device)
        for x in tqdm(batches, total=total, desc="features", disable=not ctx.progress, leave=False):
            out.append(enc(x).float().cpu())
        if not out:
            return torch.zeros(0, self.encoder.dim)
        return torch.cat(out)

    # ---------------------------------------------------------------------------------------------------- fit
    def _new_lfdn(self) -> LFDN:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.train_cfg.seed)
            return LFDN(self.encoder.dim, **self.lfdn_kwargs)

    def fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None = None) -> None:
        check_precision(self.precision, ctx.device)  # fail before any extraction or training
        feats = self.features(id_train, ctx)  # training features in full precision, as the official training
        spec = {
            "version": LFDN_VERSION,
            "features": tensor_fingerprint(feats),
            "encoder": self.encoder.identity(),
            "lfdn": self.lfdn_kwargs,
            "diffusion": asdict(self.diffusion),
            "train": asdict(self.train_cfg),
        }

        def build(tmp: Path) -> None:
            log.info(
                "training LFDN (%s) on %d feature vectors of dim %d for %d epochs",
                self.lfdn_kwargs,
                len(feats),
                feats.shape[1],
                self.train_cfg.epochs,
            )
            with phase("train"):
                res = train_lfdn(self._new_lfdn(), feats, self.diffusion, self.train_cfg, ctx.device, ctx.progress)
            torch.save(res.final, tmp / "final.pt")
            torch.save(res.early, tmp / "early.pt")
            write_loss_csv(tmp / "loss.csv", res.losses)
            meta = {
                "train_seconds": round(res.seconds, 3),
                "final_loss": res.losses[-1][2],
                "train_steps": len(res.losses),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

        entry, created = ctx.cache.get_or_create("lfdn", spec, build)
        self.model, self.early = self._load(entry / "final.pt", ctx), self._load(entry / "early.pt", ctx)
        meta = json.loads((entry / "meta.json").read_text())
        self.info = {"lfdn_cache": entry.name, "lfdn_trained": created, **meta}
        if not created:
            log.info("LFDN cache hit (lfdn/%s); loss curve in %s", entry.name, entry / "loss.csv")
        self.info["epoch_loss_first"], self.info["epoch_loss_last"] = _epoch_ends(read_loss_csv(entry / "loss.csv"))

    def _load(self, path: Path, ctx: Context) -> LFDN:
        model = self._new_lfdn()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.to(ctx.device).eval()

    # ---------------------------------------------------------------------------------------------------- score
    def score(
        self,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> Scores:
        if self.model is None:
            raise RuntimeError("DLSR.score called before fit")
        feats = self.features(images, ctx, self.precision)
        idx = np.arange(len(images)) if indices is None else np.asarray(indices)
        if len(idx) != len(images):
            raise ValueError(f"got {len(idx)} indices for {len(images)} images")
        sched = self.diffusion.ddim()
        rows = noise_rows(self.recon, self.t)
        cols: dict[str, list[torch.Tensor]] = {"mfsim": [], "mse": [], "mse_early": [], "lr": []}
        models = (self.model, self.early) if self.score_name == "lr" else (self.model,)
        nfe_sum = 0
        with autocast(ctx.device, self.precision), count_calls(*models) as calls, phase("sampling"):
            for i in tqdm(range(0, len(feats), self.batch_size), desc="DLSR", disable=not ctx.progress, leave=False):
                x0 = feats[i : i + self.batch_size].to(ctx.device)
                idx_b, before = idx[i : i + self.batch_size], calls[0]
                noise = self._noise(idx_b, rows, x0, ctx, split)
                rec = self._reconstruct(self.model, sched, x0, noise)
                cols["mfsim"].append(mfsim(rec, x0, self.encoder.block_sizes, self.mfsim_skip_first).float().cpu())
                cols["mse"].append(mse(rec, x0, self.mse_reduction).float().cpu())
                if self.score_name == "lr":
                    # official: each checkpoint draws its own noise; shared: the difference is the models' only
                    shared = self.lr_noise == "shared"
                    early_noise = noise if shared else self._noise(idx_b, rows, x0, ctx, split, key=1)
                    rec_early = self._reconstruct(self.early, sched, x0, early_noise)
                    cols["mse_early"].append(mse(rec_early, x0, self.mse_reduction).float().cpu())
                    cols["lr"].append(cols["mse_early"][-1] - cols["mse"][-1])
                nfe_sum += (calls[0] - before) * len(x0)
        keys = ("mfsim", "mse") + (("mse_early", "lr") if self.score_name == "lr" else ())
        out = {k: torch.cat(cols[k]).double().numpy() if cols[k] else np.zeros(0) for k in keys}
        values = out[self.score_name]
        extras = {k: v for k, v in out.items() if k != self.score_name}
        return Scores(values=values, extras=extras, nfe_per_image=nfe_sum / max(1, len(feats)))

    def _noise(
        self, idx: np.ndarray, rows: int, x0: torch.Tensor, ctx: Context, split: str | None, key: int | None = None
    ) -> torch.Tensor:
        """``[N, rows, D]`` standard normal noise, one generator per sample (``key`` picks another stream).

        ``noise_key=split`` seeds by split name and sample index, so ID sample i and OOD sample i draw different noise
        (the official code draws fresh noise for every sample); ``index`` seeds by the index alone (before 2026-12-03).
        """
        keys: tuple[int, ...] = (split_key(split),) if self.noise_key == "split" else ()
        keys += () if key is None else (key,)
        gens = sample_generators(ctx.seed, idx, *keys)
        return randn_per_sample((len(x0), rows, x0.shape[1]), gens, ctx.device, torch.float32)

    def _reconstruct(self, model: LFDN, sched: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.recon == "official":
            return reconstruct_official(model, sched.alphas_cumprod, x0, self.t, self.eta, noise).float()
        return reconstruct(model, sched, x0, self.t, self.eta, noise).float()

    def describe(self) -> dict[str, Any]:
        enc = self.encoder
        n_params = sum(p.numel() for p in self.model.parameters()) if self.model is not None else None
        return {
            "encoder": enc.name,
            "encoder_weights": enc.weights_id,
            "layers": ",".join(enc.layers),
            "input_size": enc.input_size,
            "pool_stride": enc.stride,
            "feature_dim": enc.dim,
            "block_sizes": ",".join(map(str, enc.block_sizes)),
            "width": self.lfdn_kwargs["width"],
            "num_blocks": self.lfdn_kwargs["num_blocks"],
            "lfdn_params": n_params,
            "epochs": self.train_cfg.epochs,
            "early_epoch": self.train_cfg.early_epoch,
            "t": self.t,
            "eta": self.eta,
            "recon": self.recon,
            "score": self.score_name,
            "lr_noise": self.lr_noise,
            "noise_key": self.noise_key,
            "precision": self.precision,
            "mfsim_skip_first": self.mfsim_skip_first,
            "mse_reduction": self.mse_reduction,
            "features_extracted": self.features_extracted,
            **self.info,
        }


def _epoch_ends(losses: list[tuple[int, int, float]]) -> tuple[float, float]:
    """Mean training loss of the first and the last epoch."""
    by_epoch: dict[int, list[float]] = {}
    for _, epoch, value in losses:
        by_epoch.setdefault(epoch, []).append(value)
    first, last = by_epoch[min(by_epoch)], by_epoch[max(by_epoch)]
    return round(float(np.mean(first)), 6), round(float(np.mean(last)), 6)
