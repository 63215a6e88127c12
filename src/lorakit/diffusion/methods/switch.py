"""LoRA Switch: one LoRA active per denoising step, the active one changing every ``switch_step`` steps in turn.

"Multi-LoRA Composition for Image Generation" (Zhong et al., arXiv:2402.16843, §3.1). Schedule as the official
``callbacks.py`` (l.4-12): the callback runs at the end of step ``i`` and moves to the next LoRA when ``i > 0`` and
``i % switch_step == 0``, so LoRA 0 is active for steps 0..switch_step (one step more than the others) and at step
``j ≥ 1`` the active LoRA is ``⌊(j − 1) / switch_step⌋ mod K`` (:func:`switch_schedule`). Default
``switch_step = 5`` (``compose_lora.py`` l.122).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...core.errors import FIELD, ConfigError
from ..sampler import CompositionConfig, Run, register_composition


def switch_schedule(num_steps: int, num_loras: int, switch_step: int) -> list[int]:
    """Index of the active LoRA at each step 0..num_steps-1 (the official callback's order)."""
    return [0 if j == 0 else ((j - 1) // switch_step) % num_loras for j in range(num_steps)]


@dataclass
class SwitchConfig(CompositionConfig):
    switch_step: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.switch_step <= 0:
            raise ConfigError(f"{FIELD} must be a positive number of steps, got {self.switch_step}", field="switch_step")


@register_composition("switch", SwitchConfig, "one LoRA per step, switching every switch_step steps")
class LoraSwitch:
    def __init__(self, config: SwitchConfig):
        self.config = config

    def start(self, run: Run) -> None:
        run.state["schedule"] = switch_schedule(run.num_steps, len(run.loras), self.config.switch_step)

    def noise(self, run: Run, step: int, t, x):
        return run.predict(x, t, [run.loras[run.state["schedule"][step]]])[0]
