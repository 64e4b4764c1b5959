"""Checksummed archives and safe extraction, on archives built here (no network): a good archive extracts, a wrong
hash is refused, and every malicious member kind is refused before anything is written."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zipfile
from pathlib import Path

import pytest
from anomaly_layouts import write_mvtec

from ood_bench.data import download
from ood_bench.data.anomaly import MVTecLayout
from ood_bench.data.download import (
    DOWNLOADS,
    ChecksumError,
    DownloadInfo,
    UnsafeArchiveError,
    download_and_extract,
    fetch,
    safe_extract,
    verify_sha256,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_file(tf: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def add_link(tf: tarfile.TarFile, name: str, target: str, hard: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    tf.addfile(info)


def test_known_archives_have_full_sha256_and_official_urls():
    assert DOWNLOADS["mvtec_ad"].url.startswith("https://www.mydrive.ch/shares/38536/")
    assert DOWNLOADS["visa"].url == "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
    for info in DOWNLOADS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", info.sha256), info.name
        assert info.url.endswith(info.filename) and "anomalib" in info.hash_source


def test_good_archive_on_disk_is_hashed_then_extracted(tmp_path):
    src = tmp_path / "src"
    write_mvtec(src, "widget", n_train=2, n_good=1, defects={"hole": 1})
    archive = tmp_path / "data" / "widget.tar.xz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:xz") as tf:
        tf.add(src / "widget", arcname="widget")
    info = DownloadInfo("widget", "https://example.invalid/widget.tar.xz", sha256(archive), "widget.tar.xz", "test")
    created = download_and_extract(info, tmp_path / "data", progress=False)  # on disk: no download attempted
    assert created == [tmp_path / "data" / "widget"]
    table = MVTecLayout("widget", str(tmp_path / "data")).samples()
    assert len(table) == 4 and (tmp_path / "data" / "widget" / "ground_truth" / "hole" / "000_mask.png").is_file()
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_wrong_hash_is_refused_and_named(tmp_path):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        add_file(tf, "a/b.txt")
    info = DownloadInfo("a", "https://example.invalid/a.tar", "0" * 64, "a.tar")
    with pytest.raises(ChecksumError, match=rf"{archive}: SHA-256 {sha256(archive)} does not match the known 0000"):
        fetch(info, tmp_path)
    with pytest.raises(ChecksumError, match="no verified SHA-256"):
        fetch(DownloadInfo("a", info.url, None, "a.tar"), tmp_path)
    verify_sha256(archive, sha256(archive).upper())  # hex case does not matter


def test_sha256_is_chunked(tmp_path):
    """A file larger than one chunk hashes like hashlib over the whole content."""
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 9000)  # 2.3 MB: three 1 MiB chunks
    assert download.file_sha256(big, length=64) == sha256(big)


MALICIOUS = {
    "absolute path": lambda tf: add_file(tf, "/tmp/evil.txt"),
    "dot-dot member": lambda tf: add_file(tf, "data/../../evil.txt"),
    "symlink outside": lambda tf: add_link(tf, "data/link", "../../outside"),
    "absolute symlink": lambda tf: add_link(tf, "data/etc", "/etc/passwd"),
    "hard link outside": lambda tf: add_link(tf, "data/hard", "../evil.txt", hard=True),
}


@pytest.mark.parametrize("kind", list(MALICIOUS))
def test_malicious_tar_is_refused_before_anything_is_written(tmp_path, kind):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        add_file(tf, "data/fine.txt", b"fine")  # a harmless member first: it must not be extracted either
        MALICIOUS[kind](tf)
    root = tmp_path / "root"
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, root)
    assert list(root.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "outside").exists()


def test_symlink_inside_the_root_is_allowed(tmp_path):
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tf:
        add_file(tf, "data/real.txt", b"real")
        add_link(tf, "data/alias.txt", "real.txt")
    safe_extract(archive, tmp_path / "root")
    assert (tmp_path / "root" / "data" / "alias.txt").read_bytes() == b"real"


def test_malicious_zip_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/fine.txt", "fine")
        zf.writestr("../evil.txt", "evil")
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./evil\.txt'"):
        safe_extract(archive, tmp_path / "root")
    assert not (tmp_path / "evil.txt").exists() and list((tmp_path / "root").iterdir()) == []


def test_download_switch_extracts_the_official_archive_when_present(tmp_path, monkeypatch):
    """data.download=true with the archive already on disk: it is hashed against the table, then extracted."""
    src = tmp_path / "src"
    write_mvtec(src, "bottle", n_train=2, n_good=1, defects={"broken_large": 1})
    root = tmp_path / "mvtec_anomaly_detection"
    root.mkdir()
    archive = root / DOWNLOADS["mvtec_ad"].filename
    with tarfile.open(archive, "w:xz") as tf:
        tf.add(src / "bottle", arcname="bottle")
    with pytest.raises(ChecksumError, match="does not match"):  # the real table's hash: a test archive is refused
        MVTecLayout("bottle", str(root), archive="mvtec_ad", download=True).samples()
    local = DownloadInfo(**{**DOWNLOADS["mvtec_ad"].__dict__, "sha256": sha256(archive)})
    monkeypatch.setitem(DOWNLOADS, "mvtec_ad", local)
    table = MVTecLayout("bottle", str(root), archive="mvtec_ad", download=True).samples()
    assert len(table) == 4 and (root / "bottle" / "train" / "good").is_dir()
