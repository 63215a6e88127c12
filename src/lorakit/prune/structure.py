"""Structured pruning of decoder blocks: which weights a head group or an FFN channel owns, and physically
removing them so that the smaller model still runs and (with equal widths in every block) saves as a normal
transformers model. Shared by LoRAPrune (``training/procedures/loraprune.py``) and LoRAM (``prune/loram.py``).

Pruning units, for a Llama-style block (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``):

- an **attention group** g: key/value head g with the ``n_rep = num_attention_heads / num_key_value_heads`` query
  heads that read it — rows ``[g·n_rep·d, (g+1)·n_rep·d)`` of q_proj and columns of o_proj, rows
  ``[g·d, (g+1)·d)`` of k_proj and v_proj (``d`` = head_dim). With multi-head attention (n_rep = 1) a group is one
  head, LoRAPrune's unit; with grouped-query attention whole groups go, as LoRAM's recovery code assumes
  (``3_recovered_low_rank_matrix_generation.py`` lines 68–72: pruned q/o ranges = pruned kv heads × n_rep);
- an **FFN channel** c: row c of gate_proj and up_proj, column c of down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import LorakitError
from ..core.layer import AdapterLayer

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
OUTPUT_SIDE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # pruned rows; o_proj/down_proj: columns


@dataclass
class Block:
    """One decoder block's prunable parts: ``attn`` and ``mlp`` modules, their path prefixes, and sizes."""

    index: int
    attn: nn.Module
    mlp: nn.Module
    attn_path: str
    mlp_path: str
    head_dim: int
    num_groups: int  # key/value heads
    n_rep: int  # query heads per key/value head
    channels: int  # FFN intermediate size

    def module(self, name: str) -> nn.Module:
        return getattr(self.attn if name in ATTENTION else self.mlp, name)

    def path(self, name: str) -> str:
        return f"{self.attn_path if name in ATTENTION else self.mlp_path}.{name}"


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def decoder_blocks(model: nn.Module) -> list[Block]:
    """The Llama-style blocks of ``model`` in order; LorakitError when it has none (names what is needed)."""
    config = model.config
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attn = {n: m for n, m in model.named_modules() if all(hasattr(m, p) for p in ATTENTION)}
    mlp = {n: m for n, m in model.named_modules() if all(hasattr(m, p) for p in MLP)}
    blocks = []
    for index, (a_path, a) in enumerate(attn.items()):
        prefix = a_path.rpartition(".")[0]
        m_path = next((p for p in mlp if p.rpartition(".")[0] == prefix), None)
        if m_path is None:
            continue
        q_out = base_of(a.q_proj).out_features
        k_out = base_of(a.k_proj).out_features
        blocks.append(Block(index=index, attn=a, mlp=mlp[m_path], attn_path=a_path, mlp_path=m_path,
                            head_dim=head_dim, num_groups=k_out // head_dim, n_rep=q_out // k_out,
                            channels=base_of(mlp[m_path].gate_proj).out_features))
    if not blocks:
        raise LorakitError(f"{type(model).__name__} has no Llama-style decoder blocks (attention with "
                           f"{', '.join(ATTENTION)} and an MLP with {', '.join(MLP)}); structured pruning supports "
                           "Llama, Mistral, Qwen2/3 and similar models")
    return blocks


def group_rows(block: Block, name: str, groups: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (q/k/v/gate/up) or columns (o/down) of module ``name`` owned by attention ``groups``
    or FFN channels (``groups`` holds channel ids for MLP modules)."""
    if name in MLP:
        return groups
    width = block.head_dim * (block.n_rep if name in ("q_proj", "o_proj") else 1)
    return (groups[:, None] * width + torch.arange(width, device=groups.device)).reshape(-1)


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(dim, index.to(linear.weight.device)).clone(),
                                     requires_grad=linear.weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[index.to(linear.bias.device)].clone(),
                                       requires_grad=linear.bias.requires_grad)
    if dim == 0:
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def prune_blocks(model: nn.Module, keep: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Physically remove, in place, every attention group and FFN channel not kept: ``keep[block] = (kept
    groups, kept channels)`` (blocks not in ``keep`` stay whole). Returns ``model``.

    The model must have no adapters attached (merge or unload them first): LorakitError otherwise. When every
    block ends with the same widths, ``model.config`` gets the new ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim`` and ``intermediate_size`` and ``save_pretrained`` writes a model
    transformers loads; with unequal widths the model runs in memory but its config cannot describe it.
    """
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise LorakitError("prune_blocks needs a model without adapters: merge_and_unload (or unload) it first")
    blocks = decoder_blocks(model)
    for block in blocks:
        if block.index not in keep:
            continue
        groups, channels = (torch.as_tensor(t, dtype=torch.long).sort().values for t in keep[block.index])
        if len(groups) == 0 or len(channels) == 0:
            raise LorakitError(f"block {block.index}: keep at least one attention group and one FFN channel")
        for name in ATTENTION + MLP:
            index = group_rows(block, name, groups if name in ATTENTION else channels)
            _slice_linear(block.module(name), index, 0 if name in OUTPUT_SIDE else 1)
        if hasattr(block.mlp, "intermediate_size"):
            block.mlp.intermediate_size = len(channels)
    widths = {(base_of(b.attn.k_proj).out_features, base_of(b.mlp.gate_proj).out_features) for b in decoder_blocks(model)}
    if len(widths) == 1:
        (k_out, channels), = widths
        first = blocks[0]
        config = model.config
        config.head_dim = first.head_dim
        config.num_key_value_heads = k_out // first.head_dim
        config.num_attention_heads = config.num_key_value_heads * first.n_rep
        config.intermediate_size = channels
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
