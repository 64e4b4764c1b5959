"""LMD — Lift, Map, Detect (Liu, Zhou, Wang, Weinberger; ICML 2023).

Lift: mask part of the image (checkerboard, alternating boards across repeats). Map: inpaint the masked part
with a diffusion model trained on ID data. Detect: the distance between the image and its inpainting
(LPIPS by default), aggregated over repeats by the median. ID images are inpainted faithfully, OOD images
are pulled towards the ID manifold and change more: higher distance = more OOD.

Scoring runs per batch of ``batch_size`` images; all repeats of a batch are inpainted in one batched pass
(at most ``eval_batch`` image-repeat rows per network call), with one generator per sample and repeat, so the
scores depend neither on the batch size nor on how repeats are batched. Every inpainting is cached
content-addressed (kind ``lmd_inpaint``: image batch, sample indices, model, sampler settings, precision, mask,
seed and repeat; the inpainted pixels as float16, one entry per batch and repeat): an interrupted run resumes
per batch, and scoring a finished run with another distance, aggregation or fewer repeats evaluates no network.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ood_bench.costs import phase
from ood_bench.data.imageset import iter_batches
from ood_bench.distances import DISTANCES, Distance, build_distance
from ood_bench.distances.lpips import NETS as LPIPS_NETS
from ood_bench.methods.base import Context, Method, Scores, check_choice, check_int, register
from ood_bench.models.diffusion import DiffusionModel, get_diffusion_model
from ood_bench.samplers import MASK_TYPES, SAMPLERS, inpaint, lmd_mask
from ood_bench.samplers.sde import model_sde, score_sde_info
from ood_bench.utils import PRECISIONS, check_precision, sample_seed, tensor_fingerprint

log = logging.getLogger(__name__)

AGGREGATES = ("median", "mean")
INPAINT_KIND = "lmd_inpaint"
INPAINT_VERSION = 1  # bump when the sampler changes its numbers


@register("lmd")
class LMD(Method):
    """Checkerboard masking, replacement inpainting, perceptual distance, median over repeats."""

    lazy_images = True

    uses_image_model = True
    runtime_keys = ("batch_size", "eval_batch", "weights_dir")

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
        precision: str = "fp32",
        batch_size: int = 100,
        eval_batch: int = 1000,
    ) -> None:
        check_choice("mask", mask, MASK_TYPES)
        check_choice("sampler", sampler, SAMPLERS)
        check_choice("distance", distance, DISTANCES)
        check_choice("aggregate", aggregate, AGGREGATES)
        check_choice("lpips_net", lpips_net, tuple(LPIPS_NETS))
        check_choice("precision", precision, PRECISIONS)
        for key, val, low in (
            ("num_blocks", num_blocks, 2),
            ("reps", reps, 1),
            ("steps", steps, 1),
            ("batch_size", batch_size, 1),
            ("eval_batch", eval_batch, 1),
        ):
            check_int(key, val, low)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"method.eta={eta} is not valid; valid: 0 <= eta <= 1")
        if not isinstance(clip, bool):
            raise ValueError(f"method.clip={clip!r} is not valid; valid: true or false")
        if sampler == "subvp_em" and clip:
            raise ValueError(
                "method.clip=true is not valid with method.sampler=subvp_em (Euler-Maruyama has no x0 prediction to "
                "clip; the official sampler never clips); valid: method.clip=false"
            )
        self.mask, self.num_blocks, self.reps = mask, num_blocks, reps
        self.sampler, self.steps, self.eta, self.clip = sampler, steps, float(eta), clip
        self.distance_name, self.lpips_net, self.lpips_weights = distance, lpips_net, lpips_weights
        self.weights_dir, self.aggregate, self.batch_size = weights_dir, aggregate, batch_size
        self.precision, self.eval_batch = precision, eval_batch
        self.model: DiffusionModel | None = None
        self.distance: Distance | None = None
        self.image_size: int | None = None

    def check(self, image_size: int, channels: int, model_cfg: dict[str, Any] | None) -> None:
        for rep in range(min(2, self.reps)):
            lmd_mask(self.mask, image_size, self.num_blocks, rep)
        if model_cfg is not None and not model_cfg.get("pretrained") and self.sampler == "subvp_em":
            sde = model_cfg["train"].get("sde", "ddpm")
            if sde != "subvp":
                raise ValueError(
                    f"method.sampler=subvp_em needs a model trained on the subVP-SDE: set model.train.sde=subvp "
                    f"(got model.train.sde={sde!r}), or use method.sampler=ddpm or ddim"
                )
        elif model_cfg is not None and not model_cfg.get("pretrained"):  # subvp_em: steps = N of a continuous SDE
            n_train = int(model_cfg["scheduler"]["num_train_timesteps"])
            if self.steps > n_train:
                raise ValueError(f"method.steps={self.steps} is not valid; valid: 1..{n_train} (model timesteps)")

    def fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None = None) -> None:
        check_precision(self.precision, ctx.device)
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
        with phase("train"):  # loading a cached model counts here too (under a second)
            self.model = get_diffusion_model(ctx.model_cfg, id_train, ctx.cache, ctx.device, progress=ctx.progress)
        if self.sampler == "subvp_em":
            model_sde(self.model)  # a clear error now for a model that is not a subVP-SDE model
        elif (score_sde_info(self.model) or {}).get("sde") == "subvpsde":
            log.warning(
                "method.sampler=%s runs a subVP-SDE model on the discrete VP schedule, off its training marginals "
                "(docs/deviations.md L1); method.sampler=subvp_em is its own sampler",
                self.sampler,
            )

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
        dists = np.zeros((n, self.reps), dtype=np.float64)
        batches = zip(range(0, n, self.batch_size), iter_batches(images, self.batch_size, ctx.device), strict=True)
        total = -(-n // self.batch_size)
        for start, x in tqdm(batches, total=total, desc="LMD inpaint", disable=not ctx.progress, dynamic_ncols=True):
            recons = self.batch_inpaintings(x, indices[start : start + self.batch_size], ctx)
            for r, recon in enumerate(recons):
                dists[start : start + len(x), r] = self.distance(x, recon).double().cpu().numpy()
        agg = np.median(dists, axis=1) if self.aggregate == "median" else dists.mean(axis=1)
        return Scores(agg, extras={"dist_rep": dists}, nfe_per_image=float(self.reps * self.steps))

    def inpaintings(
        self, images: torch.Tensor, indices: np.ndarray, ctx: Context, first: int | None = None
    ) -> list[torch.Tensor]:
        """The inpaintings of the first ``first`` images (all when ``None``), ``[reps]`` of ``[n, C, H, W]`` in
        ``[0, 1]``, through the same batches and cache entries as ``score`` (after scoring: no network call)."""
        n = len(images) if first is None else min(first, len(images))
        if n == 0:
            return [images[:0].to(ctx.device) for _ in range(self.reps)]
        parts: list[list[torch.Tensor]] = []
        for start in range(0, n, self.batch_size):
            x = images[start : start + self.batch_size].to(ctx.device)
            recons = self.batch_inpaintings(x, np.asarray(indices)[start : start + self.batch_size], ctx)
            parts.append([recon[: n - start] for recon in recons])
        return [torch.cat([part[r] for part in parts]) for r in range(self.reps)]

    def masks(self, size: int) -> list[torch.Tensor]:
        """The ``[H, W]`` mask of every repeat (1 = known pixel)."""
        return [lmd_mask(self.mask, size, self.num_blocks, r) for r in range(self.reps)]

    def batch_inpaintings(self, x: torch.Tensor, idx: np.ndarray, ctx: Context) -> list[torch.Tensor]:
        """The inpainting of every repeat of one batch (``[reps]`` of ``[B, C, H, W]`` in ``[0, 1]``), cached.

        Repeats already in the cache are read back; the missing ones are inpainted together in one batched pass,
        stored (float16 inpainted pixels), and read back like the others, so a cached and a fresh run score the
        same values.
        """
        idx = np.asarray(idx)
        masks = self.masks(x.shape[-1])
        specs = [self._inpaint_spec(x, idx, masks[r], r, ctx.seed) for r in range(self.reps)]
        keys = [ctx.cache.key(INPAINT_KIND, spec) for spec in specs]
        missing = [r for r in range(self.reps) if not ctx.cache.has(INPAINT_KIND, keys[r])]
        fresh = self.reconstruct_reps(x, idx, missing, ctx.seed) if missing else {}
        out = []
        for r in range(self.reps):
            unknown = masks[r] == 0
            if r in fresh:
                values = fresh[r][:, :, unknown.to(x.device)].cpu().numpy().astype(np.float16)
                entry, _ = ctx.cache.get_or_create(
                    INPAINT_KIND, specs[r], lambda tmp, v=values: np.save(tmp / "inpainted.npy", v)
                )
            else:
                entry = ctx.cache.entry(INPAINT_KIND, keys[r])
                log.info("cache hit: %s/%s", INPAINT_KIND, keys[r])
            stored = torch.from_numpy(np.load(entry / "inpainted.npy")).to(device=x.device, dtype=x.dtype)
            out.append(_fill(x, stored, unknown))
        return out

    def reconstruct_reps(self, x: torch.Tensor, idx: np.ndarray, reps: list[int], seed: int) -> dict[int, torch.Tensor]:
        """Inpaint ``x`` (``[0, 1]``) for each repeat in ``reps`` in batched passes of at most ``eval_batch`` rows.

        Row (repeat r, sample i) uses repeat r's mask and the generator keyed by (seed, sample index, r): the same
        draws as a pass over one repeat, so the results do not depend on how the rows are batched.
        Returns ``{rep: [B, C, H, W]}`` in ``[0, 1]`` (unknown pixels rounded to float16, as stored).
        """
        size, n = x.shape[-1], len(x)
        masks = self.masks(size)
        rows = [(r, i) for r in reps for i in range(n)]
        out = torch.empty(len(rows), *x.shape[1:], device=x.device, dtype=x.dtype)
        for lo in range(0, len(rows), self.eval_batch):
            chunk = rows[lo : lo + self.eval_batch]
            sel = [i for _, i in chunk]
            mask = torch.stack([masks[r] for r, _ in chunk])[:, None]
            gens = [torch.Generator().manual_seed(sample_seed(seed, int(idx[i]), r)) for r, i in chunk]
            with phase("sampling"):
                out[lo : lo + len(chunk)] = self._inpaint(x[sel], mask, gens)
        by_rep = out.view(len(reps), n, *x.shape[1:])
        return {r: _fill(x, by_rep[k][:, :, masks[r] == 0], masks[r] == 0) for k, r in enumerate(reps)}

    def reconstruct(self, x: torch.Tensor, idx: np.ndarray, mask: torch.Tensor, rep: int, seed: int) -> torch.Tensor:
        """The inpainting of ``x`` (``[0, 1]``) under ``mask`` in repeat ``rep``, in ``[0, 1]``; per-sample noise.

        Known pixels are ``x`` itself; the inpainted ones are rounded to float16, as ``LMD.score`` stores them.
        """
        gens = [torch.Generator().manual_seed(sample_seed(seed, int(i), rep)) for i in idx]
        with phase("sampling"):
            recon = self._inpaint(x, mask, gens)
        unknown = mask.to(x.device) == 0
        return _fill(x, recon[..., unknown], unknown)

    def _inpaint(self, x: torch.Tensor, mask: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """Replacement inpainting of ``x`` in ``[0, 1]``, returned in ``[0, 1]`` (unclipped unless ``clip``)."""
        recon = inpaint(
            self.model,
            x * 2 - 1,
            mask,
            gens,
            sampler=self.sampler,
            steps=self.steps,
            eta=self.eta,
            clip=self.clip,
            precision=self.precision,
        )
        return (recon + 1) / 2

    def _inpaint_spec(self, x: torch.Tensor, idx: np.ndarray, mask: torch.Tensor, rep: int, seed: int) -> dict:
        """What determines one repeat's inpaintings of one batch (content-addressed: the mask by its pixels)."""
        return {
            "version": INPAINT_VERSION,
            "model": self.model.source,
            **self._sampler_identity(),
            "mask": tensor_fingerprint(mask.float()),
            "seed": seed,
            "rep": rep,
            "images": tensor_fingerprint(x),
            "indices": [int(i) for i in idx],
        }

    def _sampler_identity(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler,
            "steps": self.steps,
            "eta": self.eta,
            "clip": self.clip,
            "precision": self.precision,
        }

    def describe(self) -> dict[str, Any]:
        record: dict[str, Any] = {"mask": self.mask, "num_blocks": self.num_blocks, **self._sampler_identity()}
        record.update(
            reps=self.reps,
            aggregate=self.aggregate,
            distance_used=self.distance.describe_for(self.image_size or 0) if self.distance else self.distance_name,
            model_source=self.model.source if self.model else "",
        )
        return record


def _fill(x: torch.Tensor, values: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
    """``x`` with its ``unknown`` pixels (``[H, W]`` bool) set to ``values`` (``[B, C, K]``) rounded to float16."""
    out = x.clone()
    out[:, :, unknown.to(x.device)] = values.to(torch.float16).to(x.dtype)
    return out


def _check_size(size: int, expected: int) -> None:
    """LMD inpaints with one model at one size: images must come at ``data.image_size``."""
    if size != expected:
        raise ValueError(
            f"LMD got {size}px images but its diffusion model works at data.image_size={expected}px; "
            f"data.resize_protocol=native keeps each side at its own size: use common_min or direct for LMD"
        )
