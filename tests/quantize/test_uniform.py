"""Round-to-nearest against the textbook affine quantization formula (Jacob et al., arXiv:1712.05877, eq. (1)
``r = S(q − Z)`` with the range widened to hold 0, §2.1), computed here independently in numpy."""

import numpy as np
import pytest
import torch

from lorakit.core.errors import ConfigError
from lorakit.quantize import QuantSpec, quantize_weights, rtn, rtn_codes

from lk_models import tiny_llama


def textbook(w: np.ndarray, bits: int) -> np.ndarray:
    """Per-row asymmetric min-max quantization: s = (max − min)/(2^b − 1), z = round(−min/s),
    q = clamp(round(w/s) + z, 0, 2^b − 1), ŵ = s(q − z); min ≤ 0 ≤ max."""
    lo = np.minimum(w.min(1, keepdims=True), 0.0)
    hi = np.maximum(w.max(1, keepdims=True), 0.0)
    s = (hi - lo) / (2 ** bits - 1)
    z = np.round(-lo / s)
    q = np.clip(np.round(w / s) + z, 0, 2 ** bits - 1)
    return s * (q - z)


def test_rtn_hand_example():
    # bits=2: min −1, max 2 → s = 3/3 = 1, z = 1; codes [0, 1, 2, 3]; ŵ = [−1, 0, 1, 2]
    w = torch.tensor([[-1.0, 0.2, 0.7, 2.0]])
    q, scale, zero = rtn_codes(w, QuantSpec(bits=2))
    assert q.flatten().tolist() == [0, 1, 2, 3]
    assert float(scale) == 1.0 and float(zero) == 1.0
    assert rtn(w, QuantSpec(bits=2)).flatten().tolist() == [-1.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_equals_textbook_per_channel(bits):
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(bits), dtype=torch.float64).float()
    np.testing.assert_allclose(rtn(w, QuantSpec(bits)).numpy(), textbook(w.double().numpy(), bits), rtol=0, atol=1e-6)


def test_rtn_groups_are_independent_rows():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    grouped = rtn(w, QuantSpec(bits=3, group_size=8)).numpy()
    expected = textbook(w.reshape(-1, 8).double().numpy(), 3).reshape(6, 32)
    np.testing.assert_allclose(grouped, expected, rtol=0, atol=1e-6)


def test_quant_spec_errors_name_the_fix():
    with pytest.raises(ConfigError, match="bits must be an integer from 2 to 8"):
        QuantSpec(bits=1)
    with pytest.raises(ConfigError, match="does not divide the 40 input columns of layer x"):
        rtn(torch.zeros(2, 40), QuantSpec(bits=4, group_size=16), "layer x")


def test_quantize_weights_rtn_rewrites_every_block_linear():
    model = tiny_llama()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    embed = model.model.embed_tokens.weight.clone()
    summary = quantize_weights(model, "rtn", bits=4)
    assert summary["layers"] == 2 * 7
    after = model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(after, rtn(before, QuantSpec(4)))
    assert len(torch.unique(after[0])) <= 16  # at most 2^4 levels per output channel
    assert torch.equal(model.model.embed_tokens.weight, embed)  # embeddings and head stay full precision


def test_quantize_weights_unknown_names():
    with pytest.raises(ConfigError, match="Did you mean: cbq"):
        quantize_weights(tiny_llama(), "cbqq")
    with pytest.raises(ConfigError, match="Did you mean: window"):
        quantize_weights(tiny_llama(), "cbq", torch.zeros(1, 4, dtype=torch.long), windw=3)


@pytest.mark.parametrize("method", ["rtn", "cbq"])
def test_a_4bit_model_is_refused_and_left_unchanged(method):
    """Was: RTN and CBQ took a bitsandbytes 4-bit layer (an nn.Linear subclass) for a weight and rewrote its packed
    NF4 codes in place: the model's outputs changed and the summary said 14 layers were quantized."""
    pytest.importorskip("bitsandbytes")
    from lorakit.core.errors import LorakitError
    from lorakit.quantize import quantize_model

    model = quantize_model(tiny_llama(), "nf4")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match="block 0 self_attn.q_proj is a Linear4bit .* quantized already"):
        quantize_weights(model, method, torch.randint(0, 96, (2, 8)), bits=4, **({"steps": 1} if method == "cbq" else {}))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_blocks_without_linear_layers_are_refused():
    """A model whose blocks hold no linear layer (here Llama's projections replaced by identities) was "quantized"
    with a summary of 0 layers."""
    from lorakit.core.errors import LorakitError

    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp = torch.nn.Identity()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, torch.nn.Identity())
    for method in ("rtn", "cbq"):
        with pytest.raises(LorakitError, match="blocks hold no nn.Linear or Conv1D layer"):
            quantize_weights(model, method, torch.randint(0, 96, (2, 8)), bits=4,
                             **({"steps": 1} if method == "cbq" else {}))
