"""DiffGuard (Gao, Zhao, Hong, Xu; ICCV 2023): semantic-mismatch-guided OOD detection with a diffusion model.

The classifier predicts a label y for the input x. DiffGuard DDIM-inverts x to a partly noised latent, re-synthesises
it under label y, and scores how far the synthesis lies from x (or, with ``uncond_aux``, from an unguided synthesis
of the same latent). An ID image guided towards its own class keeps its content; an OOD image is pulled towards a
class it does not belong to and changes more: higher distance = more OOD.

Two guidance paths, as the official code (cure-lab/DiffGuard, ImageNet only):

- ``cg`` (its GDM path, an unconditional model): classifier guidance with the clean-gradient mix and random
  cutouts (``samplers/guidance.py``), the ``adm`` DDIM convention with x0 clipping, inversion that stops per sample
  at the adaptive early-stop thresholds (PSNR with the official +42.11 dB offset, DISTS), synthesis that starts
  one level above the reached depth.
- ``cfg`` (its LDM path, a class-conditional model with a null class): classifier-free guidance of weight w,
  optionally only inside a GradCAM mask of the classifier (``cam_cut``), the ``ldm`` DDIM convention.

The classifier comes from the ``classifier`` config group. For ``cfg`` without ``model.pretrained`` the method
trains the class-conditional variant of the ``model`` architecture on the ID training labels (null class = last
index, labels dropped with ``label_dropout``), through the same cache as every diffusion model.

``label_mode`` ``oracle`` (true label for ID, a random label for OOD) and ``oracle_id`` (true label for ID, the
prediction for OOD) are the official oracle modes: they read the labels to score, and say so in the results.
``combine`` (``msp``/``mls``/``ebo``) is the paper's "DiffGuard + X": X is trusted on the inputs it is confident
about (X score below its ``combine_quantile`` on the ID training images) and the rest is deferred to DiffGuard;
every trusted input ranks as more ID than every deferred one, and only the deferred ones are synthesised.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ood_bench.costs import phase
from ood_bench.data.transforms import resize
from ood_bench.distances import IMAGE_DISTANCES, Distance, build_distance
from ood_bench.distances.lpips import NETS as LPIPS_NETS
from ood_bench.methods.base import Context, Scores, check_choice, check_int, register
from ood_bench.methods.classifier_scores import BASELINES, ClassifierMethod, baseline_scores
from ood_bench.models.diffusion import DiffusionModel, get_diffusion_model
from ood_bench.samplers.guidance import ClassifierGuidance, cam_masks, cfg_eps, unconditional_eps
from ood_bench.samplers.inversion import CONVENTIONS, DDIMGrid, EarlyStop, invert, synthesize
from ood_bench.utils import PRECISIONS, autocast, check_precision, sample_generators, tensor_fingerprint

log = logging.getLogger(__name__)

GUIDANCES = ("cfg", "cg")
LABEL_MODES = ("predicted", "oracle", "oracle_id")
DISTANCES = ("logit_l1", *IMAGE_DISTANCES)
COMBINES = ("none", *BASELINES)
CUTOUT_RNGS = ("shared", "per_sample")
# keys that separate the per-sample random streams of different uses
_CUTOUT_KEY, _ORACLE_KEY = 11, 12
# columns of the per-batch cache array
_COLS = ("distance", "depth", "synthesis_steps", "nfe", "classifier_passes")


@register("diffguard")
class DiffGuard(ClassifierMethod):
    """Invert, re-synthesise under the predicted label, measure the drift."""

    uses_image_model = True

    def __init__(
        self,
        guidance: str = "cfg",
        steps: int = 20,
        inversion_steps: int = 10,
        ddim_convention: str = "ldm",
        clip_denoised: bool = False,
        synthesis_offset: int = 0,
        early_stop_psnr: float | None = None,
        early_stop_dists: float | None = None,
        scale: float = 3.0,
        cutouts: int = 8,
        cutout_min_frac: float = 0.875,
        cutout_rng: str = "shared",
        clean_grad: bool | str = True,
        label_dropout: float = 0.1,
        cam_cut: float | None = None,
        distance: str = "logit_l1",
        distance_size: int | None = None,
        lpips_net: str = "alex",
        uncond_aux: bool = False,
        label_mode: str = "predicted",
        combine: str = "none",
        combine_quantile: float = 0.5,
        weights_dir: str | None = None,
        precision: str = "fp32",
        batch_size: int = 64,
    ) -> None:
        super().__init__(batch_size)
        check_choice("guidance", guidance, GUIDANCES)
        check_choice("precision", precision, PRECISIONS)
        check_choice("ddim_convention", ddim_convention, CONVENTIONS)
        check_choice("distance", distance, DISTANCES)
        check_choice("lpips_net", lpips_net, tuple(LPIPS_NETS))
        check_choice("label_mode", label_mode, LABEL_MODES)
        check_choice("combine", combine, COMBINES)
        check_choice("cutout_rng", cutout_rng, CUTOUT_RNGS)
        check_int("steps", steps)
        check_int("inversion_steps", inversion_steps)
        check_int("cutouts", cutouts, low=0)
        check_int("synthesis_offset", synthesis_offset, low=0)
        if clean_grad not in (True, False, "paper"):
            raise ValueError(
                f"method.clean_grad={clean_grad!r} is not valid; valid: true (official: the clean-estimate mix as a "
                f"leaf), false (the gradient at x_t), paper (through eps_theta, one more UNet pass per guided step)"
            )
        if distance_size is not None:
            check_int("distance_size", distance_size)
        if inversion_steps > steps:
            raise ValueError(f"method.inversion_steps={inversion_steps} is not valid; valid: 1..steps={steps}")
        if not scale >= 0:
            raise ValueError(f"method.scale={scale} is not valid; use a number >= 0")
        if not 0 < cutout_min_frac <= 1:
            raise ValueError(f"method.cutout_min_frac={cutout_min_frac} is not valid; valid: 0 < value <= 1")
        if not 0 <= label_dropout < 1:
            raise ValueError(f"method.label_dropout={label_dropout} is not valid; valid: 0 <= value < 1")
        if cam_cut is not None and not -1 <= cam_cut <= 1:
            raise ValueError(f"method.cam_cut={cam_cut} is not valid; use null (no mask) or a value in [-1, 1]")
        if cam_cut is not None and guidance != "cfg":
            raise ValueError("method.cam_cut applies to guidance=cfg only (the official LDM path); set it to null")
        if not 0 < combine_quantile < 1:
            raise ValueError(f"method.combine_quantile={combine_quantile} is not valid; valid: 0 < value < 1")
        if early_stop_dists is not None and not 0 < early_stop_dists < 1:
            raise ValueError(f"method.early_stop_dists={early_stop_dists} is not valid; null or a value in (0, 1)")
        self.guidance, self.steps, self.inversion_steps = guidance, steps, inversion_steps
        self.ddim_convention, self.clip_denoised, self.synthesis_offset = (
            ddim_convention,
            clip_denoised,
            synthesis_offset,
        )
        self.early_stop_psnr, self.early_stop_dists = early_stop_psnr, early_stop_dists
        self.scale, self.cutouts, self.cutout_min_frac = float(scale), cutouts, float(cutout_min_frac)
        self.cutout_rng, self.clean_grad = cutout_rng, clean_grad
        self.label_dropout, self.cam_cut = float(label_dropout), cam_cut
        self.distance_name, self.lpips_net, self.uncond_aux = distance, lpips_net, uncond_aux
        self.distance_size = distance_size
        self.label_mode, self.combine, self.combine_quantile = label_mode, combine, float(combine_quantile)
        self.weights_dir, self.precision = weights_dir, precision
        self.model: DiffusionModel | None = None
        self.distance: Distance | None = None
        self.grid: DDIMGrid | None = None
        self.early_stop = EarlyStop()
        self.combine_threshold: float | None = None
        self.stats: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------------

    def check(self, image_size: int, channels: int, model_cfg: dict[str, Any] | None) -> None:
        if model_cfg is not None and not model_cfg.get("pretrained"):
            n_train = int(model_cfg["scheduler"]["num_train_timesteps"])
            if n_train % self.steps:
                raise ValueError(
                    f"method.steps={self.steps} is not valid: it must divide model.scheduler.num_train_timesteps="
                    f"{n_train} (e.g. 10, 20, 25, 50, 100)"
                )

    def fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None = None) -> None:
        check_precision(self.precision, ctx.device)
        with phase("train"):  # loading cached networks counts here too
            self._fit(id_train, ctx, labels)

    def _fit(self, id_train: torch.Tensor, ctx: Context, labels: np.ndarray | None) -> None:
        clf = self.fit_classifier(id_train, ctx, labels)
        weights_dir = self.weights_dir or ctx.weights_dir
        if self.distance_name != "logit_l1":
            self.distance = build_distance(self.distance_name, lpips_net=self.lpips_net, weights_dir=weights_dir)
            self.distance.to(ctx.device)
        if self.early_stop_dists is not None:
            dists = self.distance if self.distance_name == "dists" else build_distance("dists", weights_dir=weights_dir)
            self.early_stop = EarlyStop(self.early_stop_psnr, self.early_stop_dists, dists.to(ctx.device).similarity)
        else:
            self.early_stop = EarlyStop(self.early_stop_psnr)
        if ctx.model_cfg is None:
            raise ValueError("DiffGuard needs an image diffusion model: the `model` config group is missing")
        self.model = self._diffusion_model(id_train, labels, ctx)
        sched = DDPMScheduler.from_config(self.model.scheduler_config)
        self.grid = DDIMGrid.make(sched.alphas_cumprod, self.steps, self.ddim_convention)
        if self.combine != "none":
            train_scores = baseline_scores(self.combine, clf.logits(id_train, self.batch_size))
            self.combine_threshold = float(np.quantile(train_scores, self.combine_quantile))
            log.info("DiffGuard + %s: trusting %s below %.4g", self.combine, self.combine, self.combine_threshold)

    def _diffusion_model(self, id_train: torch.Tensor, labels: np.ndarray | None, ctx: Context) -> DiffusionModel:
        """The unconditional model (cg), or the class-conditional one over the classifier's classes (cfg)."""
        model_cfg = dict(ctx.model_cfg)
        class_labels = None
        if self.guidance == "cfg" and not model_cfg.get("pretrained"):
            if labels is None:
                raise ValueError("guidance=cfg trains a class-conditional diffusion model: the ID labels are missing")
            idx = self.classifier.class_index(labels)
            if (idx < 0).any():
                unknown = sorted(set(np.asarray(labels)[idx < 0].tolist()))
                raise ValueError(
                    f"ID training labels {unknown[:10]} are not classes of the classifier "
                    f"({self.classifier.classes[:10]}...): the class-conditional model is trained on its classes"
                )
            model_cfg["conditioning"] = {
                "num_classes": self.classifier.num_classes,
                "label_dropout": self.label_dropout,
            }
            class_labels = torch.as_tensor(idx)
        model = get_diffusion_model(
            model_cfg, id_train, ctx.cache, ctx.device, progress=ctx.progress, labels=class_labels
        )
        if self.guidance == "cfg" and (model.num_classes != self.classifier.num_classes or not model.has_null_class):
            have = "no class embeddings"
            if model.num_classes is not None:
                have = f"{model.num_classes} classes {'plus a' if model.has_null_class else 'and no'} null class"
            raise ValueError(
                f"guidance=cfg needs a class-conditional model with the classifier's {self.classifier.num_classes} "
                f"classes plus a null class; model.pretrained={model_cfg.get('pretrained')!r} has {have} "
                "(use guidance=cg for an unconditional model)"
            )
        return model

    # ------------------------------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------------------------------

    def _labels_to_use(
        self, pred: torch.Tensor, labels: np.ndarray | None, split: str | None, indices: np.ndarray, seed: int
    ) -> torch.Tensor:
        """Class index each image is re-synthesised under: the prediction, or an oracle's choice."""
        if self.label_mode == "predicted":
            return pred
        if split not in ("id", "ood"):
            raise ValueError(f"method.label_mode={self.label_mode} needs the split (id/ood) of the images, got {split}")
        if split == "ood":
            if self.label_mode == "oracle_id":
                return pred
            gens = sample_generators(seed, indices, _ORACLE_KEY)
            k = self.classifier.num_classes
            return torch.stack([torch.randint(0, k, (), generator=g) for g in gens]).to(pred.device)
        if labels is None:
            raise ValueError(f"method.label_mode={self.label_mode} needs the ID labels")
        idx = self.classifier.class_index(labels)
        if (idx < 0).any():
            raise ValueError(
                f"label_mode={self.label_mode}: ID labels {sorted(set(labels[idx < 0]))} unknown to the classifier"
            )
        return torch.as_tensor(idx, device=pred.device)

    def score(
        self,
        images: torch.Tensor,
        ctx: Context,
        indices: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        split: str | None = None,
    ) -> Scores:
        if self.model is None or self.grid is None:
            raise RuntimeError("call fit() before score()")
        n = images.shape[0]
        indices = np.arange(n) if indices is None else np.asarray(indices)
        logits = self.classify(images, labels, split)
        pred = logits.argmax(1)
        use = self._labels_to_use(pred, labels, split, indices, ctx.seed).cpu()
        deferred = np.ones(n, dtype=bool)
        x_scores = None
        if self.combine != "none":
            x_scores = baseline_scores(self.combine, logits)
            deferred = x_scores > self.combine_threshold
        cols = np.full((n, len(_COLS)), np.nan)
        todo = np.flatnonzero(deferred)
        batches = range(0, len(todo), self.batch_size)
        bar = tqdm(
            total=len(todo), desc=f"DiffGuard {split or ''}".strip(), disable=not ctx.progress, dynamic_ncols=True
        )
        for start in batches:
            rows = todo[start : start + self.batch_size]
            x = images[rows].to(ctx.device)
            idx, y = indices[rows], use[rows]
            spec = {
                **self._identity(),
                "model": self.model.source,
                "classifier": self.classifier.source,
                "seed": ctx.seed,
                "images": tensor_fingerprint(x),
                "indices": idx.tolist(),
                "labels": y.tolist(),
            }
            cols[rows] = ctx.cache.array(
                "diffguard_batches", spec, lambda x=x, idx=idx, y=y: self._batch(x, idx, y.to(ctx.device), ctx.seed)
            )
            bar.update(len(rows))
        bar.close()
        dist = cols[:, 0]
        values = dist
        if x_scores is not None:
            squash = lambda s: np.arctan(s) / np.pi + 0.5  # noqa: E731  (monotone map into (0, 1))
            values = np.where(deferred, 1.0 + squash(np.nan_to_num(dist)), squash(x_scores))
        self._record(split, cols, deferred, n)
        extras = {
            "pred": self.predicted_labels(logits),
            "label_used": np.asarray(self.classifier.classes)[use.numpy()],
            "max_softmax": torch.softmax(logits.double(), 1).max(1).values.cpu().numpy(),
            "dg_distance": dist,
            "depth": cols[:, 1],
            "synthesis_steps": cols[:, 2],
        }
        if x_scores is not None:
            extras[f"{self.combine}_score"] = x_scores
            extras["deferred"] = deferred.astype(np.int64)
        nfe = float(np.nansum(cols[:, 3]) / max(n, 1))
        return Scores(values, extras=extras, nfe_per_image=nfe)

    def _uncond(self, x: torch.Tensor, t: int, rows: torch.Tensor) -> torch.Tensor:
        """The unconditional noise prediction (the eps function of inversion and of unguided synthesis)."""
        return unconditional_eps(self.model, x, t)

    @torch.no_grad()
    def _batch(self, x01: torch.Tensor, idx: np.ndarray, y: torch.Tensor, seed: int) -> np.ndarray:
        """Invert, re-synthesise and measure one batch; columns ``_COLS``."""
        grid, clf = self.grid, self.classifier
        x = x01 * 2 - 1
        stop = self.early_stop if self.early_stop.active else None
        with phase("features"), autocast(x.device, self.precision):  # inversion
            latents, depth = invert(grid, x, self.inversion_steps, self._uncond, clip=self.clip_denoised, stop_fn=stop)
            latents = latents.float()
        with phase("sampling"), autocast(x.device, self.precision):
            recon, compare, nfe, passes, syn_steps = self._resynthesize(x, x01, latents, depth, idx, y, seed)
        compare01, recon01 = ((compare.float() + 1) / 2).clamp(0, 1), ((recon.float() + 1) / 2).clamp(0, 1)
        if self.distance_size is not None and compare01.shape[-1] != self.distance_size:
            # the official GDM path resizes the synthesis back to the classifier's 224 px before DISTS / logits
            compare01, recon01 = (resize(v, self.distance_size) for v in (compare01, recon01))
        if self.distance_name == "logit_l1":
            dist = (clf(compare01) - clf(recon01)).abs().sum(1)
            passes += 2
        else:
            dist = self.distance(compare01, recon01)
        out = [dist.double().cpu(), depth.double(), syn_steps.double(), nfe.double(), passes.double()]
        return torch.stack(out, dim=1).numpy()

    def _resynthesize(
        self,
        x: torch.Tensor,
        x01: torch.Tensor,
        latents: torch.Tensor,
        depth: torch.Tensor,
        idx: np.ndarray,
        y: torch.Tensor,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Guided re-synthesis from the inverted latents (and the unguided one with ``uncond_aux``): the
        reconstruction, what it is compared with, NFE and classifier passes per image, synthesis steps."""
        model, grid, clf, uncond = self.model, self.grid, self.classifier, self._uncond
        start = grid.start_level(depth, self.synthesis_offset)
        syn_steps = grid.synthesis_steps(start)
        passes = torch.zeros(len(x))
        if self.guidance == "cg":
            gen_idx = np.zeros_like(idx) if self.cutout_rng == "shared" else idx
            guide = ClassifierGuidance(
                clf,
                y,
                self.scale,
                sample_generators(seed, gen_idx, _CUTOUT_KEY),
                n_cutouts=self.cutouts,
                cutout_min_frac=self.cutout_min_frac,
                clean_grad=self.clean_grad,
                eps_fn=uncond if self.clean_grad == "paper" else None,
            )
            recon = synthesize(grid, latents, start, uncond, clip=self.clip_denoised, guide_fn=guide)
            passes += syn_steps * max(1, self.cutouts)
            nfe = depth + syn_steps * (2 if self.clean_grad == "paper" else 1)
        else:
            mask = cam_masks(clf, x01, y, self.cam_cut) if self.cam_cut is not None else None
            if mask is not None:
                passes += 1

            def guided(xx: torch.Tensor, t: int, rows: torch.Tensor) -> torch.Tensor:
                rows = rows.to(y.device)
                return cfg_eps(model, xx, t, y[rows], self.scale, None if mask is None else mask[rows])

            recon = synthesize(grid, latents, start, guided, clip=self.clip_denoised)
            nfe = depth + 2 * syn_steps
        compare = x
        if self.uncond_aux:
            compare = synthesize(grid, latents, start, uncond, clip=self.clip_denoised)
            nfe = nfe + syn_steps
        return recon, compare, nfe, passes, syn_steps

    def _record(self, split: str | None, cols: np.ndarray, deferred: np.ndarray, n: int) -> None:
        key = split or "all"
        self.stats[key] = {
            "mean_depth": float(np.nanmean(cols[:, 1])) if deferred.any() else math.nan,
            "nfe_per_image": float(np.nansum(cols[:, 3]) / max(n, 1)),
            # + 1: the classification of every input
            "classifier_passes_per_image": 1.0 + float(np.nansum(cols[:, 4]) / max(n, 1)),
            "deferred_share": float(deferred.mean()) if n else math.nan,
        }

    # ------------------------------------------------------------------------------------------------------------
    # identity and the results row
    # ------------------------------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """The settings that determine one batch's numbers (the per-batch cache key)."""
        ident = {
            "guidance": self.guidance,
            "steps": self.steps,
            "inversion_steps": self.inversion_steps,
            "ddim_convention": self.ddim_convention,
            "clip_denoised": self.clip_denoised,
            "synthesis_offset": self.synthesis_offset,
            "early_stop_psnr": self.early_stop_psnr,
            "early_stop_dists": self.early_stop_dists,
            "scale": self.scale,
            "distance": self.distance.describe() if self.distance else self.distance_name,
            "uncond_aux": self.uncond_aux,
        }
        if self.distance_size is not None:  # batches without a resize keep their keys
            ident["distance_size"] = self.distance_size
        if self.precision != "fp32":  # fp32 batches keep the keys they had before precisions existed
            ident["precision"] = self.precision
        if self.guidance == "cg":
            ident.update(
                cutouts=self.cutouts,
                cutout_min_frac=self.cutout_min_frac,
                cutout_rng=self.cutout_rng,
                clean_grad=self.clean_grad,
            )
        else:
            ident.update(cam_cut=self.cam_cut)
        return ident

    def describe(self) -> dict[str, Any]:
        record = {k: v for k, v in self._identity().items() if k != "distance"}
        record["precision"] = self.precision
        record.update(super().describe())
        record.update(
            distance_used=self.distance.describe() if self.distance else self.distance_name,
            label_mode=self.label_mode,
            oracle=self.label_mode != "predicted",
            combine=self.combine,
            combine_quantile=self.combine_quantile if self.combine != "none" else "",
            model_source=self.model.source if self.model else "",
        )
        for split, stats in self.stats.items():
            for k, v in stats.items():
                record[f"{k}_{split}"] = round(v, 4) if not math.isnan(v) else ""
        return record
