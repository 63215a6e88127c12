"""One routing context: how per-call information reaches adapter layers.

Host models never see it. A caller wraps a forward (or ``generate``) in ``routing(...)``; layers read
``current_routing()``. Information carried:

- ``adapter_names``: one adapter name per batch row (``None`` / ``"__base__"`` = no adapter), as PEFT's
  ``adapter_names``; ``adapter_ids`` is the same as integer indices into a bank.
- ``adapter_weights``: per-row weighted combinations, a mapping name -> (batch,) tensor of weights.
- ``keys``: a per-row key (task / modality / user) for routed mixtures; ``token_mask`` a per-token mask
  (e.g. modality) of shape (batch, seq).
- ``extras``: anything a method defines for itself (e.g. a router's hidden-state input). One name is set by
  lorakit's training loop (and its Trainer callback) for every method: ``SUPERVISED_KEY``, the (batch, seq) bool
  mask of the tokens the loss supervises (a causal LM's completion / answer tokens; ``training.objectives.supervised_extras``).
- ``row_extras`` / ``token_extras``: the names of the extras that hold one entry per batch row (rows first), and of
  those that are also per token ((batch, seq, ...)). The producer declares them (``training.objectives.
  batch_routing`` does for the supervised mask and the examples' routing vectors); a delta serving some rows of a
  mixed batch gets exactly these sliced to its rows (``rows_routing``), every other extra unchanged, whatever its
  shape.
- ``rng_streams``: adapter name -> ``core.rng.RngStream``; a layer runs the random draws it makes for that adapter's
  rows (its dropout, a hook's noise) inside that stream (concurrent training: each job draws as it would alone).
- ``adapter_lengths``: adapter name -> the sequence length its rows had before a mixed batch padded them to a longer
  one; a layer gives that adapter's delta its rows cut to it (the rest is padding), so its draws and any
  per-sequence computation see the shapes they would alone.

ContextVars make this safe across threads and asyncio tasks (the server runs requests concurrently).
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Collection, Iterator, Mapping, Sequence

import torch

from .errors import AdapterError, did_you_mean

if TYPE_CHECKING:
    from .rng import RngStream


@dataclass(frozen=True)
class Routing:
    adapter_names: Sequence[str | None] | None = None
    adapter_ids: torch.Tensor | None = None
    adapter_weights: Mapping[str, torch.Tensor] | None = None
    keys: Sequence[Any] | torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    row_extras: Collection[str] = ()
    token_extras: Collection[str] = ()
    rng_streams: Mapping[str, "RngStream"] | None = None
    adapter_lengths: Mapping[str, int] | None = None


_CURRENT: ContextVar[Routing | None] = ContextVar("lorakit_routing", default=None)
# Routing blocks open in any thread or context. While none is, current_routing() answers None without reading the
# ContextVar: torch.compile traces (and guards on) this plain global, where ContextVar.get is a graph break in every
# adapted layer (fullgraph=True failed on any adapted model, PEFT's compile). A bool, so a compiled model has two
# variants at most (any block open or none), whatever the nesting depth.
_OPEN = 0
_ANY_OPEN = False
_OPEN_LOCK = threading.Lock()


def current_routing() -> Routing | None:
    """The routing information of the forward in progress, or None outside any ``routing`` block."""
    if not _ANY_OPEN:
        return None
    return _CURRENT.get()


@contextlib.contextmanager
def _routing_set(ctx: Routing | None) -> Iterator[Routing | None]:
    global _OPEN, _ANY_OPEN
    with _OPEN_LOCK:
        _OPEN += 1
        _ANY_OPEN = True
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
        with _OPEN_LOCK:
            _OPEN -= 1
            _ANY_OPEN = _OPEN > 0


@contextlib.contextmanager
def routing(**info: Any) -> Iterator[Routing]:
    """Set per-call routing information for every adapter layer inside the block.

    Nested blocks update the outer one field by field (an inner ``keys=`` keeps the outer ``adapter_names``).
    """
    unknown = set(info) - set(Routing.__dataclass_fields__)
    if unknown:
        raise TypeError(f"routing() got unknown fields {sorted(unknown)}; known: {sorted(Routing.__dataclass_fields__)}")
    if isinstance(info.get("adapter_names"), str):
        raise TypeError(f"routing(adapter_names=...) takes one entry per batch row (a list), got the string "
                        f"{info['adapter_names']!r}; write adapter_names=[{info['adapter_names']!r}] (one entry is "
                        f"every row's) or set_adapter({info['adapter_names']!r}) for the whole batch")
    for name in ("row_extras", "token_extras"):
        if isinstance(info.get(name), str):
            raise TypeError(f"routing({name}=...) takes a collection of extras' names, got the string "
                            f"{info[name]!r}; write {name}=({info[name]!r},)")
    outer = current_routing()
    ctx = replace(outer, **info) if outer is not None else Routing(**info)
    with _routing_set(ctx):
        yield ctx


@contextlib.contextmanager
def routing_as(ctx: Routing | None) -> Iterator[Routing | None]:
    """Make ``ctx`` (a ``current_routing()`` read earlier, or None) the routing inside the block, exactly as it was:
    not merged into the routing around the block. For replaying a forward under the routing it first ran with
    (``core.checkpointing``)."""
    with _routing_set(ctx):
        yield ctx


SUPERVISED_KEY = "supervised_mask"  # extras: (batch, seq) bool, True on the tokens whose labels the loss scores
BASE_NAME = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def rows_for_batch(values, batch: int, what: str, unit: str = "entry"):
    """Per-row routing values (a sequence or a tensor with rows first) for a batch of ``batch`` rows.

    ``generate`` with ``num_beams`` / ``num_return_sequences`` repeats each prompt row k times in place
    (``repeat_interleave``), so a batch k times as long as the rows given takes each row's value k times: each
    beam / returned sequence keeps its prompt row's adapter. Serving banks and per-row adapters share this rule.
    Raises AdapterError for any other mismatch.
    """
    n = values.shape[0] if isinstance(values, torch.Tensor) else len(values)
    if n == batch:
        return values
    if n == 0 or batch % n:
        raise AdapterError(f"routing {what} has {n} rows for a batch of {batch} rows (give one {unit} per row; "
                           f"generate's beams / return sequences of a row take that row's {unit})")
    k = batch // n
    if isinstance(values, torch.Tensor):
        return values.repeat_interleave(k, dim=0)
    return [v for v in values for _ in range(k)]


def check_adapter_names(ctx: Routing | None, known: Mapping[str, Any] | Sequence[str]) -> None:
    """Raise AdapterError when ``ctx`` names an adapter (``adapter_names`` rows, ``adapter_weights`` keys) that is
    not in ``known``. ``None`` and ``"__base__"`` are the explicit "no adapter" row."""
    if ctx is None:
        return
    named = set()
    if ctx.adapter_names is not None:
        named.update(n for n in ctx.adapter_names if n is not None and n != BASE_NAME)
    if ctx.adapter_weights is not None:
        named.update(ctx.adapter_weights)
    unknown = sorted((n for n in named if not isinstance(n, str) or n not in known), key=str)
    if unknown:
        bad = unknown[0]
        where = "adapter_weights key" if ctx.adapter_weights is not None and bad in ctx.adapter_weights else "adapter_names entry"
        hint = did_you_mean(bad, list(known)) if isinstance(bad, str) else ""
        raise AdapterError(f"routing {where} {bad!r} is not an adapter of this model.{hint} Adapters: {list(known)} "
                           f"(use None or '__base__' for a row without adapter)"
                           + (f"; other unknown names: {unknown[1:]}" if len(unknown) > 1 else ""))


ADAPTER_EXTRAS_KEY = "adapter_extras"  # extras: {adapter name: {extra: value}}, merged in for that adapter's rows


def rows_routing(ctx: Routing | None, index: torch.Tensor, batch: int, adapter_name: str,
                 length: int | None = None) -> dict[str, Any]:
    """The per-row fields of ``ctx`` restricted to rows ``index`` of a ``batch``-row forward, as ``routing(...)``
    keyword arguments, for adapter ``adapter_name``'s delta: ``adapter_names``, ``keys``, ``token_mask`` and the
    extras the producer declared per row (``row_extras``, ``token_extras``); every other extra passes unchanged
    (whatever its shape: a per-row guess from a first dimension that happens to equal the row count would slice a
    table that is not per row), and ``extras[ADAPTER_EXTRAS_KEY][adapter_name]`` is merged in (per-adapter values
    such as the ``task_names`` its rows' key ids index, when concurrent jobs have different tasks). ``length``: the
    rows' own sequence length (``adapter_lengths``); per-token fields (``token_mask``, ``token_extras``) are cut to
    it. A per-row field given for fewer rows (generate's beams) is first widened as ``rows_for_batch`` does. Lets a
    delta that serves only some rows of a mixed batch (per-row adapters, concurrent training) see its rows' own
    routing, as it would in a batch of its own."""
    if ctx is None or ctx.adapter_names is None:
        return {}
    rows = len(ctx.adapter_names)

    def take(value: Any, what: str, tokens: bool = False) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            value = rows_for_batch(value, batch, what).index_select(0, index.to(value.device))
            return value[:, :length] if tokens and length is not None and value.dim() >= 2 else value
        if value is not None and not isinstance(value, torch.Tensor) and len(value) == rows:
            widened = rows_for_batch(list(value), batch, what)
            return [widened[i] for i in index.tolist()]
        return value

    per_row = set(ctx.row_extras) | set(ctx.token_extras)
    extras = {k: take(v, f"extras[{k!r}]", k in ctx.token_extras) if k in per_row else v
              for k, v in ctx.extras.items() if k != ADAPTER_EXTRAS_KEY}
    extras.update((ctx.extras.get(ADAPTER_EXTRAS_KEY) or {}).get(adapter_name, {}))
    return {"adapter_names": take(list(ctx.adapter_names), "adapter_names"), "keys": take(ctx.keys, "keys"),
            "token_mask": take(ctx.token_mask, "token_mask", True), "extras": extras, "adapter_lengths": None}
