"""TrainConfig: every knob of lorakit's training loop, typed and validated up front.

A bad value fails here, when the config is built, with a message that says what to change, rather than
minutes into a run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..core.config import (check_field_types, check_max_length, check_non_negative, check_positive, check_positive_ints,
                           check_range, field_error)
from ..core.errors import ConfigError, did_you_mean

SCHEDULES = ("constant", "linear", "cosine")
DISTRIBUTED_MODES = ("ddp", "fsdp")  # training.distributed.MODES


@dataclass
class TrainConfig:
    """How to train one adapter.

    Counts are in optimizer steps; one step sees ``batch_size * grad_accum`` examples.

    - ``warmup_steps`` or ``warmup_ratio`` (a fraction of ``steps``): linear warmup, then ``lr_schedule``.
    - ``max_grad_norm``: clip the global gradient norm to this (None: no clipping; the norm is still logged).
    - ``eval_every``: evaluate every N steps (0: only at the end); needs ``eval_examples`` passed to ``train``.
      ``eval_examples`` caps how many of those are used (the first N).
    - ``save_every``: write ``output_dir/checkpoint-<step>/`` every N steps (0: none). ``output_dir`` None
      writes nothing at all (no checkpoints, no final adapter).
    - ``resume_from``: a ``checkpoint-<step>`` folder to continue from, exactly where it stopped.
    - ``init_batches``: how many batches a method's data-driven ``init`` hook gets.
    - ``device``: None picks CUDA when available, else CPU.
    - ``procedure``: a registered training procedure (``lorakit.training.list_procedures()``, e.g. ``"loraplus"``)
      that chooses the optimizer, its parameter groups, per-step hooks and extra losses; None = AdamW over the
      trainable parameters (or the method's ``param_groups``). ``procedure_args``: its config fields.
    - ``distributed``: under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), how gradients are shared:
      ``"ddp"`` (DistributedDataParallel over the trainable parameters) or ``"fsdp"`` (FSDP2 shards the frozen
      base; the trainable parameters stay whole and are averaged). ``batch_size`` is per process. Ignored in a
      single process. See ``lorakit.training.distributed`` and docs/distributed.md.
    - ``gradient_checkpointing``: turn on the model's activation (gradient) checkpointing for the run (transformers'
      ``activation_checkpointing_enable``, non-reentrant; off again after it): less activation memory, one more
      forward per block in backward. A model that has it on already keeps it. Either way every checkpointed block
      recomputes under the routing its forward ran with (``core.checkpointing``), so routed methods (task keys,
      per-row adapters, X-LoRA, γ-MoD) get the gradients they get without it.
    """

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    eval_examples: int = 200
    save_every: int = 0
    seed: int = 0
    max_length: int = 256
    log_every: int = 10
    init_batches: int = 4
    output_dir: str | None = None
    resume_from: str | None = None
    device: str | None = None
    procedure: str | None = None
    procedure_args: dict[str, Any] = field(default_factory=dict)
    distributed: str = "ddp"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Paths arrive as pathlib.Path as often as str; keep str so the config is JSON as-is.
        for name in ("output_dir", "resume_from"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        check_field_types(self)
        check_positive_ints(self, "steps", "batch_size", "grad_accum", "max_length", "log_every", "eval_examples")
        check_max_length(self)
        check_non_negative(self, "warmup_steps", "eval_every", "save_every", "init_batches", note=" (0 turns it off)")
        check_non_negative(self, "seed")  # numpy's and Python's seeding refuse a negative seed (torch's takes one)
        check_positive(self, "lr", finite=True)  # an infinite step turns every weight to inf / NaN at step 1
        check_non_negative(self, "weight_decay", finite=True)
        if self.lr_schedule not in SCHEDULES:
            raise field_error(self, "lr_schedule", f"={self.lr_schedule!r} is not one of {SCHEDULES}."
                                                   f"{did_you_mean(self.lr_schedule, SCHEDULES)}")
        check_range(self, "warmup_ratio", 0, 1, high_open=True)
        if self.warmup_steps and self.warmup_ratio:
            raise field_error(self, "warmup_ratio", f"={self.warmup_ratio} and warmup_steps={self.warmup_steps} are "
                                                    "both set; set warmup_steps or warmup_ratio, not both.")
        if self.num_warmup_steps >= self.steps:
            name = "warmup_steps" if self.warmup_steps else "warmup_ratio"
            raise field_error(self, name, f": warmup ({self.num_warmup_steps} steps) must be shorter than training "
                                          f"(steps={self.steps}); lower warmup_steps/warmup_ratio or raise steps.")
        check_positive(self, "max_grad_norm", note=", or None for no clipping")
        if self.save_every and self.output_dir is None:
            raise field_error(self, "save_every", f"={self.save_every} needs an output_dir to write checkpoints "
                                                  "into.")
        if self.resume_from is not None and not os.path.isfile(os.path.join(self.resume_from, "trainer_state.json")):
            raise field_error(self, "resume_from", f"={self.resume_from!r} is not a lorakit checkpoint (no "
                              "trainer_state.json in it); point it at an output_dir/checkpoint-<step> folder.")
        if self.procedure is not None:
            from .procedures import get_procedure
            try:
                info = get_procedure(self.procedure)
            except ConfigError as e:
                raise field_error(self, "procedure", f": {e}") from None
            info.config_from(self.procedure_args).check_run(self)  # a bad field, or one this run cannot use, fails here
            if self.distributed == "fsdp" and not info.cls.fsdp_compatible:
                from .distributed import env_world

                if env_world()[1] > 1:
                    raise field_error(self, "distributed", f"='fsdp' shards the frozen base across the processes, and "
                                      f"procedure {self.procedure!r} reads and edits base weights whole between steps; "
                                      "use distributed='ddp' (lorakit train --distributed ddp, the default).")
        elif self.procedure_args:
            raise field_error(self, "procedure_args", f"={self.procedure_args!r} given without a procedure; set "
                                                      "procedure (see lorakit.training.list_procedures()).")
        if self.distributed not in DISTRIBUTED_MODES:
            raise field_error(self, "distributed", f"={self.distributed!r} is not one of {DISTRIBUTED_MODES}."
                                                   f"{did_you_mean(self.distributed, DISTRIBUTED_MODES)}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
            raise field_error(self, "device", f"={self.device!r} is not a device; use 'cpu', 'cuda', 'cuda:1', "
                                              "or None to pick CUDA when available.")

    def check_steps(self) -> None:
        """Check the run's schedules against its ``steps`` (the total, when resuming): ConfigError naming the field
        whose schedule would never act in this run — ``save_every`` > ``steps`` (no checkpoint is ever written),
        ``eval_every`` > ``steps`` (no evaluation before the end-of-run one that 0 gives too), and the procedure's own
        (``ProcedureConfig.check_steps``: LISA's redraw, GaLore's projection refresh). ``lorakit train`` calls it
        before any model loads and refuses; ``train`` / ``train_concurrent`` warn with its message (a short Python
        run may mean it), as they do for the adapter's ``AdapterConfig.check_steps``."""
        for name, never in (("save_every", "no checkpoint would ever be written"),
                            ("eval_every", "no evaluation would come before the one at the end of the run, which "
                                           "eval_every=0 gives as well")):
            every = getattr(self, name)
            if every > self.steps:
                raise field_error(self, name, f"={every} is more than steps={self.steps}: {never}; lower {name} "
                                              "or train more steps.")
        if self.procedure is not None:
            from .procedures import get_procedure

            get_procedure(self.procedure).config_from(self.procedure_args).check_steps(self.steps)

    @property
    def num_warmup_steps(self) -> int:
        return self.warmup_steps or int(self.warmup_ratio * self.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

