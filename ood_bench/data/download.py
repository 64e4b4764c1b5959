"""Checksummed dataset downloads and archive extraction that cannot write outside its folder.

Every archive has a known SHA-256 in ``DOWNLOADS``. An archive that is already on disk (downloaded by hand, or by
an earlier run) is hashed too before it is trusted. Extraction checks every member first and refuses the whole
archive when one of them is an absolute path, has a ``..`` component, resolves outside the target folder, is a
link pointing outside it, or is a device / FIFO; it then extracts into a temporary folder (with Python's ``data``
filter where available) and moves the result into place, so an interrupted extraction never looks complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm.auto import tqdm

from ood_bench.utils import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadInfo:
    """An archive: where it lives, its SHA-256 and where that hash was verified."""

    name: str
    url: str
    sha256: str | None
    filename: str
    hash_source: str = ""


# Hashes as published in anomalib's source (openvinotoolkit/anomalib; DownloadInfo.hashsum, checked with sha256).
DOWNLOADS: dict[str, DownloadInfo] = {
    "mvtec_ad": DownloadInfo(
        name="MVTec AD",
        url="https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
        "mvtec_anomaly_detection.tar.xz",
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        filename="mvtec_anomaly_detection.tar.xz",
        hash_source="anomalib src/anomalib/data/datamodules/image/mvtecad.py (commit 95369ee)",
    ),
    "visa": DownloadInfo(
        name="VisA",
        url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        filename="VisA_20220922.tar",
        hash_source="anomalib src/anomalib/data/datamodules/image/visa.py (commit 01c0de3)",
    ),
}


class ChecksumError(ValueError):
    """A file's SHA-256 differs from the known one."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written (or would link) outside the extraction folder."""


def verify_sha256(path: str | os.PathLike[str], expected: str) -> None:
    """Raise ``ChecksumError`` naming the file and both hashes unless ``path`` hashes to ``expected``."""
    got = file_sha256(path, length=64)
    if got != expected.lower():
        raise ChecksumError(
            f"{path}: SHA-256 {got} does not match the known {expected}. The file is incomplete or not the "
            f"official archive: delete it and download it again."
        )


def fetch(info: DownloadInfo, dest_dir: str | os.PathLike[str], progress: bool = True) -> Path:
    """The verified archive in ``dest_dir``: hash it when already there, else download it (then hash it)."""
    if not info.sha256:
        raise ChecksumError(f"{info.name}: no verified SHA-256 is known for {info.url}; refusing to download")
    dest = Path(dest_dir) / info.filename
    if dest.is_file():
        log.info("%s: hashing the archive already on disk, %s", info.name, dest)
        verify_sha256(dest, info.sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not info.url.startswith("https://"):
        raise ValueError(f"{info.name}: only https downloads are allowed, got {info.url}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{info.filename}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        log.info("%s: downloading %s", info.name, info.url)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(info.url, timeout=60) as resp:  # noqa: S310
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=info.name, disable=not progress) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        verify_sha256(tmp, info.sha256)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _is_absolute(name: str) -> bool:
    return PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or name.startswith("\\")


def _check_member(name: str, root: Path, link: str | None = None, hard: bool = False) -> None:
    """Refuse a member (or its link target) that is absolute, has ``..`` or resolves outside ``root``."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if _is_absolute(name) or ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path or a '..' component")
    target = (root / name).resolve()
    if not target.is_relative_to(root):
        raise UnsafeArchiveError(f"archive member {name!r} resolves to {target}, outside {root}")
    if link is not None:
        if _is_absolute(link):
            raise UnsafeArchiveError(f"archive link {name!r} -> {link!r} points to an absolute path")
        # a symlink resolves from its own folder, a tar hard link from the archive root
        base = root if hard else (root / name).parent
        if not (base / link).resolve().is_relative_to(root):
            raise UnsafeArchiveError(f"archive link {name!r} -> {link!r} points outside {root}")


def check_archive(archive: str | os.PathLike[str], root: str | os.PathLike[str]) -> list[str]:
    """Check every member of a tar or zip archive against ``root``; return the member names."""
    archive, root = Path(archive), Path(root).resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for info in zf.infolist():
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                _check_member(info.filename, root, zf.read(info).decode() if is_link else None)
        return names
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
    for m in members:
        if m.isdev() or m.isfifo():
            raise UnsafeArchiveError(f"archive member {m.name!r} is a device or FIFO")
        _check_member(m.name, root, m.linkname if (m.issym() or m.islnk()) else None, hard=m.islnk())
    return [m.name for m in members]


def safe_extract(archive: str | os.PathLike[str], root: str | os.PathLike[str]) -> list[Path]:
    """Extract ``archive`` into ``root`` after checking all members; return the top-level entries created."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    check_archive(archive, root)
    tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=root))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        else:
            with tarfile.open(archive, "r:*") as tf:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: a second line of defence
                    tf.extractall(tmp, filter="data")
                else:  # pragma: no cover - older Pythons; every member was checked above
                    tf.extractall(tmp)  # noqa: S202
        created = []
        for entry in sorted(tmp.iterdir()):
            final = root / entry.name
            if final.exists():
                log.info("%s exists already; keeping it", final)
                continue
            os.replace(entry, final)
            created.append(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return created


def download_and_extract(info: DownloadInfo, root: str | os.PathLike[str], progress: bool = True) -> list[Path]:
    """Fetch (or hash the archive on disk) and extract it into ``root``; the archive is kept beside the data."""
    archive = fetch(info, root, progress=progress)
    created = safe_extract(archive, root)
    log.info("%s extracted into %s (archive kept: %s; delete it to save space)", info.name, root, archive)
    return created
