"""CBQ (arXiv:2312.07950): LoRA-Rounding's parametrization (§3.3, after AdaRound arXiv:2004.10568 eqs. 23-24),
coarse-to-fine outlier truncation (§3.4), the sliding windows (§3.2), and that the reconstruction lowers the
error and beats round-to-nearest on a real model."""

import copy
import math

import pytest
import torch

from lorakit.hub import load_model_and_tokenizer
from lorakit.quantize import (CBQConfig, LoraRounding, QuantSpec, cfp_threshold, perplexity, quantize_weights,
                              rectified_sigmoid, rtn, task_token_rows)
from lorakit.quantize.cbq import window_starts
from lorakit.core.errors import ConfigError


def test_rectified_sigmoid_is_adaround_eq_23():
    # h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1
    v = torch.tensor([-10.0, -1.0, 0.0, 1.0, 10.0])
    expected = [0.0, 1 / (1 + math.e) * 1.2 - 0.1, 0.5, 1 / (1 + math.exp(-1)) * 1.2 - 0.1, 1.0]
    torch.testing.assert_close(rectified_sigmoid(v), torch.tensor(expected))


def test_lora_rounding_parametrization():
    d, k, r = 12, 20, 3
    w = torch.randn(d, k, generator=torch.Generator().manual_seed(0))
    rd = LoraRounding(w, QuantSpec(bits=4), r)
    # V = V0 + A1 A2 with A1 ∈ R^{d×r}, A2 ∈ R^{r×k}: (d + k)·r learned rounding values, not d·k (§3.3)
    assert rd.lora_A1.shape == (d, r) and rd.lora_A2.shape == (r, k)
    assert sum(p.numel() for n, p in rd.named_parameters() if n.startswith("lora_")) == (d + k) * r
    # h(V0) is AdaRound's init, the fractional part of W/s: the soft weight before clamping is W itself
    s = rd.scale0.reshape(d, 1)
    torch.testing.assert_close(rectified_sigmoid(rd.v0), w / s - torch.floor(w / s), atol=1e-5, rtol=0)
    # A1 = 0 at init: hard rounding (V ≥ 0 rounds up) is round-to-nearest
    torch.testing.assert_close(rd.hard(), rtn(w, QuantSpec(bits=4)), atol=1e-6, rtol=0)
    # the rounding regulariser L_com = Σ 1 − |2h − 1|^β per entry: 1 at h = 1/2, 0 at h ∈ {0, 1}
    with torch.no_grad():
        rd.v0.zero_()
    assert float(rd.rounding_loss(beta=2.0).detach()) == pytest.approx(1.0)
    with torch.no_grad():
        rd.v0.copy_(torch.where(torch.rand(d, k) > 0.5, 10.0, -10.0))
    assert float(rd.rounding_loss(beta=2.0).detach()) == pytest.approx(0.0)
    # trained weights stay on the b-bit grid of their step size
    with torch.no_grad():
        rd.lora_A1.normal_()
    codes = rd.hard() / s + rd.zero.reshape(d, 1)
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.round().min() >= 0 and codes.round().max() <= 15


def test_lora_rounding_gradient_reaches_the_low_rank_factors():
    rd = LoraRounding(torch.randn(8, 16), QuantSpec(bits=3), r=2)
    (rd.straight_through() ** 2).sum().backward()
    assert rd.lora_A1.grad is not None and rd.lora_A1.grad.abs().sum() > 0
    assert rd.log_gain.grad is not None


def test_cfp_threshold_finds_planted_outliers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    w[0, :3] = torch.tensor([40.0, -45.0, 50.0])
    t = cfp_threshold(w)
    assert t is not None and float(w.abs().flatten().sort().values[-4]) <= t < 40.0
    # coarse stage: nothing above Q3 + 1.5·IQR of |w| → no outlier
    assert cfp_threshold(torch.full((4, 4), 0.5)) is None


def test_cfp_truncation_is_kept_only_where_it_lowers_the_quantization_error():
    """The guard of ``cfp_truncate`` (module doc): CFP's rule always cuts the top of a Gaussian tail; that lowers
    the RTN error at 2 bits (the range dominates) and raises it at 8 bits (clipping dominates)."""
    from lorakit.quantize import QuantSpec, rtn
    from lorakit.quantize.cbq import cfp_truncate

    g = torch.Generator().manual_seed(0)
    plain = torch.randn(64, 256, generator=g)
    t = cfp_threshold(plain)
    assert t is not None
    error = lambda w, bits: (plain - rtn(w, QuantSpec(bits))).pow(2).sum()  # noqa: E731
    out, cut = cfp_truncate(plain, QuantSpec(2))
    assert cut == int((plain.abs() > t).sum()) > 0 and error(out, 2) < error(plain, 2)
    assert error(plain.clamp(-t, t), 8) > error(plain, 8)
    out, cut = cfp_truncate(plain, QuantSpec(8))
    assert cut == 0 and out is plain


def test_window_starts_slide_with_overlap():
    assert window_starts(6, 2, 1) == [0, 1, 2, 3, 4]
    assert window_starts(6, 3, 1) == [0, 2, 3]
    assert window_starts(6, 2, 0) == [0, 2, 4]
    assert window_starts(2, 4, 1) == [0]


def test_config_errors():
    with pytest.raises(ConfigError, match="overlap < window"):
        CBQConfig(window=2, overlap=2)
    with pytest.raises(ConfigError, match="bits must be"):
        CBQConfig(bits=9)


def test_cbq_lowers_the_error_and_beats_rtn_on_a_real_model():
    """The bundled (pretrained) base cut to its first two blocks, W2A16: one window of two blocks."""
    model, tok = load_model_and_tokenizer(None)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    calib = task_token_rows(tok, "train", 8, 48)
    test = task_token_rows(tok, "test", 8, 64)
    rtn_model = copy.deepcopy(model)
    quantize_weights(rtn_model, "rtn", bits=2)
    summary = quantize_weights(model, "cbq", calib, bits=2, steps=20)
    (window,) = summary["windows"]
    assert window["blocks"] == [0, 1]
    assert window["error_end"] < 0.9 * window["error_start"]
    assert window["train_loss_last"] < window["train_loss_first"]
    assert perplexity(model, test) < perplexity(rtn_model, test)
