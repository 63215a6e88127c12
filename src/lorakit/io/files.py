"""Atomic writes and safe, validated reads of safetensors and JSON files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from filelock import lock_descriptor, unlock_descriptor
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
    them (the folder made read-only meanwhile) is the one case that leaves a mixed set).

    A temp file is ``.<name>.<8 random characters>.tmp`` (``tempfile.mkstemp``), locked while its writer runs
    (``filelock.lock_descriptor``: ``flock`` on POSIX, ``LockFileEx`` on Windows, so it holds across processes).
    A process killed mid-save leaves it behind; the next successful save of ``<name>`` removes the unlocked ones
    (:func:`remove_stale_temps`), and readers never open them (:func:`is_temp_name`). On Windows, which renames
    no file that a handle holds open, each temp file is closed (unlocked) just before its rename."""
    pending: list[tuple[str, Path]] = []
    held: dict[str, Any] = {}  # the temp files, open and locked until renamed: a concurrent save's cleanup skips them
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
            pending.append((tmp, path))
            f = os.fdopen(fd, "wb")  # owns fd from here: closed whatever fails below
            held[tmp] = f
            lock_descriptor(f.fileno())
            if not _WINDOWS:  # mkstemp makes it owner-only; the usual mode (Windows keeps no such bits)
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        while pending:
            tmp, path = pending[0]
            if _WINDOWS:
                held.pop(tmp).close()
            os.replace(tmp, path)
            pending.pop(0)
    except BaseException:
        for f in held.values():  # (Windows deletes no file that a handle holds open)
            f.close()
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    finally:
        for f in held.values():
            f.close()
    for path in {Path(p) for p in files}:
        remove_stale_temps(path)


TEMP_SUFFIX = ".tmp"
# what lorakit's atomic writes name their temporaries: files ``.<name>.<8 chars>.tmp`` (mkstemp), folders
# ``.<name>.tmp-<8 chars>`` (a folder being written) and ``.<name>.old-<8 chars>`` (the one it replaces), and on
# Windows ``.<name>.tmp-<8 chars>.lock``, the lock of a folder being written
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-[A-Za-z0-9_]{8}$")
_TEMP_LOCK = re.compile(r"^\.(?P<name>.+)\.tmp-[A-Za-z0-9_]{8}\.lock$")
# Windows opens no folder as a descriptor, and renames or deletes no file that a handle holds open: there a folder
# being written is locked through a file beside it, and a temp file is closed before its rename
_WINDOWS = sys.platform == "win32"


def is_temp_name(name: str) -> bool:
    """Whether a file or folder name is one of lorakit's atomic-write temporaries (see :func:`atomic_write_files`,
    :func:`write_dir_atomically`): readers listing a folder skip these, which a killed save may have left."""
    return bool(_TEMP_FILE.match(name) or _TEMP_DIR.match(name) or _TEMP_LOCK.match(name))


def _lock_carrier(path: Path) -> tuple[Path, int]:
    """What holds the lock of a temporary ``path`` and the flags to open it with: the file or folder itself, or on
    Windows, for a folder, the file ``<path>.lock`` beside it (made if missing)."""
    if _WINDOWS and path.is_dir() and not path.is_symlink():
        return path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT
    return path, os.O_RDONLY


def _held_by_a_writer(path: Path) -> bool:
    """Whether a running save holds the lock of the temporary ``path`` (one attempt, not waiting for it). Raises
    OSError where ``path`` cannot be opened (gone meanwhile)."""
    carrier, flags = _lock_carrier(path)
    fd = os.open(carrier, flags)
    try:
        if not lock_descriptor(fd, blocking=False):
            return True
        unlock_descriptor(fd)
        return False
    finally:
        os.close(fd)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that earlier atomic writes of ``path`` left beside it (a process killed mid-save):
    ``.<name>.<8 chars>.tmp`` files and ``.<name>.tmp-*`` / ``.<name>.old-*`` folders (and on Windows a
    ``.<name>.tmp-*.lock`` file). One a running save holds (locked) is kept. Returns what was removed."""
    path = Path(path)
    removed: list[Path] = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_FILE.match(entry.name) or _TEMP_DIR.match(entry.name) or _TEMP_LOCK.match(entry.name)
        if match is None or match["name"] != path.name:
            continue
        # Unlocked means its writer is gone: a temporary's name is never taken again, so the lock need not be held
        # while it is removed (Windows could not delete a file this process holds open).
        with contextlib.suppress(OSError):
            if _held_by_a_writer(entry):
                continue
            if entry.is_dir() and not entry.is_symlink():
                carrier, _ = _lock_carrier(entry)
                shutil.rmtree(entry)
                if carrier != entry:
                    carrier.unlink(missing_ok=True)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_dir_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh folder beside ``target``, then rename it into place (replacing an old one).

    Readers never see a half-written folder under ``target``'s name: a failure in ``write`` (or in the renames)
    removes the temporary folder and leaves the previous ``target``, if any, where it was. The temporary folder is
    locked while ``write`` runs (on Windows, which opens no folder as a descriptor, through a file
    ``.<name>.tmp-*.lock`` beside it), so another save's cleanup keeps it. A process killed mid-save leaves
    ``.<name>.tmp-*`` / ``.<name>.old-*`` (and that lock file) beside it; the next successful save removes them. The folder and what
    ``write`` put in it get the usual permissions for the umask (mkdtemp makes folders owner-only, and some
    writers create private files too). Returns ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    carrier, flags = _lock_carrier(tmp)
    lock = os.open(carrier, flags)  # held while this save runs: another save's cleanup skips the folder
    lock_descriptor(lock)
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
    finally:
        os.close(lock)
        if carrier != tmp:
            with contextlib.suppress(OSError):
                carrier.unlink()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temps(target)  # what killed saves of target left beside it
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
