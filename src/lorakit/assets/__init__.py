"""Files shipped with lorakit: the bundled pretrained base model."""

from pathlib import Path

BASE_MODEL_PATH = Path(__file__).parent / "base_model"
