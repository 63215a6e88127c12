"""LoRAPrune — "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning", Zhang et al.,
ACL Findings 2024, arXiv:2305.18403.

LoRA fine-tuning that prunes attention heads and FFN channels as it trains, judging importance from the LoRA
weights and gradients only (the frozen base's gradient is never computed). Per adapted weight, with
``G = ∇B·A + B·∇A − ∇B·∇A`` (paper eq. 8, the estimate of the base gradient from LoRA's):

    S = | G ⊙ (W + s·B·A) |                      (eq. 9–10, first-order Taylor importance of each weight)
    S_group = Σ S over the group's rows (q, k, v, gate, up) or columns (o, down), L2-normalised per module
    Ī ← 0.9·Ī + 0.1·Σ_modules S_group            (eq. 11, moving average, every optimizer step)

Every ``prune_freq`` steps, the lowest-Ī groups of each block are masked until a fraction ``r_t`` of them is
gone, ``r_t`` following the cubic schedule (official ``schedule_sparsity_ratio``):
``r_t = r_f + (r_0 − r_f)·(1 − (t − t_w)/(T − t_w − t_c))³`` between warm-up ``t_w = warmup·T`` and cool-down
``t_c = cooldown·T``. Masks multiply the outputs of q/k/v (per head group) and gate/up (per channel), so a
masked unit contributes nothing, as the official ``lora_mask``. At the end the masked units are cut out for real
(``export_pruned``): ``output_dir/pruned_model`` is a smaller transformers model (adapter merged, config with the
new ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size``).

Follows the official code, aim-uofa/LoRAPrune: ``loraprune/utils.py`` ``compute_sensitivity`` (lines 60–87: G,
S, per-head sums, L2 norm), ``update_sensitivity_dict`` (44–58: sum over the block's modules, skip the update
when it has NaN, EMA 0.9/0.1), ``local_prune`` (133–169: per block, ``int(total·ratio)`` lowest of importance ×
current mask), ``schedule_sparsity_ratio`` (171–188); ``loraprune/trainer.py`` lines 336–343 (update every step,
prune when ``step % prune_freq == 0``). Where this differs, and why:

- The official trainer prunes only while ``r_0 < r_t < r_f``, so the final ratio is never reached (the cool-down
  has ``r_t = r_f``); here ``r_t ≤ r_f`` prunes, and the last step prunes to ``r_f`` whatever ``prune_freq``, so
  the run ends at the target ratio, as the paper describes.
- The official ``freeze`` keeps the first 10% of blocks and the last block unpruned. A transformers config holds
  one ``intermediate_size`` and head count for all blocks, so the exported model would not load; here every block
  is pruned to the same widths (``protected_blocks`` keeps blocks whole, for in-memory use; export then refuses).
- Grouped-query attention: a unit is a key/value head with its query heads (see ``prune/structure.py``); with
  multi-head attention this is the official per-head unit. Module scores are reduced to groups, then normalised.
- ``on_gradients`` runs before gradient clipping (the official update runs after it).

The adapter must be a plain LoRA (``lorakit.LoraConfig``) on all seven projections, as the official script
(``--lora_target_modules '[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]'``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ...core.delta import oriented_weight
from ...core.config import check_positive_ints, check_range, field_error
from ...core.errors import ConfigError, comma_items
from ...core.layer import AdapterLayer
from ...methods.lora import LoraConfig
from ...prune.structure import ATTENTION, MLP, Block, base_of, decoder_blocks, prune_blocks
from .base import Procedure, ProcedureConfig, register_procedure

MASKED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@dataclass
class LoraPruneConfig(ProcedureConfig):
    """``ratio`` r_f: fraction of attention groups and FFN channels removed per block by the end; ``init_ratio``
    r_0; ``warmup`` / ``cooldown``: fractions of the run before the schedule starts / after it reaches r_f;
    ``prune_freq``: steps between pruning rounds; ``beta``: moving-average weight of the old importance;
    ``protected_blocks``: block indices never pruned (comma-separated); ``save_pruned``: write
    ``output_dir/pruned_model`` at the end. Defaults: the official script (ratio 0.5, prune_freq 10)."""

    ratio: float = 0.5
    init_ratio: float = 0.0
    warmup: float = 0.1
    cooldown: float = 0.1
    prune_freq: int = 10
    beta: float = 0.9
    protected_blocks: str = ""
    save_pruned: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        order = " (0 <= init_ratio <= ratio < 1: pruning grows from init_ratio to ratio)"
        check_range(self, "ratio", 0, 1, high_open=True, note=order)
        check_range(self, "init_ratio", 0, self.ratio, note=order)
        for name in ("warmup", "cooldown"):
            check_range(self, name, 0, 1, high_open=True)
        if self.warmup + self.cooldown >= 1:
            raise field_error(self, "cooldown", f"={self.cooldown} with warmup={self.warmup} leaves no pruning: "
                                                "warmup + cooldown must be < 1.")
        check_positive_ints(self, "prune_freq")
        check_range(self, "beta", 0, 1, high_open=True)
        self.protected  # noqa: B018  (a bad list fails here)

    def check_run(self, train_config) -> None:
        if self.protected and self.save_pruned and train_config.output_dir is not None:
            raise field_error(self, "protected_blocks", f"={self.protected_blocks!r} keeps those blocks at full width "
                              "while the others shrink; a transformers config has one width for all blocks, so "
                              "output_dir/pruned_model cannot be written at the end of the run. Set save_pruned=False "
                              "to keep the pruned model in memory only, or drop protected_blocks.")

    @property
    def protected(self) -> set[int]:
        items = comma_items(self.protected_blocks, "", "block indices", field=f"{type(self).__name__}.protected_blocks")
        try:
            return {int(b) for b in items}
        except ValueError:
            raise field_error(self, "protected_blocks", f"={self.protected_blocks!r}: give block indices separated by "
                                                        "commas, e.g. '0,11'.") from None


def sparsity_schedule(step: int, total: int, warmup: float, cooldown: float, initial: float, final: float) -> float:
    """Cubic schedule r_t (official ``schedule_sparsity_ratio``)."""
    if step <= warmup * total:
        return initial
    if step > total - cooldown * total:
        return final
    progress = 1 - (step - warmup * total) / (total - (warmup + cooldown) * total)
    return final + (initial - final) * progress ** 3


def lora_importance(layer: AdapterLayer, adapter_name: str) -> torch.Tensor:
    """``|G ⊙ (W + s·B·A)|`` as (out, in) for one adapted layer, from its LoRA weights and their gradients."""
    units = layer.adapters[adapter_name].units()
    a, b = units.A.detach().float(), units.B.detach().float()
    if units.A.grad is None or units.B.grad is None:
        return torch.zeros(b.shape[0], a.shape[1], device=a.device)
    grad_a, grad_b = units.A.grad.float(), units.B.grad.float()
    g = grad_b @ a + b @ grad_a - grad_b @ grad_a  # (out, r)(r, in): the estimated base gradient (eq. 8)
    weight = oriented_weight(layer.base_layer, layer.info).detach().float()  # dequantized on a 4-bit base
    return (g * (b @ a * units.scaling + weight)).abs()


def _group_scores(block: Block, name: str, s: torch.Tensor) -> torch.Tensor:
    """Per-module importance of each unit (attention group or FFN channel), L2-normalised over the units."""
    per_index = s.sum(1) if name in MASKED else s.sum(0)  # rows for q/k/v/gate/up, columns for o/down
    if name in ATTENTION:
        per_index = per_index.reshape(block.num_groups, -1).sum(1)
    return per_index / (torch.linalg.norm(per_index) + 1e-8)


class LoraPrune(Procedure):
    config: LoraPruneConfig
    fsdp_compatible = False  # masks and prunes the base weights themselves

    def __init__(self, config: LoraPruneConfig, train_config) -> None:
        super().__init__(config, train_config)
        self.blocks: list[Block] = []
        self.importance: dict[str, torch.Tensor] = {}  # "attn.<block>" / "mlp.<block>" -> (units,)
        self.masks: dict[str, torch.Tensor] = {}
        self.hooks: list = []

    # -- setup ---------------------------------------------------------------------------------------------
    @classmethod
    def check_adapter_config(cls, config: LoraPruneConfig, adapter_config: Any, task_type: str = "causal-lm") -> None:
        """A plain LoRA (plain B A units: no DoRA, no lora_bias), told from the adapter's config; whether it covers
        every attention and MLP projection is checked per block in ``param_groups``, which calls this too (a
        ``train`` from Python): NOLA, MoS and S2-LoRA compute A, B from other parameters and FFA-LoRA freezes A,
        so their A, B get no gradient and the importance (eq. 8-10) would read as all zeros."""
        plain = type(adapter_config) is LoraConfig  # not a subclass: FFA-LoRA's config is one, with A frozen
        if not plain or adapter_config.use_dora or adapter_config.lora_bias:
            what = (f"method {type(adapter_config).method!r}" if not plain
                    else "DoRA" if adapter_config.use_dora else "lora_bias")
            raise ConfigError(f"LoRAPrune needs a plain LoRA adapter (its importance comes from LoRA's weights and "
                              f"gradients); this one has {what}. Use method lora without use_dora / lora_bias.")

    def param_groups(self, model: nn.Module, adapter_name: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from ...core.model import adapter_state

        self.check_adapter_config(self.config, adapter_state(model).configs[adapter_name])
        self.blocks = decoder_blocks(model)
        for block in self.blocks:
            for name in ATTENTION + MLP:
                layer = block.module(name)
                if not isinstance(layer, AdapterLayer) or adapter_name not in layer.adapters or \
                        not layer.adapters[adapter_name].plain_units:
                    raise ConfigError(f"LoRAPrune needs a plain LoRA adapter {adapter_name!r} on {block.path(name)} "
                                      f"(all of {', '.join(ATTENTION + MLP)}): its importance comes from LoRA's "
                                      f"weights and gradients. Use target_modules='all-linear' with method lora.")
            for kind, size in (("attn", block.num_groups), ("mlp", block.channels)):
                key = f"{kind}.{block.index}"
                device = base_of(block.module("q_proj")).weight.device
                self.importance.setdefault(key, torch.zeros(size, device=device))
                self.masks.setdefault(key, torch.ones(size, device=device))
        unknown = self.config.protected - {b.index for b in self.blocks}
        if unknown:
            raise field_error(self.config, "protected_blocks", f" names {sorted(unknown)}; the model has blocks "
                                                               f"0..{len(self.blocks) - 1}.")
        self.hooks = attach_masks(self.blocks, self.masks)
        return groups

    # -- per step ------------------------------------------------------------------------------------------
    def on_gradients(self, model: nn.Module, adapter_name: str, step: int) -> None:
        scores = {}
        for block in self.blocks:
            for kind, names in (("attn", ATTENTION), ("mlp", MLP)):
                scores[f"{kind}.{block.index}"] = sum(
                    _group_scores(block, n, lora_importance(block.module(n), adapter_name)) for n in names)
        if any(torch.isnan(s).any() for s in scores.values()):
            return  # as the official update: a NaN anywhere skips this step's update
        beta = self.config.beta
        for key, s in scores.items():
            self.importance[key] = beta * self.importance[key] + (1 - beta) * s
        c = self.config
        ratio = sparsity_schedule(step, self.train_config.steps, c.warmup, c.cooldown, c.init_ratio, c.ratio)
        last = step == self.train_config.steps - 1
        if (step % c.prune_freq == 0 or last) and c.init_ratio < ratio <= c.ratio:
            self.prune_to(c.ratio if last else ratio)

    def prune_to(self, ratio: float) -> None:
        """Mask the lowest-importance units of every unprotected block until ``ratio`` of them are masked."""
        for block in self.blocks:
            if block.index in self.config.protected:
                continue
            for kind in ("attn", "mlp"):
                key = f"{kind}.{block.index}"
                mask = self.masks[key]
                need = int(mask.numel() * ratio)
                if need <= int((mask == 0).sum()):
                    continue
                order = torch.argsort(self.importance[key] * mask)  # masked units (0) come first: they stay masked
                mask.fill_(1.0)
                mask[order[:need]] = 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"importance.{k}": v for k, v in self.importance.items()},
                **{f"mask.{k}": v for k, v in self.masks.items()}}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            target = self.importance if kind == "importance" else self.masks
            target[name].copy_(value)

    def finish(self, model: nn.Module, adapter_name: str) -> None:
        """Masks stay on the model (its final evaluation is the pruned model's); the physically pruned, merged
        model is written to ``output_dir/pruned_model`` when the run has an output_dir."""
        model.lorakit_prune_masks = self.masks
        if self.config.save_pruned and self.train_config.output_dir is not None:
            from ...io.files import write_dir_atomically

            pruned = export_pruned(model, self.masks, protected=self.config.protected)
            write_dir_atomically(Path(self.train_config.output_dir) / "pruned_model",  # never half a model
                                 lambda folder: pruned.save_pretrained(folder, safe_serialization=True))


def attach_masks(blocks: list[Block], masks: dict[str, torch.Tensor]) -> list:
    """Forward hooks multiplying q/k/v outputs by the head-group mask and gate/up outputs by the channel mask."""
    hooks = []
    for block in blocks:
        for name in MASKED:
            mask = masks[f"{'attn' if name in ATTENTION else 'mlp'}.{block.index}"]
            width = block.head_dim * (block.n_rep if name == "q_proj" else 1) if name in ATTENTION else 1

            def hook(module, args, out, mask=mask, width=width):
                return out * mask.repeat_interleave(width).to(out.dtype)

            hooks.append(block.module(name).register_forward_hook(hook))
    return hooks


def export_pruned(model: nn.Module, masks: dict[str, torch.Tensor], protected: set[int] = frozenset()) -> nn.Module:
    """A physically pruned copy of ``model``: adapters merged (a 4-bit base dequantized first), masked units
    removed, config updated.
    Raises LorakitError when blocks would end with different widths (``protected`` blocks), which a transformers
    config cannot describe."""
    from ... import merge_and_unload
    from ...core.errors import LorakitError

    if protected:
        raise LorakitError(f"protected blocks {sorted(protected)} keep their full width while the others shrink; "
                           "a transformers config has one width for all blocks, so this model cannot be saved. "
                           "Train without protected_blocks to export it.")
    from ...quantize import dequantize_model

    # A 4-bit base is dequantized first (QLoRA + LoRAPrune); the mask hooks live on the adapter wrappers and go
    # with them.
    merged = merge_and_unload(dequantize_model(copy.deepcopy(model)))
    keep = {}
    for block in decoder_blocks(merged):
        attn, mlp = masks[f"attn.{block.index}"], masks[f"mlp.{block.index}"]
        keep[block.index] = (attn.nonzero().reshape(-1).cpu(), mlp.nonzero().reshape(-1).cpu())
    return prune_blocks(merged, keep)


register_procedure(
    "loraprune", LoraPrune, config=LoraPruneConfig,
    description="LoRAPrune: structured pruning of attention head groups and FFN channels during LoRA fine-tuning, "
                "importance from LoRA's weights and gradients (EMA), cubic schedule; writes a smaller model.",
    paper="Zhang et al. 2024 (ACL Findings), arXiv:2305.18403",
)
