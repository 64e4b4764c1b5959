"""Few-shot anomaly detection data: one category = a sample table of normal and defective images with masks.

Layouts (``AnomalySource`` subclasses; configs in ``conf/category/``):

* ``MVTecLayout`` — MVTec AD and every set stored like it (``magnetic_tile``, ``kolektor_sdd`` here):
  ``<root>/<folder>/train/good/*``, ``test/good/*``, ``test/<defect>/*``, ``ground_truth/<defect>/<stem>_mask.png``.
* ``VisaLayout`` — VisA as released: ``<root>/<folder>/split_csv/1cls.csv`` (``object,split,label,image,mask``,
  paths relative to ``<root>/<folder>``); masks are binarised (any non-zero value is a defect).
* ``FolderLayout`` — a user's own parts: ``normal/`` (defect-free), optional ``normal_test/``, ``abnormal/``
  (optionally one sub-folder per defect type) and optional ``masks/`` mirroring ``abnormal/``.

A sample table has one row per image: ``split`` (train | test), ``label`` (0 normal, 1 anomalous), ``defect``
(``good`` for normal images), ``image_path`` and ``mask_path`` (empty for normal images). A defective image and its
mask are matched by file stem; an unmatched image or mask is an error naming the files. Images and masks are decoded
when a run needs them; a file that cannot be decoded is an error naming it.

Aspect handling (``aspect``): ``resize`` squeezes the whole image to ``image_size`` x ``image_size``;
``center_crop`` cuts the largest centred square first. Masks follow the same geometry (nearest neighbour).
"""

from __future__ import annotations

import logging
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from ood_bench.data import transforms
from ood_bench.data.download import DOWNLOADS, download_and_extract
from ood_bench.data.sources import IMAGE_SUFFIXES, DatasetNotFoundError

log = logging.getLogger(__name__)

ASPECTS = ("resize", "center_crop")
TABLE_COLUMNS = ["split", "label", "defect", "image_path", "mask_path"]
MVTEC_LAYOUT = "<folder>/train/good/*, <folder>/test/{good,<defect>}/*, <folder>/ground_truth/<defect>/<stem>_mask.png"


class DatasetLayoutError(ValueError):
    """Files are there but do not form the expected layout (e.g. an image without its mask)."""


class CorruptFileError(ValueError):
    """An image or mask file exists but cannot be decoded."""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _match_masks(name: str, images: list[Path], masks: list[Path], suffix: str) -> list[Path]:
    """Masks in the order of ``images``, matched by stem (mask stem = image stem + ``suffix``); unmatched files
    on either side raise."""
    by_stem = {m.stem.removesuffix(suffix): m for m in masks}
    missing = [str(p) for p in images if p.stem not in by_stem]
    orphans = sorted(str(m) for s, m in by_stem.items() if s not in {p.stem for p in images})
    if missing or orphans:
        raise DatasetLayoutError(
            f"{name}: images and masks do not match by file stem: {len(missing)} defective image(s) without a "
            f"mask (e.g. {missing[:3]}), {len(orphans)} mask(s) without an image (e.g. {orphans[:3]})"
        )
    return [by_stem[p.stem] for p in images]


class AnomalySource(ABC):
    """One category: its sample table (built once, validated) and a description."""

    name: str
    object_name: str
    #: key into ``ood_bench.data.download.DOWNLOADS`` when the set has an official archive
    archive: str | None = None

    def __init__(self, name: str, root: str, folder: str, object_name: str | None, download: bool, hint: str) -> None:
        self.name, self.root, self.folder = name, Path(root), folder
        self.object_name = object_name or name.replace("_", " ")
        self.download, self.hint = download, hint
        self._table: pd.DataFrame | None = None

    @property
    def path(self) -> Path:
        return self.root / self.folder

    @property
    def layout(self) -> str:
        """The expected on-disk layout, for error messages."""
        return MVTEC_LAYOUT

    @property
    def extract_dir(self) -> Path:
        """Where the official archive is kept and extracted (its top level holds one folder per category)."""
        return self.root

    def _not_found(self, what: Path) -> DatasetNotFoundError:
        how = self.hint
        if self.archive:
            info = DOWNLOADS[self.archive]
            how = (
                f"data.download=true downloads {info.url} (SHA-256 {info.sha256}) into {self.extract_dir} and "
                f"extracts it; or download it yourself, put {info.filename} in {self.extract_dir} (it is hashed "
                f"before use) and rerun with data.download=true, or extract it there. {how}"
            )
        return DatasetNotFoundError(
            f"{self.name}: {what} not found. Expected layout under {self.root}: {self.layout}. Set paths.data_dir "
            f"(or OOD_BENCH_DATA) to the folder that holds it. {how}".strip()
        )

    def ensure_present(self) -> None:
        """Download and extract the official archive when the data is missing and ``download`` is on."""
        if self.path.exists() or not self.download:
            return
        if not self.archive:
            raise self._not_found(self.path)
        download_and_extract(DOWNLOADS[self.archive], self.extract_dir)

    def samples(self) -> pd.DataFrame:
        """The validated sample table (``TABLE_COLUMNS``), train rows first, each split sorted by path."""
        if self._table is None:
            self.ensure_present()
            table = self._build()
            if not (table["split"] == "train").any():
                raise DatasetLayoutError(f"{self.name}: no defect-free training images ({self.layout})")
            if not (table["split"] == "test").any():
                raise DatasetLayoutError(f"{self.name}: no test images ({self.layout})")
            self._table = table[TABLE_COLUMNS].reset_index(drop=True)
        return self._table

    @abstractmethod
    def _build(self) -> pd.DataFrame:
        """Scan the files into a sample table."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": type(self).__name__, "path": str(self.path), "object": self.object_name}


def _rows(split: str, label: int, defect: str, images: list[Path], masks: list[Path] | None = None) -> list[dict]:
    return [
        {
            "split": split,
            "label": label,
            "defect": defect,
            "image_path": str(p),
            "mask_path": str(masks[i]) if masks is not None else "",
        }
        for i, p in enumerate(images)
    ]


class MVTecLayout(AnomalySource):
    """MVTec AD's layout: ``train/good``, ``test/<defect>``, ``ground_truth/<defect>/<stem>_mask.png``."""

    def __init__(
        self,
        name: str,
        root: str,
        folder: str | None = None,
        object_name: str | None = None,
        download: bool = False,
        archive: str | None = None,
        hint: str = "",
        mask_suffix: str = "_mask",
    ) -> None:
        super().__init__(name, root, folder or name, object_name, download, hint)
        if archive is not None and archive not in DOWNLOADS:
            raise ValueError(f"archive={archive!r} is not a known download; valid: {sorted(DOWNLOADS)} or null")
        self.archive, self.mask_suffix = archive, mask_suffix

    def _build(self) -> pd.DataFrame:
        good = self.path / "train" / "good"
        for folder in (self.path, good, self.path / "test"):
            if not folder.is_dir():
                raise self._not_found(folder)
        rows = _rows("train", 0, "good", _images_in(good))
        defects = sorted(p.name for p in (self.path / "test").iterdir() if p.is_dir())
        if not [d for d in defects if d != "good"]:
            raise DatasetLayoutError(f"{self.name}: {self.path / 'test'} has no defect folder ({self.layout})")
        for defect in defects:
            images = _images_in(self.path / "test" / defect)
            if defect == "good":
                rows += _rows("test", 0, "good", images)
                continue
            gt = self.path / "ground_truth" / defect
            if not gt.is_dir():
                raise DatasetLayoutError(f"{self.name}: mask folder {gt} for the '{defect}' images is missing")
            masks = _match_masks(f"{self.name}/{defect}", images, _images_in(gt), self.mask_suffix)
            rows += _rows("test", 1, defect, images, masks)
        return pd.DataFrame(rows, columns=TABLE_COLUMNS)


class VisaLayout(AnomalySource):
    """VisA as released: ``split_csv/1cls.csv`` names each category's train and test images and masks."""

    archive = "visa"
    SPLIT_FILE = "split_csv/1cls.csv"

    def __init__(
        self,
        name: str,
        root: str,
        folder: str = "visa",
        category: str | None = None,
        object_name: str | None = None,
        download: bool = False,
        hint: str = "",
    ) -> None:
        super().__init__(name, root, folder, object_name, download, hint)
        self.category = category or name

    @property
    def layout(self) -> str:
        return f"{self.folder}/{self.SPLIT_FILE} (object,split,label,image,mask) and {self.folder}/<category>/Data/"

    @property
    def extract_dir(self) -> Path:
        return self.path  # VisA_20220922.tar holds split_csv/ and the category folders at its top level

    def _build(self) -> pd.DataFrame:
        split_file = self.path / self.SPLIT_FILE
        if not split_file.is_file():
            raise self._not_found(split_file)
        table = pd.read_csv(split_file, dtype=str, keep_default_na=False)
        expected = ["object", "split", "label", "image", "mask"]
        if list(table.columns) != expected:
            raise DatasetLayoutError(f"{split_file}: columns {list(table.columns)}, expected {expected}")
        table = table[table["object"] == self.category]
        if table.empty:
            objects = sorted(pd.read_csv(split_file, dtype=str)["object"].unique())
            raise DatasetLayoutError(f"{split_file} has no rows for category {self.category!r}; it has {objects}")
        bad = sorted(set(table["label"]) - {"normal", "anomaly"}) + sorted(set(table["split"]) - {"train", "test"})
        if bad:
            raise DatasetLayoutError(f"{split_file}: unexpected split/label values {bad}")
        rows = []
        for r in table.sort_values(["split", "image"], ascending=[False, True]).itertuples():
            image = self.path / r.image
            if not image.is_file():
                raise self._not_found(image)
            anomalous = r.label == "anomaly"
            mask = self.path / r.mask if anomalous else None
            if anomalous and (not r.mask or mask.stem != image.stem):
                raise DatasetLayoutError(f"{self.name}: anomalous image {image} has mask {r.mask!r}: stems differ")
            rows += _rows(
                r.split, int(anomalous), "anomaly" if anomalous else "good", [image], [mask] if mask else None
            )
        return pd.DataFrame(rows, columns=TABLE_COLUMNS)


class FolderLayout(AnomalySource):
    """A user's own parts: ``normal/``, optional ``normal_test/``, ``abnormal/[<defect>/]``, optional ``masks/``.

    Without ``normal_test/`` a seeded share (``test_fraction``) of ``normal/`` becomes the normal test images.
    Masks (optional) mirror ``abnormal/``: ``masks/[<defect>/]<stem><mask_suffix>.<ext>``; without them only the
    image metrics are computed.
    """

    def __init__(
        self,
        name: str,
        root: str,
        folder: str,
        object_name: str | None = None,
        normal_dir: str = "normal",
        abnormal_dir: str = "abnormal",
        mask_dir: str | None = "masks",
        normal_test_dir: str | None = "normal_test",
        test_fraction: float = 0.3,
        split_seed: int = 0,
        mask_suffix: str = "",
        hint: str = "",
    ) -> None:
        super().__init__(name, root, folder, object_name, False, hint)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction={test_fraction} must lie in (0, 1)")
        self.normal_dir, self.abnormal_dir, self.mask_dir = normal_dir, abnormal_dir, mask_dir
        self.normal_test_dir, self.test_fraction, self.split_seed = normal_test_dir, test_fraction, split_seed
        self.mask_suffix = mask_suffix

    @property
    def layout(self) -> str:
        return (
            f"{self.folder}/{self.normal_dir}/*, [{self.folder}/{self.normal_test_dir}/*], "
            f"{self.folder}/{self.abnormal_dir}/[<defect>/]*, [{self.folder}/{self.mask_dir}/[<defect>/]<stem>"
            f"{self.mask_suffix}.png]"
        )

    def _build(self) -> pd.DataFrame:
        normal, abnormal = self.path / self.normal_dir, self.path / self.abnormal_dir
        for folder in (self.path, normal, abnormal):
            if not folder.is_dir():
                raise self._not_found(folder)
        normals = _images_in(normal)
        test_dir = self.path / self.normal_test_dir if self.normal_test_dir else None
        if test_dir is not None and test_dir.is_dir():
            train, test = normals, _images_in(test_dir)
        else:
            is_test = np.random.default_rng(self.split_seed).random(len(normals)) < self.test_fraction
            train = [p for p, t in zip(normals, is_test) if not t]
            test = [p for p, t in zip(normals, is_test) if t]
        rows = _rows("train", 0, "good", train) + _rows("test", 0, "good", test)
        groups = [(d.name, d) for d in sorted(abnormal.iterdir()) if d.is_dir()] or [("defect", abnormal)]
        masks_root = self.path / self.mask_dir if self.mask_dir else None
        with_masks = masks_root is not None and masks_root.is_dir()
        for defect, folder in groups:
            images = _images_in(folder)
            masks = None
            if with_masks:
                mask_folder = masks_root / folder.relative_to(abnormal)
                found = _images_in(mask_folder) if mask_folder.is_dir() else []
                masks = _match_masks(f"{self.name}/{defect}", images, found, self.mask_suffix)
            rows += _rows("test", 1, defect, images, masks)
        return pd.DataFrame(rows, columns=TABLE_COLUMNS)


# ---------------------------------------------------------------------------------------------------------------
# Decoding, aspect handling and the protocol's draws
# ---------------------------------------------------------------------------------------------------------------


def _decode(path: str | Path, what: str) -> np.ndarray:
    """Decode an image file into ``[H, W]`` (grey) or ``[H, W, 3]`` uint8; a clear error names a bad file."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("L") if im.mode in ("L", "1", "I;16", "I", "F") else im.convert("RGB"))
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"{what} {path} not found") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated files
        raise CorruptFileError(f"cannot decode {what} {path}: {type(err).__name__}: {err}") from err
    return arr


def _geometry(x: torch.Tensor, size: int, aspect: str, mode: str) -> torch.Tensor:
    """``[N, C, H, W]`` to ``size`` x ``size`` by ``aspect`` (``mode``: bilinear with antialias, or nearest)."""
    if aspect == "center_crop":
        h, w = x.shape[-2:]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top : top + s, left : left + s]
    elif aspect != "resize":
        raise ValueError(f"data.aspect={aspect!r} is not valid; valid: {list(ASPECTS)}")
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest-exact")
    return transforms.resize(x, size)


def load_images(paths: list[str], size: int, aspect: str, channels: int) -> torch.Tensor:
    """Float images ``[N, channels, size, size]`` in ``[0, 1]`` (grey repeated to RGB, RGB to luma for 1)."""
    out = []
    for p in paths:
        arr = _decode(p, "image")
        x = torch.from_numpy(arr[None, None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1)[None]))
        x = transforms.set_channels(transforms.to_float(x), channels)
        out.append(_geometry(x, size, aspect, "bilinear")[0])
    return torch.stack(out) if out else torch.zeros(0, channels, size, size)


def load_masks(image_paths: list[str], mask_paths: list[str], size: int, aspect: str) -> np.ndarray:
    """Binary masks ``[N, size, size]`` (uint8 0/1; all zeros for normal images, whose mask path is empty).

    A mask must have its image's size: the geometry is then the same for both.
    """
    out = np.zeros((len(image_paths), size, size), dtype=np.uint8)
    for i, (img, msk) in enumerate(zip(image_paths, mask_paths)):
        if not msk:
            continue
        m = _decode(msk, "mask")
        m = m if m.ndim == 2 else m.max(axis=2)
        with Image.open(img) as im:
            w, h = im.size
        if m.shape != (h, w):
            raise DatasetLayoutError(f"mask {msk} is {m.shape[1]}x{m.shape[0]} but its image {img} is {w}x{h}")
        t = torch.from_numpy((m > 0).astype(np.float32))[None, None]
        out[i] = (_geometry(t, size, aspect, "nearest")[0, 0] > 0.5).numpy()
    return out


def select_test(table: pd.DataFrame, n: int | None, seed: int) -> np.ndarray:
    """Rows of the test split: all (``n`` null or at least the test size), or ``n`` drawn with ``seed``,
    stratified by defect type (normal = ``good``) with largest-remainder allocation, so that the normal /
    anomalous ratio and the mix of defect types follow the full test set."""
    test = np.flatnonzero(table["split"].to_numpy() == "test")
    if n is None or n >= len(test):
        return test
    defects = table["defect"].to_numpy()[test]
    groups = sorted(set(defects.tolist()))
    counts = np.array([np.sum(defects == g) for g in groups])
    quota = counts * n / len(test)
    take = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - take), kind="stable")[: n - take.sum()]:
        take[j] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(test[defects == g], size=t, replace=False) for g, t in zip(groups, take) if t > 0]
    return np.sort(np.concatenate(chosen))


def draw_shots(table: pd.DataFrame, k: int, shot_seed: int) -> np.ndarray:
    """``k`` rows of the defect-free training images, drawn with ``shot_seed``.

    A seeded permutation's first ``k`` entries: the draws of one seed are nested (the 1-shot image is among the
    4 shots), so different k are paired comparisons.
    """
    train = np.flatnonzero(table["split"].to_numpy() == "train")
    if k > len(train):
        raise ValueError(f"data.k_shot={k} is more than the {len(train)} defect-free training images")
    return train[np.random.default_rng(shot_seed).permutation(len(train))[:k]]


def category_seed(seed: int, name: str) -> int:
    """A per-category seed (CRC32 of the name mixed in): each category's draw ignores the other categories."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


@dataclass
class Category:
    """One category of a run: its source, sample table and the seeded test subset at the run's image size."""

    index: int
    source: AnomalySource
    table: pd.DataFrame
    test_rows: np.ndarray
    test_images: torch.Tensor
    test_masks: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def has_masks(self) -> bool:
        """Whether every anomalous test image has a mask (pixel metrics need them)."""
        rows = self.table.iloc[self.test_rows]
        return bool((rows.loc[rows["label"] == 1, "mask_path"] != "").all())

    @property
    def test_labels(self) -> np.ndarray:
        return self.table["label"].to_numpy()[self.test_rows].astype(np.int64)

    def files(self, rows: np.ndarray) -> list[str]:
        """Paths of ``rows`` relative to the category folder (what the per-run output records)."""
        base = self.source.path
        return [
            str(Path(p).relative_to(base)) if Path(p).is_relative_to(base) else p
            for p in self.table["image_path"].to_numpy()[rows]
        ]


def load_category(
    source: AnomalySource, index: int, *, image_size: int, aspect: str, channels: int, n_test: int | None, seed: int
) -> Category:
    """Scan the category, draw its test subset (seeded per category) and decode its images and masks."""
    table = source.samples()
    rows = select_test(table, n_test, category_seed(seed, source.name))
    paths = table["image_path"].to_numpy()[rows].tolist()
    images = load_images(paths, image_size, aspect, channels)
    masks = load_masks(paths, table["mask_path"].to_numpy()[rows].tolist(), image_size, aspect)
    labels = table["label"].to_numpy()[rows]
    meta = {
        **source.describe(),
        "n_train_pool": int((table["split"] == "train").sum()),
        "n_test_pool": int((table["split"] == "test").sum()),
        "n_test": len(rows),
        "n_good": int((labels == 0).sum()),
        "n_anomalous": int((labels == 1).sum()),
    }
    log.info(
        "category %s: %d test images (%d normal, %d anomalous) of %d, %d training images, at %dx%d (%s)",
        source.name,
        len(rows),
        meta["n_good"],
        meta["n_anomalous"],
        meta["n_test_pool"],
        meta["n_train_pool"],
        image_size,
        image_size,
        aspect,
    )
    return Category(index, source, table, rows, images, masks, meta)


def load_shots(
    category: Category, k: int, shot_seed: int, *, image_size: int, aspect: str, channels: int
) -> tuple[torch.Tensor, np.ndarray]:
    """The ``k`` shots of ``shot_seed`` (seeded per category): images and their table rows."""
    rows = draw_shots(category.table, k, category_seed(shot_seed, category.name))
    return load_images(category.table["image_path"].to_numpy()[rows].tolist(), image_size, aspect, channels), rows
