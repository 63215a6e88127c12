"""LoRA / DoRA on nn.Conv1d, nn.Conv2d, nn.Conv3d (lorakit.methods.lora_conv) against the real ``peft``.

Reference: PEFT 0.21.2 ``peft/tuners/lora/layer.py`` ``_ConvNd`` (lora_A / lora_B built at lines 1619-1628,
``get_delta_weight`` at 1755-1797, grouped merge refused at 1682-1684, rank % groups at 1565) and
``peft/tuners/lora/dora.py`` ``_DoraConvNdLayer`` (205-265). The outputs compared are PEFT's, not lorakit's own.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import lorakit as lk
from lorakit.core.model import adapter_layers

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ConvNet(nn.Module):
    """Two convolutions of one dimensionality (a 3-wide strided kernel, then a 1-wide one) and a ReLU."""

    def __init__(self, dims: int, groups: int = 1, seed: int = 0, **kwargs):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_a = CONVS[dims](4, 6, 3, **{"stride": 2, "padding": 1, "groups": groups, **kwargs})
        self.conv_b = CONVS[dims](6, 4, 1)

    def forward(self, x):
        return self.conv_b(torch.relu(self.conv_a(x)))


def _x(dims, batch=3):
    g = torch.Generator().manual_seed(7)
    return torch.randn(batch, 4, *(6,) * dims, generator=g)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_conv_nd_matches_peft_both_ways(dims, variant, tmp_path):
    x = _x(dims)
    config = dict(target_modules=["conv_a", "conv_b"], r=4, lora_alpha=8, init_lora_weights=False, **variant)
    peft_model = get_peft_model(ConvNet(dims), PeftLoraConfig(**config)).eval()
    _randomise(peft_model, 0)
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_layer = peft_model.base_model.model.conv_a

    model = lk.load_adapter(ConvNet(dims), tmp_path / "peft")
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # ΔW equals PEFT's get_delta_weight (a convolution of Aᵀ with B for k > 1, layer.py:1786-1791)
    delta = model.conv_a.adapters["default"].delta_weight()
    torch.testing.assert_close(delta.reshape(peft_layer.base_layer.weight.shape),
                               peft_layer.get_delta_weight("default"), atol=1e-5, rtol=1e-5)
    lk.save_adapter(model, tmp_path / "lk")
    back = PeftModel.from_pretrained(ConvNet(dims), tmp_path / "lk").eval()
    torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-5)

    lk.merge_adapter(model)
    assert model.conv_a.merged == ["default"]
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
    lk.unmerge_adapter(model)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_grouped_conv_matches_peft_and_refuses_to_merge(tmp_path):
    x = _x(2)
    peft_model = get_peft_model(ConvNet(2, groups=2), PeftLoraConfig(target_modules=["conv_a"], r=4,
                                                                     init_lora_weights=False)).eval()
    _randomise(peft_model, 1)
    peft_model.save_pretrained(tmp_path)
    model = lk.load_adapter(ConvNet(2, groups=2), tmp_path)
    delta = model.conv_a.adapters["default"]
    assert delta.lora_A.weight.shape == (4, 4, 3, 3) and delta.lora_B.weight.shape == (6, 2, 1, 1)  # B grouped
    torch.testing.assert_close(model(x), peft_model(x), atol=1e-6, rtol=0)
    with pytest.raises(lk.AdapterError, match="groups=2.*cannot be merged"):
        lk.merge_adapter(model)
    with pytest.raises(lk.ConfigError, match=r"'conv_a'.*r=3 is not divisible by groups=2"):
        lk.add_adapter(ConvNet(2, groups=2), lk.LoraConfig(target_modules=["conv_a"], r=3))
    with pytest.raises(lk.ConfigError, match="DoRA on a convolution with groups=2"):
        lk.add_adapter(ConvNet(2, groups=2), lk.LoraConfig(target_modules=["conv_a"], r=4, use_dora=True))


@pytest.mark.parametrize("kwargs", [{"dilation": 2, "padding": 2}, {"padding_mode": "circular"},
                                    {"padding": "same", "stride": 1, "padding_mode": "reflect"}],
                         ids=["dilated", "circular", "same-reflect"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_dilation_and_padding_modes_merge_exactly(kwargs, use_dora):
    """lora_A takes the base's dilation and padding mode (PEFT's does not, layer.py:1625), so the merged
    convolution is the unmerged one: W' ⋆ x = W ⋆ x + s·B ⋆ (A ⋆ x)."""
    x = _x(2)
    model = lk.add_adapter(ConvNet(2, **kwargs), lk.LoraConfig(
        target_modules=["conv_a"], r=4, init_lora_weights=False, use_dora=use_dora))
    model.train()  # DoRA's training branch recomputes W ⋆ x itself (with the padding mode): same as eval here
    train_out = model(x)
    model.eval()
    unmerged = model(x)
    torch.testing.assert_close(train_out, unmerged, atol=1e-5, rtol=0)
    lk.merge_adapter(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)


def test_dora_conv_magnitude_has_peft_shape_and_init():
    """m = ‖W + s·BA‖ per output channel, kept as (1, out, 1, 1) (PEFT dora.py:207-213)."""
    model = lk.add_adapter(ConvNet(2), lk.LoraConfig(target_modules=["conv_a"], r=4, use_dora=True))
    m = model.conv_a.adapters["default"].lora_magnitude_vector
    assert m.shape == (1, 6, 1, 1)
    w = model.conv_a.base_layer.weight
    torch.testing.assert_close(m.reshape(-1), w.flatten(1).norm(dim=1))  # B = 0 at init: ‖W‖ per channel


def test_lora_dropout_on_conv_as_peft():
    """Dropout on the adapter's input only (PEFT: lora_B(lora_A(dropout(x))) * scaling, layer.py:1823)."""
    model = lk.add_adapter(ConvNet(2), lk.LoraConfig(target_modules=["conv_a"], r=4, lora_dropout=0.5,
                                                     init_lora_weights=False))
    delta = model.conv_a.adapters["default"]
    x = _x(2)
    model.train()
    torch.manual_seed(3)
    got = model.conv_a(x) - model.conv_a.base_layer(x)
    torch.manual_seed(3)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(got, delta.lora_B(delta.lora_A(mask_x)) * delta.scaling, atol=1e-6, rtol=0)


def test_registered_inits_are_refused_on_convolutions():
    with pytest.raises(lk.ConfigError, match=r"module 'conv_a' \(Conv2d.*init_lora_weights='pissa'.*linear"):
        lk.add_adapter(ConvNet(2), lk.LoraConfig(target_modules=["conv_a"], init_lora_weights="pissa"))


def test_gaussian_init_and_zero_start():
    model = ConvNet(2)
    x = _x(2)
    ref = model(x)
    lk.add_adapter(model, lk.LoraConfig(target_modules=["conv_a", "conv_b"], r=4, init_lora_weights="gaussian"))
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)  # B = 0
    A = model.conv_a.adapters["default"].lora_A.weight
    assert abs(A.std().item() - 1 / 4) < 0.05  # N(0, 1/r) as PEFT's "gaussian" (layer.py:339-340)
    assert all(layer.info.kind == "conv" for _, layer in adapter_layers(model))
