"""`lorakit merge` on models whose adapter targets convolutions: a diffusers UNet2DModel (nn.Conv2d) and a
transformers Whisper (nn.Conv1d) folder, neither a causal LM nor with a tokenizer; the written model is the plain
model class with the adapter folded in, and gives the adapted model's outputs."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lk_models import tiny_unet, tiny_whisper, unet_inputs, whisper_inputs


def _adapted(factory, targets, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    factory().save_pretrained(base_dir)
    model = lk.add_adapter(factory(), lk.LoraConfig(target_modules=targets, r=4, init_lora_weights=False,
                                                    use_dora=True))
    lk.save_adapter(model, adapter_dir)
    return model, base_dir, adapter_dir


@pytest.mark.parametrize("case", ["unet", "whisper"])
def test_merge_cli_writes_a_full_model_with_conv_targets(case, tmp_path, capsys):
    if case == "unet":
        from diffusers import UNet2DModel as cls

        factory, targets, run = tiny_unet, ["conv_in", "conv1", "conv2", "conv_shortcut"], \
            lambda m: m(**unet_inputs()).sample
    else:
        from transformers import WhisperForConditionalGeneration as cls

        ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
        factory, targets, run = tiny_whisper, ["conv1", "conv2"], lambda m: m(**whisper_inputs(ids)).encoder_last_hidden_state
    model, base_dir, adapter_dir = _adapted(factory, targets, tmp_path)
    with torch.no_grad():
        expected = run(model)
        base = run(factory())
    assert (expected - base).abs().max() > 1e-3
    assert main(["merge", "--model", str(base_dir), "--adapter", str(adapter_dir), "--output", str(tmp_path / "m")]) == 0
    assert "merged model written" in capsys.readouterr().out
    merged = cls.from_pretrained(tmp_path / "m").eval()
    assert not any("lora_" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(run(merged), expected, atol=1e-5, rtol=0)
