"""LoRAM — "Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language Models", Zhang et al.,
ICLR 2025, arXiv:2502.13533.

Train LoRA on a structurally pruned copy of the base (less memory: the frozen base dominates it), then recover
the low-rank matrices to the original shapes and use them with the original, unpruned base:

    pruned:    W_p = W[kept rows] (q, k, v, gate, up) or W[:, kept columns] (o, down)
    train:     ΔW_p = s·B_p·A_p on the pruned model
    recover:   B[kept rows] = B_p, B[pruned rows] = 0          (q, k, v, gate, up: B is (out, r))
               A[:, kept cols] = A_p, A[:, pruned cols] = 0    (o, down: A is (r, in))  — "zeroA"
               or A[:, pruned cols] ~ N(0, (1/r)²)             — "normA" (``recover="normal"``)
    infer:     W + s·B·A on the original model (merge_and_unload)

With zeroA the recovered ΔW equals ΔW_p on the kept rows/columns and is zero on the pruned ones: the full model's
pruned units get no update, the kept ones get exactly what training on the small model learned.

Follows the official code, junzhang-zj/LoRAM ``loram/3_recovered_low_rank_matrix_generation.py``: lines 30–52
(MLP: ``down_proj.lora_A`` columns, ``gate_proj``/``up_proj.lora_B`` rows, zeros, ``normA`` = ``normal_(std=1/r)``
before the kept columns are written back), lines 64–103 (attention: pruned key/value heads, the q/o ranges of
their ``n_rep`` query heads, ``o_proj.lora_A`` columns, ``q/k/v_proj.lora_B`` rows). The pruning itself comes
from outside the official pipeline (LLM-Pruner indices for LoRAM-Stru, random for LoRAM-Rand); here
``criterion="random"`` is LoRAM-Rand and ``criterion="magnitude"`` ranks units by the L2 norm of their weights
(a cheap structured criterion, not LLM-Pruner's gradient one). The pruned blocks are ``block_range`` (official
70B example: layers 4–78 of 80).

Alignment (pipeline step 1, the publisher's continued pre-training of the pruned model before LoRA training) is
``lorakit.pretrain.loram_align.align_pruned`` (it uses the pretraining corpus and loop, a higher layer).
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.config import field_error
from ..core.errors import AdapterError, ConfigError, LorakitError, did_you_mean
from ..core.inits import find_init
from ..io.files import atomic_write_json, is_temp_name, load_tensors, read_json, save_tensors, write_dir_atomically
from ..io.peft_format import PREFIX, WEIGHTS_NAME, weights_path
from .structure import ATTENTION, MLP, OUTPUT_SIDE, Block, base_of, decoder_blocks, group_rows, prune_blocks

CRITERIA = ("random", "magnitude")
RECOVER = ("zero", "normal")
PLAN_NAME = "loram_plan.safetensors"
PLAN_INFO = "loram_plan.json"


@dataclass(frozen=True)
class LoramConfig:
    """``ratio``: fraction of attention groups and FFN channels removed in each pruned block (official 70B: 0.85);
    ``criterion``: ``"random"`` (LoRAM-Rand) or ``"magnitude"``; ``block_range``: (start, end) of the pruned blocks,
    None = all; ``seed``: of the random criterion. ConfigError on bad values."""

    ratio: float = 0.5
    criterion: str = "random"
    block_range: tuple[int, int] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise field_error(self, "ratio", f"={self.ratio}: give the fraction removed, in (0, 1)")
        if self.criterion not in CRITERIA:
            raise field_error(self, "criterion", f"={self.criterion!r}: choose one of {CRITERIA}."
                                                f"{did_you_mean(self.criterion, CRITERIA)}")
        if self.block_range is not None and not (0 <= self.block_range[0] < self.block_range[1]):
            raise field_error(self, "block_range", f"={self.block_range}: give (start, end) with 0 <= start < end")


@dataclass
class PrunePlan:
    """What was kept: ``groups[block]`` attention groups and ``channels[block]`` FFN channels (sorted indices into
    the original block), with each pruned block's original sizes in ``blocks`` (paths, head_dim, n_rep, ...)."""

    groups: dict[int, torch.Tensor] = field(default_factory=dict)
    channels: dict[int, torch.Tensor] = field(default_factory=dict)
    blocks: dict[int, dict] = field(default_factory=dict)

    def kept(self, path: str) -> tuple[int, torch.Tensor, int] | None:
        """(dim, kept indices, original size) of adapted module ``path`` — dim 0 for rows (q/k/v/gate/up), 1 for
        columns (o/down) — or None when the module was not pruned."""
        for index, info in self.blocks.items():
            for name in ATTENTION + MLP:
                if path == f"{info['attn_path' if name in ATTENTION else 'mlp_path']}.{name}":
                    block = Block(index=index, attn=None, mlp=None, **info)
                    units = self.groups[index] if name in ATTENTION else self.channels[index]
                    full = block.channels if name in MLP else block.num_groups * block.head_dim * (
                        block.n_rep if name in ("q_proj", "o_proj") else 1)
                    return (0 if name in OUTPUT_SIDE else 1), group_rows(block, name, units), full
        return None

    def save(self, folder: str | os.PathLike) -> None:
        tensors = {f"groups.{i}": t for i, t in self.groups.items()} | {f"channels.{i}": t for i, t in self.channels.items()}

        def write(tmp: Path) -> None:
            save_tensors(tmp / PLAN_NAME, tensors)
            atomic_write_json(tmp / PLAN_INFO, {str(i): info for i, info in self.blocks.items()})

        write_dir_atomically(folder, write)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "PrunePlan":
        folder = Path(folder)
        tensors = load_tensors(folder / PLAN_NAME)
        info = {int(i): v for i, v in read_json(folder / PLAN_INFO).items()}
        return cls(groups={i: tensors[f"groups.{i}"] for i in info}, channels={i: tensors[f"channels.{i}"] for i in info},
                   blocks=info)


def _unit_scores(block: Block, criterion: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if criterion == "random":
        return torch.rand(block.num_groups, generator=generator), torch.rand(block.channels, generator=generator)
    scores = {}
    for kind, names, size in (("attn", ATTENTION, block.num_groups), ("mlp", MLP, block.channels)):
        total = torch.zeros(size)
        for name in names:
            w = base_of(block.module(name)).weight.detach().float().cpu()
            per_index = w.norm(dim=1) ** 2 if name in OUTPUT_SIDE else w.norm(dim=0) ** 2
            total += per_index.reshape(size, -1).sum(1) if name in ATTENTION else per_index
        scores[kind] = total.sqrt()
    return scores["attn"], scores["mlp"]


def loram_prune(model: nn.Module, config: LoramConfig = LoramConfig()) -> tuple[nn.Module, PrunePlan]:
    """(a pruned copy of ``model``, its PrunePlan): in every pruned block the ``ratio`` lowest-scoring attention
    groups and FFN channels are removed (at least one of each kept). ``model`` is not changed. Raises
    LorakitError for a model with adapters or without Llama-style blocks, ConfigError for a bad block_range."""
    blocks = decoder_blocks(model)
    start, end = config.block_range or (0, len(blocks))
    if end > len(blocks):
        raise ConfigError(f"LoramConfig.block_range={config.block_range}: the model has {len(blocks)} blocks")
    generator = torch.Generator().manual_seed(config.seed)
    plan, keep = PrunePlan(), {}
    for block in blocks[start:end]:
        group_scores, channel_scores = _unit_scores(block, config.criterion, generator)
        kept = []
        for scores in (group_scores, channel_scores):
            n_keep = max(1, len(scores) - int(len(scores) * config.ratio))
            kept.append(torch.argsort(scores, descending=True)[:n_keep].sort().values)
        keep[block.index] = tuple(kept)
        plan.groups[block.index], plan.channels[block.index] = kept
        plan.blocks[block.index] = {"attn_path": block.attn_path, "mlp_path": block.mlp_path, "head_dim": block.head_dim,
                                    "num_groups": block.num_groups, "n_rep": block.n_rep, "channels": block.channels}
    return prune_blocks(copy.deepcopy(model), keep), plan


def recover_state_dict(tensors: dict[str, torch.Tensor], plan: PrunePlan, recover: str = "zero",
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """PEFT-layout LoRA tensors of the pruned model -> the same tensors at the original model's shapes
    (zeros, or N(0, 1/r²) for ``recover="normal"``, in the pruned rows of B / columns of A). Raises LorakitError
    for another tensor of a pruned module (e.g. DoRA's magnitude): only lora_A / lora_B can be recovered."""
    if recover not in RECOVER:
        raise ConfigError(f"recover={recover!r}: choose one of {RECOVER}.{did_you_mean(recover, RECOVER)}")
    generator = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for key, value in tensors.items():
        path, _, param = key.removeprefix(PREFIX).rpartition(".lora_")
        kept = plan.kept(path)
        if kept is None:
            continue
        dim, index, full = kept
        if (param, dim) in (("A.weight", 0), ("B.weight", 1)):
            continue  # the unpruned side (hidden size): unchanged
        if param not in ("A.weight", "B.weight"):
            raise LorakitError(f"{key}: LoRAM recovers lora_A / lora_B only; this adapter has other tensors on a "
                               f"pruned module (train a plain LoRA on the pruned model)")
        shape = list(value.shape)
        shape[dim] = full
        recovered = torch.zeros(shape, dtype=torch.float32)
        if recover == "normal" and param == "A.weight":  # official normA: normal_(std=1/r) before writing back
            recovered.normal_(std=1 / value.shape[0], generator=generator)
        recovered.index_copy_(dim, index, value.float())
        out[key] = recovered.to(value.dtype)
    return out


def recover_adapter(source: str | os.PathLike, plan: PrunePlan, target: str | os.PathLike, *,
                    recover: str = "zero", seed: int = 0, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter folder ``source`` (trained on the pruned model) recovered for the original model to
    ``target`` (same adapter_config.json, PEFT-loadable, the folder's other files copied along), written atomically
    (a folder already at ``target`` is replaced). ``base_model_name_or_path``: the original model, recorded in the
    target's config in place of the pruned base ``source`` records (None: kept as it is). Returns ``target``.

    Raises AdapterError for an adapter whose file is relative to a base its init changed and redoes on load
    (PiSSA, OLoRA: ``init_lora_weights="pissa"``): on the full model that init would factorise other weights.
    Save such an adapter with ``save_adapter(..., original_base=True)`` first."""
    source, target = Path(source), Path(target)
    config = read_json(source / "adapter_config.json")
    spec = config.get("init_lora_weights")
    if isinstance(spec, str) and find_init(spec) is not None and find_init(spec).rerun_on_load:
        raise AdapterError(f"{source}: init_lora_weights={spec!r} is redone on the base the adapter is loaded on, "
                           "and the full model is another base than the pruned one it was trained on. Save the "
                           "pruned model's adapter with save_adapter(model, dir, original_base=True) (a plain LoRA "
                           "for the untouched pruned base) and recover that.")
    recovered = recover_state_dict(load_tensors(weights_path(source)), plan, recover, seed)
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path

    def write(folder: Path) -> None:
        for extra in source.iterdir():  # what else the folder holds (task_index.json, ...) goes along unchanged
            if extra.is_file() and extra.name not in (WEIGHTS_NAME, "adapter_config.json") and not is_temp_name(extra.name):
                shutil.copy2(extra, folder / extra.name)
        save_tensors(folder / WEIGHTS_NAME, recovered)
        atomic_write_json(folder / "adapter_config.json", config)

    return write_dir_atomically(target, write)  # an interrupted recovery leaves no adapter without its config


def plan_summary(plan: PrunePlan, full: nn.Module, pruned: nn.Module) -> dict:
    """Parameter counts for reports: original, pruned, removed fraction."""
    n_full, n_pruned = (sum(p.numel() for p in m.parameters()) for m in (full, pruned))
    return {"params_full": n_full, "params_pruned": n_pruned, "removed_fraction": 1 - n_pruned / n_full,
            "pruned_blocks": sorted(plan.blocks)}
