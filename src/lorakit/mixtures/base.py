"""What every mixture delta shares: routing records for balance losses, router statistics, and routing traces."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator

import torch
from torch import nn

from ..core.checkpointing import recomputing, reentrant_forward
from ..core.errors import ConfigError
from ..core.delta import Delta
from ..core.layer import AdapterLayer
from ..core.parallel import gather_rows
from ..core.routing import current_routing, rows_for_batch
from .router import RouterOutput, z_loss


@dataclass
class AuxRecord:
    """One forward's routing at one layer, kept for the method's balance / supervision loss."""

    out: RouterOutput
    token_mask: torch.Tensor | None  # (N,) bool, real tokens
    keys: torch.Tensor | None  # (N,) per-token routing key (e.g. task id), when the data has one
    key_names: list[str] | None = None  # name of each key id (the training loop passes the task names)


def token_mask_for(n_tokens: int) -> torch.Tensor | None:
    ctx = current_routing()
    if ctx is None or ctx.token_mask is None or ctx.token_mask.numel() != n_tokens:
        return None
    return ctx.token_mask.reshape(-1).bool()


def token_keys_for(x_shape: torch.Size) -> torch.Tensor | None:
    """Per-token keys: the routing context's per-row keys broadcast over the sequence."""
    ctx = current_routing()
    if ctx is None or ctx.keys is None or not isinstance(ctx.keys, torch.Tensor):
        return None
    keys = ctx.keys
    if keys.dim() == 1 and len(x_shape) == 3 and keys.shape[0] and x_shape[0] % keys.shape[0] == 0:
        keys = rows_for_batch(keys, x_shape[0], "keys", "key")  # generate's beams keep their row's key
        keys = keys[:, None].expand(x_shape[0], x_shape[1])
    n = 1
    for s in x_shape[:-1]:
        n *= s
    return keys.reshape(-1) if keys.numel() == n else None


class MixtureDelta(Delta):
    """Base of routed deltas: call ``self.observe(router_out, x.shape)`` once per forward."""

    mergeable = False
    # Methods without a routing loss (e.g. SMoRA) set False so no forward's graph is kept waiting for one.
    keeps_aux_records = True

    def __init__(self, info, num_experts: int):
        super().__init__(info)
        self.num_experts = num_experts
        self.register_buffer("stat_load", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("stat_entropy", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("stat_tokens", torch.zeros((), dtype=torch.float64), persistent=False)
        self._aux: list[AuxRecord] = []
        self._aux_lost = False  # a forward ran under reentrant checkpointing since the last pop
        self._trace: tuple[list[dict], ...] | None = None  # the lists of the open record_routing blocks

    def __getstate__(self):  # copies and pickles never carry a forward's graph or an open trace
        state = self.__dict__.copy()
        state["_aux"], state["_trace"], state["_aux_lost"] = [], None, False
        return state

    def observe(self, out: RouterOutput, x_shape: torch.Size) -> None:
        if recomputing():  # a checkpointed block's recompute: its forward already recorded all of this
            return
        if self.keeps_aux_records and self.training and reentrant_forward():
            self._aux_lost = True  # no record can carry a graph from this forward (pop_aux_records says so)
        n = out.logits.shape[0]
        mask = token_mask_for(n)
        if self.keeps_aux_records and self.training and torch.is_grad_enabled():
            ctx = current_routing()
            names = ctx.extras.get("task_names") if ctx is not None else None
            self._aux.append(AuxRecord(out=out, token_mask=mask, keys=token_keys_for(x_shape), key_names=names))
        with torch.no_grad():
            sel = out.selected if mask is None else out.selected & mask[:, None]
            p = out.probs if mask is None else out.probs[mask]
            self.stat_load += sel.sum(0).double()
            self.stat_tokens += sel.any(-1).sum().double() if mask is None else mask.sum().double()
            self.stat_entropy += -(p * p.clamp_min(1e-12).log()).sum().double()
        if self._trace is not None:  # every open record_routing block (nested ones included) gets the entry
            lead = tuple(x_shape[:-1])
            entry = {"selected": out.selected.reshape(*lead, -1).cpu(),
                     "weights": out.weights.detach().reshape(*lead, -1).cpu()}
            for sink in self._trace:
                sink.append(entry)

    def pop_aux(self) -> list[AuxRecord]:
        records, self._aux, self._aux_lost = self._aux, [], False
        return records


def mixture_deltas(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, str, MixtureDelta]]:
    """(layer path, adapter name, delta) for every mixture delta (of adapter ``name`` if given)."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            for adapter, delta in module.adapters.items():
                if isinstance(delta, MixtureDelta) and (name is None or adapter == name):
                    yield path, adapter, delta


def pop_aux_records(model: nn.Module, name: str, *, for_loss: bool = True) -> list[tuple[str, AuxRecord]]:
    """The aux-loss records of adapter ``name``'s forwards since the last pop (``for_loss=False``: only clearing them).

    Raises ConfigError for a loss when a forward ran under reentrant activation checkpointing (``use_reentrant=True``):
    its block ran without gradients and is recomputed only in backward, after the loss, so the records a loss needs
    were never kept (the loss would silently lack them)."""
    deltas = [d for _, _, d in mixture_deltas(model, name)]
    lost = [type(d).__name__ for d in deltas if d._aux_lost]
    records = [(path, r) for path, _, d in mixture_deltas(model, name) for r in d.pop_aux()]
    if lost and for_loss:
        raise ConfigError(f"{lost[0]}'s router aux loss cannot train under reentrant activation checkpointing (each "
                          "block's forward runs without gradients, its recompute only after the loss): enable "
                          "checkpointing with use_reentrant=False (lorakit's TrainConfig.gradient_checkpointing and "
                          "transformers' default do)")
    return records


def router_stats(model: nn.Module, name: str | None = None) -> dict[str, dict]:
    """Per layer: tokens routed, per-expert load (count and fraction) and mean router entropy since the last reset."""
    stats = {}
    for path, adapter, d in mixture_deltas(model, name):
        tokens = float(d.stat_tokens)
        load = d.stat_load.tolist()
        total = sum(load) or 1.0
        stats[f"{path}[{adapter}]"] = {"tokens": tokens, "load": load, "load_fraction": [v / total for v in load],
                                       "entropy": float(d.stat_entropy) / max(tokens, 1.0)}
    return stats


def router_summary(stats: dict[str, dict] | None) -> dict | None:
    """``router_stats(...)`` over all layers in a few numbers (None without mixture layers or routed tokens):
    mean router entropy, and the mean over layers of the busiest and idlest expert's load fraction next to
    the uniform share 1/E (a balanced router has max ≈ min ≈ uniform)."""
    stats = [s for s in (stats or {}).values() if s["tokens"] > 0]
    if not stats:
        return None
    n = len(stats)
    return {"layers": n, "entropy": sum(s["entropy"] for s in stats) / n,
            "max_load_fraction": sum(max(s["load_fraction"]) for s in stats) / n,
            "min_load_fraction": sum(min(s["load_fraction"]) for s in stats) / n,
            "uniform_fraction": sum(1.0 / len(s["load"]) for s in stats) / n}


def router_stat_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The count buffers behind ``router_stats`` (summed over processes before a distributed run reads them)."""
    return [t for _, _, d in mixture_deltas(model) for t in (d.stat_load, d.stat_entropy, d.stat_tokens)]


def reset_router_stats(model: nn.Module) -> None:
    for _, _, d in mixture_deltas(model):
        d.stat_load.zero_()
        d.stat_entropy.zero_()
        d.stat_tokens.zero_()


@contextlib.contextmanager
def router_stats_paused(model: nn.Module) -> Iterator[None]:
    """Forwards inside the block (e.g. an evaluation during training) leave ``router_stats`` as they were."""
    saved = [(d, d.stat_load.clone(), d.stat_entropy.clone(), d.stat_tokens.clone()) for _, _, d in mixture_deltas(model)]
    try:
        yield
    finally:
        for d, load, entropy, tokens in saved:
            d.stat_load.copy_(load)
            d.stat_entropy.copy_(entropy)
            d.stat_tokens.copy_(tokens)


@contextlib.contextmanager
def record_routing(model: nn.Module, name: str | None = None) -> Iterator[dict[str, list[dict]]]:
    """Inside the block, record which experts each token used: ``{layer[adapter]: [{"selected", "weights"}, ...]}``
    (one entry per forward, shaped like the input's leading dims × experts)."""
    traces: dict[str, list[dict]] = {}
    deltas = list(mixture_deltas(model, name))
    found = [(d, d._trace) for _, _, d in deltas]  # an outer block's traces: kept recording, restored on exit
    for path, adapter, d in deltas:
        d._trace = (*(d._trace or ()), traces.setdefault(f"{path}[{adapter}]", []))
    try:
        yield traces
    finally:
        for d, trace in found:
            d._trace = trace


def router_loss(model: nn.Module, name: str, balance, coef: float, *, z_coef: float = 0.0,
                group: Callable[[str], Hashable] | None = None) -> torch.Tensor:
    """The routing losses of this forward (the records kept since the last call, which this pops):
    ``Σ_groups coef · balance(probs, selected, mask) + z_coef · z_loss(logits, mask)``, each group's tokens
    concatenated. ``group(layer path)`` names a record's group: ``None`` pools every layer into one group
    (MixLoRA, after Mixtral's reference; MoLE), a decoder-layer index gives one loss per decoder layer (MoLA).
    Padding is excluded where the routing context gave a token mask for every record of a group. Inside a
    distributed training run the records of every rank are joined first (``core.parallel.gather_rows``),
    so the loss is the global micro-batch's and data parallelism matches one process on the whole batch."""
    records = pop_aux_records(model, name)
    if not records or (coef == 0 and z_coef == 0):
        return torch.zeros((), device=next(model.parameters()).device)
    groups: dict[Hashable, list[AuxRecord]] = {}
    for path, record in records:
        groups.setdefault(None if group is None else group(path), []).append(record)
    total = torch.zeros((), device=records[0][1].out.probs.device)
    for members in groups.values():
        masks = [r.token_mask for r in members]
        mask = gather_rows(torch.cat(masks)) if all(m is not None for m in masks) else None
        if coef:
            total = total + coef * balance(gather_rows(torch.cat([r.out.probs for r in members])),
                                           gather_rows(torch.cat([r.out.selected for r in members])), mask)
        if z_coef:
            total = total + z_coef * z_loss(gather_rows(torch.cat([r.out.logits for r in members])), mask)
    return total


def count_layers(model: nn.Module, layers_pattern=None) -> int:
    """Number of transformer blocks: config.num_hidden_layers, else 1 + the largest layer index in module names."""
    from ..core.targeting import layer_index

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    indices = [layer_index(name + ".", layers_pattern) for name, _ in model.named_modules()]
    indices = [i for i in indices if i is not None]
    return max(indices) + 1 if indices else 1
