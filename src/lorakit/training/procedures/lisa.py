"""LISA — "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning",
Pan et al., NeurIPS 2024, arXiv:2403.17919.

Full-parameter AdamW in which only γ of the N decoder blocks train at a time:

    every K steps (from step 0): freeze all N blocks; draw γ block indices uniformly without replacement;
    unfreeze them. Embeddings, final norm and LM head (everything outside the blocks) always train.

Follows the official code, OptimalScale/LMFlow ``src/lmflow/pipeline/utils/lisa_trainer.py`` (``LISATrainer``:
``_switch_active_layers`` freezes every body layer and unfreezes the drawn ones; ``maybe_switch_active_layers``
re-creates the optimizer at each switch, keeping the state of the non-body groups (``LISA_PARAM_GROUPS_KEEP_
STATE_IDX``) so newly active blocks start from fresh Adam moments). Here one AdamW holds every parameter and
the switch drops the moments of the blocks it freezes: optimizer state exists only for the active blocks and
the always-trained parameters, and the updates equal the official re-created optimizer's. Options as LMFlow's
``lisa_activated_layers`` (γ, default 2) and ``lisa_interval_steps`` (K, default 20).

The draw for interval ``i = step // K`` comes from a generator seeded with (run seed, i), not from a global
RNG, so the choice is reproducible from the seed and a resumed run draws the same blocks. The decoder blocks
are the model's longest ``nn.ModuleList`` (``model.layers``, ``transformer.h``) unless ``layers_attribute``
names one. The run's adapter (if ``train_adapter``) keeps training throughout; adapter parameters inside blocks
are not frozen with them. The trained weights are in the loop's checkpoints (``param.<name>``) and, at the end of a
run with an ``output_dir``, in ``trainable_params.safetensors`` beside the adapter (``lorakit eval`` / ``generate`` /
``merge`` load them with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ...core.config import check_positive_ints, field_error
from ...core.errors import ConfigError
from ...core.model import adapter_layers
from ...data import stable_seed
from .base import Procedure, ProcedureConfig, float_base_params, register_procedure, save_trained_base


@dataclass
class LisaConfig(ProcedureConfig):
    """``lisa_activated_layers`` γ blocks train at a time, redrawn every ``lisa_interval_steps`` K steps;
    ``layers_attribute``: dotted path of the blocks' ModuleList ("" = the longest one); ``train_adapter``: keep
    training the run's adapter as well."""

    lisa_activated_layers: int = 2
    lisa_interval_steps: int = 20
    layers_attribute: str = ""
    train_adapter: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "lisa_activated_layers", "lisa_interval_steps")

    def check_steps(self, steps: int) -> None:
        # the first redraw comes after step lisa_interval_steps (Lisa.on_step), so it trains a step only if it is
        # before the last one
        if self.lisa_interval_steps >= steps:
            raise field_error(self, "lisa_interval_steps", f"={self.lisa_interval_steps} with steps={steps}: the "
                              "first redraw of the trained blocks would come after the run's last step, so the "
                              f"{self.lisa_activated_layers} blocks drawn at the start would be the only ones trained; "
                              "lower lisa_interval_steps below steps, or train more steps.")


class Lisa(Procedure):
    config: LisaConfig
    quantized_base_ok = False

    def __init__(self, config: LisaConfig, train_config) -> None:
        super().__init__(config, train_config)
        self.blocks: list[list[nn.Parameter]] = []
        self.active: list[int] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.trained_base: list[nn.Parameter] = []  # every base parameter it may train (saved by finish)

    def _find_blocks(self, model: nn.Module) -> nn.ModuleList:
        if self.config.layers_attribute:
            try:
                blocks = model.get_submodule(self.config.layers_attribute)
            except AttributeError:
                blocks = None
            if not isinstance(blocks, nn.ModuleList):
                raise ConfigError(f"LisaConfig.layers_attribute={self.config.layers_attribute!r} is not an "
                                  f"nn.ModuleList of {type(model).__name__}.")
            return blocks
        lists = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and ".adapters" not in n]
        if not lists:
            raise ConfigError(f"LISA found no nn.ModuleList of blocks in {type(model).__name__}; set layers_attribute.")
        return max(lists, key=len)

    def param_groups(self, model: nn.Module, adapter_name: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        adapter_ids = {id(p) for _, layer in adapter_layers(model) for p in layer.adapters.parameters()}
        blocks = self._find_blocks(model)
        if self.config.lisa_activated_layers > len(blocks):
            raise ConfigError(f"LisaConfig.lisa_activated_layers={self.config.lisa_activated_layers} exceeds the "
                              f"model's {len(blocks)} blocks.")
        self.blocks = [[p for p in block.parameters() if id(p) not in adapter_ids] for block in blocks]
        if not self.config.train_adapter:
            for g in groups:
                for p in g["params"]:
                    p.requires_grad_(False)
            groups = []
        taken = {id(p) for g in groups for p in g["params"]}
        in_blocks = {id(p) for block in self.blocks for p in block}
        always = [p for p in model.parameters() if id(p) not in adapter_ids and id(p) not in taken | in_blocks]
        body = float_base_params(model, [p for block in self.blocks for p in block], "LISA")
        for p in float_base_params(model, always, "LISA"):
            p.requires_grad_(True)
        self.trained_base = always + body
        extra = {"lr": self.train_config.lr, "weight_decay": self.train_config.weight_decay}
        self._activate(0)
        return [g for g in groups if g["params"]] + [{"params": always, **extra}, {"params": body, **extra}]

    def make_optimizer(self, groups: list[dict[str, Any]], train_config) -> torch.optim.Optimizer:
        self.optimizer = super().make_optimizer(groups, train_config)
        return self.optimizer

    def _activate(self, interval: int) -> None:
        """Freeze every block (dropping its Adam moments), then unfreeze interval ``interval``'s draw."""
        for block in self.blocks:
            for p in block:
                p.requires_grad_(False)
                p.grad = None
                if self.optimizer is not None:
                    self.optimizer.state.pop(p, None)
        generator = torch.Generator().manual_seed(stable_seed("lorakit-lisa", self.train_config.seed, interval))
        self.active = sorted(torch.randperm(len(self.blocks), generator=generator)[: self.config.lisa_activated_layers]
                             .tolist())
        for index in self.active:
            for p in self.blocks[index]:
                p.requires_grad_(True)

    def on_step(self, model: nn.Module, adapter_name: str, step: int, total_steps: int) -> bool:
        """Redraw the active blocks every ``lisa_interval_steps``; True then (what trains changed)."""
        if step % self.config.lisa_interval_steps == 0:
            self._activate(step // self.config.lisa_interval_steps)
            return True
        return False

    def finish(self, model: nn.Module, adapter_name: str) -> None:
        save_trained_base(model, self.trained_base, self.train_config)  # blocks, embeddings, head: trained in full

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"active": torch.tensor(self.active, dtype=torch.int64)}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        # Moments of the checkpoint's active blocks were restored by the loop; only requires_grad follows here.
        self.active = tensors["active"].tolist()
        for index, block in enumerate(self.blocks):
            for p in block:
                p.requires_grad_(index in self.active)


register_procedure(
    "lisa", Lisa, config=LisaConfig,
    description="LISA: full-parameter AdamW on lisa_activated_layers random decoder blocks, redrawn every "
                "lisa_interval_steps steps; embeddings and head always train.",
    paper="Pan et al. 2024 (NeurIPS), arXiv:2403.17919",
)
