"""AnomalySD — few-shot multi-class anomaly detection with Stable Diffusion (Yan, Fang, Lv, Su; arXiv 2408.01960).

No public code exists; this is a re-implementation from the paper (``../shared/docs/methods.md`` §3).

Fit: an SD-inpainting stack (a pretrained checkpoint, or a small stack built from configs and trained from scratch
where no weights exist) is fine-tuned on the k normal shots: the VAE (decoder) with ``||x - x̂||² + β·LPIPS`` and the
9-channel UNet with the ε-loss under foreground-based random masks and hierarchical prompts ("A perfect [c]." /
"A [c] with intact …"). One model serves every category it was fitted on (multi-class).

Score: every image is inpainted under multi-scale grid masks (each pixel hidden by exactly one mask per scale) and a
prototype-guided mask (the latent cells whose AlexNet patch features lie farthest from the category's few-shot
prototypes), starting from noise level λT (``strength``). The per-mask difference between the image and its
inpainting in AlexNet feature space (LPIPS-style) is kept where that mask hid the image; the scales are fused by
the harmonic mean, ``S_ms = (|K|⁻¹ Σ_k S_k⁻¹)⁻¹``, then ``S = (1 − α)·S_ms + α·S_pg``; the image score is the map's
max or top-k mean. Higher = more anomalous.

Caching: the scratch stack (``sd_stack``), the fine-tuned UNet + VAE (``anomalysd_finetuned``: keyed by the base
stack, the shots, their prompts and every training setting) and, per scored batch, the per-scale and prototype maps
(``anomalysd_maps``: keyed by the fine-tuned model, the images, their indices and the inpainting and distance
settings). Changing only ``alpha``, ``fusion``, ``sigma``, ``image_score`` or ``topk_fraction`` re-scores from the
cached maps with no UNet call.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ood_bench.costs import phase
from ood_bench.distances.feature_maps import (
    NORMALISATIONS,
    WEIGHTINGS,
    AlexFeatureMaps,
    check_layers,
    nearest_prototype_distance,
)
from ood_bench.methods.base import Context, Method, Scores, check_choice, check_int, register
from ood_bench.methods.patch_knn import top_mean
from ood_bench.models.sd_finetune import FOREGROUNDS, VAE_MODES, Augment, FinetuneConfig, finetune
from ood_bench.models.sd_stack import (
    SDStack,
    StackNotFoundError,
    load_stack,
    prompt_words,
    random_known_stack_dir,
    scratch_factor,
    scratch_stack_dir,
    validate_scratch_cfg,
)
from ood_bench.samplers.anomaly_masks import (
    GRID_LAYOUTS,
    check_grid,
    grid_masks,
    masks_per_scale,
    top_fraction_mask,
    upsample_mask,
)
from ood_bench.samplers.sd_inpaint import inference_timesteps, latent_mask, sd_inpaint
from ood_bench.utils import sample_generators, stable_hash, tensor_fingerprint

log = logging.getLogger(__name__)

FUSIONS = ("harmonic", "mean")
IMAGE_SCORES = ("max", "topk_mean")
REFERENCES = ("input", "reconstruction")
# object: "A perfect {c}." only; hierarchical: the UNet's ε averaged over the object and detail prompts (one call
# per prompt); hierarchical_embedding: one call on the mean of their text embeddings
INFERENCE_PROMPTS = ("object", "hierarchical", "hierarchical_embedding")
PRECISIONS = ("fp32", "bf16")
FINETUNE_VERSION = 2  # 2: the UNet's target latents are shifted like the scored ones (SDStack.encode)
MAPS_VERSION = 1
HARMONIC_EPS = 1e-6  # keeps the harmonic mean finite where a scale's map is exactly 0
PG_KEY = 0  # generator key of the prototype-guided mask (grid scales are >= 2)


def harmonic_fusion(maps: np.ndarray, eps: float = HARMONIC_EPS) -> np.ndarray:
    """``S_ms = (|K|⁻¹ Σ_k (S_k + eps)⁻¹)⁻¹`` over axis 1 of ``[N, K, H, W]`` maps (non-negative)."""
    return maps.shape[1] / np.sum(1.0 / (maps + eps), axis=1)


def fuse(scale_maps: np.ndarray, pg_map: np.ndarray, alpha: float, fusion: str) -> np.ndarray:
    """``S = (1 − α)·S_ms + α·S_pg`` with ``S_ms`` the harmonic (or arithmetic) mean of the scale maps."""
    ms = harmonic_fusion(scale_maps) if fusion == "harmonic" else scale_maps.mean(axis=1)
    return (1.0 - alpha) * ms + alpha * pg_map


def image_scores(maps: np.ndarray, how: str, topk: float) -> np.ndarray:
    """Per-image score from ``[N, H, W]`` maps: the max, or the mean of the top ``int(topk · pixels)`` (at least 1;
    patch_knn's and AnomalyDINO's ``mean_top1p``)."""
    flat = maps.reshape(len(maps), -1)
    return flat.max(axis=1) if how == "max" else top_mean(flat, topk)


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each ``[H, W]`` map (``sigma`` in pixels; 0 = none)."""
    if sigma <= 0:
        return maps
    from scipy.ndimage import gaussian_filter

    return np.stack([gaussian_filter(m, sigma=sigma, mode="reflect") for m in maps])


@register("anomalysd")
class AnomalySD(Method):
    """SD inpainting under grid and prototype-guided masks, AlexNet-space differences, harmonic fusion."""

    tasks = ("anomaly",)
    uses_image_model = False  # it brings its own SD-inpainting stack (method.stack / method.scratch)
    runtime_keys = ("batch_size", "weights_dir", "checkpoint_every")

    def __init__(
        self,
        stack: str | None = None,
        scratch: dict[str, Any] | None = None,
        scratch_seed: int = 0,
        object_prompt: str = "A perfect {c}.",
        detail_prompt: str = "A {c} with intact {d}.",
        detail_words: list[str] | tuple[str, ...] = ("surface", "structure", "texture"),
        unet_steps: int = 600,
        train_batch_size: int = 16,
        lr: float = 1e-3,
        warmup_steps: int = 50,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        grad_clip: float = 1.0,
        vae_mode: str = "full",
        vae_steps: int = 150,
        vae_lr: float = 1e-3,
        vae_batch_size: int = 8,
        beta: float = 1.0,
        kl_weight: float = 1e-6,
        foreground: str = "otsu",
        mask_grid_prob: float = 0.4,
        mask_full_prob: float = 0.1,
        mask_max_boxes: int = 3,
        mask_box_range: list[float] | tuple[float, float] = (0.1, 0.5),
        augment: dict[str, Any] | None = None,
        train_seed: int = 0,
        checkpoint_every: int = 100,
        strength: float = 0.75,
        steps: int = 20,
        eta: float = 0.0,
        replace_known: bool = False,
        mask_scales: list[int] | tuple[int, ...] = (4, 8),
        mask_layout: str = "checkerboard",
        inference_prompts: str = "object",
        pg_layers: list[int] | tuple[int, ...] = (2, 3),
        pg_ratio: float = 0.1,
        pg_dilate: int = 1,
        diff_layers: list[int] | tuple[int, ...] = (1, 2, 3, 4, 5),
        diff_weighting: str = "uniform",
        diff_normalise: str = "unit",
        feature_size: int | None = 256,
        reference: str = "reconstruction",
        paste_back: bool = True,
        fusion: str = "harmonic",
        alpha: float = 0.5,
        sigma: float = 4.0,
        image_score: str = "max",
        topk_fraction: float = 0.01,
        precision: str = "bf16",
        lpips_weights: str = "auto",
        weights_dir: str | None = None,
        batch_size: int = 32,
    ) -> None:
        check_choice("vae_mode", vae_mode, VAE_MODES)
        check_choice("foreground", foreground, FOREGROUNDS)
        check_choice("mask_layout", mask_layout, GRID_LAYOUTS)
        check_choice("inference_prompts", inference_prompts, INFERENCE_PROMPTS)
        check_choice("diff_weighting", diff_weighting, WEIGHTINGS)
        check_choice("diff_normalise", diff_normalise, NORMALISATIONS)
        check_choice("reference", reference, REFERENCES)
        check_choice("fusion", fusion, FUSIONS)
        check_choice("image_score", image_score, IMAGE_SCORES)
        check_choice("precision", precision, PRECISIONS)
        for key, val, low in (
            ("unet_steps", unet_steps, 0),
            ("train_batch_size", train_batch_size, 1),
            ("warmup_steps", warmup_steps, 0),
            ("vae_steps", vae_steps, 0),
            ("vae_batch_size", vae_batch_size, 1),
            ("mask_max_boxes", mask_max_boxes, 1),
            ("checkpoint_every", checkpoint_every, 0),
            ("steps", steps, 1),
            ("pg_dilate", pg_dilate, 0),
            ("batch_size", batch_size, 1),
            ("scratch_seed", scratch_seed, 0),
            ("train_seed", train_seed, 0),
        ):
            check_int(key, val, low)
        for key, val, lo, hi in (
            ("strength", strength, 0.0, 1.0),
            ("alpha", alpha, 0.0, 1.0),
            ("pg_ratio", pg_ratio, 0.0, 1.0),
            ("topk_fraction", topk_fraction, 0.0, 1.0),
            ("eta", eta, 0.0, 1.0),
            ("mask_grid_prob", mask_grid_prob, 0.0, 1.0),
            ("mask_full_prob", mask_full_prob, 0.0, 1.0),
        ):
            if not isinstance(val, int | float) or not lo <= val <= hi:
                raise ValueError(f"method.{key}={val!r} is not valid; valid: {lo} <= {key} <= {hi}")
        if strength <= 0 or pg_ratio <= 0 or topk_fraction <= 0:
            raise ValueError(
                f"method.strength={strength}, pg_ratio={pg_ratio}, topk_fraction={topk_fraction}: "
                "each must be > 0 (and <= 1)"
            )
        if mask_grid_prob + mask_full_prob > 1:
            raise ValueError(f"method.mask_grid_prob + mask_full_prob = {mask_grid_prob + mask_full_prob} > 1")
        lo, hi = (float(v) for v in mask_box_range)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"method.mask_box_range={list(mask_box_range)} is not valid; use 0 < low <= high <= 1")
        for key, val in (("lr", lr), ("vae_lr", vae_lr), ("beta", beta), ("kl_weight", kl_weight)):
            if val < 0:
                raise ValueError(f"method.{key}={val} is not valid; use a value >= 0")
        if sigma < 0:
            raise ValueError(f"method.sigma={sigma} is not valid; use >= 0 (0 = no smoothing)")
        if feature_size is not None:
            check_int("feature_size", feature_size, 32)
        if "{c}" not in object_prompt or "{c}" not in detail_prompt:
            raise ValueError("method.object_prompt and method.detail_prompt must contain {c} (the object name)")
        if stack is None and scratch is None:
            raise ValueError(
                "method.stack (a hub id or SD-inpainting folder) or method.scratch (a stack to build) is needed"
            )
        if stack is None:
            validate_scratch_cfg(scratch)
            if scratch["vae"].get("kind", "kl") == "patch" and vae_mode != "none":
                raise ValueError(
                    f"method.vae_mode={vae_mode!r} with method.scratch.vae.kind=patch: a PatchAutoencoder has no "
                    "weights to train; use method.vae_mode=none (or scratch.vae.kind=kl)"
                )
        self.stack_ref, self.scratch, self.scratch_seed = stack, scratch, scratch_seed
        self.object_prompt, self.detail_prompt = object_prompt, detail_prompt
        self.detail_words = [str(w) for w in detail_words]
        self.ft = FinetuneConfig(
            unet_steps=unet_steps,
            batch_size=train_batch_size,
            lr=float(lr),
            warmup_steps=warmup_steps,
            weight_decay=float(weight_decay),
            ema_decay=float(ema_decay),
            grad_clip=float(grad_clip),
            vae_mode=vae_mode,
            vae_steps=vae_steps,
            vae_lr=float(vae_lr),
            vae_batch_size=vae_batch_size,
            beta=float(beta),
            kl_weight=float(kl_weight),
            foreground=foreground,
            mask_grid_prob=float(mask_grid_prob),
            mask_full_prob=float(mask_full_prob),
            mask_max_boxes=mask_max_boxes,
            mask_box_range=(lo, hi),
            augment=Augment(**(augment or {})),
            precision=precision,
            seed=train_seed,
        )
        self.checkpoint_every = checkpoint_every
        self.strength, self.steps, self.eta, self.replace_known = float(strength), steps, float(eta), replace_known
        self.mask_scales, self.mask_layout = [int(k) for k in mask_scales], mask_layout
        self.inference_prompts = inference_prompts
        self.pg_layers = check_layers("pg_layers", list(pg_layers))
        self.diff_layers = check_layers("diff_layers", list(diff_layers))
        self.pg_ratio, self.pg_dilate = float(pg_ratio), pg_dilate
        self.diff_weighting, self.diff_normalise, self.feature_size = diff_weighting, diff_normalise, feature_size
        self.reference, self.paste_back = reference, paste_back
        self.fusion, self.alpha, self.sigma = fusion, float(alpha), float(sigma)
        self.image_score, self.topk_fraction = image_score, float(topk_fraction)
        self.precision, self.lpips_weights, self.weights_dir = precision, lpips_weights, weights_dir
        self.batch_size = batch_size
        self.sd: SDStack | None = None
        self.features: AlexFeatureMaps | None = None
        self.names: list[str] = []
        self.prototypes: dict[int, torch.Tensor] = {}
        self.finetuned_key = ""
        self.base_source = ""
        self._base_dir = ""
        self.train_info: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------------------
    # settings
    # ----------------------------------------------------------------------------------------------------------

    @property
    def latent_factor(self) -> int | None:
        """Pixels per latent cell when known before loading (scratch stacks); SD checkpoints use 8."""
        if self.sd is not None:
            return self.sd.vae_scale_factor
        if self.scratch is not None and self.stack_ref is None:
            return scratch_factor(self.scratch)
        return None

    def check(self, image_size: int, channels: int, model_cfg: dict[str, Any] | None) -> None:
        check_grid(image_size, self.mask_scales, self.mask_layout, self.latent_factor or 8)
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels} is not valid for AnomalySD; valid: 1 or 3 (RGB stack)")

    def prompts_for(self, name: str) -> list[str]:
        """The hierarchical training prompts of one object: object level, then one per detail word."""
        return [self.object_prompt.format(c=name)] + [self.detail_prompt.format(c=name, d=d) for d in self.detail_words]

    def test_prompts(self, name: str) -> list[str]:
        """The prompts inpainting is conditioned on: the object-level one, or all hierarchical ones."""
        return [self.object_prompt.format(c=name)] if self.inference_prompts == "object" else self.prompts_for(name)

    def _test_text(self, lab: np.ndarray) -> torch.Tensor:
        """Text condition per image: ``[n, L, D]``, or ``[n, P, L, D]`` for ``inference_prompts=hierarchical``."""
        sd = self.sd
        if self.inference_prompts == "object":
            return sd.encode_prompts([self.object_prompt.format(c=self.names[c]) for c in lab])
        emb = {int(c): sd.encode_prompts(self.test_prompts(self.names[int(c)])) for c in set(lab.tolist())}
        if self.inference_prompts == "hierarchical":
            return torch.stack([emb[int(c)] for c in lab])
        return torch.stack([emb[int(c)].mean(0) for c in lab])  # hierarchical_embedding

    def _inference_identity(self) -> dict[str, Any]:
        """Everything that determines the cached per-scale and prototype maps."""
        return {
            "version": MAPS_VERSION,
            "strength": self.strength,
            "steps": self.steps,
            "eta": self.eta,
            "replace_known": self.replace_known,
            "mask_scales": self.mask_scales,
            "mask_layout": self.mask_layout,
            **({"inference_prompts": self.inference_prompts} if self.inference_prompts != "object" else {}),
            "pg_layers": list(self.pg_layers),
            "pg_ratio": self.pg_ratio,
            "pg_dilate": self.pg_dilate,
            "diff_layers": list(self.diff_layers),
            "diff_weighting": self.diff_weighting,
            **({"diff_normalise": self.diff_normalise} if self.diff_normalise != "unit" else {}),
            "feature_size": self.feature_size,
            "features": self.features.describe() if self.features else "",
            "reference": self.reference,
            "paste_back": self.paste_back,
            "precision": self.precision,
        }

    @property
    def masks_per_image(self) -> int:
        return sum(masks_per_scale(self.mask_layout, k) for k in self.mask_scales) + 1

    # ----------------------------------------------------------------------------------------------------------
    # fit
    # ----------------------------------------------------------------------------------------------------------

    def fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None = None) -> None:
        shots = _rgb(id_train)
        labels = np.zeros(len(shots), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        if len(labels) != len(shots):
            raise ValueError(f"fit got {len(shots)} shots but {len(labels)} labels")
        self.names = _object_names(ctx, int(labels.max()) + 1)
        size = int(shots.shape[-1])
        self.check(size, 3, None)
        # The feature network first: missing ImageNet weights fail before any training.
        self.features = AlexFeatureMaps(self.lpips_weights, self.weights_dir or ctx.weights_dir, self.feature_size)
        self.features.to(ctx.device)
        with phase("train"):  # building, fine-tuning or loading the stack
            self._fit_stack(shots, labels, size, ctx)
        # Few-shot prototypes: the shots' patch features at the latent grid, per category.
        with phase("features"):
            grid = size // self.sd.vae_scale_factor
            feats = self.features.patch_features(shots.to(ctx.device), self.pg_layers, grid)
        self.prototypes = {
            int(c): feats[torch.as_tensor(labels == c)].reshape(-1, feats.shape[-1]) for c in set(labels)
        }

    def _fit_stack(self, shots: torch.Tensor, labels: np.ndarray, size: int, ctx: Context) -> None:
        """The base stack, fine-tuned on the shots (cached by everything that determines it)."""
        base = self._base_stack(ctx, labels)
        check_grid(size, self.mask_scales, self.mask_layout, base.vae_scale_factor)
        shot_prompts = [self.prompts_for(self.names[c]) for c in labels]
        spec = {
            "version": FINETUNE_VERSION,
            "base": self.base_source,
            "shots": tensor_fingerprint(shots),
            "labels": labels.tolist(),
            "prompts": shot_prompts,
            "grid": {"scales": self.mask_scales, "layout": self.mask_layout},
            "train": self.ft.identity(),
        }
        perceptual = self.features.describe() if self.features else ""
        if "random" in perceptual and self.ft.vae_mode != "none" and self.ft.beta > 0:  # the VAE loss's LPIPS
            spec["perceptual"] = perceptual  # (named only when random: real keys stay as they were)
        kind = "anomalysd_finetuned"
        key = ctx.cache.key(kind, spec)
        resume_dir = ctx.cache.entry(kind, f".partial-{key}")
        f = base.vae_scale_factor
        grid_latent = torch.cat([grid_masks(size // f, k, self.mask_layout) for k in self.mask_scales])

        def build(tmp: Path) -> None:
            base.to(ctx.device)
            lpips_model = self.features.model
            finetune(
                base, shots, shot_prompts, grid_latent, self.ft, lpips_model, ctx.device, tmp,
                resume_dir=resume_dir, checkpoint_every=self.checkpoint_every, progress=ctx.progress,
            )  # fmt: skip

        entry, created = ctx.cache.get_or_create(kind, spec, build)
        if resume_dir.exists():
            shutil.rmtree(resume_dir)
        if not created:
            log.info("using the cached fine-tuned AnomalySD stack %s (no training)", entry)
        self.finetuned_key = entry.name
        base_dir = self._base_dir
        self.sd = load_stack(base_dir, parts_from={"unet": str(entry), "vae": str(entry)}).to(ctx.device).eval()
        self.sd.source = f"{self.base_source}+finetuned:{entry.name}"
        self.train_info = json.loads((entry / "train_info.json").read_text())

    def _base_stack(self, ctx: Context, labels: np.ndarray) -> SDStack:
        """The stack before fine-tuning: the pretrained checkpoint, or the (cached) stack built from configs."""
        words = prompt_words(p for c in sorted(set(labels)) for p in self.prompts_for(self.names[c]))
        if self.stack_ref is not None:
            self._base_dir = self.stack_ref
            self.base_source = f"pretrained:{self.stack_ref}"
            try:
                return load_stack(self.stack_ref)
            except StackNotFoundError as err:  # debug=fast_dev_run only: the published architecture, random
                folder, key = random_known_stack_dir(ctx.cache, self.stack_ref, words, self.scratch_seed, err)
                self._base_dir, self.base_source = str(folder), f"random(fast_dev_run):{key}"
                stack = load_stack(str(folder))
                stack.source = self.base_source
                return stack
        folder, key = scratch_stack_dir(ctx.cache, self.scratch, words, self.scratch_seed)
        self._base_dir = str(folder)
        self.base_source = f"scratch:{key}"
        stack = load_stack(str(folder))  # the same from_pretrained path as a real checkpoint
        stack.source = self.base_source
        return stack

    # ----------------------------------------------------------------------------------------------------------
    # score
    # ----------------------------------------------------------------------------------------------------------

    @property
    def nfe_per_image(self) -> int:
        """UNet calls per image: one inpainting per mask, each running the λ-truncated DDIM steps."""
        stack = self.sd
        if stack is None:
            return 0
        _, timesteps = inference_timesteps(stack, self.steps, self.strength)
        per_step = 1 + len(self.detail_words) if self.inference_prompts == "hierarchical" else 1
        return self.masks_per_image * len(timesteps) * per_step

    def score(
        self,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> Scores:
        if self.sd is None or self.features is None:
            raise RuntimeError("call fit() before score()")
        images = _rgb(images)
        n = len(images)
        indices = np.arange(n) if indices is None else np.asarray(indices)
        labels = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        unknown = sorted(set(labels.tolist()) - set(self.prototypes))
        if unknown:
            raise ValueError(
                f"score got category labels {unknown} that fit() had no shots of: {sorted(self.prototypes)}"
            )
        ident = {**self._inference_identity(), "model": self.sd.source, "seed": ctx.seed}
        parts = []
        bar = tqdm(total=n, desc="AnomalySD inpaint", disable=not ctx.progress, dynamic_ncols=True)
        for start in range(0, n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            x, idx, lab = images[sl], indices[sl], labels[sl]
            spec = {**ident, "images": tensor_fingerprint(x), "indices": idx.tolist(), "labels": lab.tolist()}
            with phase("sampling"):  # the inpaintings (and their difference maps) of one batch, or its cache entry
                parts.append(
                    ctx.cache.array("anomalysd_maps", spec, lambda x=x, idx=idx, lab=lab: self._maps(x, idx, lab, ctx))
                )
            bar.update(len(x))
        bar.close()
        raw = np.concatenate(parts).astype(np.float64)
        k = len(self.mask_scales)
        scale_maps, pg_map, knn_map = raw[:, :k], raw[:, k], raw[:, k + 1]
        maps = smooth(fuse(scale_maps, pg_map, self.alpha, self.fusion), self.sigma)
        values = image_scores(maps, self.image_score, self.topk_fraction)
        extras = {
            "ms_max": harmonic_fusion(scale_maps).reshape(n, -1).max(1)
            if self.fusion == "harmonic"
            else scale_maps.mean(1).reshape(n, -1).max(1),
            "pg_max": pg_map.reshape(n, -1).max(1),
            "knn_max": knn_map.reshape(n, -1).max(1),
        }
        return Scores(values, extras=extras, nfe_per_image=float(self.nfe_per_image), maps=maps.astype(np.float32))

    @torch.no_grad()
    def _maps(self, x: torch.Tensor, idx: np.ndarray, lab: np.ndarray, ctx: Context) -> np.ndarray:
        """``[n, K + 2, H, W]``: the K per-scale maps, the prototype-guided map and the prototype kNN distance."""
        feats = self.features
        ref, knn, repaints = self.repaints(x, idx, lab, ctx)
        f_ref = feats.features(ref, self.diff_normalise)
        n, size = len(ref), ref.shape[-1]
        out = torch.zeros(n, len(self.mask_scales) + 2, size, size, device=ref.device)
        for slot, known, xhat in repaints:
            d = feats.diff_map(
                ref, xhat, self.diff_layers, self.diff_weighting, fx=f_ref, normalise=self.diff_normalise
            )
            out[:, slot] += (1 - known[:, 0]) * d  # kept where the mask hid the image
        out[:, -1] = knn
        return out.cpu().numpy()

    @torch.no_grad()
    def repaints(
        self, x: torch.Tensor, idx: np.ndarray, lab: np.ndarray, ctx: Context
    ) -> tuple[torch.Tensor, torch.Tensor, Iterator[tuple[int, torch.Tensor, torch.Tensor]]]:
        """The inpaintings behind the maps, before any difference is taken.

        Returns the reference ``[n, 3, H, W]`` that D compares with, the prototype kNN distance ``[n, H, W]`` and a
        lazy iterator (each mask is inpainted when reached, with the method's settings at that time) of
        ``(slot, known, x̂)`` per mask: ``slot`` i < K is scale i's grid masks, K the prototype-guided mask;
        ``known`` ``[n, 1, H, W]`` is 1 where the image was kept; x̂ ``[n, 3, H, W]`` in ``[0, 1]``, its known
        pixels the reference's when ``paste_back``.
        """
        sd, feats, device = self.sd, self.features, ctx.device
        f = sd.vae_scale_factor
        dtype = torch.bfloat16 if self.precision == "bf16" else None
        x = x.to(device).float()
        n, size = len(x), x.shape[-1]
        text = self._test_text(lab)
        if text.dim() == 4:  # several prompts per image: the UNet's ε is their mean
            sd = replace(sd, unet=_PromptEnsemble(sd.unet))
        x2 = x * 2 - 1
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            z0 = sd.encode(x2).float()
            ref = x if self.reference == "input" else ((sd.decode(z0).float().clamp(-1, 1) + 1) / 2)
        grid = size // f
        patches = feats.patch_features(x, self.pg_layers, grid)
        knn = torch.stack(
            [nearest_prototype_distance(p[None], self.prototypes[int(c)])[0] for p, c in zip(patches, lab)]
        ).view(n, grid, grid)
        known_pg = upsample_mask(top_fraction_mask(knn, self.pg_ratio, self.pg_dilate), f)[:, None]

        def inpaint(known: torch.Tensor, *keys: int) -> torch.Tensor:
            """x̂ of SD inpainting under ``known`` ([n,1,H,W]), noise from the per-sample generators of ``keys``."""
            gens = sample_generators(ctx.seed, idx, *keys)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                masked = sd.encode(x2 * known).float()
                lat, _ = sd_inpaint(
                    sd, z0, masked, latent_mask(known, f), text, gens, steps=self.steps, strength=self.strength,
                    eta=self.eta, replace_known=self.replace_known, autocast_dtype=dtype,
                )  # fmt: skip
                out = (sd.decode(lat).float().clamp(-1, 1) + 1) / 2
            return known * ref + (1 - known) * out if self.paste_back else out

        @torch.no_grad()  # a generator runs when iterated, outside this method's no_grad
        def inpaintings() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
            for slot, k in enumerate(self.mask_scales):
                for g, m in enumerate(grid_masks(size, k, self.mask_layout)):
                    known = m.to(device).expand(n, 1, size, size).contiguous()
                    yield slot, known, inpaint(known, k, g)
            yield len(self.mask_scales), known_pg, inpaint(known_pg, PG_KEY, PG_KEY)

        knn_map = torch.nn.functional.interpolate(knn[:, None], size=(size, size), mode="bilinear")[:, 0]
        return ref, knn_map, inpaintings()

    # ----------------------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        counts = self.sd.parameter_counts() if self.sd else {}
        record: dict[str, Any] = {
            "stack": self.stack_ref or "scratch",
            "stack_source": self.sd.source if self.sd else "",
            "params_unet": counts.get("unet", 0),
            "params_vae": counts.get("vae", 0),
            "vae": type(self.sd.vae).__name__ if self.sd else "",  # AutoencoderKL | PatchAutoencoder (exact)
            "params_text": counts.get("text_encoder", 0),
            "latent_factor": self.latent_factor or "",
            "scratch_hash": stable_hash(self.scratch) if self.stack_ref is None else "",
            "masks_per_image": self.masks_per_image,
            "nfe_per_image": self.nfe_per_image,
            "inference_prompts": self.inference_prompts,
            "diff_normalise": self.diff_normalise,
            "fusion": self.fusion,
            "alpha": self.alpha,
            "sigma": self.sigma,
            "image_score": self.image_score,
            "topk_fraction": self.topk_fraction if self.image_score == "topk_mean" else "",
            "object_prompt": self.object_prompt,
            "detail_prompt": self.detail_prompt,
            "detail_words": "|".join(self.detail_words),
            "categories": "|".join(self.names),
            "train_seconds": self.train_info.get("seconds", ""),
        }
        for key, val in self._inference_identity().items():
            if key != "version":
                record[key] = "|".join(map(str, val)) if isinstance(val, list) else val
        for key, val in self.ft.identity().items():
            if key == "augment":
                record.update({f"augment_{k}": v for k, v in val.items()})
            else:
                record[f"train_{key}"] = "|".join(map(str, val)) if isinstance(val, tuple | list) else val
        return record


class _PromptEnsemble(torch.nn.Module):
    """A UNet whose ε is the mean of its predictions under P prompts per image (``encoder_hidden_states``
    ``[N, P, L, D]``; one batched call of N·P). Without a guidance weight this is composable diffusion's AND of the
    prompts (Liu et al. 2022): every prompt the model was fine-tuned with guides the repaint."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        n, p = encoder_hidden_states.shape[:2]
        eps = self.unet(
            sample.repeat_interleave(p, 0), timestep, encoder_hidden_states=encoder_hidden_states.flatten(0, 1)
        ).sample
        return SimpleNamespace(sample=eps.view(n, p, *eps.shape[1:]).mean(1))


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` float images (grey repeated to three channels); square images are required."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1|3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"AnomalySD needs square images, got {images.shape[-2]}x{images.shape[-1]}")
    images = images.float()
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def _object_names(ctx: Context, n_labels: int) -> list[str]:
    """Prompt names per category index: ``object_names``, else ``categories``, from the data's metadata."""
    names = ctx.data_meta.get("object_names") or ctx.data_meta.get("categories")
    if not names:
        if n_labels > 1:
            raise ValueError("several categories but ctx.data_meta has neither 'object_names' nor 'categories'")
        log.warning("ctx.data_meta names no object; prompting with 'object'")
        return ["object"]
    names = [str(n).replace("_", " ") for n in names]
    if len(names) < n_labels:
        raise ValueError(f"category labels go up to {n_labels - 1} but data_meta names only {len(names)}: {names}")
    return names
