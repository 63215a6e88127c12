"""Training procedures: one module per procedure, each registering itself on import (see ``base.py``).

Where a new procedure goes: a new file here (e.g. ``galore.py``, ``lisa.py``) with a ``ProcedureConfig``
subclass, a ``Procedure`` subclass and one ``register_procedure`` call, opening with the paper title, arXiv id
and the update it implements. It is then ``TrainConfig(procedure=NAME, procedure_args={...})`` and
``lorakit train --procedure NAME`` with one flag per config field.
"""

import importlib
import pkgutil

from .base import (Procedure, ProcedureConfig, ProcedureInfo, get_procedure, list_procedures,  # noqa: F401
                   register_procedure)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Procedure", "ProcedureConfig", "ProcedureInfo", "get_procedure", "list_procedures", "register_procedure"]
