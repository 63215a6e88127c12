"""merge_adapters on convolution LoRAs (a diffusers UNet2DModel's nn.Conv2d), checked against the real ``peft``.

Reference: the source adapters loaded and active together in PEFT (``base_model.set_adapter([...])``: PEFT's
``_ConvNd.forward`` adds every active adapter's ``lora_B(lora_A(x)) * scaling``, peft/tuners/lora/layer.py:1810-1830),
the layer-wise sum that ``cat`` reproduces exactly; a single DoRA source must come back unchanged.
"""

from __future__ import annotations

import pytest
import torch
from compose.helpers import make_adapter, peft_all_active
from lk_models import tiny_unet, unet_inputs
from peft import PeftModel
from torch import nn

import lorakit as lk
from lorakit.compose import merge_adapters
from lorakit.core.errors import ConfigError

TARGETS = ["conv_in", "conv1", "conv2", "conv_shortcut", "conv_out"]


def _peft_sample(paths):
    model = peft_all_active(tiny_unet, paths)
    with torch.no_grad():
        return model(**unet_inputs()).sample


def _lorakit_sample(path):
    model = lk.load_adapter(tiny_unet(), path)
    with torch.no_grad():
        return model(**unet_inputs()).sample


def test_cat_of_conv_adapters_equals_peft_with_both_active(tmp_path):
    paths = [make_adapter(tiny_unet, tmp_path / "a", 0, r=4, lora_alpha=8, target_modules=TARGETS),
             make_adapter(tiny_unet, tmp_path / "b", 1, r=2, lora_alpha=4, use_rslora=True,
                          target_modules=TARGETS[1:3])]
    merged = merge_adapters(paths, None, "cat", model=tiny_unet()).save(tmp_path / "m")
    torch.testing.assert_close(_lorakit_sample(merged), _peft_sample(paths), atol=1e-5, rtol=0)
    peft_merged = PeftModel.from_pretrained(tiny_unet(), str(merged)).eval()  # the file loads in PEFT too
    with torch.no_grad():
        torch.testing.assert_close(peft_merged(**unet_inputs()).sample, _peft_sample(paths), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["della", "dare_ties"])
def test_sparsifying_merges_of_a_one_channel_conv_load_in_peft(method, tmp_path):
    """conv_in of a 1-channel UNet stores (out, 1, 3, 3): DELLA ranks along the stored dim 1 (mergekit
    della_magprune), which has one entry, so there is nothing to rank — each entry is kept with probability
    density (mergekit's 0/0 there is NaN). The merged file must be finite and load in PEFT as in lorakit."""
    from lorakit.compose.methods import della_probs

    probs = della_probs(torch.randn(2, 8, 1, 3, 3), 0.5, 0.2)
    assert torch.equal(probs, torch.full_like(probs, 0.5))
    paths = [make_adapter(tiny_unet, tmp_path / n, i, r=2, lora_alpha=4, target_modules=["conv_in", "conv1"])
             for i, n in enumerate("ab")]
    merged = merge_adapters(paths, [0.5, 0.5], method, model=tiny_unet(), density=0.5, seed=1).save(tmp_path / "m")
    peft_merged = PeftModel.from_pretrained(tiny_unet(), str(merged)).eval()
    with torch.no_grad():
        expected = peft_merged(**unet_inputs()).sample
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(_lorakit_sample(merged), expected, atol=1e-5, rtol=0)


def test_single_dora_conv_source_round_trips(tmp_path):
    path = make_adapter(tiny_unet, tmp_path / "d", 2, r=3, lora_alpha=3, use_dora=True, target_modules=TARGETS)
    merged = merge_adapters([path], [1.0], "linear", model=tiny_unet()).save(tmp_path / "m")
    torch.testing.assert_close(_lorakit_sample(merged), _peft_sample([path]), atol=1e-5, rtol=0)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x):
        return self.conv(x)


def test_grouped_conv_sources_are_refused_by_name(tmp_path):
    model = lk.add_adapter(Grouped(), lk.LoraConfig(target_modules=["conv"], r=2))
    with pytest.raises(ConfigError, match="module 'conv' is a convolution with groups=2"):
        merge_adapters(["default"], [1.0], "linear", model=model)
