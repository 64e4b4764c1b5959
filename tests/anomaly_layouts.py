"""Small synthetic anomaly datasets written in the real on-disk layouts (MVTec AD, VisA, generic folder).

Normal images are smooth noise; a defective image carries a bright square (or two) exactly where its mask is 1, so
a working detector separates them and the masks can be checked pixel by pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def normal_image(rng: np.random.Generator, size: tuple[int, int], mode: str = "L") -> np.ndarray:
    """Low-contrast noise around mid-grey (``size`` = (height, width))."""
    h, w = size
    img = 100 + 30 * rng.random((h, w))
    if mode == "RGB":
        img = np.stack([img, img * 0.9, img * 1.1], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def defect(rng: np.random.Generator, size: tuple[int, int], mode: str = "L", regions: int = 1):
    """A normal image with ``regions`` bright squares and its 0/255 mask."""
    img = normal_image(rng, size, mode)
    mask = np.zeros(size, dtype=np.uint8)
    h, w = size
    for _ in range(regions):
        s = max(3, min(h, w) // 6)
        top, left = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        mask[top : top + s, left : left + s] = 255
    img[mask > 0] = 250
    return img, mask


def save(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_mvtec(
    root: Path,
    category: str,
    n_train: int = 6,
    n_good: int = 6,
    defects: dict[str, int] | None = None,
    size: tuple[int, int] = (64, 80),
    mode: str = "L",
    seed: int = 0,
) -> Path:
    """``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``."""
    rng = np.random.default_rng(seed)
    base = root / category
    for i in range(n_train):
        save(normal_image(rng, size, mode), base / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(normal_image(rng, size, mode), base / "test" / "good" / f"{i:03d}.png")
    for name, n in (defects or {"scratch": 4, "hole": 3}).items():
        for i in range(n):
            img, mask = defect(rng, size, mode, regions=1 + i % 2)
            save(img, base / "test" / name / f"{i:03d}.png")
            save(mask, base / "ground_truth" / name / f"{i:03d}_mask.png")
    return base


def write_visa(root: Path, categories: tuple[str, ...] = ("candle", "pcb1"), size=(48, 64), seed: int = 0) -> Path:
    """``<root>/visa/split_csv/1cls.csv`` and ``<root>/visa/<category>/Data/{Images,Masks}/...``; masks hold the
    small label values VisA uses (1, 2), not 0/255."""
    rng = np.random.default_rng(seed)
    base = root / "visa"
    lines = ["object,split,label,image,mask"]
    for cat in categories:
        for i in range(5):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            save(normal_image(rng, size, "RGB"), base / rel)
            lines.append(f"{cat},{'train' if i < 3 else 'test'},normal,{rel},")
        for i in range(3):
            img, mask = defect(rng, size, "RGB")
            rel, rel_mask = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG", f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            save(img, base / rel)
            save((mask > 0).astype(np.uint8) * (1 + i % 2), base / rel_mask)
            lines.append(f"{cat},test,anomaly,{rel},{rel_mask}")
    (base / "split_csv").mkdir(parents=True, exist_ok=True)
    (base / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    return base


def write_folder(root: Path, with_masks: bool = True, normal_test: bool = False, seed: int = 0) -> Path:
    """``<root>/parts/{normal, [normal_test], abnormal/<defect>, [masks/<defect>/<stem>.png]}``."""
    rng = np.random.default_rng(seed)
    base = root / "parts"
    for i in range(10):
        save(normal_image(rng, (40, 40)), base / "normal" / f"n{i}.png")
    if normal_test:
        for i in range(3):
            save(normal_image(rng, (40, 40)), base / "normal_test" / f"t{i}.png")
    for d in ("dent", "stain"):
        for i in range(2):
            img, mask = defect(rng, (40, 40))
            save(img, base / "abnormal" / d / f"{d}{i}.png")
            if with_masks:
                save(mask, base / "masks" / d / f"{d}{i}.png")
    return base
