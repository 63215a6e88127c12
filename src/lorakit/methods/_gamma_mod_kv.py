"""γ-MoD's KV-slot helpers (lorakit.methods.gamma_mod): a MoD block runs its host block on the kept tokens only;
these give the host block its arguments for them (positions, rotary embeddings, attention mask) and keep the host's
KV cache at the model's length, a skipped token leaving an all-zero key/value slot that the block's mask hides
(gamma_mod's module docstring, "KV cache")."""

from __future__ import annotations

from typing import Any

import torch

from ..core.errors import AdapterError

CACHES = ("cache", "past_key_values", "past_key_value", "layer_past")  # a host block's KV-cache argument


def real_tokens(mask: Any, batch: int, seq: int, past: int) -> torch.Tensor | None:
    """(B, T) bool: the tokens of this forward that are not padding, read from the host's attention mask: a 4-d mask
    (B or 1, H or 1, T, keys; bool True attends, float 0 attends) lets a real token attend to itself (key
    ``past + t``), a padding token attends to nothing of its own; a 2-d mask (B, past + T) (flash attention) names
    them directly. None when the mask says nothing (None: no padding, or a shape it cannot read)."""
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2 and mask.shape[-1] >= past + seq and mask.shape[0] in (1, batch):
        return mask[:, past:past + seq].bool().expand(batch, seq)
    if mask.dim() != 4 or mask.shape[-2] != seq or mask.shape[-1] < past + seq or mask.shape[0] not in (1, batch):
        return None
    t = torch.arange(seq, device=mask.device)
    own = mask[:, 0, t, past + t]  # (B or 1, T): each token's entry for itself
    own = own if own.dtype == torch.bool else own == 0
    return own.expand(batch, seq)


def restrict(mask: torch.Tensor | None, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4-d attention mask (bool: True attends; float: added to the scores) that also forbids ``~allowed``
    ((B, Q, K) bool). ``mask=None`` (the host left causality to the kernel) gives an additive float mask."""
    allowed = allowed.unsqueeze(1)  # (B, 1, Q, K)
    if mask is None:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


class SlotCache:
    """The host's KV cache as a MoD block's attention sees it: each ``update`` writes the gathered tokens' keys
    and values into their own positions of a full-length update (zeros in skipped and filler slots), so every
    layer's cache keeps the model's length; the block's mask hides those slots."""

    def __init__(self, cache: Any, index: torch.Tensor, kept: torch.Tensor, seq: int):
        self._cache, self._index, self._kept, self._seq = cache, index, kept, seq

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        def full(states: torch.Tensor) -> torch.Tensor:  # (B, H, K, Dh) -> (B, H, T, Dh)
            b, h, k, dh = states.shape
            slot = self._index[:, None, :, None].expand(b, h, k, dh)
            states = states * self._kept[:, None, :, None].to(states.dtype)
            return states.new_zeros(b, h, self._seq, dh).scatter(2, slot, states)

        return self._cache.update(full(key_states), full(value_states), layer_idx, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._cache, name)


def slot_history(cache: Any, layer_idx: int, batch: int, past: int, device: torch.device) -> torch.Tensor:
    """(B, past) bool: which of a cache's earlier slots hold a token this block processed (all, for a cache whose
    layers it cannot read). Skipped and filler tokens leave all-zero keys (``SlotCache``, ``write_empty_slots``); a
    processed token's key vector is never exactly zero over every head. Read from the cache itself, the masks
    follow whatever the cache does to its rows and length (beam search's ``reorder_cache``, ``crop``, batch
    selection)."""
    layers = getattr(cache, "layers", None)
    keys = getattr(layers[layer_idx], "keys", None) if layers is not None and layer_idx < len(layers) else None
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[0] != batch or keys.shape[2] != past:
        return torch.ones(batch, past, dtype=torch.bool, device=device)
    return keys.ne(0).any(-1).any(1).to(device)  # (B, kv_heads, past, Dh) -> (B, past)


def write_empty_slots(cache: Any, layer_idx: int, seq: int) -> None:
    """Zero key/value slots for ``seq`` tokens that skipped the block (the cache keeps the model's length)."""
    layer = cache.layers[layer_idx]
    keys = layer.keys.new_zeros(*layer.keys.shape[:2], seq, layer.keys.shape[-1])
    values = layer.values.new_zeros(*layer.values.shape[:2], seq, layer.values.shape[-1])
    cache.update(keys, values, layer_idx)


def gather_args(params: list[str], bound: dict[str, Any], index: torch.Tensor, kept: torch.Tensor, seq: int,
                cache_name: str | None, cache: Any, past: int, slots: torch.Tensor | None,
                dtype: torch.dtype) -> dict[str, Any]:
    """The host block's arguments (``bound``: by name; ``params``: its forward's parameter names) for the gathered
    tokens ``index`` (B, K) (``kept``: which are really kept, the others fillers): positions and rotary embeddings
    gathered, the attention mask restricted to the kept keys, and (out of training, ``slots`` (B, past + T): the
    cache's processed slots) the cache behind a ``SlotCache``."""
    batch, k = index.shape

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        t = t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t
        shape = [1] * t.dim()
        shape[0], shape[dim] = batch, k
        idx = index.view(*shape).expand(*[s if i != dim else k for i, s in enumerate(t.shape)])
        return t.gather(dim, idx)

    out = dict(bound)
    for name, value in bound.items():
        if name in CACHES:
            out[name] = None
        elif name == "position_ids" and isinstance(value, torch.Tensor) and value.shape[-1] == seq:
            out[name] = along(value, value.dim() - 1)
        elif name == "position_embeddings" and isinstance(value, tuple):
            out[name] = tuple(along(v, 1) for v in value)
        elif name == "cache_position" and slots is None:
            out[name] = None
    given = bound.get("attention_mask")
    given = given if isinstance(given, torch.Tensor) and given.dim() == 4 else None
    if slots is not None:
        # Queries: the gathered tokens at their positions; keys: every slot of the cache (skipped ones masked).
        if given is not None and given.shape[-1] != slots.shape[1]:
            raise AdapterError(f"γ-MoD decodes from growing KV caches (DynamicCache); this cache's mask has "
                               f"{given.shape[-1]} key positions for {slots.shape[1]} tokens.")
        queries = past + index  # (B, K)
        keys = torch.arange(slots.shape[1], device=index.device)
        allowed = (keys <= queries[..., None]) & (slots[:, None, :] | (keys == queries[..., None]))
        out["attention_mask"] = restrict(None if given is None else along(given, 2), allowed, dtype)
        out[cache_name] = SlotCache(cache, index, kept, seq)
    elif bool(kept.all()):
        out["attention_mask"] = None if given is None else along(along(given, 2), 3)
    else:  # keys: the gathered tokens, fillers masked out (each still sees itself, so no row is empty)
        own = torch.eye(k, dtype=torch.bool, device=index.device)
        allowed = torch.ones(k, k, dtype=torch.bool, device=index.device).tril() & (kept[:, None, :] | own)
        out["attention_mask"] = restrict(None if given is None else along(along(given, 2), 3), allowed, dtype)
    if "attention_mask" not in params:
        out.pop("attention_mask")
    return out
