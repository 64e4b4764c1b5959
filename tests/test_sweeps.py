"""Every experiment overlay is executed, not only composed (lightning-hydra-template's tests/test_sweeps.py).

For each ``conf/experiment/*.yaml`` (found at collection time, so new overlays are covered) the test writes small
datasets in every layout the overlay's sweep reads, then runs ``python run.py -m experiment=<name> debug=default``
with tiny model settings for the overlay's method, and checks that every cell of the sweep completed.

torchvision's own dataset files carry checksums that cannot be faked, so the test runs on a copy of ``conf/``
in which the torchvision datasets (CIFAR-10/100, SVHN, CelebA) read image folders of the same name; every other
source (image folders, IDX files, npz, digits) reads its real layout.
"""

from __future__ import annotations

import gzip
import itertools
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from anomaly_layouts import write_mvtec
from conftest import CONF_DIR, compose_with_hydra
from omegaconf import OmegaConf
from PIL import Image
from test_run import read_csv, run_cli

pytestmark = pytest.mark.slow

# Settings that keep each method tiny (unknown methods run with debug=default alone: add theirs here).
TINY_MODEL = [
    "model.unet.block_out_channels=[8,16]",
    "model.unet.layers_per_block=1",
    "model.unet.down_block_types=[DownBlock2D,DownBlock2D]",
    "model.unet.up_block_types=[UpBlock2D,UpBlock2D]",
    "model.unet.norm_num_groups=4",
    "model.unet.attention_head_dim=8",
    "model.train.steps=3",
    "model.train.batch_size=8",
    "model.train.warmup_steps=1",
]
TINY_BY_METHOD = {
    "lmd": [
        *TINY_MODEL,
        "method.reps=2",
        "method.steps=2",
        "figures.inpaint_images=1",
    ],
    "dlsr": [
        "method.encoder_weights=none",  # seeded random encoder: EfficientNet-B4 weights are not here
        "method.input_size=32",
        "method.width=32",
        "method.num_blocks=1",
        "method.time_embed_dim=16",
        "method.epochs=2",
        "method.early_epoch=1",
        "method.train_batch_size=32",
        "method.precision=bf16",  # the overlays' fp16 test pass needs CUDA; bf16 autocast runs it on CPU
    ],
    # the CIFAR ResNets load their checkpoints from ../shared/weights; the diffusion model is trained tiny
    "diffguard": [*TINY_MODEL, "method.steps=4", "method.inversion_steps=2", "method.batch_size=16"],
}
# Overlays not run here, and why (the first three run where their downloads are).
NOT_RUN_HERE = {
    "diffguard_table2": "needs guided-diffusion's ImageNet 256 UNet and torchvision's ResNet-50 weights (downloads)",
    "anomalysd_mvtec_1shot": "needs Stable-Diffusion inpainting weights (a download)",
    "anomalysd_visa_1shot": "needs Stable-Diffusion inpainting weights (a download)",
    "anomalysd_cpu": "its cells are full few-shot fine-tuning runs; tests/test_anomalysd.py runs the same runner path "
    "on a tiny stack",
}
TORCHVISION_TARGET = "ood_bench.data.TorchvisionSource"
N_CLASSES, PER_CLASS = 10, 8


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def sweep_cells(name: str) -> list[list[str]]:
    """The overrides of every cell of the overlay's sweep (the basic sweeper's cartesian product)."""
    params = compose_with_hydra([f"experiment={name}"]).hydra.sweeper.params or {}
    keys = list(params)
    values = [[v.strip() for v in str(params[k]).split(",")] for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*values)]


# ---------------------------------------------------------------------------------------------------------------
# Small datasets in the real on-disk layouts
# ---------------------------------------------------------------------------------------------------------------


def _images(n: int, size: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def write_image_folder(path: Path, size: int = 32, channels: int = 3) -> None:
    """``<path>/{train,test}/<class>/*.png``."""
    for split, seed in (("train", 0), ("test", 1)):
        images = _images(N_CLASSES * PER_CLASS, size, channels, seed)
        for i, img in enumerate(images):
            folder = path / split / f"class{i % N_CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")


def write_image_list(data_dir: Path, source_cfg: dict) -> None:
    """OpenOOD-style ``<path> <label>`` lists (train and test where configured) and the images they name, small
    enough that the 256 -> 224 resize-and-crop of the real configs stays cheap."""
    for split, seed in (("train", 0), ("test", 1)):
        ref = source_cfg.get(f"{split}_list")
        if not ref:
            continue
        images = _images(N_CLASSES * PER_CLASS, 32, 3, seed)
        lines = []
        for i, img in enumerate(images):
            rel = f"{source_cfg['name']}/{split}/{i}.png"
            target = data_dir / source_cfg.get("image_root", "") / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(target)
            lines.append(f"{rel} {i % N_CLASSES}")
        listed = data_dir / ref
        listed.parent.mkdir(parents=True, exist_ok=True)
        listed.write_text("\n".join(lines) + "\n")


def write_idx(path: Path) -> None:
    """MNIST-style ``raw/`` files (gzip-compressed, as the official downloads)."""
    raw = path / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, seed in (("train", 0), ("t10k", 1)):
        n = N_CLASSES * PER_CLASS
        images = _images(n, 28, 1, seed)
        labels = (np.arange(n) % N_CLASSES).astype(np.uint8)
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x0803, n, 28, 28) + images.tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x0801, n) + labels.tobytes())


def provide_dataset(source_cfg: dict, data_dir: Path, conf_copy: Path) -> None:
    """Write small data for one dataset config (``conf/dataset/<name>.yaml`` as composed)."""
    target = source_cfg["_target_"]
    if target.endswith("DigitsSource"):
        return
    if target == TORCHVISION_TARGET:  # read an image folder of the same name instead (see the module docstring)
        folder = f"{source_cfg['name']}-fake"
        replacement = {"_target_": "ood_bench.data.ImageFolderSource", "name": source_cfg["name"], "folder": folder}
        replacement["root"] = "${paths.data_dir}"
        (conf_copy / "dataset" / f"{source_cfg['name']}.yaml").write_text(yaml.safe_dump(replacement))
        if not (data_dir / folder).exists():
            write_image_folder(data_dir / folder)
    elif target.endswith("ImageFolderSource"):
        if not (data_dir / source_cfg["folder"]).exists():
            write_image_folder(data_dir / source_cfg["folder"], size=28 if "mnist" in source_cfg["name"] else 32)
    elif target.endswith("IdxSource"):
        if not (data_dir / source_cfg["folder"]).exists():
            write_idx(data_dir / source_cfg["folder"])
    elif target.endswith("ImageListSource"):
        if not (data_dir / source_cfg["test_list"]).exists():
            write_image_list(data_dir, source_cfg)
    elif target.endswith("MVTecLayout"):
        if not (data_dir / source_cfg["folder"]).exists():
            write_mvtec(data_dir, source_cfg["folder"], size=(32, 32))
    elif target.endswith("NpzSource"):
        x, y = _images(40, 32, 3, 0), np.arange(40) % N_CLASSES
        np.savez(data_dir / source_cfg["file"], x_train=x, y_train=y, x_test=x, y_test=y)
    else:
        pytest.fail(f"no small-data writer for {target}: add one to tests/test_sweeps.py")


def dataset_sources(node) -> list[dict]:
    """Every dataset source config (a node with ``_target_``) in a composed ``data`` config, whatever its layout."""
    if isinstance(node, dict):
        if "_target_" in node:
            return [node]
        return [s for v in node.values() for s in dataset_sources(v)]
    if isinstance(node, list):
        return [s for v in node for s in dataset_sources(v)]
    return []


@pytest.mark.parametrize("name", experiments())
def test_experiment_runs_every_cell(name, tmp_path):
    if name in NOT_RUN_HERE:
        pytest.skip(f"experiment={name}: {NOT_RUN_HERE[name]}")
    cells = sweep_cells(name)
    method = compose_with_hydra([f"experiment={name}"]).method.name
    conf_copy = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf_copy)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for cell in cells:
        data_cfg = OmegaConf.to_container(compose_with_hydra([f"experiment={name}", *cell]).data, resolve=False)
        for source in dataset_sources(data_cfg):
            provide_dataset(source, data_dir, conf_copy)

    args = [
        "-cp",
        str(conf_copy),
        "-m",
        f"experiment={name}",
        "debug=default",
        *TINY_BY_METHOD.get(method, []),
        "threads=1",
        f"paths.data_dir={data_dir}",
        *[f"paths.{k}_dir={tmp_path / k}" for k in ("results", "cache", "log")],
    ]
    run_cli(args, timeout=1800)
    rows = read_csv(tmp_path / "results" / "runs.csv")
    assert len(rows) == len(cells), f"{len(rows)} of {len(cells)} cells completed"
    done = list((tmp_path / "results").glob("*/*/*/DONE"))
    assert len(done) == len(cells)
    assert not list((tmp_path / "results").rglob("FAILED"))
