"""lorakit: low-rank adaptation of any PyTorch / transformers model, PEFT-compatible on disk."""

__version__ = "0.1.0"

from .core.config import AdapterConfig  # noqa: E402
from .core.inits import init_adapter, list_inits, register_init, restore_base  # noqa: E402
from .core.errors import (AdapterError, AdapterLoadError, ConfigError, LorakitError, TargetError,  # noqa: E402
                          UnknownMethodError)
from .core.model import (active_adapters, adapter_names, add_adapter, delete_adapter, disable_adapters,  # noqa: E402
                         merge_adapter, merge_and_unload, print_trainable_parameters, refresh_trainable,
                         set_adapter, trainable_parameters, unload, unmerge_adapter)
from .core.registry import get_method, list_methods, register_method  # noqa: E402
from .core.routing import current_routing, routing  # noqa: E402
from .io.peft_format import adapter_state_dict, load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .methods.lora import LoraConfig  # noqa: E402
from . import init as _builtin_inits  # noqa: E402,F401  (registers the built-in inits)

__all__ = [
    "__version__", "AdapterConfig", "LoraConfig", "AdapterError", "AdapterLoadError", "ConfigError", "LorakitError",
    "TargetError", "UnknownMethodError", "active_adapters", "adapter_names", "add_adapter", "delete_adapter",
    "disable_adapters", "merge_adapter", "merge_and_unload", "print_trainable_parameters", "refresh_trainable", "set_adapter",
    "trainable_parameters", "unload", "unmerge_adapter", "get_method", "list_methods", "register_method",
    "current_routing", "routing", "init_adapter", "list_inits", "register_init", "restore_base", "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter",
]
