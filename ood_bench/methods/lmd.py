"""LMD — Lift, Map, Detect (Liu, Zhou, Wang, Weinberger; ICML 2023).

Lift: mask part of the image (checkerboard, alternating boards across repeats). Map: inpaint the masked part
with a diffusion model trained on ID data. Detect: the distance between the image and its inpainting
(LPIPS by default), aggregated over repeats by the median. ID images are inpainted faithfully, OOD images
are pulled towards the ID manifold and change more: higher distance = more OOD.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ood_bench.distances import DISTANCES, Distance, build_distance
from ood_bench.distances.lpips import NETS as LPIPS_NETS
from ood_bench.methods.base import Context, Method, Scores, check_choice, check_int, register
from ood_bench.models.diffusion import DiffusionModel, get_diffusion_model
from ood_bench.samplers import MASK_TYPES, SAMPLERS, inpaint, lmd_mask
from ood_bench.utils import sample_generators, tensor_fingerprint

log = logging.getLogger(__name__)

AGGREGATES = ("median", "mean")


@register("lmd")
class LMD(Method):
    """Checkerboard masking, replacement inpainting, perceptual distance, median over repeats."""

    uses_image_model = True

    def __init__(
        self,
        mask: str = "checkerboard_alt",
        num_blocks: int = 8,
        reps: int = 10,
        sampler: str = "ddim",
        steps: int = 25,
        eta: float = 1.0,
        clip: bool = False,
        distance: str = "lpips",
        lpips_net: str = "alex",
        lpips_weights: str = "auto",
        weights_dir: str | None = None,
        aggregate: str = "median",
        batch_size: int = 100,
    ) -> None:
        check_choice("mask", mask, MASK_TYPES)
        check_choice("sampler", sampler, SAMPLERS)
        check_choice("distance", distance, DISTANCES)
        check_choice("aggregate", aggregate, AGGREGATES)
        check_choice("lpips_net", lpips_net, tuple(LPIPS_NETS))
        for key, val, low in (
            ("num_blocks", num_blocks, 2),
            ("reps", reps, 1),
            ("steps", steps, 1),
            ("batch_size", batch_size, 1),
        ):
            check_int(key, val, low)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"method.eta={eta} is not valid; valid: 0 <= eta <= 1")
        if not isinstance(clip, bool):
            raise ValueError(f"method.clip={clip!r} is not valid; valid: true or false")
        self.mask, self.num_blocks, self.reps = mask, num_blocks, reps
        self.sampler, self.steps, self.eta, self.clip = sampler, steps, float(eta), clip
        self.distance_name, self.lpips_net, self.lpips_weights = distance, lpips_net, lpips_weights
        self.weights_dir, self.aggregate, self.batch_size = weights_dir, aggregate, batch_size
        self.model: DiffusionModel | None = None
        self.distance: Distance | None = None
        self.image_size: int | None = None

    def check(self, image_size: int, channels: int, model_cfg: dict[str, Any] | None) -> None:
        for rep in range(min(2, self.reps)):
            lmd_mask(self.mask, image_size, self.num_blocks, rep)
        if model_cfg is not None and not model_cfg.get("pretrained"):
            n_train = int(model_cfg["scheduler"]["num_train_timesteps"])
            if self.steps > n_train:
                raise ValueError(f"method.steps={self.steps} is not valid; valid: 1..{n_train} (model timesteps)")

    def fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None = None) -> None:
        # The distance first: a missing LPIPS backbone fails before any training.
        self.distance = build_distance(
            self.distance_name,
            lpips_net=self.lpips_net,
            lpips_weights=self.lpips_weights,
            weights_dir=self.weights_dir or ctx.weights_dir,
        ).to(ctx.device)
        if ctx.model_cfg is None:
            raise ValueError("LMD needs an image diffusion model: the `model` config group is missing")
        self.image_size = int(id_train.shape[-1])
        _check_size(self.image_size, int(ctx.model_cfg["sample_size"]))
        self.model = get_diffusion_model(ctx.model_cfg, id_train, ctx.cache, ctx.device, progress=ctx.progress)

    @torch.no_grad()
    def score(
        self,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> Scores:
        if self.model is None or self.distance is None:
            raise RuntimeError("call fit() before score()")
        n, size = images.shape[0], images.shape[-1]
        if self.image_size is not None:
            _check_size(size, self.image_size)
        indices = np.arange(n) if indices is None else np.asarray(indices)
        masks = [lmd_mask(self.mask, size, self.num_blocks, r) for r in range(self.reps)]
        dists = np.zeros((n, self.reps), dtype=np.float64)
        batches = range(0, n, self.batch_size)
        bar = tqdm(total=len(batches) * self.reps, desc="LMD inpaint", disable=not ctx.progress, dynamic_ncols=True)
        for start in batches:
            x = images[start : start + self.batch_size].to(ctx.device)
            idx = indices[start : start + self.batch_size]
            for r in range(self.reps):
                # Each (batch, repeat) is cached on disk, so an interrupted run resumes where it stopped.
                spec = {
                    **self._identity(),
                    "model": self.model.source,
                    "seed": ctx.seed,
                    "rep": r,
                    "images": tensor_fingerprint(x),
                    "indices": idx.tolist(),
                }
                dists[start : start + len(x), r] = ctx.cache.array(
                    "lmd_distances", spec, lambda x=x, idx=idx, r=r: self._distances(x, idx, masks[r], r, ctx.seed)
                )
                bar.update(1)
        bar.close()
        agg = np.median(dists, axis=1) if self.aggregate == "median" else dists.mean(axis=1)
        return Scores(agg, extras={"dist_rep": dists}, nfe_per_image=float(self.reps * self.steps))

    def reconstruct(self, x: torch.Tensor, idx: np.ndarray, mask: torch.Tensor, rep: int, seed: int) -> torch.Tensor:
        """The inpainting of ``x`` (``[0, 1]``) under ``mask`` in repeat ``rep``, in ``[0, 1]``; per-sample noise."""
        gens = sample_generators(seed, idx, rep)
        recon = inpaint(
            self.model, x * 2 - 1, mask, gens, sampler=self.sampler, steps=self.steps, eta=self.eta, clip=self.clip
        )
        return (recon + 1) / 2

    def _distances(self, x: torch.Tensor, idx: np.ndarray, mask: torch.Tensor, rep: int, seed: int) -> np.ndarray:
        """Inpaint one batch for one repeat and measure the distance to the originals."""
        return self.distance(x, self.reconstruct(x, idx, mask, rep, seed)).double().cpu().numpy()

    def _identity(self) -> dict[str, Any]:
        """The settings that determine one repeat's distances (the per-batch cache key)."""
        return {
            "mask": self.mask,
            "num_blocks": self.num_blocks,
            "sampler": self.sampler,
            "steps": self.steps,
            "eta": self.eta,
            "clip": self.clip,
            "distance": self.distance.describe() if self.distance else self.distance_name,
        }

    def describe(self) -> dict[str, Any]:
        record = {k: v for k, v in self._identity().items() if k != "distance"}
        record.update(
            reps=self.reps,
            aggregate=self.aggregate,
            distance_used=self.distance.describe_for(self.image_size or 0) if self.distance else self.distance_name,
            model_source=self.model.source if self.model else "",
        )
        return record


def _check_size(size: int, expected: int) -> None:
    """LMD inpaints with one model at one size: images must come at ``data.image_size``."""
    if size != expected:
        raise ValueError(
            f"LMD got {size}px images but its diffusion model works at data.image_size={expected}px; "
            f"data.resize_protocol=native keeps each side at its own size: use common_min or direct for LMD"
        )
