from .files import atomic_write_bytes, atomic_write_json, load_tensors, read_json, save_tensors
from .peft_format import (CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapter, read_adapter_config,
                          save_adapter)

__all__ = ["atomic_write_bytes", "atomic_write_json", "load_tensors", "read_json", "save_tensors", "CONFIG_NAME",
           "WEIGHTS_NAME", "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter"]
