"""The wrapper that holds a base layer and its named adapter deltas, and the modules_to_save wrapper."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .delta import LayerInfo, MergeTerms, oriented_weight
from .errors import AdapterError
from .routing import current_routing

BASE_NAME = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class AdapterLayer(nn.Module):
    """``y = base_layer(x) + Σ_{active a} Δ_a(x)``.

    The base layer keeps its own parameters; deltas live in ``self.adapters`` keyed by adapter name.
    Merged adapters are folded into the base weight and skipped in forward.
    """

    def __init__(self, base_layer: nn.Module, info: LayerInfo):
        super().__init__()
        self.base_layer = base_layer
        self.info = info
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._original: tuple[torch.Tensor, torch.Tensor | None] | None = None  # exact pre-merge weights, if kept
        # Optional batched multi-adapter executor (e.g. serving banks): called as bank(x, base_out, ctx) when a
        # routing context carries ``adapter_ids``; returns the summed delta for every row in one batched pass.
        self.bank: nn.Module | None = None

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.disabled:
            for name in self.active:
                delta = self.adapters[name] if name in self.adapters else None
                if delta is not None and delta.replaces_base and name not in self.merged:
                    if len([n for n in self.active if n in self.adapters]) > 1:
                        raise AdapterError(f"adapter {name!r} replaces this layer's forward and cannot be active "
                                           f"together with {[n for n in self.active if n != name]}")
                    return delta.full_forward(x, self.base_layer, *args, **kwargs)
        base_out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return base_out
        ctx = current_routing()
        if ctx is not None:
            if ctx.adapter_ids is not None:
                if self.bank is None:
                    raise AdapterError("routing(adapter_ids=...) needs adapters loaded into a bank on this layer")
                if not torch.is_grad_enabled() and hasattr(self.bank, "add_into"):
                    return self.bank.add_into(x, base_out, ctx)  # inference: add into the base output in place
                return base_out + self.bank(x, base_out, ctx)
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
        out = base_out
        if ctx.adapter_names is not None:
            names = list(ctx.adapter_names)
            if len(names) != x.shape[0]:
                raise AdapterError(f"routing adapter_names has {len(names)} entries for a batch of {x.shape[0]} rows")
            used = sorted({n for n in names if n is not None and n != BASE_NAME and n in self.adapters})
            if used and self._stackable(used):
                out = self._stacked_rows(x, out, names, used)
            elif used:
                out = self._looped_rows(x, base_out, out, names, used)
        if ctx.adapter_weights is not None:
            for name, w in ctx.adapter_weights.items():
                if name not in self.adapters:
                    continue
                w = w.to(device=base_out.device, dtype=base_out.dtype).reshape(-1, *([1] * (base_out.dim() - 1)))
                out = out + w * self.adapters[name](x, base_out, self.base_layer)
        return out

    def _stackable(self, used: list[str]) -> bool:
        deltas = [self.adapters[n] for n in used]
        if not all(d.plain_units for d in deltas):
            return False
        dropouts = {getattr(d.units().dropout, "p", 0.0) for d in deltas}  # nn.Dropout's p; None/Identity: 0
        dtypes = {d.dtype for d in deltas}
        return len(dropouts) == 1 and len(dtypes) == 1

    def _stacked_rows(self, x, out, names, used):
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
        xa = dropout(x.to(A.dtype)).reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, in)
        h = torch.bmm(xa, A[rows].transpose(1, 2)) * row_scale[:, None, None]  # (batch, tokens, r)
        delta = torch.bmm(h, B[rows].transpose(1, 2))  # (batch, tokens, out)
        return out + delta.reshape(out.shape).to(out.dtype)

    def _looped_rows(self, x, base_out, out, names, used):
        """Reference path (any delta kind): gather each adapter's rows, like PEFT's ``adapter_names``."""
        for name in used:
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            delta = self.adapters[name](x.index_select(0, index), base_out.index_select(0, index), self.base_layer)
            out = out.index_add(0, index, delta)
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
        w = weight_oi.T if self.info.fan_in_fan_out else weight_oi
        with torch.no_grad():
            base.weight.copy_(w.to(base.weight.dtype))
            if bias is not None:
                base.bias.copy_(bias.to(base.bias.dtype))

    def _unmerged_base(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight (float32, (out, in)) and bias with every merged adapter taken back out."""
        if self._original is not None:
            w, b = self._original
            w = (w.T if self.info.fan_in_fan_out else w).float()
            return w.clone(), (b.float().clone() if b is not None else None)
        w = oriented_weight(self.base_layer, self.info).detach().float()
        b = getattr(self.base_layer, "bias", None)
        b = b.detach().float() if b is not None else None
        if not self.merged:
            return w.clone(), (b.clone() if b is not None else None)
        scale, add, bias = self._combine(self._terms(self.merged, None), self.info.out_features, w.device)
        w = (w - add) / scale[:, None]
        if b is not None:
            b = b - bias
        return w, b

    def merge(self, names: list[str], keep_original: bool | None = None) -> None:
        """Fold ``names`` into the base weight. ``keep_original`` keeps a copy of the base weights so that
        ``unmerge`` restores them bit for bit (otherwise unmerging is arithmetic, exact up to rounding);
        None = keep only for half-precision weights, where arithmetic unmerging visibly damages the base."""
        todo = [n for n in names if n in self.adapters and n not in self.merged]
        if not todo:
            return
        for n in todo:
            if not self.adapters[n].mergeable:
                raise AdapterError(f"adapter {n!r} is input-dependent ({type(self.adapters[n]).__name__}) and cannot "
                                   f"be merged into the base weights; export or serve it unmerged")
        if keep_original is None:
            keep_original = self.base_layer.weight.dtype in (torch.float16, torch.bfloat16)
        if keep_original and not self.merged:
            bias = getattr(self.base_layer, "bias", None)
            self._original = (self.base_layer.weight.detach().clone(), None if bias is None else bias.detach().clone())
        base_w, base_b = self._unmerged_base()
        for n in todo:
            if self.adapters[n].delta_bias() is not None and base_b is None:
                raise AdapterError(f"adapter {n!r} has a bias but the base layer has none; it cannot be merged")
        # Cached terms of the already merged adapters, fresh terms (computed on the unmerged base) for new ones.
        terms = self._terms(self.merged, None) + self._terms(todo, base_w)
        scale, add, bias = self._combine(terms, self.info.out_features, base_w.device)
        self._write(base_w * scale[:, None] + add, base_b + bias if base_b is not None else None)
        self.merged.extend(todo)

    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._original is not None:
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

    def extra_repr(self) -> str:
        return f"kind={self.info.kind}, active={self.active}, merged={self.merged}"


class ModulesToSaveWrapper(nn.Module):
    """A module trained and saved in full per adapter (e.g. a classifier head), as PEFT's modules_to_save."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False

    @staticmethod
    def copy_of(module: nn.Module) -> nn.Module:
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        return copy.deepcopy(module)

    def forward(self, *args, **kwargs):
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name](*args, **kwargs)
        return self.original_module(*args, **kwargs)

