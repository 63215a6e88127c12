"""Multi-LoRA composition for image generation on a small latent-free diffusion model (optional extra ``diffusion``).

- :mod:`.data`: scikit-learn's bundled 8×8 digits, upscaled, and styles (thick, inverted, thin).
- :mod:`.model`: a class-conditioned ``diffusers.UNet2DModel``, its training, concept LoRAs trained on it.
- :mod:`.sampler`: the sampling loop and registry of training-free composition methods; :mod:`.methods` holds
  merge, switch, composite (Zhong et al., arXiv:2402.16843), cmlora (arXiv:2502.04923) and composer
  (LoRA-Composer-style regions, arXiv:2403.11627).
- :mod:`.classifier`: the concept classifier used as the metric (the role CLIP plays in the papers).

``docs/diffusion.md`` walks through it; ``lorakit diffusion --help`` and ``lorakit compose-image --help`` are the CLI.
"""

from .data import STYLES, apply_styles, load_digit_images
from .model import (LORA_TARGETS, NULL_CLASS, ConceptSpec, LoraSpec, TrainSpec, UNetSpec, build_scheduler, build_unet,
                    default_concepts, load_base, load_loras, sampling_scheduler, train_base, train_concept_loras)
from .sampler import CompositionConfig, compose_images, get_composition, list_compositions, make_config

__all__ = [
    "STYLES", "apply_styles", "load_digit_images", "LORA_TARGETS", "NULL_CLASS", "ConceptSpec", "LoraSpec",
    "TrainSpec", "UNetSpec", "build_scheduler", "build_unet", "default_concepts", "load_base", "load_loras",
    "sampling_scheduler", "train_base", "train_concept_loras", "CompositionConfig", "compose_images",
    "get_composition", "list_compositions", "make_config",
]
