"""A ``UNet2DModel`` forward that reuses cached deep features for some rows (DeepCache-style feature caching).

CMLoRA caches each LoRA's deep UNet features and, between refreshes, recomputes only the outer (shallow) part of
the UNet for that LoRA: the official ``LoRA_Cache/models/unets/unet_2d_condition.py`` (l.1218-1332) runs the down
blocks up to ``cache_layer_id``, takes ``replicate_prv_feature`` as the input of the matching up block, and runs
only the up blocks from there; a full forward returns the new feature (l.1436-1437). Here the unit is a whole
level: ``depth`` outer down/up block pairs are always run, the rest (inner down blocks, mid block, inner up blocks)
only for the rows being refreshed; the cached tensor is the input of the first outer up block.

Rows are routed per LoRA with ``lorakit.routing(adapter_names=...)``: the shallow part runs once over all rows, the
deep part once over the refreshed rows only (a sub-batch with their names), so neither part loops over LoRAs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.routing import routing


def _embedding(unet: nn.Module, timesteps: torch.Tensor, class_labels: torch.Tensor, batch: int) -> torch.Tensor:
    t = timesteps if torch.is_tensor(timesteps) else torch.tensor(timesteps)
    t = t.reshape(-1).to(torch.long).expand(batch) if t.numel() == 1 else t
    emb = unet.time_embedding(unet.time_proj(t).to(unet.dtype))
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(class_labels).to(unet.dtype)
    return emb


def cached_unet_forward(unet: nn.Module, sample: torch.Tensor, timesteps, class_labels: torch.Tensor,
                        names: Sequence[str | None], refresh: torch.Tensor, cache: torch.Tensor | None,
                        depth: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε (B, C, H, W), deep features (B, C', h, w)) for a batch whose row ``i`` runs LoRA ``names[i]``.

    Rows with ``refresh[i]`` (or all rows when ``cache`` is None) run the whole UNet and return fresh deep
    features; the others reuse ``cache[i]``. Equals ``unet(sample, t, class_labels)`` row for row on refreshed rows.
    Raises ConfigError for a UNet2DModel variant it does not handle (skip connections, Fourier time embedding) or a
    ``depth`` outside 1..levels-1.
    """
    levels = len(unet.down_blocks)
    if not 1 <= depth < levels:
        raise ConfigError(f"depth must be in 1..{levels - 1} (outer levels always recomputed), got {depth}")
    if any(hasattr(b, "skip_conv") for b in [*unet.down_blocks, *unet.up_blocks]) or \
            unet.config.time_embedding_type == "fourier":
        raise ConfigError("cached_unet_forward supports UNet2DModel without skip blocks and with positional time "
                          "embedding")
    batch = sample.shape[0]
    names = list(names)
    rows = torch.arange(batch) if cache is None else torch.nonzero(refresh, as_tuple=False).reshape(-1)
    with routing(adapter_names=names):
        emb = _embedding(unet, timesteps, class_labels, batch)
        h = unet.conv_in(sample)
        res: list[torch.Tensor] = [h]
        for block in unet.down_blocks[:depth]:
            h, r = block(hidden_states=h, temb=emb)
            res.extend(r)
    feature = cache.clone() if cache is not None else None
    shallow_left = len(res)
    if rows.numel():
        sub = [names[i] for i in rows.tolist()]
        with routing(adapter_names=sub):
            e, d = emb[rows], h[rows]
            stack = [x[rows] for x in res]
            for block in unet.down_blocks[depth:]:
                d, r = block(hidden_states=d, temb=e)
                stack.extend(r)
            if unet.mid_block is not None:
                d = unet.mid_block(d, e)
            for block in unet.up_blocks[:levels - depth]:
                n = len(block.resnets)
                d = block(d, tuple(stack[-n:]), e)
                stack = stack[:-n]
            shallow_left = len(stack)  # the skip tensors the outer up blocks still take
        feature = d if feature is None else feature.index_copy(0, rows, d.to(feature.dtype))
    else:  # no refresh: the inner up blocks would take as many skips as the deep down blocks give, plus these
        inner = sum(len(b.resnets) for b in unet.up_blocks[:levels - depth])
        deep_res = sum(len(b.resnets) + (getattr(b, "downsamplers", None) is not None)
                       for b in unet.down_blocks[depth:])
        shallow_left = len(res) - (inner - deep_res)
    res = res[:shallow_left]
    with routing(adapter_names=names):
        h = feature
        for block in unet.up_blocks[levels - depth:]:
            n = len(block.resnets)
            h = block(h, tuple(res[-n:]), emb)
            res = res[:-n]
        out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return out, feature
