"""Adapter memory tiers for serving, as in S-LoRA (Sheng et al., arXiv:2311.03285, §4): adapters on disk, a
host-memory cache of their parsed weights, and the resident banks a batch runs on.

- **disk**: every registered adapter is a PEFT-format folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) under one of the configured roots. A training run folder there (``lorakit train
  --output ROOT/name``: ``adapter/``, checkpoints, ``base.json``) serves its ``adapter/`` under the run's name, as
  every command taking an adapter folder reads a run folder; its ``base.json`` is checked as for ``adapter/``.
- **host**: an LRU of parsed safetensors files, capped by count (``max_cpu_loras``) and bytes.
  :meth:`AdapterStore.prefetch` fills it in a background thread for adapters of queued requests.
- **resident**: the model's :class:`~lorakit.serving.multi.AdapterRegistry` banks, capped by count
  (``max_loras``, vLLM's name) and bytes; least recently used adapters that no running request holds
  (``pin``) are evicted to make room. Ranks may differ (the banks pad to the largest).

Adapters the banks cannot hold (DoRA, whose per-row magnitude rescales the base output, and router-driven
lorakit mixtures: MixLoRA, MoLE, MeteoRA, X-LoRA, ...) are served **attached**: loaded with
``lorakit.load_adapter`` (inactive), counted against the same resident cap, and run by the engine in their own
forward with the adapter active. They cannot take part in a per-request weighted mix. An attached adapter
trained with task keys (``routed_lora``, MeteoRA, ...) routes each request by its ``task``: the name is looked up in
the folder's ``task_index.json`` (``lorakit.data.read_task_index``; for a routed_lora without one, its
``key_to_expert`` / ``adapter_names``) and the id reaches the layers as ``lorakit.routing(keys=...)``.

Loading into the banks mutates them, so :meth:`ensure_resident`, :meth:`evict` and :meth:`unregister` must run on
the thread that runs forwards (the engine's); registering and prefetching may run anywhere.

In flight (as LoRAX and vLLM keep an adapter their running requests use): :meth:`unregister` of an adapter that
requests hold (:meth:`pin`: running, or preempted and queued again) refuses new requests for it at once and evicts it
when the last of them finishes; :meth:`evict`, ``registry.remove`` and banking the name again are refused with
AdapterConflictError while it is held, so no row of a batch fails because an adapter left under it.

Adapters banked into the model directly (:func:`~lorakit.serving.bank_adapters` / ``load_adapters``, before this store
was made or after: they reach its registry) are served with the registered folders (:attr:`AdapterStore.banked`,
:meth:`AdapterStore.names`): never evicted, as there is nothing to load them again from; :meth:`unregister` removes
one. Banking directly under a name the store serves from a folder is refused (AdapterConflictError).

An adapter whose ``base_model_name_or_path`` names another model than the served one is served anyway with a warning
(:func:`base_name_mismatch`, :attr:`AdapterStore.warnings`), as PEFT and vLLM load it.

With several roots, a name belongs to the first root that has a folder of that name; a later root's folder of that
name is skipped with a warning naming both, also when the first one cannot be served (requests then get its reason;
a broken owner is never silently replaced). A relative path given to :meth:`AdapterStore.register` is taken from the
first root that has it.

A folder under a root that cannot be served never stops the others: :meth:`AdapterStore.register_roots` (what
``lorakit serve`` and the Ray Serve replicas start with) skips a folder that fails to register, logs a warning through
the ``lorakit.serving`` logger naming it and the reason, and records the reason in :attr:`AdapterStore.failed`; an
adapter whose weights fail when first loaded (a corrupt file, a tensor whose shape disagrees with its config) is
unregistered and recorded the same way. A request naming a recorded adapter is refused with that reason
(AdapterLoadError), not as an unknown name, and so is the request whose load met the failure: the first request and
every later one read the same message. Registering the name again (after fixing its folder) clears the record.

Paths are confined to the roots: a path with ``..``, or one whose resolved location (symlinks followed) lies
outside every root, is refused, and so is a weights file that is a symlink leaving the root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import (FIELD, AdapterConflictError, AdapterError, AdapterLoadError, LorakitError,
                           UnknownAdapterError, did_you_mean)
from ..core.layer import BASE_NAME, AdapterLayer
from ..io.peft_format import (CONFIG_NAME, _name_or_path, read_adapter_config, run_adapter, trained_base_error,
                              trained_base_mismatch, weights_path)
from ..io.files import is_temp_name, load_tensors
from .multi import REGISTRY_ATTR, AdapterRegistry, RowSpec, _check_bankable_config

log = logging.getLogger("lorakit.serving")


def names_in(spec: RowSpec) -> list[str]:
    """Adapter names a row spec uses (none for the base)."""
    if spec is None or spec == BASE_NAME:
        return []
    if isinstance(spec, Mapping):
        return [n for n in spec if n is not None and n != BASE_NAME]
    return [spec]


def locate(path: str | os.PathLike, roots: Sequence[Path]) -> Path:
    """Where ``path`` points: an absolute path as it is; a relative one under the first root that has it (as a name
    belongs to the first root holding its folder, :meth:`AdapterStore.register_dir`), else under the first root."""
    p = Path(path)
    if p.is_absolute() or not roots:
        return p
    return next((Path(r) / p for r in roots if (Path(r) / p).exists()), Path(roots[0]) / p)


def confine(path: str | os.PathLike, roots: Sequence[Path]) -> Path:
    """``path`` resolved, if it lies inside one of ``roots`` (a relative path is taken from the first root that has
    it: :func:`locate`)."""
    if not roots:
        raise AdapterError("no adapter roots are configured; the server loads adapters only from --adapters folders")
    p = Path(path)
    if ".." in p.parts:
        raise AdapterError(f"adapter path {str(path)!r} contains '..'; give a path inside {[str(r) for r in roots]}")
    p = locate(p, roots)
    try:
        real = p.resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError):
        raise AdapterError(f"adapter path {str(path)!r} does not exist") from None
    for root in roots:
        root_real = Path(root).resolve()
        if real == root_real or root_real in real.parents:
            return real
    raise AdapterError(f"adapter path {str(path)!r} resolves outside the allowed roots {[str(r) for r in roots]}")


def read_servable(folder: Path):
    """(config, weights path) of an adapter folder as registering it reads them: the config parsed and checked, the
    safetensors file present (its tensors are read on first use). AdapterLoadError naming the folder (one of
    many under a root)."""
    try:
        config = read_adapter_config(folder)
    except AdapterLoadError as e:
        if str(folder) in str(e):
            raise
        raise AdapterLoadError(f"{folder}: {e}") from None
    wpath = weights_path(folder)
    if not wpath.is_file():
        raise AdapterLoadError(f"{folder} has no adapter_model.safetensors (only safetensors files are loaded)")
    return config, wpath


def served_folder(folder: str | os.PathLike) -> Path:
    """The adapter folder a folder under a root serves: ``folder/adapter`` when ``folder`` is a training run folder
    (``lorakit train --output``: its ``adapter/``, the adapter the run ended with, not a ``checkpoint-N``; as every
    CLI command that takes an adapter folder resolves one), else ``folder`` itself."""
    return run_adapter(folder) or Path(folder)


def adapter_folders(root: str | os.PathLike, *, field: str = "adapters") -> list[Path]:
    """The folders directly under ``root`` that hold an adapter or a training run (``adapter/`` inside:
    :func:`served_folder`, served under the run folder's name), or look meant to (a weights file without its config:
    registering it says what is wrong), sorted by name.

    Raises AdapterError with ``field`` (the argument naming ``root``; a command line words it with its flag) when
    ``root`` is missing, a file, unreadable, or an adapter folder itself (only folders under a root are served)."""
    root = Path(root)
    if not root.is_dir():
        raise AdapterError(f"{FIELD} {str(root)!r} " + ("is a file" if root.exists() else "does not exist")
                           + f": give a folder of adapter folders (each with {CONFIG_NAME})", field=field)
    if (root / CONFIG_NAME).is_file():
        raise AdapterError(f"{FIELD} {str(root)!r} is an adapter folder itself; give the folder that holds it "
                           f"({str(root.parent)!r}): every adapter folder directly under {FIELD} is served, "
                           f"named by its folder", field=field)
    try:
        entries = sorted(root.iterdir())
    except OSError as e:
        raise AdapterError(f"{FIELD} {str(root)!r} cannot be read ({e.strerror or e}): give a folder this process "
                           f"may list", field=field) from None
    # a killed save's temporary folder (.<name>.tmp-*) is no adapter, though it may hold a config
    return [d for d in entries if d.is_dir() and not is_temp_name(d.name)
            and ((d / CONFIG_NAME).is_file() or weights_path(d).is_file() or run_adapter(d) is not None)]


def base_name_mismatch(config, model: nn.Module) -> str | None:
    """Why ``config``'s ``base_model_name_or_path`` may name another model than ``model`` (its ``name_or_path``), or
    None when they agree or either is unknown. Compared by the last path component, since one model lives under
    different paths on different machines (a Hub id ``org/name``, a local copy ``/models/name``).

    A warning, never a refusal, as the libraries that load such files do: PEFT's ``get_peft_model`` warns when the
    two differ ("The PEFT config's `base_model_name_or_path` was renamed ...", peft 0.21.2, peft/mapping_func.py
    lines 139-157) and ``PeftModel.from_pretrained`` does not compare them; vLLM loads a LoRA without reading the
    field. Shapes that disagree with the model still fail when the weights load."""
    saved, served = getattr(config, "base_model_name_or_path", None), _name_or_path(model)
    if not saved or not served:
        return None

    def key(path) -> str:
        return str(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]

    if key(saved) == key(served):
        return None
    return (f"its adapter_config.json names base_model_name_or_path {saved!r}, this server's base is {served!r} "
            f"(compared by their last path component); it is served anyway, as PEFT and vLLM load it: check that it "
            f"was trained on this base")


def check_adapter_roots(roots: Sequence[str | os.PathLike] | None) -> None:
    """Before a server loads its model: every root is a readable folder of adapter folders (:func:`adapter_folders`;
    AdapterError with ``field="adapters"``). The adapter folders under it are not judged here: one that fails to
    register is skipped when the server starts (:meth:`AdapterStore.register_roots`), the others are served."""
    for root in roots or []:
        adapter_folders(root)


def _reason(error: BaseException) -> str:
    """An error as a failure record words it: lorakit's messages as they are, anything else with its type."""
    return str(error) if isinstance(error, LorakitError) else f"{type(error).__name__}: {error}"


class AdapterTaskError(LorakitError, ValueError):
    """A request's ``task`` does not fit its adapter (unknown task, task on an adapter without keys, missing task)."""


def _task_index(folder: Path, config) -> dict[str, int] | None:
    """Task -> key id of an attached adapter. A config that maps keys by name (``key_to_expert``, ``key_to_domain``)
    reads id j as the j-th of its sorted names (``mixtures.keys.KeyTable``; a request carries no task names): its
    saved ``task_index.json``'s tasks (all of them without one) get those ids. Otherwise the saved task index, else a
    routed adapter's ``adapter_names`` (id j = expert j)."""
    from ..data.keys import read_task_index
    from ..mixtures.keys import mapped_key_names

    tasks = read_task_index(folder)
    mapped = mapped_key_names(config)
    if mapped is not None:  # the training data's task ids may number a subset of the mapping's names
        return {n: mapped.index(n) for n in (mapped if tasks is None else tasks) if n in mapped}
    if tasks is not None or not hasattr(config, "default_expert"):
        return tasks
    names = getattr(config, "adapter_names", None)
    return {n: i for i, n in enumerate(names)} if names else None


class _NoDelta(nn.Module):
    """The bank of a layer that only attached adapters adapt: banked rows add nothing there."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, ctx) -> torch.Tensor:
        return base_out.new_zeros(())

    def add_into(self, x: torch.Tensor, base_out: torch.Tensor, ctx) -> torch.Tensor:
        return base_out


class _TieredRegistry(AdapterRegistry):
    """The banks, reading weights through the store's host cache instead of the disk."""

    def __init__(self, model: nn.Module, store: "AdapterStore", dtype: torch.dtype | None):
        super().__init__(model, dtype=dtype)
        self._store = store

    def _read_weights(self, name: str, path: Path):
        return self._store.host_weights(name, path)

    def _read_config(self, name: str, directory: Path):
        if self._store.paths.get(name) == Path(directory) and name in self._store.configs:
            return self._store.configs[name]
        return super()._read_config(name, directory)

    # Loads and removals by the store itself (its tiers) call AdapterRegistry's own methods; the public ones below are
    # what a caller banking into the model directly reaches (lorakit.serving.load_adapters / bank_adapters, which
    # find this registry on the model): the store adopts what they bank, and a name running requests hold is
    # neither replaced nor removed under them (every row of their batch would fail).
    def load(self, adapters, *, overwrite: bool = False) -> list[str]:
        if not isinstance(adapters, Mapping):  # named by folder, as AdapterRegistry.load (read once: an iterator too)
            adapters = {Path(d).name: d for d in adapters}
        with self._store._banking_directly(adapters):
            added = super().load(adapters, overwrite=overwrite)
            self._store._adopt(added)
        return added

    def add_attached(self, names: Sequence[str] | None = None, *, overwrite: bool = True) -> list[str]:
        if names is None:  # the store's attached adapters (DoRA, mixtures) are its own, served in their own forward
            from ..core.model import adapter_state

            names = [n for n in adapter_state(self.model).configs if n not in self._store.attached]
        names = list(names)  # (read once: an iterator too)
        with self._store._banking_directly(names):
            added = super().add_attached(names, overwrite=overwrite)
            self._store._adopt(added)
        return added

    def remove(self, name: str) -> None:
        """Drop ``name`` from the banks: through the store (AdapterConflictError while running requests hold it; a
        folder adapter stays registered and is loaded again when next requested; one banked directly is forgotten)."""
        if name in self._store.resident:  # (the banked ones too: evict forgets them)
            self._store.evict(name)
        else:
            super().remove(name)

    def _bank(self, path, new_banks):
        bank = self.banks.get(path) or new_banks.get(path)
        if bank is not None:  # (no get_submodule walk per module per load)
            return bank
        layer = self._layer(path)
        if layer is not None and isinstance(layer.bank, _NoDelta):
            layer.bank = None  # a real bank takes the placeholder's place
        return super()._bank(path, new_banks)


class AdapterStore:
    """Registered adapters of one model across the disk / host / resident tiers.

    Args:
        model: the base model (its banks are created here; an existing registry is replaced).
        roots: folders adapters may be loaded from.
        max_loras, max_resident_bytes: resident cap (count; bytes of adapter weights, None = no byte cap).
        max_cpu_loras, max_cpu_bytes: host cache cap.
    """

    def __init__(self, model: nn.Module, roots: Iterable[str | os.PathLike] = (), *, max_loras: int = 64,
                 max_resident_bytes: int | None = None, max_cpu_loras: int = 256, max_cpu_bytes: int | None = None,
                 dtype: torch.dtype | None = None, rank: int | None = None, base_name: str | None = None):
        if max_loras < 1 or max_cpu_loras < 1:
            raise AdapterError(f"max_loras and max_cpu_loras must be >= 1 (got {max_loras}, {max_cpu_loras})")
        self.roots = [Path(r).absolute() for r in roots]  # absolute: a relative root is not joined twice
        self.max_loras, self.max_resident_bytes = max_loras, max_resident_bytes
        self.max_cpu_loras, self.max_cpu_bytes = max_cpu_loras, max_cpu_bytes
        self.registry = _TieredRegistry(model, self, dtype)
        self.registry.max_slots = max_loras
        # adapters banked into the model directly (lorakit.serving.load_adapters / bank_adapters: no folder the store
        # registered), before or after this store was made: served as they are, never evicted (there is nothing to
        # load them again from); :meth:`names` and :meth:`check` know them with the registered ones
        self.banked: dict[str, None] = {}
        old = getattr(model, REGISTRY_ATTR, None)
        if isinstance(old, AdapterRegistry):  # banked before: its banks and ids carry over
            for attr in ("ids", "configs", "banks", "_names", "_free_ids", "_targets_cache", "_infos", "_installed"):
                setattr(self.registry, attr, getattr(old, attr))
            self.banked = dict.fromkeys(old.ids)
        object.__setattr__(model, REGISTRY_ATTR, self.registry)
        self.paths: dict[str, Path] = {}  # registered name -> folder
        # registered name -> a token of that registration: a read of its weights that began under an earlier one (a
        # prefetch still reading while the name was unloaded and loaded again) is not cached under this one
        self._registration: dict[str, object] = {}
        self.configs: dict[str, object] = {}  # registered name -> its folder's config as read and checked then
        self._host: OrderedDict[str, tuple[dict, int]] = OrderedDict()  # LRU: name -> (tensors, bytes)
        self._resident: OrderedDict[str, int] = OrderedDict()  # LRU: name -> bytes
        self._pins: Counter[str] = Counter()
        self._doomed: set[str] = set()  # unregistered while pinned: evict when released
        self._loading: set[str] = set()  # names a load is in flight for (:meth:`loading`, banking directly)
        self._load_marks: dict[str, object] = {}  # name -> the mark :meth:`loading` yielded (its load's register)
        self._unloading: set[str] = set()  # names an unload is in flight for (:meth:`unloading`)
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-prefetch")
        self._pending: dict[str, Future] = {}
        self._closed = False  # :meth:`close`: no more background reads
        self.attached: dict[str, object] = {}  # name -> config of adapters served attached (not banked)
        self.tasks: dict[str, dict[str, int]] = {}  # attached name -> task -> routing key id
        self.stats = Counter()  # disk_loads, resident_loads, evictions, host_hits
        # ``rank``: nested-rank adapters (configs with a ``rank`` setting: DyLoRA) are served at this rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise AdapterError(f"rank must be a positive integer (the rank nested-rank adapters are served at), got {rank!r}")
        self.rank = rank
        self.overrides: dict[str, dict] = {}  # attached name -> load_adapter config_overrides
        # name -> why it cannot be served (a folder that failed to register, weights that failed to load); a request
        # for it is refused with this, not as an unknown name, until the name registers again
        self.failed: dict[str, str] = {}
        # name -> the folder its recorded failure came from: the name's owner (a later root's folder of that name is
        # skipped, not served in its place; :meth:`register_dir`)
        self.failed_folders: dict[str, Path] = {}
        # ``base_name``: the name a server answers as the base model; an adapter of that name could never be requested
        self.base_name = base_name
        # registered name -> why it may be for another base (:func:`base_name_mismatch`); served anyway, logged once
        self.warnings: dict[str, str] = {}

    # -- registration (any thread) -------------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike, *, confined: bool = True, load: object = None) -> Path:
        """Make ``name`` servable from folder ``path``; the config is read and checked now, weights on first use.

        ``load``: the mark :meth:`loading` yielded for ``name``, when this register is that load's own (a server's
        load). Raises AdapterError / AdapterLoadError / ConfigError naming what is wrong, AdapterConflictError for a
        name that is registered, being unregistered (:meth:`unregister` while running requests hold it) or whose load is
        in flight (:meth:`loading` without ``load`` its mark, banking directly): the name belongs to the load that
        marked it first (was: a concurrent :meth:`register_dir` took it, and that load then got a 409). Success clears a
        failure recorded for ``name`` (:attr:`failed`); a failure updates one (so requests read the latest reason)."""
        try:
            folder = self._register(name, path, confined, load)
        except AdapterConflictError:  # the name's state, not its folder: nothing to record
            raise
        except LorakitError as e:
            with self._lock:
                if name in self.failed and name not in self.paths:
                    self._record(name, f"adapter {name!r} failed to register: {_reason(e)}",
                                 locate(path, self.roots) if confined else path)
            raise
        with self._lock:
            self.failed.pop(name, None)
            self.failed_folders.pop(name, None)
        return folder

    @contextlib.contextmanager
    def loading(self, name: str):
        """Mark ``name`` as being loaded while the block runs (a server's load, queued for the engine thread, runs
        register + :meth:`ensure_resident` inside it). Entering checks the name's state and marks it in one step under
        the store's lock, on the caller's thread: AdapterConflictError at once, before anything is queued, for a name
        that is loaded (registered or banked directly), whose load is in flight, or that is being unloaded
        (:meth:`unloading`, or unregistered while running requests hold it). While marked, a second load of ``name``,
        an unload of it and banking it directly are refused the same way instead of racing it (which would win would
        depend on the order the engine thread happens to run them in), and so is a :meth:`register` of it (by
        :meth:`register_dir` too) other than the load's own: it passes the yielded mark (``register(..., load=mark)``)."""
        with self._lock:
            if name in self._loading:
                raise AdapterConflictError(f"adapter {name!r} is being loaded by another request; retry after that "
                                           f"load finishes")
            self._refuse_unloading(name)
            if name in self.paths or name in self.banked:
                raise AdapterConflictError(f"adapter {name!r} is already loaded; unload it first")
            self._loading.add(name)
            mark = self._load_marks[name] = object()
        try:
            yield mark
        finally:
            with self._lock:
                self._loading.discard(name)
                self._load_marks.pop(name, None)

    @contextlib.contextmanager
    def unloading(self, name: str):
        """Mark ``name`` as being unloaded while the block runs (a server's unload, queued for the engine thread,
        runs :meth:`unregister` inside it). Entering checks and marks in one step under the store's lock, on the
        caller's thread, so a conflicting request is answered at once while the operation in progress finishes:
        AdapterConflictError for a name whose load is in flight (:meth:`loading`) or that is already being unloaded;
        UnknownAdapterError for a name neither served nor recorded as failed (:meth:`unregister` raises the same).
        While marked, a load of ``name`` is refused as being unloaded."""
        with self._lock:
            if name in self._loading:
                raise AdapterConflictError(f"adapter {name!r} is being loaded; unload it after that load finishes")
            if name in self._unloading or name in self._doomed:
                raise AdapterConflictError(f"adapter {name!r} is already being unloaded (running requests may still "
                                           f"use it; it is evicted when they finish)")
            if not (name in self.paths or name in self._resident or name in self.banked or name in self.failed):
                raise self._unknown(name)
            self._unloading.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._unloading.discard(name)

    def _refuse_unloading(self, name: str) -> None:
        """AdapterConflictError for a name being unloaded (its unload queued, or running requests still holding it).
        Called with the lock held."""
        if name in self._unloading or name in self._doomed:
            raise AdapterConflictError(f"adapter {name!r} is being unloaded (running requests may still use it); retry "
                                       f"when it is gone")

    def _record(self, name: str, reason: str, folder: str | os.PathLike) -> None:
        """Record why ``name`` (from ``folder``) cannot be served (:attr:`failed`, :attr:`failed_folders`)."""
        self.failed[name] = reason
        self.failed_folders[name] = Path(folder).absolute()

    def _refuse_loading(self, name: str, load: object) -> None:
        """AdapterConflictError for a name whose load is in flight, unless ``load`` is that load's mark
        (:meth:`loading`). Called with the lock held."""
        if name in self._loading and (load is None or self._load_marks.get(name) is not load):
            raise AdapterConflictError(f"adapter {name!r} is being loaded by another request; retry after that load "
                                       f"finishes")

    def _register(self, name: str, path: str | os.PathLike, confined: bool, load: object = None) -> Path:
        if not isinstance(name, str) or not name or name == BASE_NAME or len(name) > 256:
            raise AdapterError(f"invalid adapter name {name!r}")
        with self._lock:  # at once, before reading the folder (checked again below, where the name is taken)
            self._refuse_loading(name, load)
        if name == self.base_name:
            raise AdapterError(f"adapter name {name!r} is the base model's name (requests for it are answered by the "
                               f"base model); rename the adapter's folder")
        folder = confine(path, self.roots) if confined else Path(path)
        if not folder.is_dir():
            raise AdapterLoadError(f"adapter path {str(path)!r} is not a folder")
        if run_adapter(folder) is not None:  # a training run folder: its adapter/, under the name given
            folder = served_folder(folder)
            if confined:
                folder = confine(folder, self.roots)  # (an adapter/ symlinked out of the roots is refused)
        config, wpath = read_servable(folder)
        quantized = getattr(self.registry.model, "lorakit_quantize", None)  # the base's 4-bit setting (quantize_model)
        mismatch = trained_base_mismatch(folder, getattr(quantized, "quant_type", None),
                                         getattr(quantized, "double_quant", None), loader="this server")
        if mismatch:  # it would load (the shapes agree) and answer with outputs other than the trained model's
            raise AdapterLoadError(f"{mismatch}; its answers here would not be the trained model's: serve it on the "
                                   f"base it was trained on (lorakit serve with that run's --quantize / "
                                   f"--double-quant flags)")
        trained = trained_base_error(folder, "this server")
        if trained:  # it would load and answer with the untouched base's blocks, not the run's trained ones
            raise AdapterLoadError(trained)
        try:
            _check_bankable_config(config, folder)
            attached = None
        except AdapterLoadError:
            attached = config  # served attached, in its own forward
        if attached is not None:  # loaded into the model's layers: the core's naming rules apply
            from ..core.model import _check_name

            _check_name(name)
        overrides = None
        if self.rank is not None and attached is not None and "rank" in {f.name for f in dataclasses.fields(attached)}:
            from ..io.peft_format import override_config

            overrides = {"rank": self.rank}
            attached = override_config(attached, overrides, source=str(folder))  # ConfigError: rank above its r
        if confined:
            confine(wpath, self.roots)  # a symlinked weights file must not leave the roots either
        mismatch = base_name_mismatch(config, self.registry.model)
        with self._lock:
            if name in self.paths or name in self.banked:
                raise AdapterConflictError(f"adapter {name!r} is already loaded; unload it first")
            self._refuse_unloading(name)
            self._refuse_loading(name, load)
            self.paths[name] = folder
            self._registration[name] = object()
            self.configs[name] = config
            if mismatch is not None:
                self.warnings[name] = mismatch
            if attached is not None:
                self.attached[name] = attached
                if overrides:
                    self.overrides[name] = overrides
                tasks = _task_index(folder, attached)
                if tasks is not None:
                    self.tasks[name] = tasks
        if mismatch is not None:
            log.warning("adapter %r (%s) may be for another base model: %s", name, folder, mismatch)
        return folder

    def register_dir(self, root: str | os.PathLike, *, on_error: str = "raise") -> list[str]:
        """Register every adapter folder directly under ``root`` (named by folder; :func:`adapter_folders`); returns
        the names registered.

        A name belongs to the first folder registered under it (with several roots: the first root that has the
        name). A folder whose name another folder already owns is skipped with a warning naming both, whether the
        owner is served or failed (:attr:`failed`): a broken owner is not replaced by a later root's folder, and
        requests for the name keep getting the owner's reason. The owner's own folder, scanned again, is registered
        again (a failed one is retried).

        ``on_error``: ``"raise"`` (the first folder that fails to register raises, as a caller that wrote the folders
        itself wants) or ``"skip"`` (it is left out, its reason recorded in :attr:`failed` and logged as a warning
        naming the folder; the others register). A bad ``root`` itself raises AdapterError either way. A folder whose
        name is busy (AdapterConflictError: being unloaded while running requests hold it, loaded meanwhile by another
        thread, or its load in flight: :meth:`loading`, the name belongs to that load) is no fault of the folder:
        with "skip" it is left out with a warning and nothing recorded (was: recorded as failed, so requests for the
        name got a 400 telling them to fix a folder that is fine, and the record outlived the unload); registering the
        root again once the unload is done serves it. With "raise", AdapterConflictError."""
        if on_error not in ("raise", "skip"):
            raise AdapterError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        found = []
        for d in adapter_folders(Path(root).absolute(), field="root"):  # absolute: confine() reads a relative path as under the first root
            with self._lock:
                served, owner = self.paths.get(d.name), self.failed_folders.get(d.name)
            if served is not None or owner is not None:
                if served_folder(served or owner).resolve() != served_folder(d).resolve():
                    if served is not None:
                        why = f"an adapter named {d.name!r} is already served from {served}"
                    else:
                        why = (f"the name {d.name!r} belongs to {owner} (found first), which cannot be served, so "
                               f"requests for {d.name!r} are refused with its reason, not answered from here")
                    log.warning("skipped adapter folder %s: %s (names are folder names; rename one)", d, why)
                    continue
                if served is not None:
                    continue
            try:
                self.register(d.name, d)
            except AdapterConflictError as e:  # the name's state, not the folder's fault: skipped, nothing recorded
                if on_error == "raise":
                    raise
                log.warning("skipped adapter folder %s for now: %s; register it again once that is done", d, e)
                continue
            except Exception as e:  # noqa: BLE001  (skip: one bad folder, whatever its fault, never stops the others)
                if on_error == "raise":
                    raise
                with self._lock:
                    self._record(d.name, f"adapter {d.name!r} failed to register: {_reason(e)}", d)
                log.warning("skipped adapter folder %s: %s", d, _reason(e),
                            exc_info=None if isinstance(e, LorakitError) else e)
                continue
            found.append(d.name)
        return found

    def register_roots(self, roots: Iterable[str | os.PathLike]) -> list[str]:
        """Register every adapter folder under each root as a server starting up does: a folder that fails is
        skipped (``register_dir(on_error="skip")``), and a warning says when no adapter at all can be served (the
        base model still is). Returns the names registered."""
        roots = list(roots)
        found = [n for root in roots for n in self.register_dir(root, on_error="skip")]
        if roots and not self.paths:
            skipped = f"all {len(self.failed)} adapter folder(s) failed to register" if self.failed else \
                f"no adapter folders (with {CONFIG_NAME}) were found"
            log.warning("%s under %s; serving the base model only", skipped, ", ".join(str(r) for r in roots))
        return found

    def names(self) -> list[str]:
        """Every adapter a request may name: the registered folders, then the adapters banked directly; not one whose
        load is in flight (registered already, its weights not yet checked: :meth:`check` answers it as in flight)."""
        with self._lock:
            served = list(self.paths) + [n for n in self.banked if n not in self.paths]
            return [n for n in served if n not in self._loading]

    @contextlib.contextmanager
    def _banking_directly(self, names: Sequence[str]):
        """Around banking ``names`` into the model directly (the registry's public ``load`` / ``add_attached``):
        checks them and marks them as being loaded in one step under the lock, so a server load, an unload or a
        request for one of them meanwhile is answered as for any load in flight; the block adopts what it banked
        (:meth:`_adopt`) before the marks go. AdapterConflictError for a name the store serves from a folder or
        is loading, one running requests hold (replacing its weights would change their answers mid-request), or one
        being unloaded."""
        names = list(dict.fromkeys(names))
        with self._lock:
            for n in names:
                if n in self.paths or n in self._loading:
                    raise AdapterConflictError(f"adapter {n!r} is served by the store from "
                                               f"{self.paths.get(n, 'a load in flight')}; bank it under another name, "
                                               f"or unregister it first")
                if self._pins[n] > 0:
                    raise AdapterConflictError(f"adapter {n!r} is in use by running requests; bank it again when they "
                                               f"finish")
                self._refuse_unloading(n)
            self._loading.update(names)
        try:
            yield
        finally:
            with self._lock:
                self._loading.difference_update(names)

    def _adopt(self, names: Iterable[str]) -> None:
        """Serve ``names``, just banked into the model directly, as they are (:attr:`banked`)."""
        with self._lock:
            for n in names:
                self.banked[n] = None
                self.failed.pop(n, None)
                self.failed_folders.pop(n, None)

    def check(self, spec: RowSpec) -> None:
        """Raise UnknownAdapterError naming an unregistered adapter of ``spec`` (with near matches), AdapterLoadError
        with the recorded reason for one that failed (:attr:`failed`), AdapterConflictError for one whose load is in
        flight (:meth:`loading`, until it has succeeded or failed: also once registered, while its weights are read):
        a request may retry it (HTTP 409, which OpenAI's client retries by itself) where vLLM answers such a request
        with a 404, as if the name were unknown."""
        with self._lock:  # one view of the table: a load finishing between two reads would read as unknown
            for n in names_in(spec):
                if n in self._loading:  # its load is in flight: retry after it (an OpenAI client retries a 409)
                    raise AdapterConflictError(f"adapter {n!r} is being loaded; retry after its load finishes")
                if n not in self.paths and n not in self.banked:
                    if n in self.failed:
                        raise AdapterLoadError(self.failed[n])
                    raise self._unknown(n)
                if n in self.attached and isinstance(spec, Mapping):
                    raise AdapterError(f"adapter {n!r} ({type(self.attached[n]).__name__}) runs in its own forward "
                                       f"and cannot be part of a weighted mix; request it alone")

    def _unknown(self, name: str) -> UnknownAdapterError:
        """The error for a name neither registered nor recorded as failed: the same whether a request is checked
        (:meth:`check`), was queued before its adapter was unregistered (:meth:`ensure_resident`), or unloads it."""
        served = self.names()
        return UnknownAdapterError(f"unknown adapter {name!r}.{did_you_mean(name, served)} {len(served)} "
                                   f"adapter(s) are loaded")

    def attached_name(self, spec: RowSpec) -> str | None:
        """The adapter's name when ``spec`` is a single attached (not banked) adapter."""
        return spec if isinstance(spec, str) and spec in self.attached else None

    def task_key(self, spec: RowSpec, task: str | None) -> int | None:
        """The routing key id of ``task`` for a request on ``spec`` (None: the request carries no key).

        Raises ``AdapterTaskError`` (a LorakitError and ValueError: HTTP 400) for a task the adapter does not know (listing
        its tasks, with near matches), a task on an adapter that takes none, and a routed adapter whose rows without
        a key would silently get the base model (``default_expert = -1``) requested without a task."""
        from ..data.keys import keyless_rows_get_base

        name = self.attached_name(spec)
        tasks = self.tasks.get(name) if name is not None else None
        if task is None:
            if name is not None and keyless_rows_get_base(self.attached[name]):
                known = f"; its tasks: {', '.join(sorted(tasks))}" if tasks else ""
                raise AdapterTaskError(f"adapter {name!r} routes each request by its task key; add \"task\" to the "
                                       f"request{known}")
            return None
        if not isinstance(task, str) or not task:
            raise AdapterTaskError(f"'task' must be a non-empty string, got {task!r}")
        if tasks is None:
            what = f"adapter {spec!r}" if isinstance(spec, str) and spec != BASE_NAME else "the base model"
            raise AdapterTaskError(f"{what} takes no task key (only an adapter trained with task keys, whose folder "
                                   f"has task_index.json, does); drop \"task\" from the request")
        if task not in tasks:
            raise AdapterTaskError(f"unknown task {task!r} for adapter {name!r}; its tasks: "
                                   f"{', '.join(sorted(tasks))}.{did_you_mean(task, tasks)}")
        return tasks[task]

    def recomputes(self, name: str) -> bool:
        """Whether this attached adapter must see the whole sequence at every step (no KV reuse): X-LoRA's
        scaling pass re-reads every token's hidden state (its paper's dual forward; PEFT needs use_cache=False)."""
        return getattr(self.attached.get(name), "scaling_pass_value", None) is not None

    # -- host tier (any thread) ---------------------------------------------------------------------------
    def _read_host(self, name: str) -> tuple[dict, int]:
        """``name``'s weights (tensors, bytes): from the host cache, else read from its folder and cached, unless the
        name was unloaded meanwhile (it may be registered again, from another folder, by the time a background read
        ends: those tensors are not that registration's)."""
        with self._lock:
            hit = self._host.get(name)
            if hit is not None:
                self._host.move_to_end(name)
                self.stats["host_hits"] += 1
                return hit
            folder, registration = self.paths.get(name), self._registration.get(name)
        if folder is None:
            if name in self.failed:  # a request queued before its adapter failed
                raise AdapterLoadError(self.failed[name])
            raise self._unknown(name)  # a request queued before its adapter was unloaded
        tensors = load_tensors(weights_path(folder))
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            self.stats["disk_loads"] += 1
            if registration is not None and self._registration.get(name) is registration:
                self._host[name] = (tensors, nbytes)
                self._host.move_to_end(name)
                self._trim_host()
        return tensors, nbytes

    def _trim_host(self) -> None:
        def over():
            total = sum(e[1] for e in self._host.values())
            return len(self._host) > self.max_cpu_loras or (self.max_cpu_bytes is not None and total > self.max_cpu_bytes)
        while len(self._host) > 1 and over():
            self._host.popitem(last=False)

    def host_weights(self, name: str, path: Path):
        """The tensors of weights file ``path`` for adapter ``name``: through the host cache when it is that name's
        registered file (each name has its own entry, so two names on one folder never mix their reads)."""
        folder = self.paths.get(name)
        if folder is None or Path(path).resolve() != weights_path(folder).resolve():
            return load_tensors(Path(path))
        return self._read_host(name)[0]

    def prefetch(self, names: Iterable[str]) -> None:
        """Read these adapters' weights into the host cache in the background (disk -> host). Does nothing once the
        store is closed (:meth:`close`): they are read when first needed."""
        with self._lock:
            if self._closed:
                return
            for n in names:
                if n in self.paths and n not in self._host and n not in self._resident and n not in self._pending:
                    fut = self._pool.submit(self._prefetch_one, n)
                    self._pending[n] = fut

    def _prefetch_one(self, name: str) -> None:
        try:
            self._read_host(name)
        except Exception:  # noqa: BLE001  (a bad file is reported when the request needs it)
            pass
        finally:
            with self._lock:
                self._pending.pop(name, None)

    # -- resident tier (engine thread) ---------------------------------------------------------------------------
    @property
    def resident(self) -> list[str]:
        """The adapters in the banks (or attached): loaded by the store, then banked directly (:attr:`banked`)."""
        return list(self._resident) + list(self.banked)

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(self._resident.values())

    @property
    def host_bytes(self) -> int:
        with self._lock:  # (read by /metrics on a request's thread while the prefetch thread inserts)
            return sum(e[1] for e in self._host.values())

    def ensure_resident(self, spec: RowSpec) -> bool:
        """Load ``spec``'s adapters into the banks, evicting unpinned LRU ones; False when the caps, held by
        running requests, leave no room (the request waits). Raises AdapterLoadError for a bad file: that adapter
        is unregistered and its reason recorded (:attr:`failed`); the other adapters of ``spec`` stay loaded."""
        need = [n for n in names_in(spec) if n not in self._resident and n not in self.banked]
        for n in names_in(spec):
            if n in self._resident:
                self._resident.move_to_end(n)
        if not need:
            return True
        sizes = {}
        for n in need:
            try:
                sizes[n] = self._read_host(n)[1]
            except AdapterLoadError as e:
                raise self._fail(n, e) from e
        if not self._make_room(len(need), sum(sizes.values()), keep=set(names_in(spec))):
            total = sum(sizes.values()) + sum(self._resident.get(n, 0) for n in names_in(spec) if n not in sizes)
            reason = self.never_fits(spec, total)
            if reason is not None:
                raise AdapterError(reason)
            return False
        banked = [n for n in need if n not in self.attached]
        loaded, error = banked, None
        if banked:
            try:
                AdapterRegistry.load(self.registry, {n: self.paths[n] for n in banked})
            except AdapterLoadError:
                # the load is all or nothing: each is tried alone, so a mix's good adapters do not fail with its bad one
                loaded, error = self._load_each(banked)
        for n in need:
            if n in self.attached:
                try:
                    self._attach(n)
                except AdapterLoadError as e:
                    error = error or e
                    continue
                loaded = loaded + [n]
        for n in loaded:
            self._resident[n] = sizes[n]
        self.stats["resident_loads"] += len(loaded)
        if error is not None:
            raise error
        return True

    def _load_each(self, names: list[str]) -> tuple[list[str], AdapterLoadError | None]:
        """Load each adapter into the banks on its own: (the names loaded, the first error); each that fails is
        unregistered with its reason recorded."""
        loaded, error = [], None
        for n in names:  # only after a batched load failed: the few adapters of one request, not a hot path
            try:
                AdapterRegistry.load(self.registry, {n: self.paths[n]})
            except AdapterLoadError as e:
                error = error or self._fail(n, e)
                continue
            loaded.append(n)
        return loaded, error

    def _fail(self, name: str, error: BaseException) -> AdapterLoadError:
        """``name``'s weights failed to load: unregister it and record why, with a warning in the log. Returns the
        error to raise: the recorded reason, the same every later request for ``name`` is refused with
        (:meth:`check`), so the request that met the failure reads what the next ones read."""
        with self._lock:
            if name not in self.paths:  # already failed (a request queued before the first failure)
                return AdapterLoadError(self.failed.get(name, _reason(error)))
            folder = self.paths[name]
            self._unregister(name)  # (also while its load is in flight: this is that load failing)
            self._record(name, f"adapter {name!r} failed to load: {_reason(error)}", folder)
            recorded = AdapterLoadError(self.failed[name])
        log.warning("adapter %r (%s) failed to load and was unregistered: %s", name, folder, _reason(error))
        return recorded

    def never_fits(self, spec: RowSpec, nbytes: int | None = None) -> str | None:
        """Why ``spec``'s adapters can never be resident together (None when they can): more of them than
        ``max_loras``, or more than the slots the adapters banked directly (:attr:`banked`, never evicted) leave
        them; or (given their weights' ``nbytes``) more bytes than ``max_resident_bytes``."""
        names = set(names_in(spec))
        if len(names) > self.max_loras:
            return (f"the request names {len(names)} adapters but at most max_loras={self.max_loras} can be resident "
                    f"together (lorakit serve --max-loras; Ray Serve: max_loras_per_replica); mix fewer adapters")
        with self._lock:  # (banked changes on the engine thread; this also runs on a request's)
            held = [n for n in self.banked if n not in names]
        if len(names) + len(held) > self.max_loras:
            return (f"the request's {len(names)} adapter(s) need slots beside the {len(held)} banked directly "
                    f"({', '.join(held)}: never evicted), more than max_loras={self.max_loras}; unload one of those "
                    f"first")
        if nbytes is not None and self.max_resident_bytes is not None and nbytes > self.max_resident_bytes:
            return (f"the request's adapters need {nbytes} bytes resident, more than max_resident_bytes="
                    f"{self.max_resident_bytes}")
        return None

    def _make_room(self, count: int, nbytes: int, keep: set[str]) -> bool:
        def fits():
            return (len(self._resident) + len(self.banked) + count <= self.max_loras
                    and (self.max_resident_bytes is None or self.resident_bytes + nbytes <= self.max_resident_bytes))
        victims = [n for n in self._resident if self._pins[n] == 0 and n not in keep]  # LRU first
        while not fits() and victims:
            self.evict(victims.pop(0))
        return fits()

    def _attach(self, name: str) -> None:
        from ..core.model import adapter_state, set_adapter
        from ..io.peft_format import load_adapter

        model = self.registry.model
        active = list(adapter_state(model).active)
        try:
            load_adapter(model, self.paths[name], name, config_overrides=self.overrides.get(name))
        except AdapterLoadError as e:
            raise self._fail(name, e) from e
        set_adapter(model, active)  # loaded inactive: the engine activates it for its own rows only
        for module in model.modules():
            if isinstance(module, AdapterLayer) and module.bank is None:
                module.bank = _NoDelta()

    def evict(self, name: str) -> None:
        """Drop ``name`` from the banks (it stays registered and may stay in the host cache). An adapter banked
        directly (:attr:`banked`) is forgotten: there is no folder to load it again from.

        Raises AdapterConflictError while running requests hold it (:meth:`pin`): their batch's forward would meet an
        unknown adapter and fail every row (:meth:`unregister` waits for them instead)."""
        if self._pins[name] > 0:
            raise AdapterConflictError(f"adapter {name!r} is in use by {self._pins[name]} running request(s); evict "
                                       f"it when they finish (unregister waits for them)")
        from ..core.model import adapter_state, delete_adapter

        with self._lock:
            self.banked.pop(name, None)
        if self._resident.pop(name, None) is not None or name in self.registry:
            if name in self.registry:
                AdapterRegistry.remove(self.registry, name)
            elif name in adapter_state(self.registry.model).configs:  # an attached adapter
                delete_adapter(self.registry.model, name)
            self.stats["evictions"] += 1

    def pin(self, spec: RowSpec) -> None:
        with self._lock:  # (read by checks on other threads: banking directly, a load's or an unload's check)
            for n in names_in(spec):
                self._pins[n] += 1

    def unpin(self, spec: RowSpec) -> None:
        released = []
        with self._lock:
            for n in names_in(spec):
                self._pins[n] -= 1
                if self._pins[n] <= 0:
                    del self._pins[n]
                    if n in self._doomed:
                        self._doomed.discard(n)
                        released.append(n)
        for n in released:  # (outside the lock: the banks change on this, the engine's, thread only)
            self.evict(n)

    def unregister(self, name: str) -> None:
        """Forget ``name``: new requests for it fail; running ones finish first (then it is evicted). For a name
        that failed (:attr:`failed`), forgets its failure: requests for it are then refused as unknown.

        Raises UnknownAdapterError for a name neither registered nor recorded; AdapterConflictError while a load of
        ``name`` is in flight (:meth:`loading`) or while it is already being unregistered (running requests still
        hold it)."""
        with self._lock:  # checked and forgotten in one step: no load of the name can start in between
            if name in self._loading:
                raise AdapterConflictError(f"adapter {name!r} is being loaded; unload it after that load finishes")
            if name in self._doomed:
                raise AdapterConflictError(f"adapter {name!r} is already being unloaded (running requests still use "
                                           f"it; it is evicted when they finish)")
            evict = self._forget(name)
        if evict:
            self.evict(name)

    def _unregister(self, name: str) -> None:
        with self._lock:
            evict = self._forget(name)
        if evict:
            self.evict(name)

    def _forget(self, name: str) -> bool:
        """Forget ``name`` (with the lock held): whether to evict it now (False: running requests hold it, it is
        evicted when they finish, or it was only a recorded failure)."""
        known = name in self.paths or name in self._resident or name in self.banked
        if not known and self.failed.pop(name, None) is not None:
            self.failed_folders.pop(name, None)
            return False
        if not known:
            raise self._unknown(name)
        self.banked.pop(name, None)
        self.paths.pop(name, None)
        self._registration.pop(name, None)
        self.configs.pop(name, None)
        self.attached.pop(name, None)
        self.tasks.pop(name, None)
        self.warnings.pop(name, None)
        self._host.pop(name, None)
        if self._pins[name] > 0:
            self._doomed.add(name)
            return False
        return True

    def close(self) -> None:
        """Stop the background reads (:meth:`prefetch`): those queued are dropped, one in progress ends on its own.
        Everything else keeps working, so closing is safe while an engine still steps on this store (a shutdown that
        timed out, ``EngineStopError``: its loop ends the step it is in): adapters are then read from disk when first
        needed (was: that step's prefetch submitted to the closed pool, and the RuntimeError failed every running
        request). Idempotent."""
        with self._lock:  # (a prefetch on the engine thread submits under it: never to a closed pool)
            self._closed = True
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pending.clear()  # (cancelled reads never clear their own entry)
