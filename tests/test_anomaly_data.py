"""Anomaly data: sample tables of the three layouts (written here), masks, aspect handling, clear errors for missing,
mismatched and corrupt files, and the protocol's draws (stratified test subset, seeded nested shots)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anomaly_layouts import save, write_folder, write_mvtec, write_visa
from PIL import Image

from ood_bench.data import DatasetNotFoundError
from ood_bench.data.anomaly import (
    CorruptFileError,
    DatasetLayoutError,
    FolderLayout,
    MVTecLayout,
    VisaLayout,
    draw_shots,
    load_category,
    load_images,
    load_masks,
    load_shots,
    select_test,
)

GEOMETRY = dict(image_size=32, aspect="resize", channels=3)


def test_mvtec_layout_sample_table(tmp_path):
    base = write_mvtec(tmp_path, "widget", n_train=6, n_good=5, defects={"scratch": 4, "hole": 3})
    table = MVTecLayout("widget", str(tmp_path)).samples()
    assert len(table) == 6 + 5 + 4 + 3
    assert table.groupby(["split", "defect"]).size().to_dict() == {
        ("test", "good"): 5,
        ("test", "hole"): 3,
        ("test", "scratch"): 4,
        ("train", "good"): 6,
    }
    assert (table["label"] == (table["defect"] != "good")).all()
    bad = table[table["label"] == 1]
    for img, msk in zip(bad["image_path"], bad["mask_path"]):  # matched by stem, in the defect's mask folder
        assert msk == str(base / "ground_truth" / img.split("/")[-2] / (img.split("/")[-1][:-4] + "_mask.png"))
    assert (table.loc[table["label"] == 0, "mask_path"] == "").all()


def test_masks_follow_the_image_geometry(tmp_path):
    """A 40x80 image with a mark in its right half: resize keeps it on the right, centre crop cuts it away."""
    img = np.full((40, 80), 100, np.uint8)
    mask = np.zeros((40, 80), np.uint8)
    mask[10:20, 66:76] = 255
    img[mask > 0] = 250
    ip, mp = save(img, tmp_path / "a.png"), save(mask, tmp_path / "a_mask.png")
    resized = load_masks([str(ip)], [str(mp)], 20, "resize")[0]
    assert resized.dtype == np.uint8 and set(np.unique(resized)) == {0, 1}
    assert resized[:, 15:].sum() == resized.sum() > 0  # the defect stays in the right quarter
    assert load_masks([str(ip)], [str(mp)], 20, "center_crop")[0].sum() == 0  # the centred 40x40 square misses it
    x = load_images([str(ip)], 20, "resize", 3)
    assert x.shape == (1, 3, 20, 20) and torch.equal(x[0, 0], x[0, 2])  # grey repeated to RGB
    assert x[0, 0][resized == 1].mean() > x[0, 0][resized == 0].mean() + 0.3
    assert load_images([str(ip)], 20, "center_crop", 1).shape == (1, 1, 20, 20)
    with pytest.raises(ValueError, match=r"data\.aspect='pad'.*resize.*center_crop"):
        load_images([str(ip)], 20, "pad", 3)


def test_visa_layout_from_split_csv(tmp_path):
    write_visa(tmp_path, ("candle", "pcb1"))
    src = VisaLayout("pcb1", str(tmp_path))
    table = src.samples()
    assert len(table) == 8 and set(table["image_path"].str.split("/").str[-5]) == {"pcb1"}
    assert table.groupby(["split", "label"]).size().to_dict() == {("test", 0): 2, ("test", 1): 3, ("train", 0): 3}
    cat = load_category(src, 0, n_test=None, seed=0, **GEOMETRY)
    assert cat.has_masks and set(np.unique(cat.test_masks)) == {0, 1}  # mask values 1 and 2 binarised
    assert cat.test_masks[cat.test_labels == 1].reshape(3, -1).sum(1).min() > 0
    with pytest.raises(DatasetLayoutError, match=r"no rows for category 'nope'.*candle.*pcb1"):
        VisaLayout("nope", str(tmp_path)).samples()


def test_visa_mask_with_another_stem_is_refused(tmp_path):
    base = write_visa(tmp_path, ("candle",))
    csv = base / "split_csv" / "1cls.csv"
    csv.write_text(csv.read_text().replace("Masks/Anomaly/001.png", "Masks/Anomaly/002.png"))
    with pytest.raises(DatasetLayoutError, match=r"Anomaly/001\.JPG.*002\.png.*stems differ"):
        VisaLayout("candle", str(tmp_path)).samples()


@pytest.mark.parametrize("normal_test", [False, True])
def test_folder_layout(tmp_path, normal_test):
    write_folder(tmp_path, with_masks=True, normal_test=normal_test)
    src = FolderLayout("parts", str(tmp_path), "parts", test_fraction=0.3, split_seed=1)
    table = src.samples()
    n_test_good = 3 if normal_test else int(((table["split"] == "test") & (table["label"] == 0)).sum())
    assert ((table["split"] == "test") & (table["label"] == 0)).sum() == n_test_good > 0
    assert (table["split"] == "train").sum() == (10 if normal_test else 10 - n_test_good)
    assert sorted(set(table.loc[table["label"] == 1, "defect"])) == ["dent", "stain"]
    assert load_category(src, 0, n_test=None, seed=0, **GEOMETRY).has_masks
    if not normal_test:  # the seeded split of normal/ is reproducible
        assert FolderLayout("parts", str(tmp_path), "parts", split_seed=1).samples().equals(table)


def test_folder_layout_without_masks_gives_image_metrics_only(tmp_path):
    write_folder(tmp_path, with_masks=False)
    cat = load_category(FolderLayout("parts", str(tmp_path), "parts"), 0, n_test=None, seed=0, **GEOMETRY)
    assert not cat.has_masks and cat.test_masks.sum() == 0


def test_missing_category_names_the_layout(tmp_path):
    src = MVTecLayout("bottle", str(tmp_path / "mvtec_anomaly_detection"), archive="mvtec_ad")
    with pytest.raises(DatasetNotFoundError) as err:
        src.samples()
    msg = str(err.value)
    assert str(tmp_path / "mvtec_anomaly_detection" / "bottle") in msg and "train/good" in msg
    assert "data.download=true" in msg and "mvtec_anomaly_detection.tar.xz" in msg


def test_image_without_mask_and_orphan_mask_are_errors(tmp_path):
    base = write_mvtec(tmp_path, "widget")
    (base / "ground_truth" / "hole" / "001_mask.png").rename(base / "ground_truth" / "hole" / "009_mask.png")
    with pytest.raises(DatasetLayoutError) as err:
        MVTecLayout("widget", str(tmp_path)).samples()
    msg = str(err.value)
    assert "widget/hole" in msg and "test/hole/001.png" in msg and "ground_truth/hole/009_mask.png" in msg


def test_missing_mask_folder_is_an_error(tmp_path):
    base = write_mvtec(tmp_path, "widget")
    for f in (base / "ground_truth" / "hole").iterdir():
        f.unlink()
    (base / "ground_truth" / "hole").rmdir()
    with pytest.raises(DatasetLayoutError, match=r"mask folder .*ground_truth/hole.*'hole' images is missing"):
        MVTecLayout("widget", str(tmp_path)).samples()


def test_corrupt_mask_and_image_name_the_file(tmp_path):
    base = write_mvtec(tmp_path, "widget")
    bad_mask = base / "ground_truth" / "scratch" / "002_mask.png"
    bad_mask.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    src = MVTecLayout("widget", str(tmp_path))
    with pytest.raises(CorruptFileError, match=rf"cannot decode mask {bad_mask}"):
        load_category(src, 0, n_test=None, seed=0, **GEOMETRY)
    bad_image = base / "train" / "good" / "003.png"
    bad_image.write_bytes((base / "train" / "good" / "000.png").read_bytes()[:60])  # truncated
    with pytest.raises(CorruptFileError, match=rf"cannot decode image {bad_image}"):
        load_images([str(bad_image)], 32, "resize", 3)


def test_mask_of_another_size_is_an_error(tmp_path):
    base = write_mvtec(tmp_path, "widget", size=(32, 32))
    Image.new("L", (16, 16), 255).save(base / "ground_truth" / "hole" / "000_mask.png")
    with pytest.raises(DatasetLayoutError, match=r"000_mask\.png is 16x16 but its image .*000\.png is 32x32"):
        load_category(MVTecLayout("widget", str(tmp_path)), 0, n_test=None, seed=0, **GEOMETRY)


# ---------------------------------------------------------------------------------------------------------------
# Protocol draws
# ---------------------------------------------------------------------------------------------------------------


def test_test_subset_is_stratified_and_seeded(tmp_path):
    write_mvtec(tmp_path, "widget", n_good=20, defects={"a": 12, "b": 5, "c": 3})
    table = MVTecLayout("widget", str(tmp_path)).samples()
    rows = select_test(table, 10, seed=3)
    assert len(rows) == 10 and len(set(rows.tolist())) == 10 and (table["split"].to_numpy()[rows] == "test").all()
    counts = table["defect"].to_numpy()[rows]
    # quotas 10 * (20, 12, 5, 3) / 40 = 5, 3, 1.25, 0.75: floors 5, 3, 1, 0 and the one left goes to c (largest rest)
    assert {d: int((counts == d).sum()) for d in ("good", "a", "b", "c")} == {"good": 5, "a": 3, "b": 1, "c": 1}
    assert np.array_equal(rows, select_test(table, 10, seed=3))
    assert not np.array_equal(rows, select_test(table, 10, seed=4))
    assert len(select_test(table, None, seed=0)) == len(select_test(table, 1000, seed=0)) == 40


def test_shots_are_seeded_nested_and_named(tmp_path):
    write_mvtec(tmp_path, "widget", n_train=12)
    src = MVTecLayout("widget", str(tmp_path))
    table = src.samples()
    one, four = draw_shots(table, 1, 5), draw_shots(table, 4, 5)
    assert one[0] == four[0] and len(set(four.tolist())) == 4  # nested: the 1-shot image is the first of 4
    assert (table["split"].to_numpy()[four] == "train").all()
    assert np.array_equal(four, draw_shots(table, 4, 5))
    draws = {tuple(draw_shots(table, 4, s).tolist()) for s in range(6)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match=r"data\.k_shot=13 is more than the 12"):
        draw_shots(table, 13, 0)
    cat = load_category(src, 0, n_test=8, seed=0, **GEOMETRY)
    x, rows = load_shots(cat, 2, 7, **GEOMETRY)
    assert x.shape == (2, 3, 32, 32)
    assert all(f.startswith("train/good/") and (tmp_path / "widget" / f).is_file() for f in cat.files(rows))
    # the test subset does not depend on the shots
    again = load_category(src, 0, n_test=8, seed=0, **GEOMETRY)
    assert np.array_equal(cat.test_rows, again.test_rows) and torch.equal(cat.test_images, again.test_images)
