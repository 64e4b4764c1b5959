"""The resize protocol shared by both sides of a pair.

Protocol ``common_min`` (default): both sides are first reduced to the smallest native size of the pair
(and never above the target), then brought to the target size by one and the same upsampling. A 28x28
MNIST image and a 32x32 CIFAR image therefore both pass through 28x28 before 32x32, so resampling
artefacts (blur from upsampling, aliasing from downsampling) cannot tell ID from OOD. Protocol ``direct``
resizes each side straight to the target (what many papers do; recorded in results so it can be seen).
Protocol ``native`` leaves every side at its own size (all images of one source must share it) for methods
that resize each raw image themselves: DLSR's encoder takes each image straight to its input size (224 px),
as the DLSR paper does (Places365 256 -> 224, CIFAR 32 -> 224). Methods that need one size (LMD) reject it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROTOCOLS = ("common_min", "direct", "native")
# ITU-R BT.601 luma, as PIL's convert("L")
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0,255]`` to float32 ``[0,1]``."""
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    return x.float().div_(255.0)


def set_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey to RGB by repetition, RGB to grey by luma; ``x`` is float ``[N,C,H,W]``."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.repeat(1, 3, 1, 1)
    if c == 3 and channels == 1:
        return (x * _LUMA.to(x)).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {c} channels to {channels}; valid channel counts: 1 or 3")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square resize with antialiasing (bilinear); no-op when already ``size``."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


def common_size(native_sizes: list[int], target: int, protocol: str) -> int | None:
    """Intermediate size every side passes through before the target size (``None``: no resize, ``native``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"resize protocol={protocol!r} is not valid; valid: {list(PROTOCOLS)}")
    if protocol == "native":
        return None
    return min([*native_sizes, target]) if protocol == "common_min" else target


def prepare(x_uint8: torch.Tensor, *, channels: int, size: int, via: int | None) -> torch.Tensor:
    """uint8 images to float ``[0,1]`` with ``channels`` channels at ``size``, passing through ``via``.

    ``via=None`` (protocol ``native``) keeps the images at their own size.
    """
    x = set_channels(to_float(x_uint8), channels)
    if via is None:
        return x
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"images must be square before the resize protocol, got {tuple(x.shape[-2:])}")
    return resize(resize(x, via), size)
