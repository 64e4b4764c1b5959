"""Image classifiers: the classifier DiffGuard protects and the classifier baselines (MSP, MLS, EBO) score.

Three kinds, one interface (``classifier`` config group):

- ``small_cnn``: a small CNN the suite trains on the ID training split with its labels, cached under a hash of
  the data, the labels, the architecture and the training settings (like the diffusion models).
- ``cifar_resnet``: the CIFAR ResNet-20/32/44/56/110 of "Deep Residual Learning" (He et al. 2016, §4.2) with
  option-A shortcuts, loaded from a checkpoint (e.g. the CIFAR-10 ResNet-20/56 in ``$OOD_BENCH_WEIGHTS``).
- ``torchvision``: any torchvision classification model by name, with ImageNet weights by enum name (download) or
  from a local state dict.

A :class:`Classifier` takes images in ``[0, 1]`` at the data's size and channels and returns logits. It adapts
the input to what its network expects (channels, size, mean/std normalisation) inside ``forward``, so gradients
reach the input image (classifier guidance and CAMs need them). Logit ``i`` stands for dataset label
``classes[i]``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ood_bench.cache import ArtifactCache
from ood_bench.data.imageset import iter_batches
from ood_bench.data.transforms import set_channels
from ood_bench.utils import stable_hash, tensor_fingerprint

log = logging.getLogger(__name__)

KINDS = ("small_cnn", "cifar_resnet", "torchvision")
CACHE_KIND = "classifier"
CACHE_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Five 3x3 conv-BN-ReLU layers (widths w, w, 2w, 2w, 4w; two 2x2 max-pools), global average pool, linear.

    ~0.14 M parameters at w=32; works from 8 px upwards. ``features`` ends with the last conv block (the CAM layer).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w),
            _conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            _conv_bn_relu(w, 2 * w),
            _conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * w, 4 * w),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class _ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero-padded channels (no parameters)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = _ShortcutA(planes) if stride != 1 or cin != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 CIFAR images: 16/32/64 channels in three stages of n basic blocks."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"classifier.depth={depth} is not valid; use 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(cin, planes, stride if i == 0 else 1))
                cin = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------------------------------------------------------
# The wrapper every kind returns
# ---------------------------------------------------------------------------------------------------------------


def resolve_module(net: nn.Module, path: str) -> nn.Module:
    """``"layer4.-1"`` -> ``net.layer4[-1]``: dotted attribute names, integers (negative too) index children."""
    module = net
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            children = list(module.children())
            try:
                module = children[int(part)]
            except IndexError as err:
                raise ValueError(f"classifier.cam_layer={path!r}: {part} is out of range ({len(children)})") from err
        elif hasattr(module, part):
            module = getattr(module, part)
        else:
            names = [n for n, _ in module.named_children()]
            raise ValueError(f"classifier.cam_layer={path!r}: no child {part!r}; children: {names}")
    return module


class Classifier(nn.Module):
    """Logits of images in ``[0, 1]``; adapts channels, size and normalisation to the wrapped network."""

    def __init__(
        self,
        net: nn.Module,
        classes: list[int],
        *,
        in_channels: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: int | None,
        cam_layer: str,
        source: str,
    ) -> None:
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.classes = [int(c) for c in classes]
        self.in_channels, self.input_size, self.source = in_channels, input_size, source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.cam_layer_name = cam_layer
        self.cam_layer = resolve_module(self.net, cam_layer)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = set_channels(x, self.in_channels)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Logits of many images (``[0, 1]``, any device), batched, on the classifier's device."""
        device = self.mean.device
        return torch.cat([self(x) for x in iter_batches(images, batch_size, device)])

    def class_index(self, labels: np.ndarray) -> np.ndarray:
        """Logit index of each dataset label; -1 where the classifier has no such class."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.asarray([lookup.get(int(y), -1) for y in np.asarray(labels).ravel()], dtype=np.int64)

    def accuracy(self, logits: torch.Tensor, labels: np.ndarray) -> float:
        """Share of ``labels`` the argmax of ``logits`` gets right (labels unknown to the classifier count wrong)."""
        pred = logits.argmax(1).cpu().numpy()
        return float(np.mean(pred == self.class_index(labels)))


# ---------------------------------------------------------------------------------------------------------------
# Settings, loading and training
# ---------------------------------------------------------------------------------------------------------------


def validate_classifier_cfg(cfg: dict[str, Any]) -> None:
    """Check the ``classifier`` settings before any data is read."""
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ValueError(f"classifier.kind={kind!r} is not valid; valid: {list(KINDS)}")
    for key in ("mean", "std"):
        if cfg.get(key) is not None and len(cfg[key]) not in (1, 3):
            raise ValueError(f"classifier.{key}={cfg[key]!r} is not valid; give 1 or 3 values")
    if kind == "small_cnn":
        for key in ("steps", "batch_size"):
            v = cfg["train"][key]
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"classifier.train.{key}={v!r} is not valid; use a positive integer")
    elif kind == "cifar_resnet":
        depth = cfg.get("depth")
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"classifier.depth={depth!r} is not valid; use 6n+2 (20, 32, 44, 56, 110)")
        if not cfg.get("checkpoint"):
            raise ValueError("classifier.checkpoint is required for kind=cifar_resnet (a file in paths.weights_dir)")
    else:
        import torchvision

        valid = torchvision.models.list_models(module=torchvision.models)
        if cfg.get("arch") not in valid:
            raise ValueError(f"classifier.arch={cfg.get('arch')!r} is not a torchvision classification model: {valid}")


def _weights_file(ref: str, weights_dir: Path | None, key: str) -> Path:
    """A checkpoint given as an absolute path or as a file name in ``paths.weights_dir``."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and weights_dir is not None:
        path = Path(weights_dir) / path
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier.{key}={ref!r}: no such file ({path}). Put the checkpoint in paths.weights_dir "
            f"(OOD_BENCH_WEIGHTS) or give an absolute path."
        )
    return path


def _wrap(net: nn.Module, cfg: dict[str, Any], classes: list[int], in_channels: int, source: str) -> Classifier:
    mean = tuple(cfg.get("mean") or ([0.5] * in_channels))
    std = tuple(cfg.get("std") or ([0.5] * in_channels))
    return Classifier(
        net,
        classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        input_size=cfg.get("input_size"),
        cam_layer=cfg["cam_layer"],
        source=source,
    )


def _pretrained_classes(cfg: dict[str, Any], num_classes: int) -> list[int]:
    classes = cfg.get("classes")
    return list(range(num_classes)) if classes is None else [int(c) for c in classes]


def load_cifar_resnet(cfg: dict[str, Any], weights_dir: Path | None) -> Classifier:
    """A CIFAR ResNet from a checkpoint: a state dict, or a dict holding one under ``state_dict``; ``module.``
    prefixes (DataParallel) are removed."""
    try:
        path = _weights_file(str(cfg["checkpoint"]), weights_dir, "checkpoint")
    except FileNotFoundError as err:
        from ood_bench import fast_dev_run

        fast_dev_run.random_init(f"the CIFAR ResNet-{cfg['depth']} classifier", str(cfg["checkpoint"]), err)
        num_classes = len(cfg.get("classes") or range(10))
        torch.manual_seed(0)
        net = CifarResNet(int(cfg["depth"]), num_classes=num_classes)
        return _wrap(net.eval(), cfg, _pretrained_classes(cfg, num_classes), 3, "random(fast_dev_run)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    num_classes = int(state["linear.weight"].shape[0])
    net = CifarResNet(int(cfg["depth"]), num_classes=num_classes)
    net.load_state_dict(state, strict=True)
    return _wrap(net, cfg, _pretrained_classes(cfg, num_classes), 3, f"file:{path.name}")


def load_torchvision(cfg: dict[str, Any], weights_dir: Path | None) -> Classifier:
    """A torchvision classifier by name; ``weights``: an enum name (e.g. IMAGENET1K_V1) or a state-dict file."""
    import torchvision

    arch, weights = cfg["arch"], str(cfg.get("weights") or "")
    num_classes = int(cfg.get("num_classes") or 1000)
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    enums = torchvision.models.get_model_weights(arch)
    if weights in enums.__members__:
        enum = enums[weights]
        try:
            state = enum.get_state_dict(progress=False)
        except Exception as err:  # download errors come as URLError, OSError, RuntimeError...
            missing = FileNotFoundError(
                f"classifier {arch} weights {weights} could not be fetched from {enum.url} ({type(err).__name__}: "
                f"{err}). Download that URL into the torch hub cache (~/.cache/torch/hub/checkpoints/) on a machine "
                f"with internet, or save the state dict into paths.weights_dir and set classifier.weights=<file>."
            )
            missing.__cause__ = err
            from ood_bench import fast_dev_run

            fast_dev_run.random_init(f"the {arch} classifier", enum.url, missing)
            torch.manual_seed(0)
            net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
            return _wrap(net.eval(), cfg, _pretrained_classes(cfg, num_classes), 3, "random(fast_dev_run)")
        source = f"torchvision:{arch}.{weights}"
    else:
        path = _weights_file(weights, weights_dir, "weights")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
        source = f"file:{path.name}"
    net.load_state_dict(state, strict=True)
    return _wrap(net.eval(), cfg, _pretrained_classes(cfg, num_classes), 3, source)


def classifier_spec(cfg: dict[str, Any], images: torch.Tensor, labels: np.ndarray) -> dict[str, Any]:
    """Everything that determines a trained small CNN."""
    return {
        "version": CACHE_VERSION,
        "data": tensor_fingerprint(images),
        "labels": stable_hash(np.asarray(labels).tolist()),
        "width": cfg["width"],
        "mean": cfg.get("mean"),
        "std": cfg.get("std"),
        "train": cfg["train"],
    }


def _augment(x: torch.Tensor, shift: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` px (reflect padding) and optional horizontal flips, per image."""
    n, _, h, w = x.shape
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def train_small_cnn(
    cfg: dict[str, Any], images: torch.Tensor, targets: torch.Tensor, num_classes: int, device: torch.device, out: Path
) -> None:
    """Train the small CNN (AdamW, cosine learning rate, cross entropy); save weights and a summary to ``out``.

    Initialisation and every draw are seeded by ``classifier.train.seed`` (the global RNG state is restored).
    """
    tcfg = cfg["train"]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(tcfg["seed"]))
        net = SmallCNN(images.shape[1], num_classes, int(cfg["width"])).to(device)
    channels = images.shape[1]
    mean = torch.tensor(cfg.get("mean") or [0.5] * channels).view(1, -1, 1, 1).to(device)
    std = torch.tensor(cfg.get("std") or [0.5] * channels).view(1, -1, 1, 1).to(device)
    steps, bs = int(tcfg["steps"]), int(tcfg["batch_size"])
    opt = torch.optim.AdamW(net.parameters(), lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(int(tcfg["seed"]))
    n = images.shape[0]
    log.info("training small CNN classifier on %d images, %d classes: %d steps of batch %d", n, num_classes, steps, bs)
    t0, losses, correct, seen = time.perf_counter(), [], 0, 0
    net.train()
    bar = tqdm(range(steps), desc="train classifier", disable=not cfg.get("progress", True), dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, n, (bs,), generator=gen)
        x = _augment(images[idx], int(tcfg["shift"]), bool(tcfg["hflip"]), gen).to(device)
        y = targets[idx].to(device)
        logits = net((x - mean) / std)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step >= steps - 100:
            correct += int((logits.argmax(1) == y).sum())
            seen += bs
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    net.eval()
    torch.save(net.state_dict(), out / "weights.pt")
    info = {
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": float(np.mean(losses[-100:])),
        "train_acc_last_100_steps": correct / max(seen, 1),
        "n_images": n,
        "num_classes": num_classes,
        "device": str(device),
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    log.info("classifier trained in %.1f s, final loss %.4f", info["seconds"], info["final_loss"])


def get_classifier(
    cfg: dict[str, Any],
    images: torch.Tensor,
    labels: np.ndarray | None,
    cache: ArtifactCache,
    device: torch.device,
    weights_dir: Path | None = None,
    progress: bool = True,
) -> Classifier:
    """Load the configured classifier, or the cached small CNN trained on ``images`` / ``labels``."""
    validate_classifier_cfg(cfg)
    kind = cfg["kind"]
    if kind == "cifar_resnet":
        return load_cifar_resnet(cfg, weights_dir).to(device)
    if kind == "torchvision":
        return load_torchvision(cfg, weights_dir).to(device)
    if labels is None:
        raise ValueError("classifier.kind=small_cnn trains on the ID training labels, but the data gave none")
    labels = np.asarray(labels)
    classes = sorted(int(c) for c in np.unique(labels))
    if len(classes) < 2:
        raise ValueError(f"classifier.kind=small_cnn needs at least 2 ID classes; the training split has {classes}")
    targets = torch.as_tensor(np.searchsorted(classes, labels), dtype=torch.long)
    spec = classifier_spec(cfg, images, labels)
    entry, created = cache.get_or_create(
        CACHE_KIND,
        spec,
        lambda tmp: train_small_cnn({**cfg, "progress": progress}, images, targets, len(classes), device, tmp),
    )
    if not created:
        log.info("using cached classifier %s (no training)", entry)
    net = SmallCNN(images.shape[1], len(classes), int(cfg["width"]))
    net.load_state_dict(torch.load(entry / "weights.pt", map_location="cpu", weights_only=True))
    return _wrap(net, cfg, classes, images.shape[1], f"trained:{entry.name}").to(device)
