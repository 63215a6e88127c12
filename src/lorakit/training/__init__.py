"""Training: one plain loop (``train``), its config and result, and HF Trainer compatibility."""

from typing import Any

from .concurrent import Job, JobResult, train_concurrent
from .config import SCHEDULES, TrainConfig
from .loop import DataStream, TrainResult, lr_multiplier, make_optimizer, train
from .procedures import Procedure, ProcedureConfig, get_procedure, list_procedures, register_procedure

__all__ = ["SCHEDULES", "DataStream", "Job", "JobResult", "LorakitCallback", "Procedure", "ProcedureConfig",
           "TrainConfig", "TrainResult", "get_procedure", "list_procedures", "lr_multiplier", "make_optimizer",
           "register_procedure", "train", "train_concurrent"]


def __getattr__(name: str) -> Any:
    # transformers' Trainer modules take seconds to import; only Trainer users should pay for them.
    if name == "LorakitCallback":
        from .trainer_compat import LorakitCallback
        return LorakitCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
