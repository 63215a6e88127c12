"""Files shipped with lorakit: the bundled pretrained base models.

``base_model`` ("bundled", 5.4M parameters) is the default base; ``base_model_small`` ("bundled-small", 2.4M
parameters, a differently shaped Llama with the same tokenizer) is the second base that adapter transfer
(``lorakit transfer``, Trans-LoRA) moves adapters to. ``pretrain_info.json`` in each says how it was built.
"""

from pathlib import Path

BASE_MODEL_PATH = Path(__file__).parent / "base_model"
SMALL_BASE_MODEL_PATH = Path(__file__).parent / "base_model_small"
BUNDLED_MODELS = {"bundled": BASE_MODEL_PATH, "bundled-small": SMALL_BASE_MODEL_PATH}
