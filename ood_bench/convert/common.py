"""What both converters share: loading a checkpoint, the key check, and writing the diffusers folder atomically."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ood_bench.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """The checkpoint is not of the kind the converter reads, or lacks what its architecture needs."""


def load_checkpoint(path: str | os.PathLike[str], allow_pickle: bool = False) -> Any:
    """``torch.load`` on CPU: tensors and plain containers only, unless ``allow_pickle`` (runs the file's pickled
    code: only for a checkpoint from a source you trust)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        hint = "" if allow_pickle else " If it is a trusted checkpoint that pickles other objects, pass --allow-pickle."
        raise CheckpointError(f"checkpoint {str(path)!r} could not be read by torch.load ({err}).{hint}") from err


def _names(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def map_state_dict(
    source: Mapping[str, torch.Tensor],
    mapping: Mapping[str, tuple[str, Any]],
    want: Mapping[str, torch.Tensor],
    what: str,
) -> dict[str, torch.Tensor]:
    """Build the state dict ``want`` (its keys and shapes) from ``source`` through ``mapping`` (target key ->
    (source key, transform)).

    Every source key must be used and every target key filled with the right shape; otherwise a
    ``CheckpointError`` names the keys (``what`` says which architecture the mapping assumed).
    """
    missing = sorted({src for src, _ in mapping.values() if src not in source})
    if missing:
        raise CheckpointError(f"{what}: the checkpoint lacks keys {_names(missing)}")
    used = {src for src, _ in mapping.values()}
    unused = sorted(set(source) - used)
    if unused:
        raise CheckpointError(f"{what}: the checkpoint has keys this architecture does not use: {_names(unused)}")
    unfilled = sorted(set(want) - set(mapping))
    if unfilled:  # a bug in the mapping, not in the checkpoint
        raise RuntimeError(f"{what}: no source for diffusers keys {_names(unfilled)}")
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for key, (src, fn) in mapping.items():
        value = source[src].detach().to(torch.float32)
        value = fn(value) if fn is not None else value
        if tuple(value.shape) != tuple(want[key].shape):
            bad.append(f"{src} {tuple(source[src].shape)} (-> {key} needs {tuple(want[key].shape)})")
            continue
        out[key] = value.contiguous()
    if bad:
        raise CheckpointError(f"{what}: shapes do not match: {'; '.join(bad[:8])}")
    return out


def save_folder(
    out_dir: str | os.PathLike[str],
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    info: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``unet/``, ``scheduler/`` and ``conversion.json`` into ``out_dir`` atomically (a temp folder renamed)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        unet.save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "conversion.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote %s", out)
    return out


def converter_parser(doc: str | None, checkpoint_help: str) -> argparse.ArgumentParser:
    """The command line every ``scripts/convert_*.py`` shares: checkpoint, output folder, overwrite, pickle."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("out", help="output folder (a diffusers UNet2DModel + scheduler)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-pickle", action="store_true", help="torch.load with weights_only=False (trusted files)")
    return p


def run_converter(convert: Callable[[], object]) -> int:
    """Run a conversion from a script: log to stderr; a ``UserError`` prints ``error: ...`` and exits with 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        convert()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
