"""The wrapper that holds a base layer and its named adapter deltas, and the modules_to_save wrapper."""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .delta import Delta, LayerInfo, MergeTerms, describe_layer, is_quantized, orient, oriented_weight, stored_layout
from .errors import AdapterError
from .routing import BASE_NAME, check_adapter_names, current_routing, routing, rows_for_batch, rows_routing


# Read-only attributes host models read from the layers they own: shapes (Whisper's encoder reads ``conv1.stride``;
# PEFT 0.21.2's wrappers do not answer these, and fail there) and the base ``weight`` / ``bias`` (T5's feed-forward
# reads ``wo.weight.dtype``, ``resize_token_embeddings`` the input embedding's weight; PEFT's wrappers answer
# these two). The wrapper answers them from its base layer; assigning one is refused by nn.Module.
_BASE_ATTRIBUTES = frozenset({"in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
                              "padding", "dilation", "groups", "padding_mode", "num_embeddings", "embedding_dim",
                              "weight", "bias"})


def _host_keys(wrapper: nn.Module, inner: str) -> None:
    """Give ``wrapper``'s state dict the host's own names for the module it wraps (``q_proj.weight``, not
    ``q_proj.base_layer.weight``), and read both spellings back.

    ``model.save_pretrained()`` writes ``model.state_dict()``; with the wrapped names, ``from_pretrained`` found
    no ``q_proj.weight`` and initialised those layers at random (with PEFT too: PEFT 0.21.2's injected layers save
    ``base_layer.weight``). With the host's names the saved folder reloads as the base model exactly (what the base
    layer holds: a merged adapter is in it); the adapter's own tensors (``adapters.<name>.*``, ``copies.<name>.*``)
    keep their names, which ``from_pretrained`` reports as unexpected, and a lorakit model (Trainer resuming a
    checkpoint, ``load_state_dict``) loads them back. Save the adapter itself with ``save_adapter``.
    """
    # partials of module-level functions, so a model with these hooks still pickles (torch.save(model))
    wrapper.register_state_dict_post_hook(functools.partial(_to_host_keys, own=inner + "."))
    wrapper.register_load_state_dict_pre_hook(functools.partial(_from_host_keys, own=inner + "."))


def _to_host_keys(module, state_dict, prefix, local_metadata, *, own: str) -> None:
    items = [(k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]  # keeps the order
    for k, v in items:
        host = prefix + k[len(prefix) + len(own):] if k.startswith(prefix + own) else k
        state_dict[host if host not in state_dict else k] = v


def _from_host_keys(module, state_dict, prefix, *rest, own: str) -> None:
    for k in [k for k in state_dict if k.startswith(prefix)]:
        wrapped = prefix + own + k[len(prefix):]
        if k[len(prefix):].split(".", 1)[0] not in module._modules and wrapped not in state_dict:
            state_dict[wrapped] = state_dict.pop(k)


class AdapterLayer(nn.Module):
    """``y = base_layer(x) + Σ_{active a} Δ_a(x)``.

    The base layer keeps its own parameters; deltas live in ``self.adapters`` keyed by adapter name.
    Merged adapters are folded into the base weight and skipped in forward.
    """

    def __init__(self, base_layer: nn.Module, info: LayerInfo):
        super().__init__()
        self.base_layer = base_layer
        self.info = info
        _host_keys(self, "base_layer")
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._original: tuple[torch.Tensor, torch.Tensor | None] | None = None  # exact pre-merge weights, if kept
        # The shared (tied) weight Parameter set aside while merged: merging writes into a private copy so that
        # the twin module (e.g. lm_head tied to embed_tokens) keeps the base weight; unmerging puts it back.
        self._tied: nn.Parameter | None = None
        # The unmerged base's slices (float32, (out, in) layout) that merged replacing deltas overwrote, by adapter
        # name: (dim, index, originals). Unmerging puts them back exactly (a replacement cannot be subtracted).
        self._replaced: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
        # The model's adapter configs (a shared dict, set when attached): names a routing context may use.
        self.known: dict | None = None
        # Optional batched multi-adapter executor (e.g. serving banks): called as bank(x, base_out, ctx) when a
        # routing context carries ``adapter_ids``; returns the summed delta for every row in one batched pass.
        self.bank: nn.Module | None = None

    def __getattr__(self, name: str):
        """The base layer's attributes in ``_BASE_ATTRIBUTES``; everything else as nn.Module finds it."""
        base = self.__dict__["_modules"].get("base_layer") if name in _BASE_ATTRIBUTES else None
        if base is not None and hasattr(base, name):
            return getattr(base, name)
        return super().__getattr__(name)

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Submodules are read from ``_modules`` directly: each ``self.<submodule>`` is a Python ``__getattr__``
        # call, and serving runs this once per adapted layer per forward (host time bounds small models on GPUs).
        modules = self._modules
        if not self.disabled and self.active:
            for name in self.active:
                delta = self.adapters[name] if name in self.adapters else None
                if delta is not None and delta.replaces_base and name not in self.merged:
                    if len([n for n in self.active if n in self.adapters]) > 1:
                        raise AdapterError(f"adapter {name!r} replaces this layer's forward and cannot be active "
                                           f"together with {[n for n in self.active if n != name]}")
                    return delta.full_forward(x, self.base_layer, *args, **kwargs)
            if len(self.active) == 1 and not self.merged and not args and not kwargs:
                delta = self.adapters[self.active[0]] if self.active[0] in self.adapters else None
                if delta is not None and current_routing() is None:
                    fused = delta.fused_forward(x, self.base_layer)
                    if fused is not None:
                        return fused
        base_out = modules["base_layer"](x, *args, **kwargs)
        if self.disabled:
            return base_out
        ctx = current_routing()
        if ctx is not None:
            if ctx.adapter_ids is not None:
                if self.merged:
                    raise AdapterError(f"adapters {self.merged} are merged into this layer's base weights, so every "
                                       f"banked row would get them too; call unmerge_adapter before bank_routing")
                bank = modules.get("bank")  # (None while unset: then a plain attribute, not in _modules)
                if bank is None:  # no banked adapter adapts this layer; attached ones do not run in bank batches
                    return base_out
                add_into = None if torch.is_grad_enabled() else getattr(bank, "add_into", None)
                if add_into is not None:
                    return add_into(x, base_out, ctx)  # inference: add into the base output in place
                return base_out + bank(x, base_out, ctx)
            if ctx.adapter_names is not None or ctx.adapter_weights is not None:
                return self._per_row_forward(x, base_out, ctx)
        out = base_out
        for name in self.active:
            if name in self.adapters and name not in self.merged:
                out = self.adapters[name].accumulate(out, x, base_out, self.base_layer)
        return out

    def _per_row_forward(self, x: torch.Tensor, base_out: torch.Tensor, ctx) -> torch.Tensor:
        """Each row uses its own adapter (``adapter_names``) and/or weighted adapters (``adapter_weights``)."""
        if self.merged:
            raise AdapterError("per-row adapters cannot be used while adapters are merged; call unmerge_adapter first")
        if self.known is not None:  # (the model's pre-hook checked already; this guards a submodule called alone)
            check_adapter_names(ctx, self.known)
        batch, out = x.shape[0], base_out
        names = None if ctx.adapter_names is None else rows_for_batch(list(ctx.adapter_names), batch, "adapter_names")
        weights = {name: rows_for_batch(torch.as_tensor(w).reshape(-1), batch, f"adapter_weights[{name!r}]")
                   for name, w in (ctx.adapter_weights or {}).items() if name in self.adapters}
        if weights:
            self._check_row_conflicts(names, weights)
        if names is not None:
            used = sorted({n for n in names if n is not None and n != BASE_NAME and n in self.adapters})
            if used and self._stackable(used):
                out = self._stacked_rows(x, out, names, used, ctx)
            elif used:
                out = self._looped_rows(x, base_out, out, names, used, ctx)
        for name, w in weights.items():
            w = w.to(device=base_out.device, dtype=base_out.dtype).reshape(-1, *([1] * (base_out.dim() - 1)))
            out = out + w * self.adapters[name](x, base_out, self.base_layer)
        return out

    def _check_row_conflicts(self, names: list | None, weights: dict[str, torch.Tensor]) -> None:
        """AdapterError when two adapters that cannot be active together (``Delta.conflict``: token rows with
        overlapping indices, as ``set_adapter`` refuses) act on one row: a row's ``adapter_names`` adapter and a
        weighted one, or two weighted ones, each with a nonzero weight there. Rows are read only for such a pair."""
        asking = {n for n in [*weights, *(names or [])]
                  if n in self.adapters and type(self.adapters[n]).conflict is not Delta.conflict}
        if len(asking) < 2:
            return
        named = list(dict.fromkeys(n for n in names or [] if n in asking))  # (in row order)
        pairs = [(m, n) for m in named for n in weights if n in asking and n != m]
        weighted = [n for n in weights if n in asking]
        pairs += [(m, n) for i, m in enumerate(weighted) for n in weighted[i + 1:]]
        for first, second in pairs:
            why = self.adapters[first].conflict(self.adapters[second])
            if why is None:
                continue
            rows = [self._rows_of(m, names, weights) for m in (first, second)]
            both = (rows[0] & rows[1]).nonzero().flatten()
            if len(both):
                raise AdapterError(f"adapters {first!r} and {second!r} cannot act together on batch row "
                                   f"{int(both[0])}: they {why}.")

    @staticmethod
    def _rows_of(name: str, names: list | None, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch,) bool: the rows ``name`` acts on, as its ``adapter_names`` rows or its nonzero weights (a named
        row takes the adapter whatever its own weight there: the weighted term comes on top)."""
        rows = torch.zeros(len(next(iter(weights.values()))), dtype=torch.bool)
        if names is not None:
            rows |= torch.tensor([n == name for n in names], dtype=torch.bool)
        if name in weights:
            rows |= weights[name].detach().cpu() != 0
        return rows

    def _stackable(self, used: list[str]) -> bool:
        deltas = [self.adapters[n] for n in used]
        if not all(d.plain_units for d in deltas):
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for d in deltas for m in d.modules()):
            return False  # the stacked bmm calls neither the delta nor its lora_A / lora_B: their hooks (ALLoRA,
            # GGPO, Flexora's input scale) would be skipped
        dropouts = {getattr(d.units().dropout, "p", 0.0) for d in deltas}  # nn.Dropout's p; None/Identity: 0
        dtypes = {d.dtype for d in deltas}
        return len(dropouts) == 1 and len(dtypes) == 1

    def _own_length(self, x: torch.Tensor, ctx, name: str) -> int | None:
        """The token count to cut adapter ``name``'s rows of ``x`` to (``Routing.adapter_lengths``), or None when
        they stay whole: no length given, or ``x`` has no token dimension of the batch's length (dim 1 of a linear
        layer's (batch, seq, in) input or of an embedding's (batch, seq) ids, as long as the token mask's)."""
        length = (ctx.adapter_lengths or {}).get(name)
        if length is None or ctx.token_mask is None:
            return None
        tokens = ctx.token_mask.shape[-1]
        token_dim = (self.info.kind == "linear" and x.dim() >= 3) or (self.info.kind == "embedding" and x.dim() == 2)
        return length if token_dim and x.shape[1] == tokens and length < tokens else None

    @staticmethod
    def _pad_tokens(y: torch.Tensor, tokens: int) -> torch.Tensor:
        """``y`` (rows, length, ...) zero-padded on dim 1 to ``tokens`` (the padding's outputs are never read)."""
        return F.pad(y, [0, 0] * (y.dim() - 2) + [0, tokens - y.shape[1]])

    def _own_draws(self, dropout: nn.Module, x: torch.Tensor, names, used, ctx) -> torch.Tensor:
        """``dropout(x)``, where the rows of each used adapter with a stream (``Routing.rng_streams``) get their mask
        from that stream at their own length (``_own_length``), as a batch of their own would draw it. One draw
        per stream (torch has no per-row generator); the matmuls stay batched. Rows without a stream draw together
        from the default generator."""
        streams = ctx.rng_streams or {}
        if not (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0) or not any(
                n in streams for n in used):
            return dropout(x)
        out = torch.zeros_like(x)
        for name in [n for n in used if n in streams] + [None]:
            rows = [i for i, n in enumerate(names) if (n == name if name is not None else n not in streams)]
            if not rows:
                continue
            index = torch.tensor(rows, device=x.device)
            part = x.index_select(0, index)
            if name is None:
                out = out.index_copy(0, index, dropout(part))
                continue
            length = self._own_length(x, ctx, name)
            with streams[name].drawing():
                dropped = dropout(part[:, :length].contiguous() if length is not None else part)
            out = out.index_copy(0, index, self._pad_tokens(dropped, x.shape[1]) if length is not None else dropped)
        return out

    def _stacked_rows(self, x, out, names, used, ctx):
        """One gathered bmm for all rows: units of the used adapters, zero-padded to the largest rank, stacked
        (differentiable, so concurrent training of several adapters on one base works through this path)."""
        deltas = [self.adapters[n] for n in used]
        units = [d.units() for d in deltas]
        r_max = max(u.A.shape[0] for u in units)
        A = torch.stack([F.pad(u.A, (0, 0, 0, r_max - u.A.shape[0])) for u in units])  # (U, r, in)
        B = torch.stack([F.pad(u.B, (0, r_max - u.B.shape[1])) for u in units])  # (U, out, r)
        slot = {n: i for i, n in enumerate(used)}
        ids = torch.tensor([slot.get(n, -1) for n in names], device=x.device)
        scale = torch.tensor([u.scaling for u in units], device=x.device, dtype=A.dtype)
        row_scale = torch.where(ids >= 0, scale[ids.clamp_min(0)], torch.zeros((), dtype=A.dtype, device=x.device))
        rows = ids.clamp_min(0)
        dropout = units[0].dropout or nn.Identity()  # the same for every used adapter (see _stackable)
        spec = self.info.conv
        if spec is not None:  # units: A (r, in·Πkernel), B (out, r); each row convolves with its own A as one group
            xs = self._own_draws(dropout, x.to(A.dtype), names, used, ctx)  # (batch, in, *spatial)
            n, c = xs.shape[:2]
            weight = A[rows].reshape(n * r_max, c, *spec.kernel_size)  # (batch·r, in, *kernel)
            h = spec.conv(xs.reshape(1, n * c, *xs.shape[2:]), weight, groups=n)  # (1, batch·r, *spatial')
            h = h.reshape(n, r_max, -1) * row_scale[:, None, None]  # (batch, r, positions)
            delta = torch.bmm(B[rows], h)  # (batch, out, positions)
            return out + delta.reshape(out.shape).to(out.dtype)
        xa = self._own_draws(dropout, x.to(A.dtype), names, used, ctx)
        xa = xa.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, in)
        h = torch.bmm(xa, A[rows].transpose(1, 2)) * row_scale[:, None, None]  # (batch, tokens, r)
        delta = torch.bmm(h, B[rows].transpose(1, 2))  # (batch, tokens, out)
        return out + delta.reshape(out.shape).to(out.dtype)

    def _looped_rows(self, x, base_out, out, names, used, ctx):
        """Reference path (any delta kind): gather each adapter's rows, like PEFT's ``adapter_names``. Each delta
        runs inside the routing context of its rows (``rows_routing``): its keys, token mask and per-row extras; on
        its rows cut to their own length (``Routing.adapter_lengths``) and drawing from its stream
        (``Routing.rng_streams``) when the context gives them."""
        streams = ctx.rng_streams or {}
        for name in used:
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            length = self._own_length(x, ctx, name)
            xs, bs = x.index_select(0, index), base_out.index_select(0, index)
            if length is not None:  # (contiguous, as alone: CUDA's fused dropout indexes strided inputs otherwise)
                xs, bs = xs[:, :length].contiguous(), bs[:, :length].contiguous()
            draws = streams[name].drawing() if name in streams else contextlib.nullcontext()
            with routing(**rows_routing(ctx, index, len(names), name, length)), draws:
                delta = self.adapters[name](xs, bs, self.base_layer)
            out = out.index_add(0, index, self._pad_tokens(delta, x.shape[1]) if length is not None else delta)
        return out

    # -- merging -------------------------------------------------------------------------------------
    def _terms(self, names: Iterable[str], base_weight: torch.Tensor | None) -> list[MergeTerms]:
        if base_weight is None:
            return [self.adapters[n].unmerge_terms() for n in names]
        return [self.adapters[n].merge_terms(base_weight) for n in names]

    @staticmethod
    def _combine(terms: list[MergeTerms], out_features: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.ones(out_features, device=device)
        add = torch.zeros((), device=device)
        bias = torch.zeros(out_features, device=device)
        for t in terms:
            if t.row_scale is not None:
                scale = scale + (t.row_scale.to(device) - 1)
            if t.weight is not None:
                add = add + t.weight.to(device)
            if t.bias is not None:
                bias = bias + t.bias.to(device).float()
        return scale, add, bias

    def _write(self, weight_oi: torch.Tensor, bias: torch.Tensor | None) -> None:
        base = self.base_layer
        w = stored_layout(weight_oi, self.info, base.weight.shape)
        with torch.no_grad():
            base.weight.copy_(w.to(base.weight.dtype))
            if bias is not None:
                base.bias.copy_(bias.to(base.bias.dtype))

    def _unmerged_base(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight (float32, (out, in)) and bias with every merged adapter taken back out."""
        if self._original is not None:
            w, b = self._original
            w = orient(w, self.info).float()
            return w.clone(), (b.float().clone() if b is not None else None)
        w = oriented_weight(self.base_layer, self.info).detach().float()
        b = getattr(self.base_layer, "bias", None)
        b = b.detach().float() if b is not None else None
        if not self.merged:
            return w.clone(), (b.clone() if b is not None else None)
        scale, add, bias = self._combine(self._terms(self.merged, None), self.info.out_features, w.device)
        w = (w - add) / scale[:, None]
        for name in self.merged:
            if name in self._replaced:
                dim, index, originals = self._replaced[name]
                w = w.index_copy(dim, index.to(w.device), originals.to(w.device))
        if b is not None:
            b = b - bias
        return w, b

    @property
    def untied(self) -> bool:
        """True while merged into a private copy of a weight that is shared with another module."""
        return self._tied is not None

    def check_merge(self, names: list[str]) -> None:
        """Raise AdapterError if any of ``names`` cannot be merged here (called before anything changes)."""
        base_bias = getattr(self.base_layer, "bias", None)
        if is_quantized(self.base_layer) and any(n in self.adapters and n not in self.merged for n in names):
            raise AdapterError(f"the base layer ({type(self.base_layer).__name__}) is quantized: merging would "
                               f"re-quantize W + ΔW and lose the update's precision. Dequantize first "
                               f"(lorakit.quantize.dequantize_model(model), as `lorakit merge --quantize` does), then "
                               f"merge into the full-precision weights.")
        if parametrize.is_parametrized(self.base_layer, "weight") and any(n in self.adapters and n not in self.merged
                                                                           for n in names):
            raise AdapterError(f"the base layer's weight ({type(self.base_layer).__name__}) is computed by a "
                               f"parametrization (e.g. weight_norm), so a merged update would not be kept; use the "
                               f"adapter unmerged, or torch.nn.utils.parametrize.remove_parametrizations first.")
        together = self.merged + [n for n in names if n in self.adapters and n not in self.merged]
        replacing = [n for n in together if self.adapters[n].merge_replaces]
        if replacing and len(together) > 1:
            raise AdapterError(f"adapter {replacing[0]!r} replaces slices of this layer's weight "
                               f"({type(self.adapters[replacing[0]]).__name__}) and cannot be merged into it together "
                               f"with {[n for n in together if n != replacing[0]]}: merge one of them, or serve them "
                               f"unmerged.")
        for n in names:
            if n not in self.adapters or n in self.merged:
                continue
            why = self.adapters[n].merge_error()
            if why is not None:
                raise AdapterError(f"adapter {n!r} {why}")
            if self.adapters[n].delta_bias() is not None and base_bias is None:
                raise AdapterError(f"adapter {n!r} has a bias but the base layer has none; it cannot be merged")

    def merge(self, names: list[str], keep_original: bool | None = None, *, untie: bool = False) -> None:
        """Fold ``names`` into the base weight. ``keep_original`` keeps a copy of the base weights so that
        ``unmerge`` restores them bit for bit (otherwise unmerging is arithmetic, exact up to rounding);
        None = keep only for half-precision weights, where arithmetic unmerging visibly damages the base.
        ``untie=True`` (the weight is shared with another module) merges into a private copy of the weight."""
        todo = [n for n in dict.fromkeys(names) if n in self.adapters and n not in self.merged]  # each once
        if not todo:
            return
        self.check_merge(todo)
        # Fresh terms are computed on the unmerged base (which untying or keeping the original below leaves as is)
        base_w, base_b = self._unmerged_base()
        fresh = self._terms(todo, base_w)
        if not self.merged and all(t.is_empty() for t in fresh):  # e.g. a tied head: its embedding writes the rows
            self.merged.extend(todo)
            return
        if untie and not self.merged:
            shared = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            self._tied = shared
        if keep_original is None:  # (replaced slices are kept exactly anyway: no copy of the whole weight for them)
            keep_original = (self.base_layer.weight.dtype in (torch.float16, torch.bfloat16)
                             and not all(self.adapters[n].merge_replaces for n in todo))
        if keep_original and not self.merged and self._tied is None:
            bias = getattr(self.base_layer, "bias", None)
            self._original = (self.base_layer.weight.detach().clone(), None if bias is None else bias.detach().clone())
        # Cached terms of the already merged adapters, fresh terms (computed on the unmerged base) for new ones.
        terms = self._terms(self.merged, None) + fresh
        scale, add, bias = self._combine(terms, self.info.out_features, base_w.device)
        merged_w = base_w * scale[:, None] + add
        for name, t in zip(self.merged + todo, terms):
            if t.replace is not None:
                dim, index, values = t.replace
                index = index.to(base_w.device)
                if name not in self._replaced:
                    self._replaced[name] = (dim, index, base_w.index_select(dim, index))
                merged_w = merged_w.index_copy(dim, index, values.to(merged_w))
        self._write(merged_w, base_b + bias if base_b is not None else None)
        self.merged.extend(todo)

    def unmerge(self) -> None:
        if not self.merged:
            return
        if (self._tied is None and self._original is None
                and all(t.is_empty() for t in self._terms(self.merged, None))):
            self.merged.clear()  # nothing was written (see merge)
            return
        if self._tied is not None:  # the shared weight was never written: put it back, bit for bit
            _, base_b = self._unmerged_base()
            self.base_layer.weight = self._tied
            self._tied = None
            if base_b is not None:
                with torch.no_grad():
                    self.base_layer.bias.copy_(base_b.to(self.base_layer.bias.dtype))
        elif self._original is not None:
            w, b = self._original
            with torch.no_grad():
                self.base_layer.weight.copy_(w)
                if b is not None:
                    self.base_layer.bias.copy_(b)
            self._original = None
        else:
            base_w, base_b = self._unmerged_base()
            self._write(base_w, base_b)
        self.merged.clear()
        self._replaced.clear()

    def swap_base(self, base_layer: nn.Module) -> None:
        """Put ``base_layer`` in place of the base layer, holding the same (out, in) weight in another storage (a
        dequantized 4-bit layer: a GPT-2 ``Conv1D`` stores it (in, out)); this layer's and its deltas'
        :class:`LayerInfo` follow the new storage, so merging and the weight-reading deltas (DoRA) orient it
        right. Raises AdapterError while adapters are merged, or for a layer of another kind or shape."""
        info = describe_layer(base_layer)
        if info is None or (info.kind, info.in_features, info.out_features) != (
                self.info.kind, self.info.in_features, self.info.out_features):
            raise AdapterError(f"{type(base_layer).__name__} cannot replace the {self.info.kind} base layer "
                               f"({self.info.in_features} -> {self.info.out_features}) of this adapter layer")
        if self.merged:
            raise AdapterError(f"adapters {self.merged} are merged into this base layer: unmerge them first")
        self.base_layer = base_layer
        self.info = info
        for delta in self.adapters.values():
            if getattr(delta, "info", None) is not None:
                delta.info = info

    def extra_repr(self) -> str:
        return f"kind={self.info.kind}, active={self.active}, merged={self.merged}"


class ModulesToSaveWrapper(nn.Module):
    """A module trained and saved in full per adapter (e.g. a classifier head), as PEFT's modules_to_save."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        _host_keys(self, "original_module")
        self.active: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str):
        """What nn.Module does not find is read from the module this wrapper runs: the active adapter's copy, else
        the original (as PEFT's ModulesToSaveWrapper), so host code reading ``lm_head.weight`` or
        ``classifier.out_features`` keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("__") or "original_module" not in modules:
                raise
        copies = modules.get("copies", {})
        active = [] if self.__dict__.get("disabled") else [n for n in self.__dict__.get("active", []) if n in copies]
        return getattr(copies[active[0]] if active else modules["original_module"], name)

    @staticmethod
    def copy_of(module: nn.Module) -> nn.Module:
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        return copy.deepcopy(module)

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.original_module(*args, **kwargs)
        ctx = current_routing()
        if ctx is not None and ctx.adapter_ids is not None:
            return self.original_module(*args, **kwargs)  # serving banks hold no whole-module copies
        if ctx is not None and (ctx.adapter_names is not None or ctx.adapter_weights is not None):
            return self._per_row_forward(ctx, args, kwargs)
        active = [n for n in self.active if n in self.copies]
        if len(active) > 1:
            raise AdapterError(f"adapters {active} each have their own copy of this module (modules_to_save) and a "
                               f"forward can use only one: activate one of them, or give each row its adapter with "
                               f"lorakit.routing(adapter_names=...)")
        return (self.copies[active[0]] if active else self.original_module)(*args, **kwargs)

    def _per_row_forward(self, ctx, args, kwargs):
        """Each row runs its own adapter's copy (rows without one run the original module).

        A loop over the adapters present in the batch, each on its own rows, as PEFT's ``_mixed_batch_forward``:
        the copies are whole modules of any type, so there is no shared low-rank form to batch them in.
        """
        if self.known is not None:
            check_adapter_names(ctx, self.known)
        if ctx.adapter_weights is not None:
            mixed = [n for n in ctx.adapter_weights if n in self.copies]
            if mixed:
                raise AdapterError(f"routing adapter_weights mixes {mixed}, which have their own copy of this module "
                                   f"(modules_to_save): a weighted mix of whole modules is not any adapter's "
                                   f"function. Route such adapters per row with adapter_names.")
        if ctx.adapter_names is None:
            return self.original_module(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        batch = x.shape[0]
        names = rows_for_batch(list(ctx.adapter_names), batch, "adapter_names")
        groups: dict[str | None, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n if n in self.copies else None, []).append(i)
        if list(groups) == [None]:
            return self.original_module(*args, **kwargs)
        out = None
        for name, rows in groups.items():
            index = torch.tensor(rows, device=x.device)

            def pick(v, index=index):
                return v.index_select(0, index) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v

            module = self.original_module if name is None else self.copies[name]
            stream = (ctx.rng_streams or {}).get(name) if name is not None else None
            with stream.drawing() if stream is not None else contextlib.nullcontext():  # its dropout, as alone
                y = module(*[pick(a) for a in args], **{k: pick(v) for k, v in kwargs.items()})
            if not isinstance(y, torch.Tensor):
                raise AdapterError(f"per-row modules_to_save needs a module returning a tensor; "
                                   f"{type(module).__name__} returned {type(y).__name__}")
            if out is None:
                out = y.new_empty((batch, *y.shape[1:]))
            out = out.index_copy(0, index, y)  # the groups cover every row exactly once
        return out
