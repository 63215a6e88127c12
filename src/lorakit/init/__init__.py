"""Built-in adapter initialisations (the init registry's entries): one module per init family, each calling
``lorakit.core.inits.register_init`` once at import.

Where a new init goes: a new file here, e.g. ``lora_ga.py`` (gradient-based: LoRA-GA, LoRA-SB), ``eva.py``
(activation SVD), opening with the paper title, arXiv id and formula. An init gets ``(model, adapter_name,
batches, spec, **options)``, sets the adapter's tensors in place and returns the base edits it made
(``core.inits.BaseEdit``), which ``restore_base`` and ``save_adapter(..., original_base=True)`` use.
``weight_split.py`` holds the inits that split the base weight (PiSSA, OLoRA) and the helper they share.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
