"""Content-keyed on-disk cache for trained models and extracted features.

An entry is a directory ``<root>/<kind>/<key>/`` that appears atomically (built in a temporary directory,
then renamed), so a crash never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ood_bench.utils import stable_hash

log = logging.getLogger(__name__)


class ArtifactCache:
    """Directory cache keyed by a hash of everything that determines an artefact."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def key(self, kind: str, spec: Any) -> str:
        """Hash of ``spec`` (a JSON-able description of what determines the artefact)."""
        return stable_hash({"kind": kind, "spec": spec})

    def entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        return (self.entry(kind, key) / "spec.json").is_file()

    def get_or_create(self, kind: str, spec: Any, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """Return ``(entry_dir, created)``; ``build(tmp_dir)`` fills a new entry when none exists."""
        key = self.key(kind, spec)
        final = self.entry(kind, key)
        if self.has(kind, key):
            log.info("cache hit: %s/%s", kind, key)
            return final, False
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            build(tmp)
            (tmp / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True, default=str))
            if final.exists():  # another process finished first; keep theirs
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        log.info("cache write: %s/%s", kind, key)
        return final, True

    def array(self, kind: str, spec: Any, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """A cached array: computed once by ``compute()``, then read back (used for resumable scoring)."""

        def build(tmp: Path) -> None:
            np.save(tmp / "array.npy", np.asarray(compute()))

        entry, _ = self.get_or_create(kind, spec, build)
        return np.load(entry / "array.npy")
