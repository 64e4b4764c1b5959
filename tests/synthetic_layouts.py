"""A few synthetic images of every dataset the configs name, in each dataset's real on-disk layout.

``write_all(root)`` fills ``root`` (an ``OOD_BENCH_DATA`` folder) with the files the loaders of
``ood_bench/data/sources.py`` and ``ood_bench/data/anomaly.py`` read: CIFAR-10/100 pickles, SVHN ``.mat``, CelebA's
folder and annotation files, MNIST-family IDX files, the ODIN folders (LSUN, LSUN_resize, iSUN), Places365, DTD,
notMNIST, Tiny ImageNet, OpenOOD's image lists (ImageNet, Species, iNaturalist, OpenImage-O, ImageNet-O, TIN),
MVTec AD, VisA, magnetic tiles and KolektorSDD (``tests/anomaly_layouts.py``), at the datasets' real image sizes.
torchvision's CIFAR/SVHN/CelebA loaders also check official MD5 sums that synthetic files cannot match; under
``debug=fast_dev_run`` the suite skips that check (``ood_bench.fast_dev_run.unverified_torchvision``).
Used by ``scripts/fast_dev_run_all.py`` and ``tests/test_fast_dev_run.py``.
"""

from __future__ import annotations

import gzip
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly_layouts import write_mvtec, write_visa  # noqa: E402

N_TRAIN = 6  # per training split (fast_dev_run uses 4)
N_TEST = 4  # per test split (fast_dev_run uses 3)
MVTEC = [
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
]
VISA = [
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
]
OPENOOD_LARGE = {  # list file -> (image sub-folder, image size (w, h))
    "test_species.txt": ("species_sub", (400, 300)),
    "test_inaturalist.txt": ("inaturalist", (500, 375)),
    "test_openimage_o.txt": ("openimage_o", (640, 480)),
    "test_imagenet_o.txt": ("imagenet_o", (500, 333)),
}


def _rgb(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """``n`` smooth random colour images ``[n, h, w, 3]`` uint8 (a gradient plus noise)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 255 * np.stack([yy, xx, 1 - yy], -1)[None] * rng.random((n, 1, 1, 3))
    return np.clip(base + 40 * rng.random((n, h, w, 3)), 0, 255).astype(np.uint8)


def _save_all(images: np.ndarray, folder: Path, stem: str, suffix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, img in enumerate(images):
        path = folder / f"{stem}{i:05d}{suffix}"
        Image.fromarray(img).save(path)
        out.append(path)
    return out


def write_cifar(root: Path, hundred: bool, rng: np.random.Generator) -> None:
    """``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` or ``cifar-100-python/{train,test,meta}``."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    n_classes, key = (100, "fine_labels") if hundred else (10, "labels")

    def batch(n: int) -> dict:
        x = _rgb(rng, n, 32, 32).transpose(0, 3, 1, 2).reshape(n, -1)
        return {"data": x, key: [int(v) for v in rng.integers(0, n_classes, n)], "coarse_labels": [0] * n}

    files = {"train": N_TRAIN, "test": N_TEST} if hundred else {f"data_batch_{i}": 2 for i in range(1, 6)}
    if not hundred:
        files["test_batch"] = N_TEST
    for name, n in files.items():
        (folder / name).write_bytes(pickle.dumps(batch(n)))
    names = [f"class{i}" for i in range(n_classes)]
    meta = {"fine_label_names": names, "coarse_label_names": names[:20]} if hundred else {"label_names": names}
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta))


def write_svhn(root: Path, rng: np.random.Generator) -> None:
    """``train_32x32.mat`` / ``test_32x32.mat``: ``X`` [32, 32, 3, N], ``y`` [N, 1] in 1..10."""
    from scipy.io import savemat

    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = _rgb(rng, n, 32, 32).transpose(1, 2, 3, 0)
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})


def write_celeba(root: Path, rng: np.random.Generator) -> None:
    """``celeba/img_align_celeba/*.jpg`` (178 x 218) and the five annotation files torchvision reads."""
    base = root / "celeba"
    n = N_TRAIN + N_TEST
    files = [p.name for p in _save_all(_rgb(rng, n, 218, 178), base / "img_align_celeba", "", ".jpg")]
    part = [0] * N_TRAIN + [2] * N_TEST
    (base / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, part)))
    (base / "identity_CelebA.txt").write_text("".join(f"{f} {i + 1}\n" for i, f in enumerate(files)))
    tables = {
        "list_bbox_celeba.txt": ("image_id x_1 y_1 width height", lambda: "0 0 178 218"),
        "list_landmarks_align_celeba.txt": (" ".join(f"p{i}" for i in range(10)), lambda: " ".join(["80"] * 10)),
        "list_attr_celeba.txt": (" ".join(f"attr{i}" for i in range(40)), lambda: " ".join(["-1", "1"] * 20)),
    }
    for name, (header, row) in tables.items():
        body = "".join(f"{f} {row()}\n" for f in files)
        (base / name).write_text(f"{n}\n{header}\n{body}")


def _idx(arr: np.ndarray) -> bytes:
    head = (0x0800 + arr.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_idx(root: Path, folder: str, rng: np.random.Generator) -> None:
    """``<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (28 x 28 grey), torchvision's layout."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(_rgb(rng, n, 28, 28)[..., 0])))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(rng.integers(0, 10, n))))


def write_folders(root: Path, rng: np.random.Generator) -> None:
    """The image-folder OOD sets, at their released sizes."""
    _save_all(_rgb(rng, N_TEST, 36, 36), root / "LSUN" / "test", "", ".jpg")
    _save_all(_rgb(rng, N_TEST, 32, 32), root / "LSUN_resize" / "LSUN_resize", "", ".jpg")
    _save_all(_rgb(rng, N_TEST, 36, 36), root / "iSUN" / "iSUN_patches", "", ".jpeg")
    _save_all(_rgb(rng, N_TEST, 256, 256), root / "places365" / "test_256", "Places365_test_", ".jpg")
    for cls in ("banded", "braided"):
        _save_all(_rgb(rng, N_TEST, 32, 32), root / "textures-dtd10-jpeg32" / cls, f"{cls}_", ".jpg")
    for letter in "AB":
        _save_all(_rgb(rng, N_TEST, 28, 28)[..., 0], root / "notMNIST_small" / letter, "", ".png")
    _save_all(_rgb(rng, N_TEST, 64, 64), root / "tiny-imagenet-200" / "val" / "images", "val_", ".JPEG")
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for cls in ("airplane", "cat"):
            _save_all(_rgb(rng, n, 32, 32), root / "cifar10-jpeg" / split / cls, f"{cls}_", ".jpg")


def write_openood(root: Path, rng: np.random.Generator) -> None:
    """OpenOOD v1's ``benchmark_imglist/<id>/<list>.txt`` (``<path> <label>``) and the images they name."""
    lists = root / "benchmark_imglist"

    def write(list_file: Path, image_root: Path, sub: str, n: int, size: tuple[int, int], suffix: str) -> None:
        w, h = size
        paths = _save_all(_rgb(rng, n, h, w), image_root / sub, "img_", suffix)
        list_file.parent.mkdir(parents=True, exist_ok=True)
        list_file.write_text("".join(f"{p.relative_to(image_root)} {i % 5}\n" for i, p in enumerate(paths)))

    large = root / "images_largescale"
    write(lists / "imagenet" / "train_imagenet.txt", large, "imagenet_1k/train", N_TRAIN, (500, 375), ".JPEG")
    write(lists / "imagenet" / "test_imagenet.txt", large, "imagenet_1k/val", N_TEST, (500, 375), ".JPEG")
    for name, (sub, size) in OPENOOD_LARGE.items():
        write(lists / "imagenet" / name, large, sub, N_TEST, size, ".jpg")
    write(lists / "cifar10" / "test_tin.txt", root / "images_classic", "tin/test", N_TEST, (64, 64), ".JPEG")


def write_anomaly(root: Path) -> None:
    """MVTec AD (15 categories, 900 px PNG), VisA (12 categories, 1500 x 1000 JPG), magnetic tiles, KolektorSDD:
    one or two training shots, and normal and defective test images with masks."""
    two = {"crack": 1, "scratch": 1}
    for i, cat in enumerate(MVTEC):
        mode = "L" if cat in ("grid", "screw", "zipper") else "RGB"
        write_mvtec(root / "mvtec_anomaly_detection", cat, 2, 2, two, (900, 900), mode, seed=i)
    write_visa(root, tuple(VISA), size=(1000, 1500))
    write_mvtec(root, "magnetic_tile", 2, 2, {"MT_Blowhole": 1, "MT_Crack": 1}, (230, 380), "L", seed=90)
    write_mvtec(root, "kolektor_sdd", 2, 2, {"defect": 2}, (1260, 500), "L", seed=91)


def write_all(root: Path, seed: int = 0) -> Path:
    """Every dataset above into ``root``; a marker file makes a second call a no-op."""
    root = Path(root)
    marker = root / ".synthetic_layouts_done"
    if marker.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_cifar(root, False, rng)
    write_cifar(root, True, rng)
    write_svhn(root, rng)
    write_celeba(root, rng)
    for folder in ("MNIST", "FashionMNIST", "KMNIST"):
        write_idx(root, folder, rng)
    write_folders(root, rng)
    write_openood(root, rng)
    write_anomaly(root)
    marker.write_text("written by tests/synthetic_layouts.py\n")
    return root


if __name__ == "__main__":
    print(write_all(Path(sys.argv[1])))
