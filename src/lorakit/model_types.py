"""Model types lorakit adds to transformers' Auto classes, registered at ``import lorakit`` without the import cost.

``"lorakit-mixln"`` (Mix-LN, ``lorakit.pretrain.mixln``) needs transformers' Llama modules, whose import takes
seconds; ``import lorakit`` registers only a stand-in config class under that model type. The first time
transformers resolves it (``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained`` on a saved Mix-LN folder),
the stand-in imports the real module, which registers the real config and model classes in its place.
"""

from __future__ import annotations

from transformers import AutoConfig

from .core.targeting import DEFAULT_TARGETS

MIXLN_MODEL_TYPE = "lorakit-mixln"


class _ResolveOnUse(type):
    """Metaclass of the stand-in: any attribute or call goes to the real class, importing it first."""

    def __getattr__(cls, name):
        return getattr(cls._real(), name)

    def __call__(cls, *args, **kwargs):
        return cls._real()(*args, **kwargs)

    def _real(cls):
        from .pretrain.mixln import MixLNConfig  # registers the real classes (exist_ok) as it imports

        return MixLNConfig


class LazyMixLNConfig(metaclass=_ResolveOnUse):
    model_type = MIXLN_MODEL_TYPE


def register_model_types() -> None:
    # exist_ok: after the real classes registered, the stand-in still resolves to them
    AutoConfig.register(MIXLN_MODEL_TYPE, LazyMixLNConfig, exist_ok=True)
    DEFAULT_TARGETS.setdefault(MIXLN_MODEL_TYPE, list(DEFAULT_TARGETS["llama"]))
