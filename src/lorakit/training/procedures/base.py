"""The procedure registry: what a training run does around the plain loop, chosen by name.

A procedure is a config dataclass (its fields become ``lorakit train --procedure NAME`` flags and
``TrainConfig.procedure_args``) and a :class:`Procedure` subclass, registered once with
:func:`register_procedure`. Per run the loop builds one instance and asks it, in this order:

1. ``param_groups(model, adapter_name, groups)``: refine the optimizer's parameter groups (each a dict with
   ``params``, ``lr``, ``weight_decay``; they start as the method's ``param_groups`` or all trainable
   parameters), e.g. LoRA+'s separate learning rate for B;
2. ``make_optimizer(groups, train_config)``: the optimizer (default AdamW; GaLore's projected Adam, SoRA's
   proximal step would override it). The loop's schedule scales every group's ``initial_lr``;
3. every step: ``extra_loss(model, adapter_name)`` (added to the task loss, per micro-batch),
   ``on_gradients(model, adapter_name, step)`` after backward and before clipping (gradient scaling,
   projection, perturbation), ``on_step(model, adapter_name, step, total_steps)`` after the optimizer step
   (schedules, freezing: it returns True when it changed which parameters train and False when not; the loop
   re-reads them, ``Delta.frozen_names`` and ``requires_grad``, after True or None). The step's scheduled lr is in
   every optimizer group before the step's first forward, so updates made inside gradient hooks (GaLore's
   per-layer mode) use it;
4. ``finish(model, adapter_name)`` once when the run's last step is done: remove hooks it registered;
5. ``state_dict()`` / ``load_state_dict(tensors)``: tensors saved in checkpoints (``procedure.<key>``), so resume
   stays exact. The optimizer's own state is saved by the loop whatever the optimizer.

Before any of this, its config may check the run's settings: ``ProcedureConfig.check_run(train_config)``, called
when the ``TrainConfig`` is built (LoRAPrune: protected blocks with a pruned model to write); the adapter's config
is checked by ``Procedure.check_adapter_config`` (``lorakit train`` calls it before any model loads).

A procedure that needs held-out data (Flexora's validation split) returns a count from
``validation_split(n_train)``: before anything else the loop holds out that many examples from the end of the
training data (they are not trained on) and calls ``set_validation(batch_of, n)``, where ``batch_of(indices)``
collates held-out examples ``indices`` (0 ≤ i < n) into a batch on the run's device.

``fsdp_compatible`` (class attribute, default True): False for a procedure that reads or edits frozen base weights
outside the forward (LoRAPrune), so that ``distributed="fsdp"`` under a launcher is refused before the model loads.

``shares_batch`` (class attribute, default False) declares that the procedure touches only its own adapter's
parameters, gradients and per-delta forwards (hooks on its adapter's deltas see only its rows), so
``train_concurrent`` may train its job beside other jobs in one batch; a procedure that hooks the whole model,
its logits or base weights (BA-LoRA, Flexora, LISA, LongLoRA, LoRAPrune, GaLore's optimizer over other
parameters) keeps the default and its job trains alone.

A procedure composes with any method: the method's hooks run first, then the procedure's. Procedures that
train base weights (LISA, LongLoRA's embeddings and norms) make them trainable in ``param_groups`` (set
``requires_grad`` and add the parameters); the checkpoint then stores them beside the adapter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ...core.config import check_field_types
from ...core.errors import ConfigError, did_you_mean
from ...io.peft_format import TRAINABLE_PARAMS_FILE

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass
class ProcedureConfig:
    """Base of procedure configs: typed fields, checked on construction (ConfigError names field and value)."""

    # The label of this config's option group in ``lorakit train --help`` (set at registration).
    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_field_types(self)

    def check_run(self, train_config: "TrainConfig") -> None:
        """Checks against the run's settings, made when the ``TrainConfig`` is built (so before any model is
        loaded or step trained): ConfigError naming the field. Default: none."""

    def check_steps(self, steps: int) -> None:
        """Check the procedure's step schedules against a run of ``steps`` optimizer steps (through
        ``TrainConfig.check_steps``): ConfigError naming the field whose schedule would never act (``lorakit train``
        refuses it; the training loop warns). Default: no schedule."""


class Procedure:
    """A training procedure for one run. The base class is the plain loop: AdamW, no hooks, no state."""

    shares_batch: ClassVar[bool] = False  # True: safe beside other jobs in train_concurrent's batch (see above)
    # False: reads or writes frozen base weights as whole tensors between forwards (LoRAPrune's pruning), which a
    # base FSDP has sharded across processes does not allow; TrainConfig refuses distributed="fsdp" under a launcher.
    fsdp_compatible: ClassVar[bool] = True
    # False: trains base weights in full (GaLore's target matrices, LISA's blocks), which a 4-bit base (``lorakit
    # train --quantize``) holds as packed integers that take no gradient; the command refuses the pair before any
    # model loads, and ``float_base_params`` says so in the Python API.
    quantized_base_ok: ClassVar[bool] = True

    def __init__(self, config: ProcedureConfig, train_config: "TrainConfig") -> None:
        self.config = config
        self.train_config = train_config

    @classmethod
    def check_adapter_config(cls, config: ProcedureConfig, adapter_config: Any, task_type: str = "causal-lm") -> None:
        """ConfigError when the procedure cannot run on adapters of ``adapter_config`` (an ``AdapterConfig``) or on
        the head ``task_type`` names ("causal-lm" or "seq-cls", ``hub.TASK_TYPES``), told from the configs alone:
        ``lorakit train`` calls it before any model loads. The per-layer checks in ``param_groups`` stay (they see
        what the config alone cannot, e.g. an embedding among the targets)."""

    def param_groups(self, model: nn.Module, adapter_name: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return groups

    def make_optimizer(self, groups: list[dict[str, Any]], train_config: "TrainConfig") -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=train_config.lr, weight_decay=train_config.weight_decay)

    def extra_loss(self, model: nn.Module, adapter_name: str) -> torch.Tensor | None:
        return None

    def on_gradients(self, model: nn.Module, adapter_name: str, step: int) -> None:
        return None

    def on_step(self, model: nn.Module, adapter_name: str, step: int, total_steps: int) -> bool | None:
        """After optimizer step ``step``. Return False when it changed nothing of which parameters train, True when
        it did (the loop then re-reads them: ``refresh_trainable``, DDP's rewrap); None counts as True."""
        return False

    def finish(self, model: nn.Module, adapter_name: str) -> None:
        return None

    def validation_split(self, n_train: int) -> int:
        return 0

    def set_validation(self, batch_of: Callable[[list[int]], dict[str, torch.Tensor]], n: int) -> None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        return None


# TRAINABLE_PARAMS_FILE (io.peft_format, where readers find it): the base tensors a procedure trained in full, written
# beside the run's adapter. ``longlora.load_trainable_params`` puts them into a fresh base; ``lorakit eval`` /
# ``generate`` / ``merge`` do so for an adapter whose run folder holds the file; a server refuses such an adapter.


def save_trained_base(model: nn.Module, params: list[nn.Parameter], train_config: "TrainConfig",
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``params`` (base parameters of ``model`` the run trained in full) to ``TRAINABLE_PARAMS_FILE`` in the
    run's ``output_dir`` (nothing without one; process 0 alone under a launcher). Without it the saved adapter alone scores differently than the run's
    own evaluation did: the trained base weights would be lost with the process."""
    from ...core.model import host_path
    from ...io.files import save_tensors

    from ..distributed import env_world

    if train_config.output_dir is None or not params or env_world()[0] != 0:  # one process writes
        return
    wanted = {id(p) for p in params}
    tensors = {host_path(n): p.detach() for n, p in model.named_parameters() if id(p) in wanted}
    out = Path(train_config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / TRAINABLE_PARAMS_FILE, tensors, metadata=metadata)


def float_base_params(model: nn.Module, params: list[nn.Parameter], procedure: str) -> list[nn.Parameter]:
    """``params`` (base parameters a procedure trains in full), or ConfigError naming the first that is not floating
    point: a quantized base's packed weight (bitsandbytes' uint8), which ``requires_grad_`` refuses with a bare
    RuntimeError."""
    wanted = {id(p) for p in params if not p.is_floating_point()}
    if wanted:
        name, p = next((n, p) for n, p in model.named_parameters() if id(p) in wanted)
        raise ConfigError(f"{procedure} trains base weights in full, and {name} is stored as {p.dtype} (a quantized "
                          "base), which cannot be trained; load the base in full precision (no --quantize).")
    return params


@dataclass(frozen=True)
class ProcedureInfo:
    """A registered procedure: its name, config class, implementation and one-line description."""

    name: str
    config_cls: type[ProcedureConfig]
    cls: type[Procedure]
    description: str
    paper: str = ""

    def config_from(self, args: Mapping[str, Any]) -> ProcedureConfig:
        """The procedure's config from ``TrainConfig.procedure_args`` (ConfigError for unknown fields, with near matches)."""
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        for key in args:
            if key not in known:
                raise ConfigError(f"procedure {self.name!r} has no option {key!r}.{did_you_mean(key, known)} "
                                  f"Its options: {', '.join(sorted(known)) or 'none'}.")
        return self.config_cls(**args)

    def check_adapter(self, procedure_args: Mapping[str, Any], adapter_config: Any,
                      task_type: str = "causal-lm") -> None:
        """``Procedure.check_adapter_config`` for this procedure with options ``procedure_args`` (ConfigError)."""
        self.cls.check_adapter_config(self.config_from(procedure_args), adapter_config, task_type)

    def build(self, train_config: "TrainConfig") -> Procedure:
        return self.cls(self.config_from(train_config.procedure_args), train_config)


_PROCEDURES: dict[str, ProcedureInfo] = {}


def register_procedure(name: str, cls: type[Procedure], *, config: type[ProcedureConfig], description: str,
                       paper: str = "") -> ProcedureInfo:
    """Register procedure ``name``. Call once, at import of its module in ``lorakit/training/procedures/``."""
    if name in _PROCEDURES and _PROCEDURES[name].cls is not cls:
        raise ValueError(f"procedure {name!r} is already registered by {_PROCEDURES[name].cls.__qualname__}")
    config.method = f"procedure {name}"
    info = ProcedureInfo(name=name, config_cls=config, cls=cls, description=description, paper=paper)
    _PROCEDURES[name] = info
    return info


def get_procedure(name: str) -> ProcedureInfo:
    """The registered procedure ``name``; ConfigError with near matches otherwise."""
    try:
        return _PROCEDURES[name]
    except KeyError:
        raise ConfigError(f"unknown training procedure {name!r}.{did_you_mean(name, _PROCEDURES)} Registered: "
                          f"{', '.join(sorted(_PROCEDURES)) or 'none'}.") from None


def list_procedures() -> list[ProcedureInfo]:
    return [_PROCEDURES[k] for k in sorted(_PROCEDURES)]
