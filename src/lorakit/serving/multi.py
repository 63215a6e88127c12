"""Many adapters on one base model: load PEFT-format LoRA folders straight into per-layer banks, then run
batches where each row names its own adapter (or a weighted mix, or none), in ``forward`` and ``generate``.

    registry = load_adapters(model, {"math": "adapters/math", "sql": "adapters/sql"})
    with bank_routing(model, ["math", None, {"math": 0.7, "sql": 0.3}]):
        logits = model(input_ids=ids).logits
    out = generate(model, ids, adapter_names=["sql", "math", None], max_new_tokens=20)

Loading reads ``adapter_model.safetensors`` tensors and copies them into preallocated bank slots; no
per-adapter ``nn.Module`` is built. Banks are sized by what is loaded (exactly, when growing) and grow on
later loads. Adapters added with ``lorakit.add_adapter`` / ``load_adapter`` join the banks with
:meth:`AdapterRegistry.add_attached`. Outside a ``bank_routing`` block banked adapters do nothing.

Only plain LoRA / rsLoRA (linear and embedding layers, optional ``lora_bias``) can be banked, with a file's
``modules_to_save`` copies of Linear / Embedding modules banked exactly as the delta ``W' − W`` (rank min(in, out)):
each row then runs its own adapter's copy. A file's name lists are read as PEFT reads them — entries naming
modules this model lacks are skipped (PEFT's SEQ_CLS files list both "classifier" and "score"). DoRA rescales
each output row by a norm that depends on the adapter and the base weight, which does not batch as a
low-rank product; it is rejected, as PEFT rejects DoRA in mixed-adapter batches.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from ..core.delta import LayerInfo, describe_layer
from ..core.errors import AdapterError, AdapterLoadError, UnknownAdapterError, did_you_mean
from ..core.layer import BASE_NAME, AdapterLayer
from ..core.model import _get_parent, _resolve, adapter_state
from ..core.routing import current_routing, routing
from ..core.targeting import iter_host_modules, select_modules_to_save, select_targets
from ..io.files import TensorFile, load_tensors
from ..io.peft_format import (PREFIX, meta_tensors_message, read_adapter_config, refuse_meta_tensors,
                              trained_base_error, warn_config_changed, weights_path)
from ..methods.lora import DoraEmbedding, DoraLinear, LoraConfig, LoraEmbedding, LoraLinear
from .bank import WEIGHTS_KEY, LoraBank, bank_for, bump_storage_epoch

REGISTRY_ATTR = "lorakit_bank"
# A row of a mixed batch: an adapter name, None / "__base__" (no adapter), or {name: weight, ...}.
RowSpec = Union[str, None, Mapping[str, float]]


class AdapterRegistry:
    """The banked adapters of one model: name <-> global id, and one bank per adapted layer."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None):
        self.model = model
        self.dtype = dtype
        self.ids: dict[str, int] = {}
        self.configs: dict[str, LoraConfig] = {}
        self.banks: dict[str, LoraBank] = {}  # module path -> bank
        self._names: list[str | None] = []  # id -> name (None = freed id)
        self._free_ids: list[int] = []
        self._targets_cache: dict[str, list[str]] = {}
        self._infos: dict[str, LayerInfo | None] = {}  # module path -> describe_layer of its host module
        self._installed: tuple | None = None  # what install() last saw (see _installed_snapshot)
        self.max_slots: int | None = None  # most adapters a bank will hold (a store's max_loras): banks grow by doubling

    # -- names and ids -----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, name: object) -> bool:
        return name in self.ids

    def id_of(self, name: str) -> int:
        if name in self.ids:
            return self.ids[name]
        loaded = list(self.ids)
        shown = ", ".join(loaded[:10]) + (f", ... ({len(loaded)} in all)" if len(loaded) > 10 else "")
        raise UnknownAdapterError(f"unknown adapter {name!r}.{did_you_mean(name, loaded)} Banked adapters: "
                                  f"{shown or 'none'} (load them with load_adapters / registry.add_attached).")

    def route(self, rows: Sequence[RowSpec]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row specs -> (ids (batch,) or (batch, k), weights (batch, k) or None). -1 = no adapter."""
        rows = list(rows)
        if not any(isinstance(r, Mapping) for r in rows):
            return torch.tensor([-1 if r is None or r == BASE_NAME else self.id_of(r) for r in rows],
                                dtype=torch.long), None
        k = max(len(r) if isinstance(r, Mapping) else 1 for r in rows)
        ids = torch.full((len(rows), k), -1, dtype=torch.long)
        weights = torch.zeros(len(rows), k)
        for i, r in enumerate(rows):
            items = r.items() if isinstance(r, Mapping) else [(r, 1.0)]
            for j, (name, w) in enumerate(items):
                if name is not None and name != BASE_NAME:
                    ids[i, j], weights[i, j] = self.id_of(name), float(w)
        return ids, weights

    def _new_id(self, name: str) -> int:
        if self._free_ids:
            i = self._free_ids.pop()
            self._names[i] = name
        else:
            i = len(self._names)
            self._names.append(name)
        self.ids[name] = i
        return i

    # -- banks ---------------------------------------------------------------------------------------------
    def _layer(self, path: str) -> AdapterLayer | None:
        module = _resolve(self.model, path)  # a host path: through a wrapped block's base_layer (γ-MoD, MixLoRA)
        return module if isinstance(module, AdapterLayer) else None

    def _bank(self, path: str, new_banks: dict[str, LoraBank]) -> LoraBank:
        bank = self.banks.get(path) or new_banks.get(path)
        if bank is None:
            layer = self._layer(path)
            if layer is None:
                base = _resolve(self.model, path)
                layer = AdapterLayer(base, describe_layer(base))
            elif layer.bank is not None and not isinstance(layer.bank, LoraBank):
                raise AdapterError(f"layer {path!r} already has a bank of type {type(layer.bank).__name__}")
            bank = layer.bank if isinstance(layer.bank, LoraBank) else bank_for(layer, dtype=self.dtype)
            new_banks[path] = bank
        return bank

    def install(self) -> None:
        """Put every bank on its layer (wrapping plain layers in AdapterLayer); idempotent.

        Runs at every ``routing`` block (a ``delete_adapter`` / ``unload`` may have unwrapped layers since), so the
        common case is a check that nothing moved: every module on the way from the model to each bank's layer is
        still the one seen last time (dict lookups, no ``get_submodule`` walks), each layer still holds its bank,
        and (ids added since only grow the tables)."""
        seen = self._installed
        if seen is not None and _still_installed(seen[1], seen[2]):
            if seen[0] != len(self._names):  # new ids only: grow the tables, no walk
                for bank in self.banks.values():
                    bank.resize_table(len(self._names))
                self._installed = (len(self._names),) + seen[1:]
            return
        for path, bank in self.banks.items():
            module = _resolve(self.model, path)
            if not isinstance(module, AdapterLayer):  # e.g. delete_adapter unwrapped the layer
                module = AdapterLayer(module, describe_layer(module))
                parent, attr = _get_parent(self.model, path)
                setattr(parent, attr, module)
            if module.bank is not bank:
                module.bank = bank
            bank.resize_table(len(self._names))
        self._installed = self._installed_snapshot()
        bump_storage_epoch()  # layers may have been (re)wrapped: a captured step would miss or hold stale banks

    def _installed_snapshot(self) -> tuple | None:
        """(ids, edges (parent, name, child) from the model to every banked layer, (layer, bank) pairs), or None
        when some step is not a registered submodule (then every ``install`` walks the paths)."""
        edges: dict[tuple[int, str], tuple] = {}
        held = []
        for path, bank in self.banks.items():
            module = self.model
            for name in path.split(".") if path else ():
                child = module._modules.get(name)
                if child is None and isinstance(module, AdapterLayer):  # a wrapped block on the way: its base_layer
                    base = module._modules.get("base_layer")
                    edges[(id(module), "base_layer")] = (module, "base_layer", base)
                    module, child = base, base._modules.get(name)
                if child is None:
                    return None
                edges[(id(module), name)] = (module, name, child)
                module = child
            held.append((module, bank))
        return len(self._names), tuple(edges.values()), tuple(held)

    def _commit(self, new_banks: dict[str, LoraBank]) -> None:
        self.banks.update(new_banks)
        if new_banks:  # new layers to wrap: walk the paths (otherwise the snapshot check in install suffices)
            self._installed = None
        self.install()

    def _rollback(self, added: list[str], new_banks: dict[str, LoraBank]) -> None:
        for name in added:
            i = self.ids.pop(name)
            self.configs.pop(name, None)
            for bank in list(self.banks.values()) + list(new_banks.values()):
                bank.release(i)
            self._names[i] = None
            self._free_ids.append(i)

    def remove(self, name: str) -> None:
        """Drop a banked adapter; its slots are zeroed and reused by later loads."""
        i = self.id_of(name)
        for bank in self.banks.values():
            bank.release(i)
        del self.ids[name]
        self.configs.pop(name, None)
        self._names[i] = None
        self._free_ids.append(i)

    # -- loading from disk -----------------------------------------------------------------------------------
    def load(self, adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike], *,
             overwrite: bool = False) -> list[str]:
        """Read PEFT-format LoRA folders into the banks. A list of folders is named by folder name.

        All or nothing: on any error (bad config, DoRA, missing / unexpected / misshaped tensor, NaN) no
        adapter of this call stays loaded. Returns the names loaded.
        """
        if not isinstance(adapters, Mapping):
            adapters = {Path(d).name: d for d in adapters}
        plans = []  # (name, directory, config, [(path, kind, r, scaling)])
        need: dict[str, list[int]] = {}  # path -> [count, r_max]
        host: dict[str, nn.Module] | None = None
        for name, directory in adapters.items():
            if not isinstance(name, str) or not name or name == BASE_NAME:
                raise AdapterError(f"invalid adapter name {name!r}")
            if name in self.ids and not overwrite:
                raise AdapterError(f"adapter {name!r} is already banked; pass overwrite=True or remove it first")
            directory = Path(directory)
            config = self._read_config(name, directory)
            trained = trained_base_error(directory, "a bank")
            if trained:
                raise AdapterError(trained)
            _check_bankable_config(config, directory, files=True)
            key = json.dumps([config.target_modules, config.exclude_modules, config.layers_to_transform,
                              config.layers_pattern], sort_keys=True, default=str)
            if key not in self._targets_cache:
                self._targets_cache[key] = select_targets(self.model, config, strict=False)  # a file's names
            layers = []
            for path in self._targets_cache[key]:
                info = self._infos.get(path)
                if info is None:
                    if host is None:
                        host = dict(iter_host_modules(self.model))
                    info = self._infos[path] = describe_layer(host[path])
                if info is None or info.kind not in ("linear", "embedding"):
                    raise AdapterLoadError(f"{directory}: module {path!r} ({type(host[path]).__name__}) cannot "
                                           f"take a banked LoRA (linear and embedding layers only)")
                c = config.for_module(path)
                layers.append((path, info, c.r, c.scaling))
                n = need.setdefault(path, [0, 0])
                n[0], n[1] = n[0] + 1, max(n[1], c.r)
            saves = []
            for path in select_modules_to_save(self.model, config, strict=False) if config.modules_to_save else []:
                info = _saved_module_info(self.model, path, directory)
                saves.append((path, info))
                n = need.setdefault(path, [0, 0])
                n[0], n[1] = n[0] + 1, max(n[1], min(info.in_features, info.out_features))
            # banks are built on their base weights' device: on the meta device they would take none of the file's
            # values (as load_adapter refuses, before any bank is touched)
            refuse_meta_tensors(directory, {f"{path}.weight": _base_module(self.model, path).weight
                                            for path in [*(p for p, *_ in layers), *(p for p, _ in saves)]})
            _check_file_ranks(directory, layers)  # before the banks are sized by the config's r
            plans.append((name, directory, config, (layers, saves)))

        new_banks: dict[str, LoraBank] = {}
        for path, (count, r) in need.items():
            self._bank(path, new_banks).reserve(count, r, self.max_slots)
        added: list[str] = []
        try:
            for name, _, config, _ in plans:
                if name in self.ids:  # overwrite: same id, fresh slots
                    self.remove(name)
                self._new_id(name)
                added.append(name)
                self.configs[name] = config
            for bank in list(self.banks.values()) + list(new_banks.values()):
                bank.resize_table(len(self._names))
            for name, directory, config, layers in plans:
                self._read_into(self.ids[name], directory, config, layers, new_banks)
        except BaseException:
            self._rollback(added, new_banks)
            raise
        self._commit(new_banks)
        return added

    def _read_into(self, adapter_id: int, directory: Path, config: LoraConfig, plan, new_banks) -> None:
        layers, saves = plan
        path_w = weights_path(directory)
        tensors = self._read_weights(self._names[adapter_id], path_w)
        for key in tensors:
            if not key.startswith(PREFIX):
                raise AdapterLoadError(f"{path_w}: tensor {key!r} does not start with {PREFIX!r}; not a PEFT-layout file")
        used = set()
        for path, info, r, scaling in layers:
            got = []
            for suffix, shape in _factor_shapes(info, r):
                key = f"{PREFIX}{path}.{suffix}"
                t = tensors.get(key)
                if t is None:
                    raise AdapterLoadError(f"{path_w}: tensor {key!r} the config requires is missing")
                _check_factor_shape(path_w, path, key, suffix, tuple(t.shape), shape, r)
                used.add(key)
                got.append(t)
            bias = None
            if config.lora_bias and info.kind == "linear":
                key = f"{PREFIX}{path}.lora_B.bias"
                bias = tensors.get(key)
                if bias is None or tuple(bias.shape) != (info.out_features,):
                    raise AdapterLoadError(f"{path_w}: tensor {key!r} is missing or misshaped (lora_bias=True)")
                used.add(key)
            bank = self._bank(path, new_banks)
            bank.write(bank.allocate(adapter_id), got[0], got[1], scaling, bias)
        for path, info in saves:
            if f"{PREFIX}{path}.weight" not in tensors:
                continue  # a name the file lists but did not train (PEFT's SEQ_CLS lists "classifier" and "score")
            bank = self._bank(path, new_banks)
            A, B, bias, keys = _whole_module_as_lora(_base_module(self.model, path), info, tensors, f"{PREFIX}{path}",
                                                     path_w)
            used.update(keys)
            bank.write(bank.allocate(adapter_id), A, B, 1.0, bias)
        extra = [k for k in tensors if k not in used and not self._same_base_weight(k, tensors[k])]
        if extra:
            raise AdapterLoadError(f"{path_w}: {len(extra)} tensor(s) match no module this adapter's config targets, "
                                   f"e.g. {extra[:3]}; is it for a different base model?")

    def _read_config(self, name: str, directory: Path) -> LoraConfig:
        """The folder's adapter config for adapter ``name`` (a store overrides this with the config it read when it
        registered that name)."""
        return read_adapter_config(directory)

    def _read_weights(self, name: str, path: Path) -> dict[str, torch.Tensor]:
        """The weights file's tensors (checked finite) for adapter ``name``; a host-memory cache overrides this."""
        return load_tensors(path)

    def _same_base_weight(self, key: str, value: torch.Tensor) -> bool:
        """PEFT saves the base embedding when embeddings are targeted; fine when it equals this model's own."""
        if ".base_layer." not in key:
            return False
        module_path, _, param = key[len(PREFIX):].replace(".base_layer.", ".").rpartition(".")
        try:
            module = _resolve(self.model, module_path)
        except AttributeError:
            return False
        current = getattr(module.base_layer if isinstance(module, AdapterLayer) else module, param, None)
        if not isinstance(current, torch.Tensor) or current.shape != value.shape:
            return False
        if not torch.equal(current.detach().cpu(), value.to(current.dtype)):
            raise AdapterLoadError(f"tensor {key!r} is a base-model weight that differs from this model's (a resized "
                                   f"vocabulary?); load the matching base model first")
        return True

    # -- adapters already attached to the model ----------------------------------------------------------------
    def add_attached(self, names: Sequence[str] | None = None, *, overwrite: bool = True) -> list[str]:
        """Copy adapters added with ``lorakit.add_adapter`` / ``load_adapter`` into the banks (default: all).

        The banks hold a copy: after training the attached adapter further, call this again to refresh it.
        """
        state = adapter_state(self.model)
        names = list(state.configs) if names is None else list(names)
        for n in names:
            if n not in state.configs:
                raise UnknownAdapterError(f"unknown adapter {n!r}.{did_you_mean(n, state.configs)} Attached: {list(state.configs)}")
            if n in self.ids and not overwrite:
                raise AdapterError(f"adapter {n!r} is already banked; pass overwrite=True or remove it first")
            _check_bankable_config(state.configs[n], n)
        layers = [(p, m) for p, m in self.model.named_modules() if isinstance(m, AdapterLayer)]
        need: dict[str, list[int]] = {}
        for n in names:
            for path, layer in layers:
                if n in layer.adapters:
                    delta = layer.adapters[n]
                    if type(delta) not in (LoraLinear, LoraEmbedding):
                        kind = "DoRA" if isinstance(delta, (DoraLinear, DoraEmbedding)) else type(delta).__name__
                        raise AdapterError(f"adapter {n!r} at {path!r} is {kind}; only plain LoRA can be banked")
                    # as load / load_adapter refuse: a bank built beside a meta base weight, or copied from a meta
                    # delta, holds no values; refused before any bank is touched
                    tensors = {f"{path}.weight": layer.base_layer.weight,
                               **{f"{path}.{k}": v for k, v in delta.state_dict().items()}}
                    message = meta_tensors_message(f"adapter {n!r}", tensors, then="add the adapter and bank it")
                    if message:
                        raise AdapterError(message)
                    c = need.setdefault(path, [0, 0])
                    c[0], c[1] = c[0] + 1, max(c[1], delta.r)
        new_banks: dict[str, LoraBank] = {}
        for path, (count, r) in need.items():
            self._bank(path, new_banks).reserve(count, r, self.max_slots)
        added: list[str] = []
        try:
            for n in names:
                if n in self.ids:
                    self.remove(n)
                i = self._new_id(n)
                added.append(n)
                self.configs[n] = state.configs[n]
                for bank in list(self.banks.values()) + list(new_banks.values()):
                    bank.resize_table(len(self._names))
                for path, layer in layers:
                    if n in layer.adapters:
                        u = layer.adapters[n].units()
                        bias = getattr(getattr(layer.adapters[n], "lora_B", None), "bias", None)
                        bank = self._bank(path, new_banks)
                        bank.write(bank.allocate(i), u.A.detach(), u.B.detach(), u.scaling,
                                   None if bias is None else bias.detach())
        except BaseException:
            self._rollback(added, new_banks)
            raise
        self._commit(new_banks)
        return added

    # -- running --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def routing(self, rows: Sequence[RowSpec]) -> Iterator[None]:
        """Run the block with one adapter (or weighted mix, or none) per batch row."""
        ids, weights = self.route(rows)
        self.install()
        outer = current_routing()
        extras = {k: v for k, v in (outer.extras if outer is not None else {}).items() if k != WEIGHTS_KEY}
        if weights is not None:
            extras[WEIGHTS_KEY] = weights
        with routing(adapter_ids=ids, extras=extras):
            yield

    def generate(self, input_ids: torch.Tensor, adapter_names: Sequence[RowSpec], **kwargs) -> torch.Tensor:
        with self.routing(adapter_names):
            return self.model.generate(input_ids=input_ids, **kwargs)

    def reserve_static(self, adapters: int, r: int) -> None:
        """Allocate now every bank's storage for ``adapters`` adapters at rank up to ``r`` and id tables for
        ``adapters`` ids (what a store with ``max_loras=adapters`` can hold), so that later loads write in place;
        static-shape decode steps (``serving/graphs.py``) call this before capturing CUDA graphs."""
        self.install()
        for bank in self.banks.values():
            bank.reserve_capacity(adapters, r)
            bank.resize_table(max(adapters, len(self._names)))

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for bank in self.banks.values() for b in bank.buffers())


def _still_installed(edges: tuple, held: tuple) -> bool:
    for parent, name, child in edges:
        if parent._modules.get(name) is not child:
            return False
    for layer, bank in held:
        if layer._modules.get("bank") is not bank:
            return False
    return True


def _base_module(model: nn.Module, path: str) -> nn.Module:
    module = _resolve(model, path)
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _saved_module_info(model: nn.Module, path: str, where) -> LayerInfo:
    module = _base_module(model, path)
    info = describe_layer(module)
    if info is None or info.kind not in ("linear", "embedding"):
        raise AdapterLoadError(f"{where}: modules_to_save module {path!r} ({type(module).__name__}) cannot be banked "
                               f"(nn.Linear, Conv1D and nn.Embedding can); load it with lorakit.load_adapter and serve "
                               f"it in its own batch.")
    return info


def _whole_module_as_lora(module: nn.Module, info: LayerInfo, tensors: Mapping[str, torch.Tensor], key: str,
                          where) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[str]]:
    """A trained copy of a whole module (modules_to_save) as an exact bank entry: ``Δ = (W' − W) x + (b' − b)``,
    factored as ``B A`` with the identity on the smaller side (rank min(in, out), scaling 1). Returns (A (r, in),
    B (out, r), bias delta or None, the tensor keys used)."""
    new_w = tensors[f"{key}.weight"]
    if tuple(new_w.shape) != tuple(module.weight.shape):
        raise AdapterLoadError(f"{where}: tensor {key + '.weight'!r} has shape {tuple(new_w.shape)}; this model's "
                               f"module has {tuple(module.weight.shape)}")
    if new_w.is_floating_point() and not torch.isfinite(new_w).all():
        raise AdapterLoadError(f"{where}: tensor {key + '.weight'!r} has non-finite values (NaN/Inf)")
    diff = (new_w.float() - module.weight.detach().float().cpu())
    diff = diff.T if info.fan_in_fan_out else diff  # (out, in)
    out_f, in_f = diff.shape
    if out_f <= in_f:
        A, B = diff, torch.eye(out_f)
    else:
        A, B = torch.eye(in_f), diff
    keys, bias = [f"{key}.weight"], None
    if getattr(module, "bias", None) is not None:
        new_b = tensors.get(f"{key}.bias")
        if new_b is None or tuple(new_b.shape) != tuple(module.bias.shape):
            raise AdapterLoadError(f"{where}: tensor {key + '.bias'!r} is missing or misshaped")
        bias = new_b.float() - module.bias.detach().float().cpu()
        keys.append(f"{key}.bias")
    return A, B, bias, keys


def _check_bankable_config(config, where, *, files: bool = False) -> None:
    """AdapterLoadError for an adapter a bank cannot hold (the store then serves it attached, in its own forward);
    AdapterError (served neither way) for one whose tensors are relative to a base its init changed."""
    from ..core.inits import changed_base_error

    spec = config.requested_init() if isinstance(config, LoraConfig) else None
    changed = changed_base_error(str(where), spec, "every request runs on")
    if changed is not None:
        raise AdapterError(changed)
    if not isinstance(config, LoraConfig) or type(config) is not LoraConfig:
        raise AdapterLoadError(f"{where}: method {type(config).__name__} cannot be banked; only plain LoRA/rsLoRA")
    if config.use_dora:
        raise AdapterLoadError(
            f"{where}: DoRA adapters cannot run in a mixed-adapter batch (their per-row magnitude rescales the base "
            f"output; PEFT rejects this too). Load it with lorakit.load_adapter and serve it in its own batch.")
    if config.trainable_token_indices is not None:
        raise AdapterLoadError(
            f"{where}: trainable_token_indices (trained embedding rows) cannot be banked per row; load it with "
            f"lorakit.load_adapter and serve it in its own batch.")
    if config.modules_to_save and not files:
        raise AdapterLoadError(
            f"{where}: modules_to_save={config.modules_to_save} (whole trained modules) cannot be banked per row; "
            f"load it with lorakit.load_adapter and serve it in its own batch.")


def _factor_shapes(info: LayerInfo, r: int) -> tuple[tuple[str, tuple[int, int]], ...]:
    """(key suffix, shape) of a rank-``r`` LoRA's A and B on a layer described by ``info``, as PEFT saves them."""
    names = ("lora_embedding_A", "lora_embedding_B") if info.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
    return tuple(zip(names, ((r, info.in_features), (info.out_features, r))))


def _check_factor_shape(path_w: Path, path: str, key: str, suffix: str, got: tuple[int, ...],
                        shape: tuple[int, int], r: int) -> None:
    """AdapterLoadError naming tensor ``key`` when its shape ``got`` is not ``shape`` (and the saved rank when only the
    rank differs from the config's ``r``)."""
    if got == shape:
        return
    rank_dim = 0 if suffix.startswith(("lora_A", "lora_embedding_A")) else 1
    saved_r = got[rank_dim] if len(got) == 2 else None
    other = got[1 - rank_dim] if len(got) == 2 else None
    why = (f": adapter_config.json gives {path} r={r} (r / rank_pattern), but the tensors were saved with r={saved_r}"
           if other == shape[1 - rank_dim] and saved_r != r else "")
    raise AdapterLoadError(f"{path_w}: tensor {key!r} has shape {got} but this model and config (r / rank_pattern, "
                           f"module size) expect {shape}{why}")


def _check_file_ranks(directory: Path, layers) -> None:
    """The shapes of the factors the weights file holds for ``layers`` ((path, info, r, scaling) each), read from its
    header (no tensor is read), against the config's ranks: banks are sized by r before the tensors are read, so an
    adapter_config.json edited to a huge rank would be allocated before any tensor could name it. Also warns when
    the config is not the one saved with the tensors (``warn_config_changed``)."""
    file = TensorFile(weights_path(directory))
    warn_config_changed(directory, file)
    keys = set(file.keys())
    for path, info, r, _ in layers:
        for suffix, shape in _factor_shapes(info, r):
            key = f"{PREFIX}{path}.{suffix}"
            if key in keys:  # (a missing one is named when the tensors are read)
                _check_factor_shape(file.path, path, key, suffix, file.shape(key), shape, r)


# -- free functions -----------------------------------------------------------------------------------------------
def registry_of(model: nn.Module, *, create: bool = False, dtype: torch.dtype | None = None) -> AdapterRegistry:
    reg = getattr(model, REGISTRY_ATTR, None)
    if reg is None:
        if not create:
            raise AdapterError("this model has no banked adapters; call lorakit.serving.load_adapters first")
        reg = AdapterRegistry(model, dtype=dtype)
        object.__setattr__(model, REGISTRY_ATTR, reg)  # a plain attribute, not a submodule
    return reg


def load_adapters(model: nn.Module, adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike], *,
                  dtype: torch.dtype | None = None, overwrite: bool = False) -> AdapterRegistry:
    """Load many PEFT-format LoRA folders into ``model``'s banks ({name: folder} or a list of folders)."""
    reg = registry_of(model, create=True, dtype=dtype)
    reg.load(adapters, overwrite=overwrite)
    return reg


def bank_adapters(model: nn.Module, names: Sequence[str] | None = None, *,
                  dtype: torch.dtype | None = None) -> AdapterRegistry:
    """Copy adapters attached with ``lorakit.add_adapter`` / ``load_adapter`` into banks (default: all)."""
    reg = registry_of(model, create=True, dtype=dtype)
    reg.add_attached(names)
    return reg


@contextlib.contextmanager
def bank_routing(model: nn.Module, adapter_names: Sequence[RowSpec]) -> Iterator[None]:
    """``with bank_routing(model, ["a", None, {"a": .7, "b": .3}]): model(...)`` — one spec per batch row."""
    with registry_of(model).routing(adapter_names):
        yield


def generate(model: nn.Module, input_ids: torch.Tensor, adapter_names: Sequence[RowSpec], **kwargs) -> torch.Tensor:
    """``model.generate`` with one adapter per row; rows keep their adapter through every decode step."""
    return registry_of(model).generate(input_ids, adapter_names, **kwargs)
