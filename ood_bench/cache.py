"""Content-keyed on-disk cache for trained models and extracted features.

An entry is a directory ``<root>/<kind>/<key>/`` that appears atomically (built in a temporary directory,
then renamed), so a crash never leaves a half-written entry that a later run would trust. Every entry carries
``checksums.json`` (the SHA-256 of each of its files), verified when the entry is used: an entry whose files
were changed or truncated afterwards is logged, discarded and built again. Parallel jobs build an entry one at
a time (a file lock per entry under ``<root>/.locks``): the second job waits, then reuses the first one's entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from filelock import FileLock, Timeout

from ood_bench.utils import stable_hash

log = logging.getLogger(__name__)

MANIFEST = "checksums.json"
SPEC = "spec.json"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every file of an entry (recursively), the manifest excepted, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record the SHA-256 of every file of ``folder`` in its manifest."""
    sums = {p.relative_to(folder).as_posix(): file_sha256(p) for p in _files(folder)}
    (folder / MANIFEST).write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")


def verify_manifest(folder: Path) -> str | None:
    """``None`` when every file listed in the manifest is there with its checksum; else what is wrong."""
    try:
        sums = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable ({err})"
    for rel, digest in sums.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        got = file_sha256(path)
        if got != digest:
            return f"{rel} has sha256 {got[:12]}…, expected {digest[:12]}… (size now {path.stat().st_size} bytes)"
    return None


class ArtifactCache:
    """Directory cache keyed by a hash of everything that determines an artefact."""

    # Entries verified by this process, with the file stats they had then (re-hashed only when these change).
    _verified: ClassVar[dict[Path, tuple]] = {}
    _legacy_warned: ClassVar[set[Path]] = set()

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def key(self, kind: str, spec: Any) -> str:
        """Hash of ``spec`` (a JSON-able description of what determines the artefact)."""
        return stable_hash({"kind": kind, "spec": spec})

    def entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    @contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Hold the entry's build lock (waits, with a log line, while another process holds it)."""
        path = self.root / ".locks" / f"{kind}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=1)
        except Timeout:
            log.info("waiting for another process to finish cache entry %s/%s", kind, key)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _stats(self, folder: Path) -> tuple:
        return tuple((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in _files(folder))

    def _check(self, folder: Path) -> str | None:
        """What is wrong with a complete entry (``None``: verified, or written before checksums existed)."""
        if not (folder / MANIFEST).is_file():
            if folder not in self._legacy_warned:
                self._legacy_warned.add(folder)
                log.warning("cache entry %s has no %s (written before checksums): used unverified", folder, MANIFEST)
            return None
        stats = self._stats(folder)
        if self._verified.get(folder) == stats:
            return None
        problem = verify_manifest(folder)
        if problem is None:
            self._verified[folder] = stats
        return problem

    def _discard(self, kind: str, key: str, problem: str) -> None:
        """Move a corrupt entry out of the way (then delete it) so that it is built again."""
        folder = self.entry(kind, key)
        log.warning("cache entry %s/%s is corrupt (%s): discarding it and building it again", kind, key, problem)
        self._verified.pop(folder, None)
        trash = folder.parent / f".corrupt-{key}-{time.time_ns()}"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def has(self, kind: str, key: str) -> bool:
        """Whether a complete, intact entry exists (a corrupt one is logged and discarded: then ``False``)."""
        folder = self.entry(kind, key)
        if not (folder / SPEC).is_file():
            return False
        problem = self._check(folder)
        if problem is None:
            return True
        with self.lock(kind, key):
            if (folder / SPEC).is_file() and (problem := verify_manifest(folder)) is not None:
                self._discard(kind, key, problem)
        return (folder / SPEC).is_file()

    def get_or_create(self, kind: str, spec: Any, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """Return ``(entry_dir, created)``; ``build(tmp_dir)`` fills a new entry when none exists."""
        key = self.key(kind, spec)
        final = self.entry(kind, key)
        if self.has(kind, key):
            log.info("cache hit: %s/%s", kind, key)
            return final, False
        final.parent.mkdir(parents=True, exist_ok=True)
        with self.lock(kind, key):
            if self.has(kind, key):  # another process built it while this one waited
                log.info("cache hit: %s/%s (built by another process)", kind, key)
                return final, False
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
            try:
                build(tmp)
                (tmp / SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True, default=str))
                write_manifest(tmp)
                if (final / SPEC).is_file():  # published meanwhile by a writer that took no lock: keep theirs
                    shutil.rmtree(tmp)
                else:
                    if final.exists():  # a leftover without spec.json: never trusted, replaced
                        shutil.rmtree(final)
                    os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        self._verified[final] = self._stats(final)
        log.info("cache write: %s/%s", kind, key)
        return final, True

    def array(self, kind: str, spec: Any, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """A cached array: computed once by ``compute()``, then read back (used for resumable scoring)."""

        def build(tmp: Path) -> None:
            np.save(tmp / "array.npy", np.asarray(compute()))

        entry, _ = self.get_or_create(kind, spec, build)
        return np.load(entry / "array.npy")
