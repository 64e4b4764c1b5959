"""Dataset sources on the real offline data and on small folders written here; pair building and resizing."""

from __future__ import annotations

import gzip
import hashlib
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

from ood_bench.data import (
    DatasetNotFoundError,
    DigitsSource,
    IdxSource,
    ImageFolderSource,
    NpzSource,
    TorchvisionSource,
    build_pair,
)

# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    root = shared_path("MNIST", "raw").parents[1]
    return IdxSource("mnist", "MNIST", str(root))


@pytest.fixture(scope="module")
def digits():
    return DigitsSource()


def _write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def npz32(tmp_path):
    """A 32x32 greyscale npz set: test images 0 and 1 constant, 2 and 3 random."""
    rng = np.random.default_rng(0)
    x_test = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
    x_test[0] = 77
    x_test[1] = 200
    x_train = rng.integers(0, 256, (6, 32, 32), dtype=np.uint8)
    np.savez(
        tmp_path / "set32.npz", x_train=x_train, y_train=np.arange(6) % 2, x_test=x_test, y_test=np.array([0, 1, 0, 1])
    )
    return NpzSource("set32", "set32.npz", str(tmp_path)), x_train, x_test


# ---------------------------------------------------------------------------------------------------------------
# IDX (MNIST layout)
# ---------------------------------------------------------------------------------------------------------------


def test_idx_mnist_full_splits(mnist):
    y_train, y_test = mnist.labels("train"), mnist.labels("test")
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert set(np.unique(y_train).tolist()) == set(range(10)) == set(np.unique(y_test).tolist())
    x = mnist.images("train", [0, 1, 59999])
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 1, 28, 28)
    assert int(x.max()) == 255 and int(x.min()) == 0


def test_idx_mnist_test_images_are_pixel_exact(mnist):
    """The README gives the md5 of the official unzipped t10k-images file: rebuild it from what we decoded."""
    x = mnist.images("test", np.arange(10000)).numpy()
    assert x.shape == (10000, 1, 28, 28)
    header = (0x00000803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (10000, 28, 28))
    assert hashlib.md5(header + x.tobytes()).hexdigest() == "2646ac647ad5339dbf082846283269ea"


def test_idx_reads_uncompressed_files_as_gz(mnist, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(mnist.root / "MNIST" / "raw" / f"{stem}.gz", "rb") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    plain = IdxSource("mnist", "MNIST", str(tmp_path))
    idx = [0, 5, 9999]
    assert np.array_equal(plain.labels("test"), mnist.labels("test"))
    assert torch.equal(plain.images("test", idx), mnist.images("test", idx))


def test_idx_fashionmnist_reads():
    root = shared_path("FashionMNIST", "raw").parents[1]
    src = IdxSource("fashionmnist", "FashionMNIST", str(root))
    assert src.labels("test").shape == (10000,)
    assert tuple(src.images("test", [0]).shape) == (1, 1, 28, 28)


def test_idx_missing_kmnist_names_path_and_remedy(tmp_path):
    src = IdxSource("kmnist", "KMNIST", str(tmp_path))  # construction is lazy: no error yet
    with pytest.raises(DatasetNotFoundError) as err:
        src.labels("train")
    msg = str(err.value)
    assert str(tmp_path / "KMNIST" / "raw") in msg
    assert "download=true" in msg and "OOD_BENCH_DATA" in msg
    assert "torchvision.datasets.KMNIST" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_idx_rejects_unknown_folder_and_split(tmp_path, mnist):
    with pytest.raises(ValueError, match="MNIST"):
        IdxSource("x", "EMNIST", str(tmp_path))
    with pytest.raises(ValueError, match="valid splits"):
        mnist.labels("val")


# ---------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------


def test_image_folder_textures_is_test_only():
    path = shared_path("textures-dtd10-jpeg32")
    src = ImageFolderSource("textures", path.name, str(path.parent))
    y = src.labels("test")
    assert y.shape == (1200,)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    assert np.array_equal(np.unique(y), np.arange(len(classes)))
    assert src.labels("train").shape == (0,)
    x = src.images("test", [0, 599, 1199])
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 3, 32, 32)
    # sorted classes, sorted files: sample 0 is the first file of the first class, read as RGB
    first = sorted((path / classes[0]).iterdir())[0]
    expected = np.asarray(Image.open(first).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(x[0].numpy(), expected)


def _tiny_split_folder(root):
    """<root>/tiny/{train,test}/{bird,ant}/*.png with known pixel values (PNG is lossless)."""
    rng = np.random.default_rng(3)
    written = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("bird", "ant"):  # written out of order: classes must come back sorted
            for i in range(n):
                arr = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                _write_png(root / "tiny" / split / cls / f"{i:02d}.png", arr)
                written[(split, cls, i)] = arr
    return written


def test_image_folder_with_split_folders(tmp_path):
    written = _tiny_split_folder(tmp_path)
    src = ImageFolderSource("tiny", "tiny", str(tmp_path))
    assert src.labels("train").tolist() == [0, 0, 0, 1, 1, 1]  # ant = 0, bird = 1
    assert src.labels("test").tolist() == [0, 0, 1, 1]
    x = src.images("test", [3, 0])
    assert tuple(x.shape) == (2, 3, 6, 6)
    assert np.array_equal(x[0].numpy().transpose(1, 2, 0), written[("test", "bird", 1)])
    assert np.array_equal(x[1].numpy().transpose(1, 2, 0), written[("test", "ant", 0)])


def test_image_folder_greyscale_is_one_channel(tmp_path):
    arr = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    _write_png(tmp_path / "grey" / "a" / "0.png", arr)
    src = ImageFolderSource("grey", "grey", str(tmp_path))
    x = src.images("test", [0])
    assert tuple(x.shape) == (1, 1, 4, 4)
    assert np.array_equal(x[0, 0].numpy(), arr)


def test_image_folder_seeded_split_without_split_folders(tmp_path):
    for cls in ("a", "b"):
        for i in range(20):
            _write_png(tmp_path / "flat" / cls / f"{i:02d}.png", np.full((4, 4), i, dtype=np.uint8))
    src = ImageFolderSource("flat", "flat", str(tmp_path), test_fraction=0.5, split_seed=1)
    n_train, n_test = len(src.labels("train")), len(src.labels("test"))
    assert n_train + n_test == 40 and n_train > 0 and n_test > 0
    train_files, test_files = set(src._get("train")[0]), set(src._get("test")[0])
    assert not train_files & test_files
    again = ImageFolderSource("flat", "flat", str(tmp_path), test_fraction=0.5, split_seed=1)
    assert again._get("test")[0] == src._get("test")[0]
    other = ImageFolderSource("flat", "flat", str(tmp_path), test_fraction=0.5, split_seed=2)
    assert other._get("test")[0] != src._get("test")[0]


def test_image_folder_errors(tmp_path):
    missing = ImageFolderSource("textures", "dtd", str(tmp_path), hint="Download DTD from the VGG site.")
    with pytest.raises(DatasetNotFoundError) as err:
        missing.labels("test")
    assert str(tmp_path / "dtd") in str(err.value) and "Download DTD" in str(err.value)

    (tmp_path / "halfsplit" / "train" / "a").mkdir(parents=True)
    _write_png(tmp_path / "halfsplit" / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetNotFoundError, match="test"):
        ImageFolderSource("h", "halfsplit", str(tmp_path)).labels("test")

    _write_png(tmp_path / "mixed" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    _write_png(tmp_path / "mixed" / "a" / "1.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        ImageFolderSource("m", "mixed", str(tmp_path)).images("test", [0, 1])


# ---------------------------------------------------------------------------------------------------------------
# npz and digits
# ---------------------------------------------------------------------------------------------------------------


def test_npz_source_roundtrip(npz32):
    src, x_train, x_test = npz32
    assert src.labels("train").tolist() == [0, 1, 0, 1, 0, 1]
    assert src.labels("test").dtype == np.int64
    x = src.images("test", [2, 3])
    assert tuple(x.shape) == (2, 1, 32, 32)
    assert np.array_equal(x[:, 0].numpy(), x_test[[2, 3]])
    assert np.array_equal(src.images("train", [5])[0, 0].numpy(), x_train[5])


def test_npz_rgb_layout_and_errors(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x_test=rgb, y_test=[0, 1])
    src = NpzSource("rgb", "rgb.npz", str(tmp_path))
    x = src.images("test", [1])
    assert tuple(x.shape) == (1, 3, 5, 5)
    assert np.array_equal(x[0].numpy().transpose(1, 2, 0), rgb[1])
    with pytest.raises(KeyError, match="x_train"):
        src.labels("train")

    np.savez(tmp_path / "float.npz", x_test=rgb.astype(np.float32), y_test=[0, 1])
    with pytest.raises(ValueError, match="uint8"):
        NpzSource("f", "float.npz", str(tmp_path)).labels("test")

    with pytest.raises(DatasetNotFoundError) as err:
        NpzSource("nope", "nope.npz", str(tmp_path)).labels("test")
    assert str(tmp_path / "nope.npz") in str(err.value) and "np.savez" in str(err.value)


def test_digits_split_sizes_and_stratification(digits):
    from sklearn.datasets import load_digits

    target = load_digits().target
    n = len(target)
    y_train, y_test = digits.labels("train"), digits.labels("test")
    assert len(y_test) == math.ceil(0.4 * n)
    assert len(y_train) + len(y_test) == n
    for c in range(10):
        total = int((target == c).sum())
        assert abs(int((y_test == c).sum()) - 0.4 * total) <= 1, c
    x = digits.images("train", np.arange(len(y_train)))
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (1, 8, 8)
    assert int(x.max()) == 255 and int(x.min()) == 0


def test_digits_split_is_disjoint_and_seeded():
    a, b = DigitsSource(split_seed=0), DigitsSource(split_seed=0)
    assert torch.equal(a.images("test", range(50)), b.images("test", range(50)))
    c = DigitsSource(split_seed=1)
    assert not torch.equal(a.images("test", range(50)), c.images("test", range(50)))
    train = {a.images("train", [i]).numpy().tobytes() for i in range(len(a.labels("train")))}
    test = [a.images("test", [i]).numpy().tobytes() for i in range(len(a.labels("test")))]
    # identical 8x8 digits may exist in the data set, but nearly all test images are unseen in train
    assert sum(t in train for t in test) < 0.05 * len(test)
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsSource(test_fraction=1.0)


# ---------------------------------------------------------------------------------------------------------------
# torchvision sources
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["SVHN", "CIFAR100", "CIFAR10", "CelebA"])
def test_torchvision_missing_names_root_and_download(tmp_path, dataset):
    src = TorchvisionSource(dataset.lower(), dataset, str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as err:
        src.labels("test")
    msg = str(err.value)
    assert str(tmp_path) in msg and f"torchvision.datasets.{dataset}" in msg
    assert "download=true" in msg and "OOD_BENCH_DATA" in msg


def test_torchvision_missing_fallback_folder_still_errors(tmp_path):
    src = TorchvisionSource("cifar10", "CIFAR10", str(tmp_path), fallback_folder="cifar10-jpeg")
    with pytest.raises(DatasetNotFoundError, match="CIFAR10"):
        src.labels("test")


def test_torchvision_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="CIFAR10"):
        TorchvisionSource("x", "ImageNet", str(tmp_path))


def test_cifar10_falls_back_to_image_folder():
    path = shared_path("cifar10-jpeg")
    src = TorchvisionSource("cifar10", "CIFAR10", str(path.parent), fallback_folder=path.name)
    y_train, y_test = src.labels("train"), src.labels("test")
    assert len(y_train) == 10000 and len(y_test) == 10000
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert np.bincount(y_train).tolist() == [1000] * 10
    x = src.images("test", [0, 9999])
    assert x.dtype == torch.uint8 and tuple(x.shape) == (2, 3, 32, 32)
    assert src.describe()["files"] == f"image_folder:{path}"


# ---------------------------------------------------------------------------------------------------------------
# build_pair
# ---------------------------------------------------------------------------------------------------------------


def _digits_pair(src, seed=0, **kw):
    args = dict(
        image_size=16,
        channels=1,
        n_train=50,
        n_id_test=20,
        n_ood_test=30,
        id_classes=[0, 1, 2, 3, 4],
        ood_classes=[5, 6, 7, 8, 9],
        seed=seed,
    )
    args.update(kw)
    return build_pair("digits", src, src, **args)


def test_pair_sizes_classes_and_range(digits):
    pair = _digits_pair(digits)
    assert (len(pair.id_train), len(pair.id_test), len(pair.ood_test)) == (50, 20, 30)
    for split in (pair.id_train, pair.id_test, pair.ood_test):
        assert split.images.dtype == torch.float32
        assert tuple(split.images.shape[1:]) == (1, 16, 16)
        x = split.images[:]  # a lazy ImageSet: indexing decodes the rows
        assert x.dtype == torch.float32 and tuple(x.shape) == tuple(split.images.shape)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert len(split.labels) == len(split.indices) == len(split)
        assert len(set(split.indices.tolist())) == len(split)  # drawn without replacement
    assert set(pair.id_train.labels.tolist()) <= {0, 1, 2, 3, 4}
    assert set(pair.id_test.labels.tolist()) <= {0, 1, 2, 3, 4}
    assert set(pair.ood_test.labels.tolist()) <= {5, 6, 7, 8, 9}
    # labels and indices agree with the source
    assert np.array_equal(digits.labels("test")[pair.ood_test.indices], pair.ood_test.labels)
    assert pair.meta["n_train"] == 50 and pair.meta["n_id"] == 20 and pair.meta["n_ood"] == 30


def test_pair_full_splits_when_sizes_are_null(digits):
    pair = _digits_pair(digits, n_train=None, n_id_test=None, n_ood_test=None)
    y_test = digits.labels("test")
    assert len(pair.id_test) == int(np.isin(y_test, [0, 1, 2, 3, 4]).sum())
    assert len(pair.ood_test) == int(np.isin(y_test, [5, 6, 7, 8, 9]).sum())


def test_pair_seed_determinism(digits):
    a, b, c = _digits_pair(digits, seed=0), _digits_pair(digits, seed=0), _digits_pair(digits, seed=1)
    for key in ("id_train", "id_test", "ood_test"):
        assert np.array_equal(getattr(a, key).indices, getattr(b, key).indices)
        assert torch.equal(getattr(a, key).images[:], getattr(b, key).images[:])
        assert not np.array_equal(getattr(a, key).indices, getattr(c, key).indices)
        assert getattr(a, key).images.fingerprint() == getattr(b, key).images.fingerprint()
        assert getattr(a, key).images.fingerprint() != getattr(c, key).images.fingerprint()


def test_pair_invalid_inputs(digits):
    with pytest.raises(ValueError, match=r"classes \[42\].*valid: \[0, 1"):
        _digits_pair(digits, id_classes=[0, 42])
    with pytest.raises(ValueError, match="subset size of 0"):
        _digits_pair(digits, n_id_test=0)
    with pytest.raises(ValueError, match="data.channels"):
        _digits_pair(digits, channels=2)
    with pytest.raises(ValueError, match="resize protocol"):
        _digits_pair(digits, resize_protocol="bicubic")


def test_resize_protocol_common_min_passes_through_smallest_side(mnist, npz32):
    src32, _, x_test = npz32
    kw = dict(image_size=32, channels=1, n_train=8, n_id_test=8, n_ood_test=None, seed=0)
    common = build_pair("m_vs_32", mnist, src32, resize_protocol="common_min", **kw)
    direct = build_pair("m_vs_32", mnist, src32, resize_protocol="direct", **kw)
    assert common.meta["native_sizes"] == [28, 32]
    assert common.meta["resize_via"] == 28 and common.meta["resize_protocol"] == "common_min"
    assert direct.meta["resize_via"] == 32 and direct.meta["resize_protocol"] == "direct"

    ood_c, ood_d = common.ood_test.images[:], direct.ood_test.images[:]
    assert tuple(ood_c.shape) == (4, 1, 32, 32)
    # a constant image stays constant through 32 -> 28 -> 32
    for i, value in ((0, 77), (1, 200)):
        assert torch.allclose(ood_c[i], torch.full_like(ood_c[i], value / 255), atol=1e-6)
    # a textured 32px image is blurred by the detour through 28px; `direct` leaves it untouched
    raw = torch.from_numpy(x_test[2:]).float().div(255).unsqueeze(1)
    assert torch.equal(ood_d[2:], raw)
    assert (ood_c[2:] - raw).abs().max() > 0.05
    # the 28px side takes the same path (28 -> 32) under both protocols
    assert torch.equal(common.id_test.images[:], direct.id_test.images[:])
    assert tuple(common.id_test.images.shape) == (8, 1, 32, 32)


def test_resize_protocol_native_keeps_each_side_at_its_own_size(mnist, npz32):
    """``native`` (DLSR tables): no resize in the data layer, so the encoder takes each raw image straight to 224 px
    (the paper's Resize([224, 224])) instead of through data.image_size first."""
    src32, _, x_test = npz32
    kw = dict(image_size=224, channels=3, n_train=8, n_id_test=8, n_ood_test=None, seed=0)
    pair = build_pair("m_vs_32", mnist, src32, resize_protocol="native", **kw)
    assert pair.meta["resize_via"] is None and pair.meta["native_sizes"] == [28, 32]
    assert tuple(pair.id_test.images.shape) == (8, 3, 28, 28) and tuple(pair.ood_test.images.shape[1:]) == (3, 32, 32)
    raw = torch.from_numpy(x_test).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.equal(pair.ood_test.images[:], raw)  # untouched pixels
    assert torch.equal(pair.id_test.images[:][:, :1], mnist.images("test", pair.id_test.indices).float().div(255))


def test_channel_conversion_grey_to_rgb(mnist):
    pair = build_pair("m3", mnist, mnist, image_size=28, channels=3, n_train=4, n_id_test=4, n_ood_test=4)
    x = pair.id_test.images[:]
    assert tuple(x.shape) == (4, 3, 28, 28)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    raw = mnist.images("test", pair.id_test.indices).float().div(255)
    assert torch.equal(x[:, :1], raw)


def test_channel_conversion_rgb_to_grey_is_luma():
    path = shared_path("textures-dtd10-jpeg32")
    tex = ImageFolderSource("textures", path.name, str(path.parent))
    digits = DigitsSource()
    pair = build_pair(
        "d_vs_tex",
        digits,
        tex,
        image_size=32,
        channels=1,
        n_train=4,
        n_id_test=4,
        n_ood_test=5,
        resize_protocol="direct",
    )
    x = pair.ood_test.images[:]
    assert tuple(x.shape) == (5, 1, 32, 32)
    rgb = tex.images("test", pair.ood_test.indices).double() / 255
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert torch.allclose(x[:, 0].double(), luma, atol=1e-6)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_pair_rejects_an_empty_split_instead_of_collapsing_the_resolution(digits):
    """A test-only source (textures) on the ID side has no training images. The empty decode comes back as a
    [0, 3, 1, 1] tensor whose '1 px' native size makes common_min squeeze every image through 1x1 pixels;
    an empty split must be a clear error naming the source and the split."""
    path = shared_path("textures-dtd10-jpeg32")
    tex = ImageFolderSource("textures", path.name, str(path.parent))
    with pytest.raises(ValueError) as err:
        build_pair("tex_vs_digits", tex, digits, image_size=32, channels=3, n_id_test=5, n_ood_test=5)
    assert "textures" in str(err.value) and "train" in str(err.value)


def test_image_list_source_reads_openood_lists(tmp_path):
    """OpenOOD-style lists: '<path> <label>' lines relative to an image root; images of any size are resized
    (shorter side) and centre-cropped, so they stack into one tensor."""
    from ood_bench.data import DatasetNotFoundError, ImageListSource

    root = tmp_path / "data"
    (root / "images" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (30, 50), (64, 64)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / "a" / f"{i}.png")
    (root / "lists").mkdir()
    (root / "lists" / "test.txt").write_text("a/0.png 3\na/1.png -1\n\na/2.png 7\n")
    src = ImageListSource("toy", str(root), "lists/test.txt", image_root="images", resize=24, crop=20)
    np.testing.assert_array_equal(src.labels("test"), [3, -1, 7])
    x = src.images("test", [2, 0, 1])
    assert x.shape == (3, 3, 20, 20) and x.dtype == torch.uint8
    # the centre crop of the resized image: a uniform-colour image stays uniform, its colour kept
    Image.fromarray(np.full((30, 60, 3), 200, dtype=np.uint8)).save(root / "images" / "a" / "2.png")
    assert int(src.images("test", [2]).float().std()) == 0 and int(src.images("test", [2])[0, 0, 0, 0]) == 200
    with pytest.raises(DatasetNotFoundError, match="no train list"):
        src.labels("train")
    (root / "lists" / "bad.txt").write_text("a/0.png three\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected '<path> <integer label>'"):
        ImageListSource("bad", str(root), "lists/bad.txt").labels("test")
    with pytest.raises(DatasetNotFoundError, match="image list .*missing.txt not found"):
        ImageListSource("gone", str(root), "missing.txt").labels("test")
