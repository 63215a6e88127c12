"""mixtures.sources: the existing adapters MeteoRA, X-LoRA and the routed LoRAs stack as experts."""

from __future__ import annotations

import pytest

import lorakit as lk
from lk_models import tiny_llama
from lorakit.mixtures.sources import read_lora_source


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_source_relative_to_a_changed_base_is_refused(init, tmp_path):
    """A PiSSA / OLoRA file (PEFT's ``init_lora_weights="pissa"``) holds A, B for the residual base W − s·B₀A₀, but
    an expert adds its s·BA to the untouched base: stacked as it was, the expert was another adapter than the one
    trained. Refused, naming the export that writes it for the untouched base (which is then accepted)."""
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), init=init)
    lk.save_adapter(model, tmp_path / "a")
    with pytest.raises(lk.ConfigError, match=rf"init_lora_weights='{init}'.*lorakit export"):
        read_lora_source(tmp_path / "a")
    lk.save_adapter(model, tmp_path / "plain", original_base=True)
    assert read_lora_source(tmp_path / "plain").config.r == 4
