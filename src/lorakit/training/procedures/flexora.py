"""Flexora — "Flexora: Flexible Low Rank Adaptation for Large Language Models", Wei et al., arXiv:2408.10774.

Which layers deserve LoRA, found as hyperparameter optimisation. Stage 1 (this procedure) trains LoRA on every
adapted layer with a per-layer weight on its LoRA path, and learns the weights on a validation split:

    Δ_l(x) ← w_l · Δ_l(x),   w = L · softmax(α),   α ∈ R^L, α = 0 at the start (w = 1)
    after every optimizer step of the LoRA weights (inner problem, w held fixed):
        g = Σ_{j=1..n} ∇_α L_val(batch_j; α)        (n = ``val_batches`` held-out batches, one example each)
        α ← Adam(α, g, lr = ``hyper_lr``)
    selected layers = {l : α_l > 0}               (the layers weighted above average)

Stage 2 is plain LoRA on the selected layers only, from a fresh adapter: ``layers_to_transform=<selected>``
(``lorakit train ... --layers-to-transform 1 4 5``). The stage-1 adapter is a by-product.

Follows the official code, kithib/Flexora ``src/llamafactory/train/flora.py`` (``BlockOptimizer``):
``hyper_param`` zeros of size ``block_num`` and ``Adam([hyper_param], lr=0.01)`` (lines 123-124);
``weight = block_num * softmax(hyper_param)[block_idx]`` (271), detached for the training forward and not
detached in ``hyper_step`` (273); ``hyper_step(n=8)`` runs after every ``step`` (245, 288-305): eval mode,
``loss.backward()`` on each of 8 validation batches (``per_device_eval_batch_size: 1`` in ``flexora.yaml``),
one Adam step; ``selected_layer`` = ``hyper_param > 0`` (253-255); ``val_size: 200`` (``flexora.yaml``). Its
BAdam block switching is disabled there (``_update_active_block`` keeps every block active, 431), so every
LoRA layer trains, as here. Differences, chosen here:

- the weight multiplies each LoRA path once (the paper's ``w_l · Δ_l``); the official hooks scale the input of
  every module named "lora" in the layer (dropout, lora_A, lora_B), i.e. ``w_l³ · Δ_l``;
- the validation gradient goes to α only (``torch.autograd.grad``); the official backward also fills the LoRA
  weights' ``.grad``, which the HF Trainer then zeroes before the next step (no effect on training).

L is the number of distinct layer indices among the adapter's layers (the official ``block_num`` counts every
decoder block; equal when LoRA is in every block). The validation split is the last ``val_size`` training
examples (the loop holds them out, ``Procedure.validation_split``), drawn in order, cycling. Under the HF Trainer,
call ``set_validation`` yourself. The selection is ``procedure.selected_layers()`` and, with an ``output_dir``,
``flexora.json`` there (α and the selected layers).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import check_positive, check_positive_ints, field_error
from ...core.errors import ConfigError
from ...core.model import adapter_layers, host_path
from ...core.targeting import layer_index
from ...data import IGNORE_INDEX
from ...io.files import atomic_write_json
from ..objectives import batch_routing
from .base import Procedure, ProcedureConfig, register_procedure


@dataclass
class FlexoraConfig(ProcedureConfig):
    """``hyper_lr``: Adam learning rate of the layer logits α (official 0.01); ``val_batches``: validation
    examples per hyper step (official n = 8, one per batch); ``val_size``: training examples held out as the
    validation split (official 200)."""

    hyper_lr: float = 0.01
    val_batches: int = 8
    val_size: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "hyper_lr")
        check_positive_ints(self, "val_batches", "val_size")


def _mean_loss_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) next-token cross-entropy averaged over each example's supervised tokens (an HF loss per batch of one)."""
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                             reduction="none")  # (B, T-1)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return losses.sum(dim=1) / counts


class Flexora(Procedure):
    config: FlexoraConfig

    def __init__(self, config: FlexoraConfig, train_config) -> None:
        super().__init__(config, train_config)
        self.layers: list[int] = []
        self.alpha = torch.zeros(0)
        self.hyper_optimizer: torch.optim.Optimizer | None = None
        self._weights: torch.Tensor | None = None
        self._hooks: list[Any] = []
        self._batch_of: Callable[[list[int]], dict[str, torch.Tensor]] | None = None
        self._n_val = 0
        self._unfired: dict[int, str] = {}  # id(lora_A module) -> its delta, until its hook first runs

    # -- data and hooks -------------------------------------------------------------------------------
    def validation_split(self, n_train: int) -> int:
        if self.config.val_size >= n_train:  # named here: the loop's own check cannot tell which field it was
            raise field_error(self.config, "val_size", f"={self.config.val_size} validation examples are held out of a "
                                                       f"run of {n_train} training examples, which leaves none to train "
                                                       "on; lower it or give more training data.")
        return self.config.val_size

    def set_validation(self, batch_of: Callable[[list[int]], dict[str, torch.Tensor]], n: int) -> None:
        self._batch_of, self._n_val = batch_of, n

    def param_groups(self, model: nn.Module, adapter_name: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found: list[tuple[int, nn.Module]] = []
        for name, layer in adapter_layers(model):
            delta = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
            if delta is None:
                continue
            index = layer_index(host_path(name), None)
            lora_a = getattr(delta, "lora_A", None)
            # a container (e.g. MixLoRA's FFN experts: a ParameterDict indexed, never called) would never run
            # the hook, leaving that path unweighted: refused like a missing lora_A
            containers = (nn.ParameterDict, nn.ParameterList, nn.ModuleDict, nn.ModuleList)
            if index is None or not isinstance(lora_a, nn.Module) or isinstance(lora_a, containers):
                raise ConfigError(f"Flexora weights each layer's LoRA path through its lora_A module (one called "
                                  f"on the layer input); the adapter {adapter_name!r} at {host_path(name)!r} "
                                  f"({type(delta).__name__}) has "
                                  f"{'no layer index' if index is None else 'no such lora_A module'}.")
            found.append((index, lora_a))
            self._unfired[id(lora_a)] = f"{host_path(name)!r} ({type(delta).__name__})"
        if not found:
            raise ConfigError(f"Flexora found no layer of adapter {adapter_name!r} to weight.")
        self.layers = sorted({i for i, _ in found})
        position = {layer: k for k, layer in enumerate(self.layers)}
        device = next(m.weight.device for _, m in found)
        self.alpha = torch.zeros(len(self.layers), device=device, requires_grad=True)
        self.hyper_optimizer = torch.optim.Adam([self.alpha], lr=self.config.hyper_lr)
        self._set_weights(detach=True)
        for index, module in found:
            self._hooks.append(module.register_forward_pre_hook(self._scale_input(position[index])))
        return groups

    def _scale_input(self, k: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            assert self._weights is not None
            self._unfired.pop(id(module), None)
            return (args[0] * self._weights[k].to(args[0].dtype),) + tuple(args[1:])
        return hook

    def _set_weights(self, detach: bool) -> None:
        weights = len(self.layers) * torch.softmax(self.alpha, dim=-1)  # w = L · softmax(α)
        self._weights = weights.detach() if detach else weights

    # -- the bi-level step ----------------------------------------------------------------------------
    def on_step(self, model: nn.Module, adapter_name: str, step: int, total_steps: int) -> bool:
        if self._batch_of is None:
            raise ConfigError("Flexora needs held-out validation batches: train with lorakit.train (it holds out "
                              "val_size examples), or call procedure.set_validation(batch_of, n) first.")
        assert self.hyper_optimizer is not None
        if self._unfired:  # the step's forward never called them: weighting their input weights nothing
            raise ConfigError(f"Flexora weights each layer's LoRA path through a hook on its lora_A module, which the "
                              f"adapter's forward at {next(iter(self._unfired.values()))} never calls (it reads the "
                              "factors' weights directly, e.g. DyLoRA's rank slices); Flexora cannot weight this "
                              "method's layers: use it with method lora.")
        was_training = model.training
        model.eval()
        self._set_weights(detach=False)
        try:
            start = (step - 1) * self.config.val_batches
            indices = [(start + j) % self._n_val for j in range(self.config.val_batches)]
            batch = self._batch_of(indices)
            with batch_routing(batch):  # the training forward's routing (keys, token mask, extras)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = _mean_loss_per_example(logits, batch["labels"]).sum()  # Σ_j L_val(batch_j), batches of one
            (grad,) = torch.autograd.grad(loss, self.alpha)
        finally:
            model.train(was_training)
        self.hyper_optimizer.zero_grad(set_to_none=True)
        self.alpha.grad = grad
        self.hyper_optimizer.step()
        self._set_weights(detach=True)
        return False  # the layer weights α are the procedure's own, not the model's: what trains stays the same

    def selected_layers(self) -> list[int]:
        """Layer indices with α_l > 0 (weighted above the average), as the official ``selected_layer``."""
        return [layer for layer, a in zip(self.layers, self.alpha.detach().tolist()) if a > 0]

    def finish(self, model: nn.Module, adapter_name: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._weights = None
        chosen = self.selected_layers()
        if not chosen:
            warnings.warn("Flexora selected no layer (every α <= 0); train longer or raise hyper_lr.", stacklevel=2)
        else:
            print(f"Flexora selected layers {chosen} of {self.layers}; stage 2: train a fresh LoRA with "
                  f"--layers-to-transform {' '.join(map(str, chosen))}", file=sys.stderr)
        if self.train_config.output_dir is not None:
            Path(self.train_config.output_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(self.train_config.output_dir) / "flexora.json",
                              {"selected_layers": chosen, "layers": self.layers,
                               "alpha": self.alpha.detach().tolist()})

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"alpha": self.alpha.detach().clone()}
        assert self.hyper_optimizer is not None
        for key, value in self.hyper_optimizer.state.get(self.alpha, {}).items():
            out[f"adam_{key}"] = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
        return out

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.alpha.copy_(tensors["alpha"])
        state = {k[len("adam_"):]: v.to(self.alpha.device) if k != "adam_step" else v
                 for k, v in tensors.items() if k.startswith("adam_")}
        if state and self.hyper_optimizer is not None:
            self.hyper_optimizer.state[self.alpha] = state
        self._set_weights(detach=True)


register_procedure(
    "flexora", Flexora, config=FlexoraConfig,
    description="Flexora stage 1: per-layer LoRA weights w = L·softmax(α) learned on a held-out split after every "
                "step; selects layers with α > 0 (flexora.json) for a stage-2 LoRA on those layers only.",
    paper="Wei et al. 2024, arXiv:2408.10774",
)
