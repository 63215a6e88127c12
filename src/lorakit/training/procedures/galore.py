"""GaLore — "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", Zhao et al., ICML 2024,
arXiv:2403.03507.

Full-rank training of chosen weight matrices ``W ∈ R^{m×n}`` with Adam run in a rank-``r`` projection of
the gradient ``G``:

    P_t = top-r singular vectors of G_t, recomputed when t % T == 0 (T = update_proj_gap)
    R_t = G_t Pᵀ (m ≥ n, right vectors P ∈ R^{r×n})   or   Pᵀ G_t (m < n, left vectors P ∈ R^{m×r})
    M_t = β1 M + (1-β1) R_t,  V_t = β2 V + (1-β2) R_t²        (moments live in the r-dim space; not reset
    N_t = M̂_t / (√V̂_t + ε)                                    when P changes)
    W  -= η · scale · (N_t P  or  P N_t);   then W -= η · λ · W   (decoupled weight decay, after the update)

Follows the official code as packaged in ``galore-torch`` 1.0 (jiaweizzhao/GaLore): ``galore_torch/adamw.py``
``AdamW.step`` (lines 78-140: eps 1e-6, bias correction, decay after the update) and
``galore_torch/galore_projector.py`` (``proj_type`` std/reverse_std/left/right, lines 12-67; the SVD of the
gradient in float32, lines 71-107). ``proj_type='full'`` (two-sided) is not implemented. Every other trainable
parameter (the adapter, embeddings, norms, untargeted layers) takes the same Adam update without projection,
as the official code's non-"rank" parameter group. Targets, as ``torchrun_main.py``: ``nn.Linear`` weights of
modules whose name contains one of ``optim_target_modules`` (default ``attn``, ``mlp``).

``per_layer=True`` is the official ``*_per_layer`` mode (``torchrun_main.py``, ``optimizer_hook``): each
parameter is updated inside its ``register_post_accumulate_grad_hook`` as soon as its gradient of the step is
complete (after ``grad_accum`` micro-batches) and the gradient is dropped, so full gradients are never all
held at once. As in the official code, such gradients are not clipped (global clipping needs all of them); with
``per_layer=False`` the loop clips and steps once per step as usual. The official per-layer script doubles
``update_proj_gap``; here T means T steps in both modes.

Composition: the run's adapter keeps training (plain Adam rule above) unless ``train_adapter=False``; GaLore
alone is "a zero-initialised LoRA with ``train_adapter=False``". The trained base weights are in the loop's
checkpoints (``param.<name>``) and, at the end of a run with an ``output_dir``, in ``trainable_params.safetensors``
beside the adapter (``lorakit eval`` / ``generate`` / ``merge`` load them with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ...core.config import check_non_negative, check_positive, check_positive_ints, check_range, field_error
from ...core.errors import did_you_mean
from ...core.model import adapter_layers
from .base import Procedure, ProcedureConfig, float_base_params, register_procedure, save_trained_base

PROJ_TYPES = ("std", "reverse_std", "left", "right")


@dataclass
class GaLoreConfig(ProcedureConfig):
    """``rank`` r of the projection; ``update_proj_gap`` T (steps between SVDs); ``scale`` α on the projected-back
    update; ``proj_type`` which side is projected (std: the smaller side); ``optim_target_modules`` (the name
    ``transformers.TrainingArguments`` gives GaLore's targets) substrings of the
    module names whose ``nn.Linear`` weights get GaLore; ``train_other_params``: train every other base parameter
    (embeddings, norms, head) with plain Adam, as the official pre-training script; ``train_adapter``: keep
    training the run's adapter; ``per_layer``: update in post-accumulate-grad hooks; ``beta1``, ``beta2``,
    ``eps``: Adam's (galore-torch's defaults 0.9, 0.999, 1e-6). Defaults: the official
    C4 60M/130M scripts' scale 0.25 and gap 200 (rank 128 there; set ``rank`` to your width)."""

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    optim_target_modules: list[str] | str = field(default_factory=lambda: ["attn", "mlp"])
    train_other_params: bool = True
    train_adapter: bool = True
    per_layer: bool = True
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "rank", "update_proj_gap")
        check_positive(self, "scale")  # a negative scale turns the update into gradient ascent
        if self.proj_type not in PROJ_TYPES:
            raise field_error(self, "proj_type", f"={self.proj_type!r} is not one of {PROJ_TYPES}."
                                                 f"{did_you_mean(self.proj_type, PROJ_TYPES)}")
        if isinstance(self.optim_target_modules, str):  # one name (the CLI passes a single value as str)
            self.optim_target_modules = [self.optim_target_modules]
        if not self.optim_target_modules:
            raise field_error(self, "optim_target_modules", " is empty; name module substrings such as "
                                                            "['attn', 'mlp'].")
        for name in ("beta1", "beta2"):
            check_range(self, name, 0, 1, high_open=True)
        check_non_negative(self, "eps", finite=True)  # a negative eps can zero Adam's denominator (torch refuses it)

    def check_steps(self, steps: int) -> None:
        # GaLoreAdamW.step_param recomputes P at update t = 0, T, 2T, ... (t counts from 0), so a refresh needs T < steps
        if self.update_proj_gap >= steps:
            raise field_error(self, "update_proj_gap", f"={self.update_proj_gap} with steps={steps}: the projection "
                              "would be computed once, at the first step, and never refreshed from the gradient "
                              "(GaLore's subspace switching); lower update_proj_gap below steps, or train more steps.")

    def check_run(self, train_config) -> None:
        from ..distributed import env_world

        world = env_world()[1]
        if self.per_layer and world > 1:
            raise field_error(self, "per_layer", f"=True steps each weight inside its gradient hook, during backward, "
                                                 f"before data parallelism has averaged the gradient over the {world} "
                                                 "processes (WORLD_SIZE): they would train apart. Set per_layer=False "
                                                 "(lorakit train --no-per-layer) under torchrun / accelerate launch.")


def _right_side(shape: torch.Size, proj_type: str) -> bool:
    """True when the projection multiplies from the right (G Pᵀ, P of shape (r, n))."""
    if proj_type == "std":
        return shape[0] >= shape[1]
    if proj_type == "reverse_std":
        return shape[0] < shape[1]
    return proj_type == "right"


class GaLoreAdamW(torch.optim.Optimizer):
    """Adam with GaLore projection for groups that carry ``rank`` (``update_proj_gap``, ``scale``,
    ``proj_type``); plain Adam (same rule) elsewhere. State per parameter: ``step`` (int64 scalar), ``exp_avg``,
    ``exp_avg_sq`` (projected shape for GaLore parameters) and ``projector`` (the current P) — all tensors, so
    lorakit's checkpoints store them. :meth:`step_param` updates one parameter (the per-layer hooks)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        t = int(state["step"]) if "step" in state else 0  # completed updates of p
        grad = p.grad
        rank = group.get("rank")
        if rank is not None:
            right = _right_side(p.shape, group["proj_type"])
            if "projector" not in state or t % group["update_proj_gap"] == 0:
                # SVD in float32 (galore_projector.py get_orthogonal_matrix), P back in the gradient's dtype;
                # contiguous, as a checkpoint restores it, so that resumed matmuls round the same way.
                u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
                state["projector"] = (vh[:rank] if right else u[:, :rank]).to(grad.dtype).contiguous()
            proj = state["projector"]
            grad = grad @ proj.T if right else proj.T @ grad  # (m, r) or (r, n)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        t += 1
        state["step"] = torch.tensor(t, dtype=torch.int64)
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        if rank is not None:
            update = (update @ proj if right else proj @ update) * group["scale"]
        p.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


class GaLore(Procedure):
    config: GaLoreConfig
    quantized_base_ok = False

    def __init__(self, config: GaLoreConfig, train_config) -> None:
        super().__init__(config, train_config)
        self._hooks: list[Any] = []
        self._calls: dict[int, int] = {}
        self.trained_base: list[nn.Parameter] = []  # base parameters it trains in full (saved by finish)

    def param_groups(self, model: nn.Module, adapter_name: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        adapter_ids = {id(p) for _, layer in adapter_layers(model) for p in layer.adapters.parameters()}
        targets: dict[int, nn.Parameter] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(key in name for key in self.config.optim_target_modules) \
                    and id(module.weight) not in adapter_ids:
                targets[id(module.weight)] = module.weight
        if not targets:
            raise field_error(self.config, "optim_target_modules", f"={self.config.optim_target_modules}: GaLore found no "
                              "nn.Linear weight in a module whose name contains one of them; name modules of this model.")
        if not self.config.train_adapter:
            for g in groups:
                for p in g["params"]:
                    p.requires_grad_(False)
            groups = []
        taken = {id(p) for g in groups for p in g["params"]} | set(targets)
        others = [p for p in model.parameters() if id(p) not in adapter_ids and id(p) not in taken] \
            if self.config.train_other_params else []
        self.trained_base = float_base_params(model, [*targets.values(), *others], "GaLore")
        for p in self.trained_base:
            p.requires_grad_(True)
        out = [g for g in groups if g["params"]]
        if others:
            out.append({"params": others, "lr": self.train_config.lr, "weight_decay": self.train_config.weight_decay})
        out.append({"params": list(targets.values()), "lr": self.train_config.lr,
                    "weight_decay": self.train_config.weight_decay, "rank": self.config.rank,
                    "update_proj_gap": self.config.update_proj_gap, "scale": self.config.scale,
                    "proj_type": self.config.proj_type})
        return out

    def make_optimizer(self, groups: list[dict[str, Any]], train_config) -> torch.optim.Optimizer:
        optimizer = GaLoreAdamW(groups, lr=train_config.lr, betas=(self.config.beta1, self.config.beta2),
                                eps=self.config.eps, weight_decay=train_config.weight_decay)
        if self.config.per_layer:
            for index, group in enumerate(optimizer.param_groups):
                for p in group["params"]:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(optimizer, index)))
        return optimizer

    def _hook(self, optimizer: GaLoreAdamW, index: int):
        accum = self.train_config.grad_accum

        def hook(p: torch.Tensor) -> None:
            calls = self._calls.get(id(p), 0) + 1
            if calls < accum:  # the step's gradient is not complete yet
                self._calls[id(p)] = calls
                return
            self._calls[id(p)] = 0
            # By index: Optimizer.load_state_dict (resume) replaces the group dicts. Its lr is this step's.
            optimizer.step_param(p, optimizer.param_groups[index])
            p.grad = None

        return hook

    def finish(self, model: nn.Module, adapter_name: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        save_trained_base(model, self.trained_base, self.train_config)  # the matrices (and others) it trained

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._calls.clear()


register_procedure(
    "galore", GaLore, config=GaLoreConfig,
    description="GaLore: full-rank training of attn/mlp weights with Adam in a rank-r SVD projection of the gradient.",
    paper="Zhao et al. 2024 (ICML), arXiv:2403.03507",
)
