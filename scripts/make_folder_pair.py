"""Write a synthetic image-folder OOD pair for memory measurements (never inside the repository).

``python scripts/make_folder_pair.py /tmp/stream_pair --n-train 20000 --size 128`` writes

    <out>/synth_id/train/<class>/*.jpg    ID training images (``--n-train``, two classes)
    <out>/synth_id/test/<class>/*.jpg     ID test images (``--n-test``)
    <out>/synth_ood/test/0/*.jpg          OOD test images (``--n-test``)
    <out>/conf/data/synth_folder.yaml     a data config for ``python run.py --config-dir <out>/conf data=synth_folder``

Images are smooth random colour fields (ID) or stripes (OOD) at ``--size`` px, JPEG quality 90, seeded. The data
config sets ``image_size`` to ``--size`` and ``n_train: null`` (all training images).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _id_image(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))


def _ood_image(rng: np.random.Generator, size: int) -> np.ndarray:
    period = int(rng.integers(4, 16))
    stripes = ((np.arange(size) // period) % 2 * 255).astype(np.uint8)
    img = np.broadcast_to(stripes[None, :, None], (size, size, 3)).copy()
    return img if rng.random() < 0.5 else img.transpose(1, 0, 2).copy()


def write(out: Path, n_train: int, n_test: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    plan = [
        (out / "synth_id" / "train", n_train, _id_image),
        (out / "synth_id" / "test", n_test, _id_image),
        (out / "synth_ood" / "test", n_test, _ood_image),
    ]
    for folder, n, draw in plan:
        classes = 2 if "synth_id" in str(folder) else 1
        for c in range(classes):
            (folder / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(draw(rng, size)).save(folder / str(i % classes) / f"{i:06d}.jpg", quality=90)
    conf = out / "conf" / "data"
    conf.mkdir(parents=True, exist_ok=True)
    side = "{{_target_: ood_bench.data.ImageFolderSource, name: {0}, folder: {0}, root: {1}, test_fraction: 1.0}}"
    (conf / "synth_folder.yaml").write_text(
        "# synthetic image-folder pair written by scripts/make_folder_pair.py\n"
        "defaults:\n  - _defaults\n  - _self_\n\n"
        f"name: synth_folder\nimage_size: {size}\nchannels: 3\nn_train: null\n"
        f"id: {side.format('synth_id', out)}\nood: {side.format('synth_ood', out)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (outside the repository, e.g. /tmp/stream_pair)")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    if a.out.resolve().is_relative_to(repo):
        p.error(f"{a.out} lies inside the repository; write it elsewhere (e.g. /tmp/stream_pair)")
    write(a.out.resolve(), a.n_train, a.n_test, a.size, a.seed)
    print(f"wrote {a.n_train} + {a.n_test} ID and {a.n_test} OOD images at {a.size}px under {a.out}")
    print(f"use: python run.py --config-dir {a.out.resolve() / 'conf'} data=synth_folder ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
