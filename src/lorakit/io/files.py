"""Atomic writes and safe, validated reads of safetensors and JSON files."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..core.errors import AdapterLoadError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it owner-only; a saved file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(data, metadata=metadata))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"missing config file {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise AdapterLoadError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def load_tensors(path: str | os.PathLike, *, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle), turning every failure into a clear AdapterLoadError."""
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"missing weights file {path}")
    size = path.stat().st_size
    if size < 8:
        raise AdapterLoadError(f"{path} is truncated ({size} bytes); a safetensors file starts with an 8-byte header size")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        raise AdapterLoadError(f"{path} is truncated or corrupted: header claims {header_len} bytes, file has {size}")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError variants
        raise AdapterLoadError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    if check_finite:
        for key, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise AdapterLoadError(f"{path}: tensor {key!r} has {bad} non-finite values (NaN/Inf)")
    return tensors
