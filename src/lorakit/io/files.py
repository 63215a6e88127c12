"""Atomic writes and safe, validated reads of safetensors and JSON files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from ..core.errors import AdapterLoadError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see a partial file."""
    atomic_write_files({path: data})


def atomic_write_files(files: Mapping[str | os.PathLike, bytes]) -> None:
    """Write several files that belong together (an adapter's config and tensors) so that a failed write leaves
    the old set: every file goes to a temp file beside it and is fsynced first, and only when all are written are
    they renamed into place, one after the other (only the renames are left, each atomic; one failing between
    them (the folder made read-only meanwhile) is the one case that leaves a mixed set)."""
    pending: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            pending.append((tmp, path))
            with os.fdopen(fd, "wb") as f:  # owns fd from here: closed whatever fails below
                os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes it owner-only; the usual mode
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        while pending:
            tmp, path = pending[0]
            os.replace(tmp, path)
            pending.pop(0)
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_dir_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh folder beside ``target``, then rename it into place (replacing an old one).

    Readers never see a half-written folder under ``target``'s name: a failure in ``write`` (or in the renames)
    removes the temporary folder and leaves the previous ``target``, if any, where it was. The folder and what
    ``write`` put in it get the usual permissions for the umask (mkdtemp makes folders owner-only, and some
    writers create private files too). Returns ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        write(tmp)
        mask = current_umask()
        for path in tmp.rglob("*"):
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if target.exists():
            # A rename cannot replace a non-empty folder: move the old one aside first, drop it after.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / target.name).exists() and not target.exists():
            os.replace(old / target.name, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_dir_atomically(target: str | os.PathLike) -> bool:
    """Remove the folder ``target`` so that readers see it whole or not at all: it is renamed aside (one atomic
    rename) and deleted there. Returns whether there was one."""
    target = Path(target)
    if not target.is_dir():
        return False
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    shutil.rmtree(old, ignore_errors=True)
    return True


def json_bytes(obj: Any) -> bytes:
    """``obj`` as lorakit writes JSON files: indented, keys sorted, a final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` as the bytes of a safetensors file (on CPU, contiguous)."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, tensor_bytes(tensors, metadata))


def save_tensors_and_json(tensor_path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                          json_files: Mapping[str | os.PathLike, Any], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file and the JSON files that describe it, written together (:func:`atomic_write_files`): a
    failure leaves the previous pair, never new tensors beside an old config."""
    atomic_write_files({tensor_path: tensor_bytes(tensors, metadata),
                        **{path: json_bytes(obj) for path, obj in json_files.items()}})


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


class TensorFile:
    """A safetensors file opened for reading: lorakit's one safetensors reader (never pickle).

    Opening checks that the file exists and that its header fits; tensors are read lazily (memory-mapped,
    per key) by :meth:`get`, or all at once by :meth:`read_all`. Every failure is an AdapterLoadError naming
    the file: missing, truncated, not safetensors, a non-finite value in a tensor read with ``check_finite``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise AdapterLoadError(f"missing weights file {self.path}")
        size = self.path.stat().st_size
        bad = f"{self.path} is not a valid safetensors file"
        if size < 8:
            raise AdapterLoadError(f"{bad} (truncated: {size} bytes; a safetensors file starts with an 8-byte header "
                                   "size)")
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            raise AdapterLoadError(f"{bad} (truncated or corrupted: header claims {header_len} bytes, file has {size})")
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            self._keys = list(self._handle.keys())
        except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError variants
            raise AdapterLoadError(f"{bad} ({type(e).__name__}: {e})") from None

    def keys(self) -> list[str]:
        return list(self._keys)

    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` (str -> str; empty when the file has none)."""
        return dict(self._handle.metadata() or {})

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape from the header, without reading the tensor."""
        return tuple(self._handle.get_slice(key).get_shape())

    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor:
        try:
            t = self._handle.get_tensor(key)
        except Exception as e:
            raise AdapterLoadError(f"{self.path} is not a valid safetensors file (tensor {key!r}: "
                                   f"{type(e).__name__}: {e})") from None
        if check_finite:
            self._check_finite({key: t})
        return t

    def read_all(self, *, check_finite: bool = True) -> dict[str, torch.Tensor]:
        try:
            tensors = load_file(self.path)
        except Exception as e:
            raise AdapterLoadError(f"{self.path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
        if check_finite:
            self._check_finite(tensors)
        return tensors

    def _check_finite(self, tensors: dict[str, torch.Tensor]) -> None:
        # A NaN/Inf anywhere makes a tensor's sum non-finite, so one stacked reduction proves the common case;
        # the exact per-tensor count runs only on suspicion (a sum can also overflow on huge finite values).
        floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
        if not floats or bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float64) for t in floats.values()])).all()):
            return
        for key, t in floats.items():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise AdapterLoadError(f"{self.path}: tensor {key!r} has {bad} non-finite values (NaN/Inf)")


def load_tensors(path: str | os.PathLike, *, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (see :class:`TensorFile` for the checks and errors)."""
    return TensorFile(path).read_all(check_finite=check_finite)
