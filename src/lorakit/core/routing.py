"""One routing context: how per-call information reaches adapter layers.

Host models never see it. A caller wraps a forward (or ``generate``) in ``routing(...)``; layers read
``current_routing()``. Information carried:

- ``adapter_names``: one adapter name per batch row (``None`` / ``"__base__"`` = no adapter), as PEFT's
  ``adapter_names``; ``adapter_ids`` is the same as integer indices into a bank.
- ``adapter_weights``: per-row weighted combinations, a mapping name -> (batch,) tensor of weights.
- ``keys``: a per-row key (task / modality / user) for routed mixtures; ``token_mask`` a per-token mask
  (e.g. modality) of shape (batch, seq).
- ``extras``: anything a method defines for itself (e.g. a router's hidden-state input).

ContextVars make this safe across threads and asyncio tasks (the server runs requests concurrently).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import torch


@dataclass(frozen=True)
class Routing:
    adapter_names: Sequence[str | None] | None = None
    adapter_ids: torch.Tensor | None = None
    adapter_weights: Mapping[str, torch.Tensor] | None = None
    keys: Sequence[Any] | torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)


_CURRENT: ContextVar[Routing | None] = ContextVar("lorakit_routing", default=None)


def current_routing() -> Routing | None:
    """The routing information of the forward in progress, or None outside any ``routing`` block."""
    return _CURRENT.get()


@contextlib.contextmanager
def routing(**info: Any) -> Iterator[Routing]:
    """Set per-call routing information for every adapter layer inside the block.

    Nested blocks update the outer one field by field (an inner ``keys=`` keeps the outer ``adapter_names``).
    """
    unknown = set(info) - set(Routing.__dataclass_fields__)
    if unknown:
        raise TypeError(f"routing() got unknown fields {sorted(unknown)}; known: {sorted(Routing.__dataclass_fields__)}")
    outer = _CURRENT.get()
    ctx = replace(outer, **info) if outer is not None else Routing(**info)
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
