"""MeteoRA — "MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models", Xu et al., arXiv:2405.13053
(ICLR 2025).

N existing LoRA adapters are embedded in every target linear, and a trainable gate per module picks k of
them for each token:

    y = W x + Σ_{i ∈ TopK_k(l)} w_i · s_i · B_i A_i dropout(x),    l = W_g x,  W_g ∈ R^{N×in} (no bias, N(0, 1))

- ``gate_path="fast"`` (the official default, its accelerated forward): ``w = softmax(top-k(l) / T)``.
- ``gate_path="reference"`` (the official non-accelerated path): softmax(l / T) → top-k → renormalise.
  The two are the same function (softmax is monotonic and renormalising the kept probabilities is a softmax
  over the kept logits); they differ in floating point only: when softmax underflows, far-behind adapters
  tie at probability 0 and the reference path may keep any of them as runner-up (with weight 0), while the
  fast path keeps the true runner-up. The official reference path ignores ``T``; here ``T`` applies to both,
  so they agree. The README raises ``T`` (15 / 20 / 30) for composite tasks of 3 / 5 / 10 sub-tasks.
  ``k = 1`` gives weight 1.

Supervised gate loss (the official ``lora_gate_loss_func``): cross-entropy of every module's gate logits ``l``
against each token's ground-truth adapter, pooled over all modules and all non-padding tokens (prompt and
completion alike, as the official data code labels them), × ``router_aux_loss_coef`` (50, hard-coded in the
official ``LlamaMeteorForCausalLM``). The official code also drops the last position (a one-token shift
against its labels); with one label per sequence that only drops one token, so we keep every token.

Ground truth comes from the routing keys (``lorakit.training.train`` passes each example's task id).
Those ids are positions in the sorted list of the training data's task names (``lorakit.data.
build_task_index``). ``task_to_adapter`` maps task *names* to adapter indices and is resolved the same way
(id j ↔ the j-th name in sorted order), so it must name every task of the training data (-1: no adapter,
left out of the gate loss). Without it, task id j is adapter j ("by order").

Choices and deviations:
- Adapters may have different ranks, alphas and rsLoRA settings: all A's are stacked (R_total, in), all B's
  (out, R_total), with an ``owner`` map and per-rank scaling, and the forward is two GEMMs whatever N is
  (``mixtures.experts.rank_block_delta``). The official batched kernel requires identical ranks.
- ``train_adapters=False`` (default) trains the gate only, as the paper; the banks are then frozen
  parameters (the bank's ``frozen_names``): ``set_adapter`` never makes them trainable and they still save. ``True`` trains gate and adapters,
  as the released script does (``meteora_train.py``).
- ``lora_dropout`` applies one dropout to the whole bank; the official code hard-codes 0.1.
- A module that some adapter does not adapt gets a zero block for it (a fresh LoRA: A Kaiming, B zero).
- Source adapters: plain LoRA / rsLoRA from lorakit or PEFT on linear layers. DoRA, ``rank_pattern`` /
  ``alpha_pattern``, LoRA biases, embeddings and ``modules_to_save`` are refused with an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import LayerInfo
from ..core.config import check_non_negative, check_positive, field_error
from ..core.errors import ConfigError
from ..core.registry import register_method
from ..data import build_task_index
from ..mixtures.base import pop_aux_records
from ..mixtures.keys import check_task_experts
from ..mixtures.experts import expand_to_ranks, rank_block_delta
from ..mixtures.rank_blocks import LoraExperts, LoraExpertsConfig, drop_adapter_paths
from ..mixtures.router import Router
from ..mixtures.sources import prepare_from_sources

IGNORE = -100


@dataclass
class MeteoraConfig(LoraExpertsConfig):
    """Either ``adapter_paths`` (existing LoRA folders; ranks, alphas and default targets are read from
    them) or ``num_experts`` / ``expert_r`` (randomly initialised experts, B = 0, default r = 8, α = 2r; e.g. for
    a bank loaded later). The bank fields and their checks are ``mixtures.rank_blocks.LoraExpertsConfig``'s.

    ``adapter_names`` label the bank slots (default: the source folders' names), so a saved MeteoRA adapter,
    which no longer points at its sources, still says what each slot holds. ``task_to_adapter``: task name →
    adapter index, resolved through the sorted task names (see the module docstring); None = by order.

    - ``top_k``: adapters each token's gate keeps.
    - ``temperature``: softmax temperature of the gate (> 1 flattens the chosen adapters' weights).
    - ``gate_path``: ``fast`` (top-k on logits, softmax over the kept) or ``reference`` (the official two-softmax path).
    - ``lora_dropout``: dropout on the bank's input (the official code hard-codes 0.1).
    - ``train_adapters``: also train the LoRA adapters (False: only the gate, as the paper).
    - ``router_aux_loss_coef``: weight of the supervised gate loss, a cross-entropy against each task's adapter
      (``moe_aux_loss_coef`` in files written before the rename).
    """

    renamed_fields = {**LoraExpertsConfig.renamed_fields, "moe_aux_loss_coef": "router_aux_loss_coef"}

    top_k: int = 2
    temperature: float = 1.0
    gate_path: Literal["fast", "reference"] = "fast"
    lora_dropout: float = 0.1  # the official code's hard-coded value
    train_adapters: bool = False
    router_aux_loss_coef: float = 50.0
    task_to_adapter: dict[str, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_experts
        if not 0 < self.top_k <= n:
            raise field_error(self, "top_k", f" must be in 1..num_experts={n}, got {self.top_k}.")
        check_positive(self, "temperature")
        check_non_negative(self, "router_aux_loss_coef", finite=True)
        for task, index in (self.task_to_adapter or {}).items():
            if not -1 <= index < n:
                raise field_error(self, "task_to_adapter", f"[{task!r}]={index}: use an adapter index in "
                                                           f"0..{n - 1}, or -1 for a task without an adapter.")

    def check_examples(self, examples: Sequence[Any]) -> None:
        """Every task of the data needs an adapter its gate is supervised towards (``mixtures.keys
        .check_task_experts``): a task without one stopped the run at its first batch, after the model loaded."""
        tasks = list(build_task_index(examples))  # the data's sorted task names: the loop's task ids index them
        check_task_experts(self, "task_to_adapter", tasks, self.num_experts, self.adapter_names)

    def adapter_of_task_id(self) -> list[int] | None:
        """Routing key id → adapter index (-1: none); None = by order (id j is adapter j)."""
        if self.task_to_adapter is None:
            return None
        return [self.task_to_adapter[task] for task in sorted(self.task_to_adapter)]


# -- the delta --------------------------------------------------------------------------------------------
class MeteoraLinear(LoraExperts):
    """N LoRA adapters stacked as rank blocks of one bank (``mixtures.rank_blocks.LoraExperts``: A Kaiming, B zero
    per block, an owner map, per-rank scaling), gated per token by a top-k router on the input."""

    def __init__(self, info: LayerInfo, config: MeteoraConfig):
        super().__init__(info, config, trainable=config.train_adapters)  # gate-only: the bank is frozen
        strategy = "topk_logits" if config.gate_path == "fast" else "topk"
        self.router = Router(info.in_features, config.num_experts, strategy=strategy, top_k=config.top_k,
                             temperature=config.temperature, init_std=1.0)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        routed = self.router(x)  # weights (N, num_experts), 0 off the top-k
        self.observe(routed, x.shape)
        gate = expand_to_ranks(routed.weights.to(x.dtype), self.owner, self.rank_scaling.to(x.dtype))  # (N, R)
        flat = self.lora_dropout(x).reshape(-1, x.shape[-1])  # (N, in)
        return rank_block_delta(flat, self.lora_A, self.lora_B, gate).reshape(base_out.shape).to(base_out.dtype)


# -- hooks ------------------------------------------------------------------------------------------------
def build_meteora(base_layer: nn.Module, info: LayerInfo, config: MeteoraConfig, path: str = "") -> MeteoraLinear:
    return MeteoraLinear(info, config).load_sources(config, path)


def gate_labels(config: MeteoraConfig, keys: torch.Tensor, key_names: list[str] | None = None) -> torch.Tensor:
    """Per-token ground-truth adapter (IGNORE where the task has none) from per-token task ids.

    When the caller names the ids (the training loop passes the data's task names), tasks are mapped by
    name, so data holding a subset of the mapped tasks is still supervised correctly.
    """
    table = config.adapter_of_task_id()
    if key_names is not None and config.task_to_adapter is not None:
        unknown = [n for n in key_names if n not in config.task_to_adapter]
        if unknown:
            raise ConfigError(f"task(s) {unknown} of the training data are not in MeteoraConfig.task_to_adapter "
                              f"{sorted(config.task_to_adapter)}; map them (-1 for no adapter).")
        table = [config.task_to_adapter[n] for n in key_names]
    n_ids = config.num_experts if table is None else len(table)
    bad = keys[(keys < 0) | (keys >= n_ids)]
    if bad.numel():
        raise ConfigError(
            f"routing key (task id) {int(bad[0])} has no adapter: MeteoraConfig.task_to_adapter covers ids "
            f"0..{n_ids - 1} (ids are positions in the sorted task names of the training data). Name every task "
            "in task_to_adapter (-1 for a task without an adapter).")
    if table is None:
        return keys.long()
    labels = torch.tensor(table, device=keys.device)[keys.long()]
    return labels.masked_fill(labels < 0, IGNORE)


def gate_loss(model: nn.Module, name: str) -> torch.Tensor | None:
    """Mean cross-entropy of every module's gate logits vs each keyed, non-padding token's adapter, pooled
    over this forward's modules and tokens (consumes the routing records); None without keyed tokens."""
    from ..core.model import adapter_state

    records = [r for _, r in pop_aux_records(model, name) if r.keys is not None]
    if not records:
        return None
    logits = torch.cat([r.out.logits for r in records])  # (modules · tokens, num_experts), float32
    config = adapter_state(model).configs[name]
    labels = torch.cat([gate_labels(config, r.keys.to(logits.device), r.key_names) for r in records])
    real = torch.cat([torch.ones_like(r.keys, dtype=torch.bool, device=logits.device) if r.token_mask is None
                      else r.token_mask.to(logits.device) for r in records])
    labels = labels.masked_fill(~real, IGNORE)
    if not bool((labels != IGNORE).any()):
        return None
    return F.cross_entropy(logits, labels, ignore_index=IGNORE)


def meteora_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    from ..core.model import adapter_state

    loss = gate_loss(model, name)
    if loss is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return adapter_state(model).configs[name].router_aux_loss_coef * loss


def meteora_example_routing(input_ids: torch.Tensor) -> dict[str, Any]:
    return {"keys": torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)}


register_method(
    "meteora", config=MeteoraConfig, build=build_meteora, prepare=prepare_from_sources, extra_loss=meteora_extra_loss,
    file_fields=drop_adapter_paths, example_routing=meteora_example_routing, mergeable=False,
    description="A trained per-module top-k gate over N existing LoRA adapters, supervised by task keys.",
    paper="Xu et al. 2024 (ICLR 2025), arXiv:2405.13053",
    variants={"meteora": {"num_experts": 3, "expert_r": [4, 2, 4], "expert_alpha": [8, 4, 16],
                          "expert_use_rslora": [False, False, True], "train_adapters": True},
              "meteora_reference": {"num_experts": 2, "expert_r": [2, 2], "top_k": 1, "gate_path": "reference",
                                    "lora_dropout": 0.0, "train_adapters": True}},
)
