"""Per-layer evidence of Mix-LN (arXiv 2412.13795): gradient norms and the effect of removing each layer.

``layer_grad_norms``: the L2 norm of the next-token-loss gradient over all parameters of decoder layer ``l``,
averaged over batches (the paper's gradient-norm-per-layer figures). ``layer_importance``: the model with layer
``l`` deleted (as the official ``layer_remove.py`` does: the layer dropped, the rest renumbered) against the full
model on the same batches, as the relative loss change ``(loss_without_l - loss) / loss`` and the relative
output change ``||logits_without_l - logits|| / ||logits||``. Works for any model with ``model.model.layers``
(Llama, Mix-LN).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers ModuleList (a Llama-style decoder is needed).")
    return layers


def layer_grad_norms(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """Mean over ``batches`` (each (B, T) token ids) of each layer's gradient L2 norm; length L."""
    layers = decoder_layers(model)
    model.train()
    totals, n = torch.zeros(len(layers)), 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        for i, layer in enumerate(layers):
            squares = [p.grad.pow(2).sum() for p in layer.parameters() if p.grad is not None]
            totals[i] += torch.stack(squares).sum().sqrt() if squares else 0.0
        n += 1
    model.zero_grad(set_to_none=True)
    model.eval()
    return (totals / max(n, 1)).tolist()


@contextmanager
def layer_removed(model: nn.Module, index: int) -> Iterator[nn.Module]:
    """``model`` with decoder layer ``index`` deleted and the rest renumbered, restored on exit."""
    inner = model.model
    original = inner.layers
    kept = [layer for i, layer in enumerate(original) if i != index]
    indices = [layer.self_attn.layer_idx for layer in kept]
    inner.layers = nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    try:
        yield model
    finally:
        for layer, i in zip(kept, indices):
            layer.self_attn.layer_idx = i
        inner.layers = original


@torch.no_grad()
def _loss_and_logits(model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    losses, logits = [], []
    for batch in batches:
        out = model(input_ids=batch, labels=batch, use_cache=False)
        losses.append(out.loss.item())
        logits.append(out.logits)
    return sum(losses) / len(losses), logits


def layer_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict:
    """``{"loss": full-model loss, "loss_change": [...], "output_change": [...]}``, one entry per layer (relative)."""
    model.eval()
    batches = list(batches)
    base_loss, base_logits = _loss_and_logits(model, batches)
    base_norm = torch.sqrt(sum(x.pow(2).sum() for x in base_logits))
    loss_change, output_change = [], []
    for i in range(len(decoder_layers(model))):
        with layer_removed(model, i):
            loss, logits = _loss_and_logits(model, batches)
        loss_change.append((loss - base_loss) / base_loss)
        diff = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(logits, base_logits)))
        output_change.append((diff / base_norm).item())
    return {"loss": base_loss, "loss_change": loss_change, "output_change": output_change}
