"""lorakit: low-rank adaptation of any PyTorch / transformers model, PEFT-compatible on disk.

Importing the package registers the built-in methods (``lorakit.methods``), inits (``lorakit.init``) and
training procedures (``lorakit.training.procedures``, on first use of ``lorakit.training``); no benchmark code
is loaded. The public API is below; ``docs/architecture.md`` maps the packages.
"""

from ._version import __version__
from .core.config import AdapterConfig
from .core.errors import (AdapterConflictError, AdapterError, AdapterLoadError, ConfigError, LorakitError, TargetError,
                          UnknownAdapterError, UnknownMethodError)
from .core.inits import init_adapter, list_inits, register_init, restore_base
from .core.model import (active_adapters, adapter_names, add_adapter, delete_adapter, disable_adapters, merge_adapter,
                         merge_and_unload, print_trainable_parameters, refresh_trainable, set_adapter,
                         trainable_parameters, unload, unmerge_adapter)
from .core.registry import get_method, list_methods, register_method
from .core.routing import current_routing, routing
from .io.peft_format import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from . import methods as _builtin_methods  # noqa: F401,I001  (registers the built-in methods, once)
from . import init as _builtin_inits  # noqa: F401  (registers the built-in inits, once)
from . import quantize as _quantize  # noqa: F401  (registers the 4-bit dequantizer; bitsandbytes stays unimported)
from .model_types import register_model_types as _register_model_types
from .methods.lora import LoraConfig
from .compose import merge_adapters, merge_adapters_to

_register_model_types()  # "lorakit-mixln" for AutoConfig / AutoModelForCausalLM (the Llama modules load on first use)

__all__ = [
    "__version__", "AdapterConfig", "LoraConfig", "AdapterError", "AdapterLoadError", "ConfigError", "LorakitError",
    "TargetError", "UnknownMethodError", "UnknownAdapterError", "AdapterConflictError", "active_adapters",
    "adapter_names", "add_adapter", "delete_adapter",
    "disable_adapters", "merge_adapter", "merge_and_unload", "print_trainable_parameters", "refresh_trainable",
    "set_adapter", "trainable_parameters", "unload", "unmerge_adapter", "get_method", "list_methods",
    "register_method", "current_routing", "routing", "init_adapter", "list_inits", "register_init", "restore_base",
    "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter",
    "merge_adapters", "merge_adapters_to",
]
