"""Label guidance for DiffGuard's re-synthesis: classifier guidance (GDM path) and classifier-free guidance with
a CAM mask (LDM path). Both plug into ``samplers.inversion.synthesize``.

Classifier guidance follows the official ``cond_fn``: the gradient of ``sum log softmax(classifier(cutouts))[y]``
with respect to the "clean" estimate ``x0_hat sqrt(1-abar) + x_t (1 - sqrt(1-abar))`` (unclipped x0_hat), taken
on random square cutouts (side U[min_frac * side, side), resized to the classifier's input with nearest
interpolation), times the guidance scale. The cutout draws come from per-sample generators, so they do not
depend on the batch.

Classifier-free guidance: ``eps = eps_null + w (eps_y - eps_null)``; with a CAM mask only inside the mask,
``eps_null`` outside (the mask: GradCAM of the classifier for label y on the input, min-max scaled per image,
``> cut``; ``< |cut|`` for a negative cut).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ood_bench.models.classifier import Classifier
from ood_bench.models.diffusion import DiffusionModel


def model_eps(model: DiffusionModel, x: torch.Tensor, t: int, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The model's noise prediction at timestep ``t`` (first C output channels: learned-sigma models give 2C)."""
    t_batch = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
    out = model.unet(x, t_batch, class_labels=class_labels).sample[:, : x.shape[1]]
    ptype = model.prediction_type
    if ptype == "epsilon":
        return out
    a = float(model.ddim().alphas_cumprod[int(t)])
    if ptype == "v_prediction":
        return math.sqrt(a) * out + math.sqrt(1 - a) * x
    return (x - math.sqrt(a) * out) / math.sqrt(1 - a)  # "sample": the model predicts x0


def _need_null_class(model: DiffusionModel) -> None:
    if not model.has_null_class:
        raise ValueError(
            f"{model.source} is class-conditional without a null class (a converted ADM checkpoint): it has no "
            "unconditional prediction, so neither unguided steps nor classifier-free guidance can use it; use an "
            "unconditional checkpoint (e.g. 256x256_diffusion_uncond.pt) with method.guidance=cg"
        )


def unconditional_eps(model: DiffusionModel, x: torch.Tensor, t: int) -> torch.Tensor:
    """Unconditional prediction: the plain model, or a class-conditional model's null class."""
    if model.num_classes is None:
        return model_eps(model, x, t)
    _need_null_class(model)
    null = torch.full((len(x),), model.num_classes, device=x.device, dtype=torch.long)
    return model_eps(model, x, t, null)


def cfg_eps(
    model: DiffusionModel,
    x: torch.Tensor,
    t: int,
    labels: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classifier-free guided noise prediction for class indices ``labels`` (one batched model call)."""
    if model.num_classes is None:
        raise ValueError("classifier-free guidance needs a class-conditional diffusion model")
    _need_null_class(model)
    null = torch.full_like(labels, model.num_classes)
    eps_null, eps_y = model_eps(model, torch.cat([x, x]), t, torch.cat([null, labels])).chunk(2)
    eps = eps_null + scale * (eps_y - eps_null)
    if mask is not None:
        eps = torch.where(mask > 0.5, eps, eps_null)
    return eps


def cutouts(
    x: torch.Tensor, n: int, min_frac: float, out_size: int, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """``n`` random square crops per image, each resized to ``out_size`` (nearest); ``[n * B, C, out, out]`` with
    crop c of image i at row ``c * B + i`` (the official ``MakeCutouts`` order)."""
    b, _, h, w = x.shape
    side = min(h, w)
    low = min(side, max(1, int(min_frac * side)))
    draws = []
    for g in generators:
        row = []
        for _ in range(n):
            size = int(torch.rand([], generator=g) * (side - low) + low)
            ox = int(torch.randint(0, w - size + 1, (), generator=g))
            oy = int(torch.randint(0, h - size + 1, (), generator=g))
            row.append((size, ox, oy))
        draws.append(row)
    out = x.new_empty((n * b, x.shape[1], out_size, out_size))
    for c in range(n):
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i in range(b):
            groups.setdefault(draws[i][c], []).append(i)
        for (size, ox, oy), rows in groups.items():
            crop = x[rows, :, oy : oy + size, ox : ox + size]
            out[[c * b + i for i in rows]] = F.interpolate(crop, size=(out_size, out_size), mode="nearest")
    return out


class ClassifierGuidance:
    """The official ``cond_fn`` as a ``guide_fn`` for ``synthesize``: returns ``scale * grad log p(y | x)``."""

    def __init__(
        self,
        classifier: Classifier,
        labels: torch.Tensor,
        scale: float,
        generators: Sequence[torch.Generator],
        n_cutouts: int = 8,
        cutout_min_frac: float = 0.875,
        clean_grad: bool | str = True,
        eps_fn: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if clean_grad == "paper" and eps_fn is None:
            raise ValueError("clean_grad='paper' differentiates through the noise prediction: pass eps_fn")
        self.eps_fn = eps_fn
        self.classifier, self.labels, self.scale = classifier, labels, float(scale)
        self.generators = list(generators)
        self.n_cutouts, self.cutout_min_frac, self.clean_grad = n_cutouts, cutout_min_frac, clean_grad
        self.classifier_passes = 0  # forward+backward passes of the classifier, counted per image

    def __call__(self, x: torch.Tensor, x0_raw: torch.Tensor, abar: float, t: int, rows: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            fac = math.sqrt(1 - abar)
            if self.clean_grad == "paper":  # the paper: d/dx_t of the mix, through eps_theta (one more UNet pass)
                x_in = x.detach().requires_grad_(True)
                x0 = (x_in - fac * self.eps_fn(x_in, t, rows).float()) / math.sqrt(abar)
                img = (x0 * fac + x_in * (1 - fac) + 1) / 2
            elif self.clean_grad:  # the official cond_fn: the mix is a new leaf, eps_theta is held constant
                x_in = (x0_raw * fac + x * (1 - fac)).detach().requires_grad_(True)
                img = (x_in + 1) / 2
            else:
                x_in = x.detach().requires_grad_(True)
                img = (x_in + 1) / 2
            if self.n_cutouts > 0:
                size = self.classifier.input_size or img.shape[-1]
                gens = [self.generators[int(r)] for r in rows]
                img = cutouts(img, self.n_cutouts, self.cutout_min_frac, size, gens)
            logits = self.classifier(img)
            y = self.labels[rows.to(self.labels.device)].repeat(max(1, self.n_cutouts)).to(logits.device)
            selected = torch.log_softmax(logits, dim=-1)[torch.arange(len(logits), device=logits.device), y]
            grad = torch.autograd.grad(selected.sum(), x_in)[0]
        self.classifier_passes += len(logits)
        return grad * self.scale


def cam_masks(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, cut: float) -> torch.Tensor:
    """Binary GradCAM masks ``[B, 1, H, W]`` (1 = follow the label) of the classifier for class indices ``labels``
    on ``images`` (``[0, 1]``), at the images' size; maps are min-max scaled per image before the cut."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(int(y)) for y in labels]
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad(), GradCAM(model=classifier, target_layers=[classifier.cam_layer]) as cam:
        maps = cam(input_tensor=x, targets=targets)
    maps = np.asarray(maps, dtype=np.float64)
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    maps = (maps - lo) / (hi - lo + 1e-7)
    mask = maps > cut if cut >= 0 else maps < abs(cut)
    return torch.from_numpy(mask.astype(np.float32))[:, None].to(images.device)
