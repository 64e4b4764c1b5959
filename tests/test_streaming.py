"""Streaming data: lazy splits give the in-memory tensors bit for bit, and every method scores them identically."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_OVERRIDES
from PIL import Image

from ood_bench.data import (
    DigitsSource,
    ImageFolderSource,
    ImageSet,
    build_pair,
    iter_batches,
    select_rows,
    transforms,
)
from ood_bench.utils import tensor_fingerprint


def _digits_pair(channels: int = 3, num_workers: int = 0):
    src = DigitsSource()
    return build_pair(
        "digits",
        src,
        src,
        image_size=16,
        channels=channels,
        n_train=70,
        n_id_test=23,
        n_ood_test=None,
        id_classes=[0, 1, 2, 3, 4],
        ood_classes=[5, 6, 7, 8, 9],
        num_workers=num_workers,
    )


def _folder(tmp_path: Path, n: int = 13, size: int = 20) -> ImageFolderSource:
    """An image folder of ``n`` random RGB PNGs in two classes (a real decode path)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = tmp_path / "pngs" / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(cls / f"{i:03d}.png")
    return ImageFolderSource("pngs", "pngs", str(tmp_path), test_fraction=0.5)


def test_lazy_rows_equal_the_in_memory_tensor_bit_for_bit() -> None:
    """Any batching of the lazy split equals main's path: the whole split decoded, then resized in one piece."""
    pair = _digits_pair(channels=3)
    src = DigitsSource()
    for split, name in ((pair.id_train, "train"), (pair.id_test, "test"), (pair.ood_test, "test")):
        images = split.images
        assert isinstance(images, ImageSet) and images.shape == (len(split), 3, 16, 16)
        ref = transforms.prepare(src.images(name, split.indices), channels=3, size=16, via=8)  # main's build_pair
        assert torch.equal(images.materialize(), ref)
        for bs in (1, 7, 64):
            assert torch.equal(torch.cat(list(iter_batches(images, bs))), ref)
        idx = torch.tensor([5, 0, 5, len(split) - 1])  # random draws with repeats, as diffusion training makes
        assert torch.equal(images[idx], ref[idx])
        assert torch.equal(images[3], ref[3]) and torch.equal(images[-2:], ref[-2:])
        assert images[:0].shape == (0, 3, 16, 16)
        # the content hash (cache keys) is the materialised tensor's
        assert tensor_fingerprint(images) == tensor_fingerprint(ref)
    with pytest.raises(IndexError, match="out of range"):
        pair.id_test.images[[len(pair.id_test)]]


def test_dataloader_workers_give_the_same_batches(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    kw = dict(image_size=16, channels=3, n_train=None, n_id_test=None, n_ood_test=None, resize_protocol="direct")
    serial = build_pair("f", src, src, **kw)
    parallel = build_pair("f", src, src, num_workers=2, **kw)
    for key in ("id_train", "id_test"):
        a = list(getattr(serial, key).images.batches(3))
        b = list(getattr(parallel, key).images.batches(3))
        assert len(a) == len(b) > 1
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        raw = src.images("train" if key == "id_train" else "test", getattr(serial, key).indices)
        assert torch.equal(torch.cat(b), transforms.prepare(raw, channels=3, size=16, via=16))


def test_image_folder_pair_decodes_nothing_until_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the pair reads file headers only; a batch decodes just its rows."""
    src = _folder(tmp_path)
    decoded: list[Path] = []
    real = ImageFolderSource._decode
    monkeypatch.setattr(ImageFolderSource, "_decode", lambda self, f: decoded.append(f) or real(self, f))
    pair = build_pair("f", src, src, image_size=16, channels=1, n_train=None, n_id_test=None, n_ood_test=None)
    assert decoded == [] and pair.meta["native_sizes"] == [20]
    x = pair.id_train.images[1:3]
    assert x.shape == (2, 1, 16, 16) and len(decoded) == 2


def test_subset_keeps_source_indices_and_rows() -> None:
    """``Split.subset`` (what shard selection builds on): rows and source indices of the chosen positions."""
    pair = _digits_pair(channels=1)
    full = pair.ood_test
    pos = np.array([9, 2, 4])
    sub = full.subset(pos)
    assert np.array_equal(sub.indices, full.indices[pos]) and np.array_equal(sub.labels, full.labels[pos])
    assert torch.equal(sub.images[:], full.images[pos])
    mem = full.materialize().subset(pos)
    assert torch.equal(mem.images, sub.images[:]) and np.array_equal(mem.indices, sub.indices)
    block = select_rows(full.images, slice(3, 8))  # a shard's block stays lazy
    assert isinstance(block, ImageSet) and np.array_equal(block.indices, full.indices[3:8])
    assert torch.equal(block[:], full.images[3:8]) and torch.equal(select_rows(mem.images, [2, 0]), mem.images[[2, 0]])


def test_runtime_data_keys_are_validated_and_left_out_of_the_hash() -> None:
    from omegaconf import OmegaConf

    from ood_bench.tasks.ood import OodTask

    base = {"resize_protocol": "common_min", "n_train": None, "n_id_test": 5, "n_ood_test": 5, "id": {}, "ood": {}}
    task = OodTask()
    a = task.data_identity(OmegaConf.create({**base, "num_workers": 0, "in_memory": False}))
    b = task.data_identity(OmegaConf.create({**base, "num_workers": 4, "in_memory": True}))
    assert a == b == task.data_identity(OmegaConf.create(base))
    from ood_bench.tasks.bench import BenchTask

    for validating in (task, BenchTask()):  # both ID-vs-OOD task families check the same runtime keys
        with pytest.raises(ValueError, match=r"data.num_workers=-1 is not valid"):
            validating.validate(OmegaConf.create({**base, "num_workers": -1}))
        with pytest.raises(ValueError, match=r"data.in_memory='yes' is not valid"):
            validating.validate(OmegaConf.create({**base, "in_memory": "yes"}))
    with pytest.raises(ValueError, match=r"data.num_workers=-1 is not valid"):
        ImageSet(DigitsSource(), "test", [0], raw_shape=(1, 8, 8), channels=1, size=8, via=8, num_workers=-1)


# ---------------------------------------------------------------------------------------------------------------
# Every OOD method: streaming vs in-memory, each in its own cache (nothing is shared), same scores bit for bit
# ---------------------------------------------------------------------------------------------------------------

_CLASSIFIER = ["classifier.width=8", "classifier.train.steps=10"]
METHOD_RUNS = {
    "lmd": ["method=lmd_mse", *TINY_MODEL_OVERRIDES, "method.reps=2", "method.steps=4", "data.num_workers=1"],
    "dlsr": [
        "method=dlsr",
        "debug=default",
        "method.encoder_weights=none",
        "method.input_size=32",
        "method.width=32",
        "method.num_blocks=1",
        "method.time_embed_dim=16",
        "method.epochs=2",
    ],
    "diffguard": [
        "method=diffguard",
        *TINY_MODEL_OVERRIDES,
        *_CLASSIFIER,
        "method.steps=10",
        "method.inversion_steps=3",
    ],
    "msp": ["method=msp", "debug=default", *_CLASSIFIER],
    "mls": ["method=mls", "debug=default", *_CLASSIFIER],
    "ebo": ["method=ebo", "debug=default", *_CLASSIFIER],
}


def _scores(hydra_conf, tmp_path: Path, overrides: list[str]) -> tuple[dict, list[dict[str, str]]]:
    from ood_bench.runner import run

    cfg = hydra_conf([*overrides, "figures.enabled=false", "method.batch_size=5"], tmp_path)
    record = run(cfg)
    (scores,) = (tmp_path / "results").rglob("scores.csv")
    with open(scores, newline="") as f:
        return record, list(csv.DictReader(f))


@pytest.mark.parametrize("method", sorted(METHOD_RUNS))
def test_streaming_scores_equal_in_memory_scores(hydra_conf, tmp_path: Path, method: str) -> None:
    overrides = METHOD_RUNS[method]
    rec_mem, mem = _scores(hydra_conf, tmp_path / "memory", [*overrides, "data.in_memory=true"])
    rec_lazy, lazy = _scores(hydra_conf, tmp_path / "stream", overrides)
    assert rec_mem["config_hash"] == rec_lazy["config_hash"]  # how images are read is not part of the setting
    assert len(mem) == len(lazy) == rec_mem["n_id"] + rec_mem["n_ood"] > 0
    assert mem == lazy  # every per-sample column, as written (full float repr)
    assert rec_mem["auroc"] == rec_lazy["auroc"]
