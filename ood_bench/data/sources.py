"""Dataset sources: where images come from, read into uint8 tensors ``[N, C, H, W]``.

Every source answers two questions: ``labels(split)`` (one int per sample, cheap) and
``images(split, indices)`` (decode only the samples a pair needs). A missing dataset raises
``DatasetNotFoundError`` naming where it was expected and how to get it.

Sources register under a name (``SOURCES``); configs in ``conf/dataset/`` pick one by ``_target_``.
"""

from __future__ import annotations

import gzip
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ood_bench.errors import BadImageError, DataError, MissingFileError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
BAD_FILE_POLICIES = ("fail", "skip")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DatasetNotFoundError(MissingFileError):
    """A dataset is not where the configuration says it is."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; valid splits: {list(SPLITS)}")


def _to_nchw_uint8(arr: np.ndarray) -> torch.Tensor:
    """``[N,H,W]`` or ``[N,H,W,C]`` uint8 array to a ``[N,C,H,W]`` uint8 tensor."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"expected images of shape [N,H,W] or [N,H,W,C], got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8))


class Source(ABC):
    """A named image dataset with train and test splits."""

    name: str

    @abstractmethod
    def labels(self, split: str) -> np.ndarray:
        """Integer label of every sample in ``split``."""

    @abstractmethod
    def images(self, split: str, indices: Sequence[int]) -> torch.Tensor:
        """uint8 ``[len(indices), C, H, W]`` images of the given samples."""

    def load(self, split: str, indices: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
        """The images of ``indices`` and the indices actually returned (a source may skip undecodable files)."""
        return self.images(split, indices), np.asarray(indices, dtype=np.int64)

    def probe(self, split: str, indices: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
        """The samples of ``indices`` that can be read and the uint8 ``(C, H, W)`` they all decode to, without
        decoding them all where the format allows (a lazy ``ImageSet`` is built from this); this default decodes
        the first sample only."""
        idx = np.asarray(indices, dtype=np.int64)
        return idx, tuple(int(v) for v in self.images(split, idx[:1]).shape[1:])

    def describe(self) -> dict:
        return {"name": self.name, "type": type(self).__name__}


class ArraySource(Source):
    """A source whose splits are held in memory as arrays (loaded lazily, once)."""

    def __init__(self) -> None:
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @abstractmethod
    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(images [N,H,W(,C)] uint8, labels [N])``."""

    def _get(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        _check_split(split)
        if split not in self._arrays:
            x, y = self._load(split)
            self._arrays[split] = (np.asarray(x), np.asarray(y, dtype=np.int64))
        return self._arrays[split]

    def labels(self, split: str) -> np.ndarray:
        return self._get(split)[1]

    def images(self, split: str, indices: Sequence[int]) -> torch.Tensor:
        return _to_nchw_uint8(self._get(split)[0][np.asarray(indices, dtype=np.int64)])

    def probe(self, split: str, indices: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
        shape = self._get(split)[0].shape
        if len(shape) not in (3, 4):
            raise ValueError(f"expected images of shape [N,H,W] or [N,H,W,C], got {shape}")
        chw = (1, *shape[1:3]) if len(shape) == 3 else (shape[3], *shape[1:3])
        return np.asarray(indices, dtype=np.int64), tuple(int(v) for v in chw)


class DigitsSource(ArraySource):
    """scikit-learn's 8x8 ``load_digits`` (ships inside scikit-learn, so it always works offline).

    The 1,797 images have no official split; a stratified split with a fixed seed makes one.
    """

    def __init__(self, name: str = "digits", test_fraction: float = 0.4, split_seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction={test_fraction} must lie in (0, 1)")
        self.name, self.test_fraction, self.split_seed = name, test_fraction, split_seed

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        idx_train, idx_test = train_test_split(
            np.arange(len(x)), test_size=self.test_fraction, random_state=self.split_seed, stratify=d.target
        )
        idx = np.sort(idx_train if split == "train" else idx_test)
        return x[idx], d.target[idx]


def _read_idx(path: Path) -> np.ndarray:
    """Read an (optionally gzip-compressed) IDX file as torchvision's MNIST does."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim, dtype_code = magic % 256, magic // 256
    if dtype_code != 8:
        raise ValueError(f"{path}: unsupported IDX dtype code {dtype_code} (only uint8 is used by MNIST-style sets)")
    shape = [int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 * (ndim + 1)).reshape(shape)


class IdxSource(ArraySource):
    """MNIST, FashionMNIST and KMNIST in torchvision's layout: ``<root>/<folder>/raw/*-idx?-ubyte[.gz]``.

    With ``download=True`` torchvision fetches the files into that very layout first.
    """

    TORCHVISION = {"MNIST": "MNIST", "FashionMNIST": "FashionMNIST", "KMNIST": "KMNIST"}

    def __init__(self, name: str, folder: str, root: str, download: bool = False) -> None:
        super().__init__()
        if folder not in self.TORCHVISION:
            raise ValueError(f"folder={folder!r} is not an IDX dataset; valid: {sorted(self.TORCHVISION)}")
        self.name, self.folder, self.root, self.download = name, folder, Path(root), download

    def _find(self, stem: str) -> Path | None:
        raw = self.root / self.folder / "raw"
        for cand in (raw / stem, raw / f"{stem}.gz"):
            if cand.is_file():
                return cand
        return None

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        prefix = "train" if split == "train" else "t10k"
        stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        paths = [self._find(s) for s in stems]
        if any(p is None for p in paths) and self.download:
            import torchvision

            getattr(torchvision.datasets, self.TORCHVISION[self.folder])(str(self.root), download=True)
            paths = [self._find(s) for s in stems]
        if any(p is None for p in paths):
            raise DatasetNotFoundError(
                f"{self.name}: {stems[0]}[.gz] / {stems[1]}[.gz] not found in {self.root / self.folder / 'raw'}. "
                f"Set paths.data_dir (or OOD_BENCH_DATA) to the folder that holds '{self.folder}/raw/', or "
                f"let torchvision fetch it (needs internet) with data.id.download=true or data.ood.download=true: "
                f"torchvision.datasets.{self.TORCHVISION[self.folder]}('{self.root}', download=True)."
            )
        return _read_idx(paths[0]), _read_idx(paths[1])


class ImageFolderSource(Source):
    """Images in class sub-folders: ``<root>/<folder>/<split>/<class>/*`` or, without split folders,
    ``<root>/<folder>/<class>/*`` (then a seeded split makes train/test; ``test_fraction=1`` makes it test-only,
    the usual case for an OOD set). A folder holding images directly is one class (label 0). Classes are sorted
    alphabetically, as in torchvision.

    A file that cannot be decoded fails with the dataset's name and the file (``on_bad_file="fail"``), or is
    skipped (``"skip"``): ``load`` then returns the decodable samples and ``skipped`` lists the files left out.
    """

    def __init__(
        self,
        name: str,
        folder: str,
        root: str,
        test_fraction: float = 1.0,
        split_seed: int = 0,
        hint: str = "",
        on_bad_file: str = "fail",
    ) -> None:
        if on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(f"on_bad_file={on_bad_file!r} is not valid; valid: {list(BAD_FILE_POLICIES)}")
        self.name, self.folder, self.root = name, folder, Path(root)
        self.test_fraction, self.split_seed, self.hint = test_fraction, split_seed, hint
        self.on_bad_file = on_bad_file
        self.skipped: list[Path] = []
        self._index: dict[str, tuple[list[Path], np.ndarray]] = {}

    @property
    def path(self) -> Path:
        return self.root / self.folder

    def _scan(self, base: Path) -> tuple[list[Path], np.ndarray]:
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        if not classes:  # images directly in the folder (e.g. LSUN/test/*.jpg): one class, label 0
            found = sorted(p for p in base.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if found:
                return found, np.zeros(len(found), dtype=np.int64)
        files: list[Path] = []
        labels: list[int] = []
        for label, cls in enumerate(classes):
            found = sorted(p for p in (base / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
        if not files:
            raise DatasetNotFoundError(f"{self.name}: no images ({', '.join(IMAGE_SUFFIXES)}) under {base}/<class>/")
        return files, np.asarray(labels, dtype=np.int64)

    def _get(self, split: str) -> tuple[list[Path], np.ndarray]:
        _check_split(split)
        if split in self._index:
            return self._index[split]
        if not self.path.is_dir():
            raise DatasetNotFoundError(
                f"{self.name}: folder {self.path} not found. Set paths.data_dir (or OOD_BENCH_DATA) to the folder "
                f"that holds '{self.folder}/'. {self.hint}".strip()
            )
        if (self.path / split).is_dir():
            self._index[split] = self._scan(self.path / split)
        elif any((self.path / s).is_dir() for s in SPLITS):
            raise DatasetNotFoundError(f"{self.name}: {self.path} has split folders but no '{split}/'")
        else:
            files, labels = self._scan(self.path)
            rng = np.random.default_rng(self.split_seed)
            is_test = rng.random(len(files)) < self.test_fraction
            for s, keep in (("test", is_test), ("train", ~is_test)):
                idx = np.flatnonzero(keep)
                self._index[s] = ([files[i] for i in idx], labels[idx])
        return self._index[split]

    def labels(self, split: str) -> np.ndarray:
        return self._get(split)[1]

    def _decode(self, file: Path) -> np.ndarray:
        try:
            with Image.open(file) as im:
                return np.asarray(im.convert("L") if im.mode in ("L", "I;16", "1") else im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise BadImageError(
                f"{self.name}: cannot decode {file} ({type(err).__name__}: {err}). Delete or replace the file, or "
                f"skip undecodable files with data.id.on_bad_file=skip / data.ood.on_bad_file=skip (the side that "
                f"reads {self.name}); skipped files are counted in the results row (id_files_skipped, "
                f"ood_files_skipped)."
            ) from err

    def load(self, split: str, indices: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
        files = self._get(split)[0]
        arrays, kept = [], []
        for i in indices:
            try:
                arrays.append(self._decode(files[int(i)]))
            except BadImageError as err:
                if self.on_bad_file == "fail":
                    raise
                log.warning("%s: skipping undecodable file %s (%s)", self.name, files[int(i)], err.__cause__)
                self.skipped.append(files[int(i)])
                continue
            kept.append(int(i))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DataError(f"{self.name}: images differ in size/channels {sorted(shapes)[:3]}; resize them first")
        images = _to_nchw_uint8(np.stack(arrays)) if arrays else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        return images, np.asarray(kept, dtype=np.int64)

    def images(self, split: str, indices: Sequence[int]) -> torch.Tensor:
        """The decoded images (with ``on_bad_file="skip"`` possibly fewer than ``indices``: see ``load``)."""
        return self.load(split, indices)[0]

    def probe(self, split: str, indices: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Read every file's header (size and mode) to check they share one shape; under ``on_bad_file="skip"``
        every file is decoded once (and dropped) to find the undecodable ones, which are left out."""
        files = self._get(split)[0]
        kept, shapes = [], {}
        for i in indices:
            file = files[int(i)]
            try:
                if self.on_bad_file == "skip":
                    arr = self._decode(file)
                    shape = (1 if arr.ndim == 2 else arr.shape[2], *arr.shape[:2])
                else:
                    try:
                        with Image.open(file) as im:
                            shape = (1 if im.mode in ("L", "I;16", "1") else 3, im.size[1], im.size[0])
                    except (UnidentifiedImageError, OSError, SyntaxError):
                        self._decode(file)  # raises BadImageError naming the file and the policy
                        raise
            except BadImageError as err:
                if self.on_bad_file == "fail":
                    raise
                log.warning("%s: skipping undecodable file %s (%s)", self.name, file, err.__cause__)
                self.skipped.append(file)
                continue
            shapes.setdefault(shape, file)
            kept.append(int(i))
        if len(shapes) > 1:
            raise DataError(f"{self.name}: images differ in size/channels {sorted(shapes)[:3]}; resize them first")
        shape = next(iter(shapes)) if shapes else (3, 1, 1)
        return np.asarray(kept, dtype=np.int64), tuple(int(v) for v in shape)


class NpzSource(ArraySource):
    """Arrays in ``<root>/<file>``: keys ``x_train, y_train, x_test, y_test`` (uint8 ``[N,H,W(,C)]``).

    The simplest way to bring your own data: ``np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)``.
    """

    def __init__(self, name: str, file: str, root: str) -> None:
        super().__init__()
        self.name, self.file = name, Path(root) / file

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if not self.file.is_file():
            raise DatasetNotFoundError(
                f"{self.name}: {self.file} not found. Save your arrays with "
                f"np.savez('{self.file}', x_train=..., y_train=..., x_test=..., y_test=...) or set paths.data_dir."
            )
        with np.load(self.file) as z:
            keys = (f"x_{split}", f"y_{split}")
            missing = [k for k in keys if k not in z]
            if missing:
                raise KeyError(f"{self.file} lacks {missing}; it has {sorted(z.files)}")
            x = z[keys[0]]
            if x.dtype != np.uint8:
                raise ValueError(f"{self.file}:{keys[0]} has dtype {x.dtype}; store images as uint8 in [0, 255]")
            return x, z[keys[1]]


class TorchvisionSource(ArraySource):
    """CIFAR-10/100, SVHN and CelebA through ``torchvision.datasets`` (their own on-disk layout).

    ``fallback_folder`` names an image-folder copy (``<root>/<fallback_folder>/<split>/<class>/``) used when
    torchvision's files are absent, e.g. the JPEG CIFAR-10 mirror in the offline data folder.
    """

    SPLIT_ARGS = {
        "CIFAR10": lambda s: {"train": s == "train"},
        "CIFAR100": lambda s: {"train": s == "train"},
        "SVHN": lambda s: {"split": s},
        "CelebA": lambda s: {"split": "train" if s == "train" else "test", "target_type": "identity"},
    }

    def __init__(
        self, name: str, dataset: str, root: str, download: bool = False, fallback_folder: str | None = None
    ) -> None:
        super().__init__()
        if dataset not in self.SPLIT_ARGS:
            raise ValueError(f"dataset={dataset!r} is not supported; valid: {sorted(self.SPLIT_ARGS)}")
        self.name, self.dataset, self.root, self.download = name, dataset, Path(root), download
        self.fallback = ImageFolderSource(name, fallback_folder, root, test_fraction=1.0) if fallback_folder else None
        self._use_fallback: bool | None = None
        self._tv_sets: dict[str, Any] = {}

    def _fallback_ready(self) -> bool:
        if self._use_fallback is None:
            self._use_fallback = False
            if self.fallback is not None and self.fallback.path.is_dir():
                try:
                    self._tv(SPLITS[1], download=False)
                except (RuntimeError, FileNotFoundError, OSError):
                    self._use_fallback = True
                    log.info("%s: torchvision files absent, using image folder %s", self.name, self.fallback.path)
        return self._use_fallback

    def _tv(self, split: str, download: bool):
        """The torchvision dataset of ``split``, opened once (the fallback probe's instance is reused)."""
        if split not in self._tv_sets:
            import torchvision

            cls = getattr(torchvision.datasets, self.dataset)
            from ood_bench import fast_dev_run

            if fast_dev_run.active():
                cls = fast_dev_run.unverified_torchvision(cls)
            self._tv_sets[split] = cls(str(self.root), download=download, **self.SPLIT_ARGS[self.dataset](split))
        return self._tv_sets[split]

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            ds = self._tv(split, download=self.download)
        except (RuntimeError, FileNotFoundError, OSError) as err:
            raise DatasetNotFoundError(
                f"{self.name}: torchvision.datasets.{self.dataset} files not found under {self.root} ({err}). "
                f"Set paths.data_dir (or OOD_BENCH_DATA) to the folder that holds them, or set "
                f"data.id.download=true or data.ood.download=true to let torchvision download them (needs internet)."
            ) from err
        if self.dataset in ("CIFAR10", "CIFAR100"):
            return np.asarray(ds.data), np.asarray(ds.targets)
        if self.dataset == "SVHN":
            return np.asarray(ds.data).transpose(0, 2, 3, 1), np.asarray(ds.labels)
        # CelebA: decode files (178x218); centre crop to 178x178 so all images share one shape.
        images = []
        for i in range(len(ds)):
            im = ds[i][0]
            w, h = im.size
            top = (h - w) // 2
            images.append(np.asarray(im.crop((0, top, w, top + w)).convert("RGB")))
        return np.stack(images), np.zeros(len(images), dtype=np.int64)

    def labels(self, split: str) -> np.ndarray:
        if self._fallback_ready():
            return self.fallback.labels(split)
        return super().labels(split)

    def images(self, split: str, indices: Sequence[int]) -> torch.Tensor:
        if self._fallback_ready():
            return self.fallback.images(split, indices)
        return super().images(split, indices)

    def probe(self, split: str, indices: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
        if self._fallback_ready():
            return self.fallback.probe(split, indices)
        return super().probe(split, indices)

    def describe(self) -> dict:
        d = super().describe()
        d["files"] = "image_folder:" + str(self.fallback.path) if self._fallback_ready() else "torchvision"
        return d


class ImageListSource(Source):
    """Images named in list files, one ``<relative path> <label>`` per line (OpenOOD's ``benchmark_imglist``
    format), relative to ``<root>/<image_root>``. Each image is resized (shorter side to ``resize``, bilinear) and
    centre-cropped to ``crop`` x ``crop`` as OpenOOD's test transform, so images of any size form one tensor.
    A list given as a relative path is looked up under ``root``. ``train_list: null`` makes a test-only set.
    """

    def __init__(
        self,
        name: str,
        root: str,
        test_list: str,
        train_list: str | None = None,
        image_root: str = "",
        resize: int = 256,
        crop: int = 224,
        hint: str = "",
    ) -> None:
        if crop > resize:
            raise ValueError(f"{name}: crop={crop} is larger than resize={resize}")
        self.name, self.root, self.image_root = name, Path(root), image_root
        self.lists = {"train": train_list, "test": test_list}
        self.resize, self.crop, self.hint = resize, crop, hint
        self._index: dict[str, tuple[list[str], np.ndarray]] = {}

    def _list_path(self, split: str) -> Path:
        ref = self.lists[split]
        if ref is None:
            raise DatasetNotFoundError(f"{self.name}: no {split} list configured (a test-only set)")
        path = Path(ref).expanduser()
        return path if path.is_absolute() else self.root / path

    def _get(self, split: str) -> tuple[list[str], np.ndarray]:
        _check_split(split)
        if split not in self._index:
            path = self._list_path(split)
            if not path.is_file():
                raise DatasetNotFoundError(
                    f"{self.name}: image list {path} not found. Set paths.data_dir (or OOD_BENCH_DATA) to the folder "
                    f"that holds it. {self.hint}".strip()
                )
            files, labels = [], []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    files.append(parts[0])
                    labels.append(int(parts[1]) if len(parts) > 1 else 0)
                except ValueError as err:
                    raise ValueError(f"{path}:{n}: expected '<path> <integer label>', got {line!r}") from err
            self._index[split] = (files, np.asarray(labels, dtype=np.int64))
        return self._index[split]

    def labels(self, split: str) -> np.ndarray:
        return self._get(split)[1]

    def _load(self, rel: str) -> np.ndarray:
        path = self.root / self.image_root / rel
        if not path.is_file():
            raise DatasetNotFoundError(f"{self.name}: image {path} (listed in the {self.name} list) not found")
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = self.resize / min(w, h)
            im = im.resize((max(self.crop, round(w * scale)), max(self.crop, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            return np.asarray(im.crop((left, top, left + self.crop, top + self.crop)))

    def images(self, split: str, indices: Sequence[int]) -> torch.Tensor:
        files = self._get(split)[0]
        arrays = [self._load(files[int(i)]) for i in indices]
        if not arrays:
            return torch.zeros(0, 3, self.crop, self.crop, dtype=torch.uint8)
        return _to_nchw_uint8(np.stack(arrays))
