"""QLoRA (arXiv:2305.14314): LoRA on a bitsandbytes NF4 base, against PEFT + bitsandbytes on the same weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("bitsandbytes")
import peft  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.hub import load_model_and_tokenizer  # noqa: E402
from lorakit.quantize import (QuantizeConfig, dequantize_model, dequantize_weight, keep_qlora_layout,  # noqa: E402
                              quantize_model, quantized_bytes)

from lk_models import tiny_llama  # noqa: E402

# QLoRA paper, Appendix E ("NormalFloat 4-bit data type"): the 16 NF4 values, the quantiles of N(0, 1)
# normalised to [-1, 1] with an exact zero (eq. 4). Written out here from the paper, not read from bitsandbytes.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
TARGETS = "all-linear"


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_llama(seed=3).save_pretrained(folder)
    return folder


def _peft_base(folder, config=QuantizeConfig()):
    # keep_qlora_layout: without it bitsandbytes >= 0.50.2 repacks the codes on a CPU with AVX512-BF16 at the first
    # no-grad forward (lossy, machine-dependent, and failing on these tiny layers), so the reference would depend
    # on the machine; with it both sides run the same QLoRA layout on every CPU.
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=config.to_transformers(), device_map="cpu")
    return keep_qlora_layout(model)


def _ids(n=2, t=7):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(1))


def test_quantize_model_equals_transformers_loading(saved_base):
    ours = quantize_model(LlamaForCausalLM.from_pretrained(saved_base), "nf4")
    theirs = _peft_base(saved_base)
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].data, b[k].data) for k in a)
    assert type(ours.lm_head) is torch.nn.Linear  # the output head stays full precision, as in transformers


def test_nf4_dequantization_follows_the_paper():
    """Without double quantization: W ≈ NF4[code] · absmax(block of 64), two codes per byte, high nibble first."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8, bias=False)
    model = torch.nn.Sequential(linear, torch.nn.Linear(8, 2))
    quantize_model(model, QuantizeConfig(double_quant=False, skip_modules=("1",)))
    layer = model[0]
    packed = layer.weight.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()  # (out*in,)
    absmax = linear.weight.detach().reshape(-1, 64).abs().amax(dim=1)  # one constant per block (eq. 1)
    expected = (NF4[codes].reshape(-1, 64) * absmax[:, None]).reshape(8, 64)
    torch.testing.assert_close(dequantize_weight(layer), expected, rtol=0, atol=1e-6)
    # Each weight went to its nearest NF4 value (within half the widest gap between neighbours times absmax).
    assert (dequantize_weight(layer) - linear.weight.detach()).abs().max() <= 0.5 * 0.305 * absmax.max() + 1e-6


def test_double_quantization_saves_memory_and_stays_close():
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))
    single = quantize_model(copy.deepcopy(dense), QuantizeConfig(double_quant=False, skip_modules=("1",)))
    double = quantize_model(copy.deepcopy(dense), QuantizeConfig(double_quant=True, skip_modules=("1",)))
    assert double[0].weight.quant_state.nested and not single[0].weight.quant_state.nested
    assert quantized_bytes(double) < quantized_bytes(single) < quantized_bytes(dense) / 5
    diff = (dequantize_weight(double[0]) - dequantize_weight(single[0])).abs().max()
    assert 0 < diff < 1e-3  # only the 8-bit rounding of the block constants differs


def test_qlora_forward_and_gradients_match_peft_bnb(saved_base):
    ours = quantize_model(LlamaForCausalLM.from_pretrained(saved_base), "nf4")
    lk.add_adapter(ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    theirs = peft.get_peft_model(_peft_base(saved_base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    _assert_same_logits_and_gradients(ours, theirs, 14 * 2)


def _assert_same_logits_and_gradients(ours, theirs, n_tensors):
    """lorakit model ``ours`` and PEFT model ``theirs`` (given ours' adapter tensors here): the same training-mode
    logits and the same gradients of the ``n_tensors`` adapter tensors."""
    peft.set_peft_model_state_dict(theirs, lk.adapter_state_dict(ours))
    ids = _ids()
    ours.train(), theirs.train()
    lo, lt = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(lo.logits, lt.logits, rtol=0, atol=1e-5)
    lo.loss.backward(), lt.loss.backward()
    g_ours = {k.replace(".adapters.default", ""): p.grad for k, p in ours.named_parameters() if p.requires_grad}
    g_theirs = {k.removeprefix("base_model.model.").replace(".default", ""): p.grad
                for k, p in theirs.named_parameters() if p.requires_grad}
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == n_tensors
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_adapter_files_load_both_ways(saved_base, tmp_path, compute_dtype):
    config = QuantizeConfig(compute_dtype=compute_dtype)
    ids = _ids()
    # lorakit -> PEFT
    ours = lk.add_adapter(quantize_model(LlamaForCausalLM.from_pretrained(saved_base), config),
                          lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    lk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_peft_base(saved_base, config), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    # PEFT -> lorakit
    torch.manual_seed(5)
    trained = peft.get_peft_model(_peft_base(saved_base, config),
                                  peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False))
    trained.save_pretrained(tmp_path / "theirs")
    mine = lk.load_adapter(quantize_model(LlamaForCausalLM.from_pretrained(saved_base), config), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_merge_into_full_precision_model(saved_base, tmp_path):
    model = lk.add_adapter(quantize_model(LlamaForCausalLM.from_pretrained(saved_base)),
                           lk.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(lk.AdapterError, match="quantized.*dequantize_model"):
        lk.merge_adapter(model)
    merged = lk.merge_and_unload(dequantize_model(model))
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("4bit" in type(m).__name__ for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, before, rtol=0, atol=1e-5)


def test_dora_reads_the_dequantized_base(saved_base):
    """DoRA's magnitude is ‖W + ΔW‖ per row: on a 4-bit base W is the dequantized weight (as PEFT's bnb DoRA)."""
    model = lk.add_adapter(quantize_model(LlamaForCausalLM.from_pretrained(saved_base)),
                           lk.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    layer = model.model.layers[0].self_attn.q_proj
    expected = torch.linalg.norm(dequantize_weight(layer.base_layer), dim=1)
    torch.testing.assert_close(layer.adapters["default"].lora_magnitude_vector.detach(), expected)


def test_training_on_the_4bit_base_moves_only_the_adapter(saved_base):
    model = lk.add_adapter(quantize_model(LlamaForCausalLM.from_pretrained(saved_base)),
                           lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    codes = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(4, 12)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in codes.items())
    trainable, total = lk.trainable_parameters(model)
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable  # 4-bit weights count in full


def test_quantize_config_errors():
    with pytest.raises(lk.LorakitError, match="before add_adapter"):
        quantize_model(lk.add_adapter(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"])))
    with pytest.raises(lk.ConfigError, match="quant_type"):
        QuantizeConfig(quant_type="nf3")
    with pytest.raises(lk.ConfigError, match="compute_dtype"):
        QuantizeConfig(compute_dtype="fp8")


def test_cli_train_and_merge_with_quantize(tmp_path):
    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--quantize", "nf4", "--data", "reverse", "--steps", "2", "--batch-size", "2",
                 "--train-examples", "4", "--eval-examples", "2", "--output", str(out), "--quiet", "--r", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["quantize"] == "nf4"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert main(["merge", "--quantize", "nf4", "--adapter", str(out / "adapter"), "--output",
                 str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert getattr(merged.config, "quantization_config", None) is None
    # the merged model transformers loads gives the logits of the trained adapter on the 4-bit base in lorakit
    q4 = lk.load_adapter(load_model_and_tokenizer(None, quantize="nf4")[0], out / "adapter")
    ids = _ids()
    with torch.no_grad():
        want = q4(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=0, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("init", ["pissa", "olora", "lora_ga", "corda"])
def test_an_init_that_changes_the_base_is_refused_on_a_4bit_base(saved_base, init):
    """PiSSA / OLoRA / CorDA write W − s·B₀A₀ into the base and LoRA-GA needs the weight's gradient: neither exists
    for packed 4-bit codes (a RuntimeError 'Bad in-place call' / 'only Tensors of floating point dtype can require
    gradients' with half the adapter already written). An AdapterError naming the module, model unchanged;
    initialise on the full-precision base and quantise the residual (QPiSSA)."""
    model = lk.add_adapter(quantize_model(LlamaForCausalLM.from_pretrained(saved_base)),
                           lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _ids(2, 8)
    says = rf"init '{init}' changes the base weights.*'model.layers.0.self_attn.q_proj'.*4-bit"
    with pytest.raises(lk.AdapterError, match=says):
        lk.init_adapter(model, "default", [{"input_ids": x, "labels": x}], init=init)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _packable_linear(seed=0):
    # out 64 (a multiple of bitsandbytes' CPU block_n, 32) and in 128 (two 64-blocks): the shapes its CPU repack takes
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))


def test_inference_keeps_the_qlora_layout(saved_base):
    """On a CPU with AVX512-BF16, bitsandbytes >= 0.50.2 repacked a Linear4bit at its first no-grad eval forward
    (absmax to bfloat16, double quantization dropped); lorakit's 4-bit layers keep the NF4 codes + constants."""
    model = quantize_model(_packable_linear())
    layer = model[0]
    codes, absmax = layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()
    before = dequantize_weight(layer)
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 128))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert layer.weight.quant_state.nested  # double quantization (QuantizeConfig default) still there
    assert torch.equal(layer.weight.data, codes) and torch.equal(layer.weight.quant_state.absmax, absmax)
    assert torch.equal(dequantize_weight(layer), before)
    loaded, _ = load_model_and_tokenizer(quantize="nf4")  # the bundled base, through transformers' loader
    assert all(not m.support_avx512bf16_for_cpu for m in loaded.modules() if type(m).__name__ == "Linear4bit")


def test_a_layer_repacked_elsewhere_is_unpacked_before_dequantizing():
    import bitsandbytes.functional as F

    layer = quantize_model(_packable_linear(1), QuantizeConfig(double_quant=False))[0]
    before = dequantize_weight(layer)
    # what bitsandbytes' Linear4bit.forward does on an AVX512-BF16 CPU (a pure-torch relayout, run here on any CPU)
    layer.weight.data, layer.weight.quant_state = F._convert_weight_packed_for_cpu(layer.weight.data,
                                                                                  layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    after = dequantize_weight(layer)
    assert not layer.weight.quant_state.packing_format_for_cpu
    # the repack stored each block's absmax in bfloat16 (8 mantissa bits): that much of the weight is lost
    torch.testing.assert_close(after, before, rtol=2 ** -8, atol=0)


@pytest.fixture
def avx512_bf16_cpu(monkeypatch):
    """bitsandbytes as it runs on a CPU with AVX512-BF16 (Sapphire Rapids and later): its Linear4bit then repacks
    the weight on the first no-grad eval forward into a layout that needs out_features % 32 == 0 (and more), in
    place. The repacking is plain torch code, so this reproduces it on any CPU."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def test_eval_forward_works_on_an_avx512_bf16_cpu(avx512_bf16_cpu):
    """Was: on such a CPU `lorakit train --quantize nf4` on the bundled base (intermediate 688 = 21.5 x 32) ended in
    bitsandbytes' "AssertionError: N must be divisible by block_n" at the first evaluation, and the tiny models of
    this file in "shape '[32, 0]' is invalid". lorakit keeps the unpacked 4-bit layout the training forward uses,
    so eval equals train-mode outputs and dequantize / merge read the weights they expect."""
    torch.manual_seed(0)
    from transformers import LlamaConfig

    odd = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    for model in (quantize_model(odd, "nf4"), quantize_model(tiny_llama(seed=3), "nf4"),
                  load_model_and_tokenizer(None, quantize="nf4")[0]):  # the bundled base, loaded into 4 bit
        lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        model.train()
        expected = model(_ids()).logits
        before = {n: p.data.clone() for n, p in model.named_parameters()}
        model.eval()
        with torch.no_grad():
            got = model(_ids()).logits
        torch.testing.assert_close(got, expected.detach())
        assert all(torch.equal(p.data, before[n]) for n, p in model.named_parameters())  # no repacking in place


def test_a_mistyped_quant_type_or_compute_dtype_names_its_near_match():
    with pytest.raises(lk.ConfigError, match=r"quant_type='nf5': choose one of .*Did you mean: nf4\?"):
        QuantizeConfig(quant_type="nf5")
    with pytest.raises(lk.ConfigError, match=r"compute_dtype='bfloat61': choose one of .*Did you mean: bfloat16"):
        QuantizeConfig(compute_dtype="bfloat61")


def test_a_non_string_quant_type_or_compute_dtype_is_a_config_error():
    """The near-match hint added to these messages ran difflib on the value itself: a torch dtype (what
    BitsAndBytesConfig's bnb_4bit_compute_dtype takes), an int or None raised TypeError ("'torch.dtype' object is
    not iterable") instead of the ConfigError naming the field."""
    with pytest.raises(lk.ConfigError, match=r"compute_dtype=torch.bfloat16: choose one of .*Did you mean: bfloat16"):
        QuantizeConfig(compute_dtype=torch.bfloat16)
    with pytest.raises(lk.ConfigError, match=r"quant_type=4: choose one of"):
        QuantizeConfig(quant_type=4)
    with pytest.raises(lk.ConfigError, match=r"compute_dtype=None: choose one of"):
        QuantizeConfig(compute_dtype=None)


# --- the NF4 round trip by the paper's definition, against every lorakit path ----------------------------------------
# QLoRA (arXiv:2305.14314) §2 "Block-wise k-bit Quantization": the input tensor is flattened and cut into contiguous
# blocks of B values (B = 64 for the weights, §3), each quantized with its own absmax constant c = absmax(block)
# (eq. 1); §3 "4-bit NormalFloat": each value X/c goes to the nearest of the 16 NF4 values q_i (eq. 4, Appendix E
# table, NF4 above) and dequantizes to q_i · c. Blocks follow the flattened (out, in) weight, so where in_features is
# not a multiple of 64 a block spans two rows. Was: bitsandbytes 0.50.2's native CPU kernel read such blocks'
# constants row by row (right only for in % 64 == 0), and every path (dequantize_weight, the training forward, the
# no-grad eval forward, merge, hub loads) used those wrong weights: the bundled base's down_proj (in 688) had a
# relative error of 0.36 instead of NF4's 0.094.
WIDTHS = [64, 128, 688, 96, 32, 100, 33]  # multiples of 64; multiples of 16 (bitsandbytes' faulty branch); others


def _nf4_reference(weight, absmax=None):
    """(codes, round trip) of ``weight`` (out, in) per the paper: flat blocks of 64, absmax per block, nearest NF4
    value. ``absmax`` replaces the block constants of the dequantization (to follow double quantization, whose
    codes are chosen with the exact constant and dequantized with its 8-bit rounding)."""
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % 64
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, 64)
    exact = blocks.abs().amax(dim=1, keepdim=True)
    codes = ((blocks / exact).unsqueeze(-1) - NF4).abs().argmin(dim=-1)
    scale = exact if absmax is None else absmax.float().view(-1, 1)
    values = (NF4[codes] * scale).reshape(-1)[: flat.numel()].view(weight.shape)
    return codes.reshape(-1)[: flat.numel()].view(weight.shape), values


def _assert_nf4_round_trip(got, weight, absmax=None, atol=0.0):
    """``got`` equals the reference round trip, except where a value lies on the midpoint between two NF4 values
    (within float32 rounding): bitsandbytes' decision thresholds may put such a tie on either side."""
    _, want = _nf4_reference(weight, absmax)
    blocks = torch.nn.functional.pad(weight.detach().float().reshape(-1), (0, (-weight.numel()) % 64)).view(-1, 64)
    scaled = (blocks / blocks.abs().amax(dim=1, keepdim=True)).reshape(-1)[: weight.numel()].view(weight.shape)
    midpoints = (NF4[1:] + NF4[:-1]) / 2
    tie = (scaled.unsqueeze(-1) - midpoints).abs().amin(dim=-1) < 1e-6
    off = (got.float() - want).abs() > atol
    assert not (off & ~tie).any(), (f"{int((off & ~tie).sum())} of {weight.numel()} values differ from the NF4 round "
                                    f"trip; max {float((got.float() - want).abs().max()):.3g}")


def _dense_and_4bit(out_features, in_features, config, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False),
                                torch.nn.Linear(out_features, 2))
    weight = dense[0].weight.detach().clone()
    return weight, quantize_model(dense, QuantizeConfig(double_quant=config, skip_modules=("1",)))[0]


@pytest.mark.parametrize("in_features", WIDTHS)
def test_bitsandbytes_round_trip_follows_the_paper_once_lorakit_is_imported(in_features):
    """bitsandbytes' own functional API (what PEFT and transformers call) gives the paper's round trip in this
    process: lorakit's check replaced the faulty CPU kernel (quantize_model / load with quantize= install it)."""
    import bitsandbytes.functional as F

    _dense_and_4bit(6, in_features, False)  # quantize_model runs lorakit's bitsandbytes check
    torch.manual_seed(in_features)
    weight = torch.randn(6, in_features)
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0xF], dim=1).reshape(-1)[: weight.numel()]
    ref_codes, _ = _nf4_reference(weight)
    assert (codes.view(weight.shape).long() != ref_codes).float().mean() < 1e-3  # the quantizer was right all along
    _assert_nf4_round_trip(F.dequantize_4bit(packed, state), weight)
    _, want = _nf4_reference(weight)
    for dtype in (torch.bfloat16, torch.float16):  # the kernel's other outputs (compute dtypes), rounded from float32
        as_dtype = copy.copy(state)
        as_dtype.dtype = dtype
        got = F.dequantize_4bit(packed, as_dtype)
        assert got.dtype == dtype
        _assert_nf4_round_trip(got, weight, atol=float(want.abs().max()) * 2 ** -8)


@pytest.mark.parametrize("in_features", WIDTHS)
def test_4bit_layer_paths_use_the_nf4_round_trip(in_features):
    """dequantize_weight (merge / DoRA / inits read it), the QLoRA training forward, the no-grad eval forward and
    dequantize_model all use the paper's round trip of the weight, for widths that are and are not multiples of 64."""
    weight, layer = _dense_and_4bit(5, in_features, False)
    _, want = _nf4_reference(weight)
    _assert_nf4_round_trip(dequantize_weight(layer), weight)
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(1))
    layer.train()
    torch.testing.assert_close(layer(x.requires_grad_()), x.detach() @ want.T, rtol=1e-5, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x.detach()), x.detach() @ want.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x[:1].detach()), x[:1].detach() @ want.T, rtol=1e-5, atol=1e-5)  # one token
    merged = dequantize_model(torch.nn.Sequential(layer))[0]
    _assert_nf4_round_trip(merged.weight, weight)


@pytest.mark.parametrize("in_features", [688, 96])
def test_double_quantized_layer_follows_the_round_trip_with_its_8bit_constants(in_features):
    """Double quantization (QLoRA eq. 6): the codes are those of the exact block constants, dequantized with the
    constants' 8-bit round trip (bitsandbytes' blockwise 8-bit dequantization, not the faulty 4-bit kernel)."""
    import bitsandbytes.functional as F

    weight, layer = _dense_and_4bit(4, in_features, True)
    state = layer.weight.quant_state
    assert state.nested
    constants = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    _assert_nf4_round_trip(dequantize_weight(layer), weight, absmax=constants, atol=1e-6)
    x = torch.randn(2, in_features, generator=torch.Generator().manual_seed(2))
    _, want = _nf4_reference(weight, absmax=constants)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ want.T, rtol=1e-5, atol=1e-5)


def test_bundled_base_loaded_in_4bit_uses_the_nf4_round_trip():
    """``load_model_and_tokenizer(quantize=...)`` (what ``lorakit serve/train --quantize nf4`` load) through
    transformers' BitsAndBytesConfig: the down_proj weights (in_features 688) are the paper's round trip, in the
    bfloat16 compute dtype the serving tests use too."""
    import bitsandbytes.functional as F

    dense, _ = load_model_and_tokenizer(None)
    q4, _ = load_model_and_tokenizer(None, quantize=QuantizeConfig(compute_dtype="bfloat16", double_quant=False))
    for i, block in enumerate(q4.model.layers):
        layer = block.mlp.down_proj
        assert layer.in_features == 688
        weight = dense.model.layers[i].mlp.down_proj.weight.detach().float()
        _assert_nf4_round_trip(dequantize_weight(layer), weight)
    x = torch.randn(2, 688, generator=torch.Generator().manual_seed(3))
    _, want = _nf4_reference(dense.model.layers[0].mlp.down_proj.weight)
    with torch.no_grad():
        got = q4.model.layers[0].mlp.down_proj(x)
    expected = (x.bfloat16() @ want.bfloat16().T).float()
    torch.testing.assert_close(got.float(), expected, rtol=2 ** -6, atol=2 ** -6 * float(expected.abs().max()))


def test_the_bitsandbytes_workaround_is_a_no_op_when_bitsandbytes_is_right():
    """The check tests bitsandbytes against the paper, not its version: with a right dequantize_4bit (here the one
    lorakit installed) it registers nothing."""
    import bitsandbytes.functional as F

    from lorakit.quantize import nf4

    nf4._bnb()
    assert nf4._cpu_dequantize_is_right(F)
    saved = dict(nf4._CPU_FIX)
    try:
        nf4._CPU_FIX.clear()
        nf4._check_cpu_dequantize(F)
        assert nf4._CPU_FIX == {"checked": True}  # probed, found right, nothing registered
    finally:
        nf4._CPU_FIX.clear()
        nf4._CPU_FIX.update(saved)



def test_the_bitsandbytes_check_probes_on_cpu_under_a_meta_device_context():
    """``describe_layer`` (which now runs the check) may be called under ``torch.device("meta")``: ``planned_shapes``
    builds deltas there and a build may describe layers (FFN experts). Was: the probe's tensors came out on the
    meta device and it raised "Tensor on device meta is not on the expected device cpu!". It runs on CPU whatever
    the default device; here on a bitsandbytes already right (this process's fix), so nothing is registered and
    nothing is said."""
    import warnings

    import bitsandbytes.functional as F

    from lorakit.quantize import nf4

    nf4._bnb()
    saved = dict(nf4._CPU_FIX)
    try:
        nf4._CPU_FIX.clear()
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("error")
            nf4._check_cpu_dequantize(F)
        assert nf4._CPU_FIX == {"checked": True}
    finally:
        nf4._CPU_FIX.clear()
        nf4._CPU_FIX.update(saved)


# --- models quantized by transformers outside lorakit ----------------------------------------------------------------
# Was: lorakit ran its bitsandbytes check only from its own 4-bit calls (quantize_model, load with quantize=,
# dequantize_weight). A model loaded in 4 bit by transformers with an adapter attached by add_adapter / load_adapter /
# serving kept bitsandbytes' faulty CPU kernel, so its forward used wrong weights wherever in_features is not a
# multiple of 64. The check is process-wide, so each entry point runs in a fresh interpreter that imports only
# transformers and lorakit's public API.
_OUTSIDE = r"""
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
import lorakit as lk
base, adapter, entry, out = sys.argv[1:]
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                         bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, device_map="cpu")
assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
model.train()  # bitsandbytes repacks 4-bit weights on an eval forward on some CPUs: not what is tested here
with torch.no_grad():
    if entry == "add_adapter":
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules="all-linear"))  # B = 0: the base's logits
        logits = model(input_ids=ids).logits
    elif entry == "load_adapter":
        logits = lk.load_adapter(model, adapter)(input_ids=ids).logits
    else:
        from lorakit.serving import bank_routing, load_adapters
        load_adapters(model, {"a": adapter})
        with bank_routing(model, ["a", "a"]):
            logits = model(input_ids=ids).logits
save_file({"logits": logits.contiguous()}, out)
"""


def _odd_width_llama(seed=4):
    """hidden 32 and intermediate 96: every linear layer's in_features is a multiple of 16 but not of 64, the
    widths bitsandbytes 0.50.2's CPU kernel misread."""
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=64)).eval()


@pytest.mark.parametrize("entry", ["add_adapter",  # one fresh interpreter per entry point (~10 s each)
                                   pytest.param("load_adapter", marks=pytest.mark.slow),
                                   pytest.param("serving", marks=pytest.mark.slow)])
def test_an_adapter_on_a_model_transformers_quantized_uses_the_nf4_round_trip(tmp_path, entry):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    base = _odd_width_llama()
    base.save_pretrained(tmp_path / "base")
    lk.save_adapter(lk.add_adapter(copy.deepcopy(base), lk.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                                         init_lora_weights=False)), tmp_path / "adapter")
    script = tmp_path / "outside.py"
    script.write_text(_OUTSIDE)
    src = os.path.dirname(os.path.dirname(lk.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "base"), str(tmp_path / "adapter"), entry,
                    str(tmp_path / "logits.safetensors")], env=env, check=True, timeout=300)
    got = load_file(tmp_path / "logits.safetensors")["logits"]
    # the reference: the dense model with every quantized weight replaced by its paper round trip (lm_head stays)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if type(module) is torch.nn.Linear and name != "lm_head":
                module.weight.copy_(_nf4_reference(module.weight)[1])
    if entry != "add_adapter":
        reference = lk.load_adapter(reference, tmp_path / "adapter")
    with torch.no_grad():
        want = reference(input_ids=_ids()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


# --- 4-bit models lorakit writes, read back by plain transformers ---------------------------------------------------
@pytest.mark.parametrize("config", [QuantizeConfig(), QuantizeConfig(double_quant=False, compute_dtype="bfloat16")],
                         ids=["double_quant", "bf16"])
@pytest.mark.parametrize("adapted", [False, True], ids=["base", "with_adapter"])
def test_a_model_quantize_model_made_saves_and_loads_in_transformers(tmp_path, config, adapted):
    """Was: quantize_model left ``config.quantization_config`` unset, so ``save_pretrained`` wrote the packed codes
    under a plain config and ``from_pretrained`` refused them ("size mismatch ... ckpt: torch.Size([1536, 1]) vs
    model: torch.Size([96, 32])"). Now transformers rebuilds the same 4-bit layers (codes and constants equal) and
    the same logits; a model with an adapter attached (what HF Trainer's checkpoints save) loads as its base."""
    model = quantize_model(_odd_width_llama(), config)
    if adapted:
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    model.save_pretrained(tmp_path / "q4")
    saved = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert saved["load_in_4bit"] and saved["bnb_4bit_use_double_quant"] == config.double_quant
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
    base = lk.unload(model) if adapted else model
    ours, theirs = base.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and any(k.endswith("quant_map") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert type(loaded.lm_head) is torch.nn.Linear
    ids = _ids()
    base.train(), loaded.train()  # bitsandbytes repacks on an eval forward on some CPUs (test above)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)


def test_skipped_modules_stay_full_precision_after_a_transformers_load(tmp_path):
    """``skip_modules`` (here the MLPs too) are named in the saved quantization_config: transformers would otherwise
    quantize them on load and find dense weights where it expects codes."""
    model = quantize_model(_odd_width_llama(), QuantizeConfig(skip_modules=("lm_head", "down_proj")))
    model.save_pretrained(tmp_path / "q4")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
    assert type(loaded.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert type(loaded.model.layers[1].mlp.up_proj).__name__ == "Linear4bit"
    ids = _ids()
    model.train(), loaded.train()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_saved_4bit_checkpoint_loads_in_lorakit_without_quantize(tmp_path, avx512_bf16_cpu):
    """A folder saved in 4 bit (its config.json names the quantization) loads in 4 bit through
    ``load_model_and_tokenizer`` / ``--model`` without ``quantize=``. Was: it kept bitsandbytes' CPU repacking, so
    ``lorakit eval --model FOLDER`` on the bundled base raised "N must be divisible by block_n" on such a CPU."""
    model, tokenizer = load_model_and_tokenizer(None)
    quantize_model(model, "nf4")
    model.save_pretrained(tmp_path / "q4")
    tokenizer.save_pretrained(tmp_path / "q4")
    ids = _ids()
    model.train()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    loaded, _ = load_model_and_tokenizer(tmp_path / "q4")
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear4bit" and not loaded.training
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def _edit_quantization(q: dict, edit: str) -> dict | None:
    if edit == "deleted":
        return None
    return {**q, **{"quant_method": {"quant_method": "gptq"},
                    "8bit": {"load_in_4bit": False, "load_in_8bit": True, "_load_in_4bit": False, "_load_in_8bit": True},
                    "no_skips": {"llm_int8_skip_modules": []},
                    "more_skips": {"llm_int8_skip_modules": [*q["llm_int8_skip_modules"], "model.layers.0"]},
                    "compute_dtype": {"bnb_4bit_compute_dtype": "bfloat16"}}[edit]}


@pytest.mark.parametrize("edit, says", [
    ("deleted", "hold bitsandbytes 4-bit codes (42 layers, e.g. model.layers.0.mlp.down_proj) but its config.json "
                "has no quantization_config"),  # was: transformers' size-mismatch RuntimeError
    ("quant_method", "says quant_method='gptq', not 'bitsandbytes'"),
    ("8bit", "loads 8-bit layers (load_in_4bit=False, load_in_8bit=True)"),  # was: AttributeError 'CB' on a forward
    ("no_skips", "makes transformers load layer lm_head as 4-bit, but the weights file holds a full-precision "
                 "weight for it"),  # was: a bare AssertionError in bitsandbytes on the first forward
    ("more_skips", "makes transformers load layer model.layers.0.mlp.down_proj in full precision, but the weights "
                   "file holds 4-bit codes for it"),  # was: transformers' size-mismatch RuntimeError
    ("compute_dtype", None),  # a setting the codes do not depend on: loads
])
def test_a_4bit_folder_whose_quantization_config_was_edited_is_one_clear_error(tmp_path, edit, says):
    from lorakit.core.errors import LorakitError

    model, tokenizer = load_model_and_tokenizer(None)
    quantize_model(model, "nf4").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edited = _edit_quantization(config.pop("quantization_config"), edit)
    (tmp_path / "config.json").write_text(json.dumps(config if edited is None else {**config,
                                                                                    "quantization_config": edited}))
    if says is None:
        loaded, _ = load_model_and_tokenizer(tmp_path)
        assert loaded.model.layers[0].mlp.down_proj.compute_dtype == torch.bfloat16
        return
    with pytest.raises(LorakitError) as error:
        load_model_and_tokenizer(tmp_path)
    assert says in str(error.value) and "edited by hand" in str(error.value)


# --- the check's first run: default dtype and a second thread ---------------------------------------------------------
# Each runs in a fresh interpreter: the check runs once per process and this one has run it already.
def _fresh_interpreter(code: str) -> str:
    import os
    import subprocess
    import sys

    src = os.path.dirname(os.path.dirname(lk.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_check_works_when_the_default_dtype_is_bfloat16():
    """``torch.set_default_dtype(torch.bfloat16)`` (common in LLM scripts) before lorakit's first 4-bit call. Was:
    the probe's NF4 table came out in bfloat16 (bitsandbytes' get_4bit_type follows the default dtype), so no kernel
    matched it: lorakit warned that its workaround failed, removed it, and the faulty kernel stayed for the whole
    process. The reference here is the paper's table (NF4 above) on bitsandbytes' codes."""
    out = _fresh_interpreter(f"""
import warnings, torch
torch.set_default_dtype(torch.bfloat16)
from lorakit.quantize import quantize_model
with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*lorakit's workaround")
    quantize_model(torch.nn.Sequential(torch.nn.Linear(96, 2), torch.nn.Linear(2, 2)))
torch.set_default_dtype(torch.float32)
import bitsandbytes.functional as F
NF4 = torch.tensor({NF4.tolist()})
w = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0xF], dim=1).reshape(-1).long()
want = (NF4[codes].view(-1, 64) * state.absmax.view(-1, 1)).view(4, 96)
print(float((F.dequantize_4bit(packed, state) - want).abs().max()))
""")
    assert float(out.split()[-1]) == 0.0


@pytest.mark.slow  # a fresh interpreter and a 5 s hold
def test_a_second_thread_waits_for_the_check_instead_of_using_the_faulty_kernel():
    """Two threads reach bitsandbytes for the first time together (adapters added to models in worker threads,
    serving loads). Was: the first marked the check done before probing, so the second went on with bitsandbytes'
    faulty kernel while the first was still installing the fix. The first thread is held inside the check (up to
    5 s) until the second has returned from its own call; the second must come back with the kernel checked."""
    out = _fresh_interpreter("""
import threading
import bitsandbytes.functional as F
from lorakit.quantize import nf4
inside, second_returned = threading.Event(), threading.Event()
install = nf4._install_cpu_fix
def held_install(functional):
    inside.set()
    second_returned.wait(5)
    install(functional)
nf4._install_cpu_fix = held_install
first = threading.Thread(target=nf4._bnb)
first.start()
inside.wait(60)
nf4._bnb()
right = nf4._cpu_dequantize_is_right(F)
second_returned.set()
first.join()
print(right)
""")
    assert out.split()[-1] == "True"


@pytest.fixture(scope="module")
def twelve_layers(tmp_path_factory):
    """A tiny llama with 12 layers, so that "layers.1" patterns can wrongly reach "layers.10" and "layers.11"."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("twelve")
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=12, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
                     ).save_pretrained(folder)
    return folder


def _full_precision_linears(model) -> set[str]:
    return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}


@pytest.mark.parametrize("skip", [
    ("lm_head", "mlp.down_proj"),  # dotted suffixes
    ("lm_head", "model.layers.1"),  # a module path from the root: everything under it (layer 1, not 10 or 11)
    ("lm_head", r"model.layers.1.*"),  # a regular expression (its dots and star reach layers 10 and 11)
    ("lm_head", "p_proj"),  # a plain string suffix: up_proj
    ("self_attn", "layers.1"),  # a bare parent name: nothing under it (neither from the root nor a linear's end)
])
def test_skip_modules_match_as_transformers_loading_does(twelve_layers, skip):
    """``QuantizeConfig.skip_modules`` is transformers' ``llm_int8_skip_modules``, matched by its rule
    (transformers/quantizers/quantizers_utils.py ``should_convert_module``: a pattern matching the module path from
    its start up to a module boundary, as a regular expression, or a plain string suffix of the path), so
    ``quantize_model`` keeps in full precision the linear layers ``from_pretrained(quantization_config=...)`` keeps.
    (Was: only a module named exactly or by a dotted suffix, so a path prefix or a regex quantized what transformers
    keeps, and a saved model came back from transformers different from the one lorakit trained on.)"""
    config = QuantizeConfig(skip_modules=skip)
    theirs = LlamaForCausalLM.from_pretrained(twelve_layers, quantization_config=config.to_transformers(),
                                              device_map="cpu")
    ours = quantize_model(LlamaForCausalLM.from_pretrained(twelve_layers), config)
    kept = _full_precision_linears(theirs)
    assert kept == _full_precision_linears(ours)
    assert any(type(m).__name__ == "Linear4bit" for m in ours.modules())


def test_skip_modules_under_transformers_4_match_as_it_did(monkeypatch):
    """Without ``should_convert_module`` (transformers 4.x, allowed by lorakit's floor of 4.45), the patterns match as
    that transformers' ``_replace_with_bnb_linear`` did (transformers v4.45 integrations/bitsandbytes.py: skipped
    when ``name in modules_to_not_convert`` or ``key + "." in current_key_name_str or key == current_key_name_str``)."""
    import sys

    from lorakit.quantize.nf4 import skips_module

    path = "model.layers.11.mlp.up_proj"
    transformers_5 = [skips_module(path, [key]) for key in ("up_proj", "layers.11", "model.layers.11", "p_proj")]
    monkeypatch.setitem(sys.modules, "transformers.quantizers.quantizers_utils", None)  # (its import fails)
    transformers_4 = [skips_module(path, [key]) for key in ("up_proj", "layers.11", "model.layers.11", "p_proj")]
    assert transformers_5 == [True, False, True, True]
    assert transformers_4 == [True, True, True, False]


# --- GPT-2's Conv1D layers ----------------------------------------------------------------------------------------
# transformers' bitsandbytes loading converts every GPT-2 Conv1D too (transformers 5.24
# integrations/bitsandbytes.py line 189, ``isinstance(module, Conv1D) or type(module) is nn.Linear``), quantizing the
# (out, in) transpose of its (in, out) weight (lines 52-55). Was: quantize_model converted nn.Linear only, so a GPT-2
# "4-bit base" kept every block weight in full precision.
def _gpt2_nf4_reference(model):
    """A copy of the dense GPT-2 ``model`` with each block Conv1D weight (in, out) replaced by QLoRA's round trip of
    its (out, in) transpose (the paper's blocks of 64, no double quantization): the weights a 4-bit base computes
    with. A Conv1D computes ``x @ W + b``."""
    from transformers.pytorch_utils import Conv1D

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, Conv1D):
                module.weight.copy_(_nf4_reference(module.weight.T)[1].T)
    return reference


def test_gpt2_conv1d_layers_are_quantized_as_transformers_loads_them(tmp_path):
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel

    from lk_models import tiny_gpt2

    dense = tiny_gpt2(seed=2)
    dense.save_pretrained(tmp_path)
    config = QuantizeConfig(double_quant=False)
    ours = quantize_model(GPT2LMHeadModel.from_pretrained(tmp_path), config)
    theirs = keep_qlora_layout(GPT2LMHeadModel.from_pretrained(
        tmp_path, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=torch.float32)))
    assert type(ours.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = _ids()
    with torch.no_grad():
        got = ours(input_ids=ids).logits
        torch.testing.assert_close(got, _gpt2_nf4_reference(dense)(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_lora_on_a_quantized_conv1d_equals_lora_on_the_dequantized_conv1d(tmp_path):
    """A QLoRA adapter on GPT-2's 4-bit Conv1D layers computes what the same adapter computes, under real PEFT, on
    the dense GPT-2 holding the NF4 round-trip weights (PEFT's Conv1D LoRA, fan_in_fan_out); ``dequantize_model``
    gives those Conv1D layers back (weights (in, out)), and the merged model saves and loads as a plain GPT-2 with
    the same logits. Was: a dequantized layer became an nn.Linear, whose (out, in) weight a GPT-2 checkpoint cannot
    hold (c_attn refused the shape on load, the square c_proj would load transposed)."""
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from lk_models import tiny_gpt2

    dense = tiny_gpt2(seed=2)
    targets = ["c_attn", "c_proj", "c_fc"]
    for use_dora in (False, True):
        model = lk.add_adapter(quantize_model(copy.deepcopy(dense), QuantizeConfig(double_quant=False)),
                               lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                             use_dora=use_dora))
        assert type(model.transformer.h[1].mlp.c_proj.base_layer).__name__ == "Linear4bit"
        folder = tmp_path / f"adapter-dora{use_dora}"
        lk.save_adapter(model, folder)
        ids = _ids()
        with torch.no_grad():
            got = model(input_ids=ids).logits
        reference = _gpt2_nf4_reference(dense)
        weights = {k: v.clone() for k, v in reference.state_dict().items()}
        with torch.no_grad():
            want = peft.PeftModel.from_pretrained(reference, folder)(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

        dequantize_model(model)
        layer = model.transformer.h[0].attn.c_attn
        assert isinstance(layer.base_layer, Conv1D) and layer.base_layer.weight.shape == (32, 96)
        torch.testing.assert_close(layer.base_layer.weight, weights["transformer.h.0.attn.c_attn.weight"],
                                   rtol=0, atol=1e-6)
        merged = lk.merge_and_unload(model)
        merged.save_pretrained(tmp_path / f"merged-dora{use_dora}")
        loaded = GPT2LMHeadModel.from_pretrained(tmp_path / f"merged-dora{use_dora}")
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, got, rtol=0, atol=1e-4)


def test_gpt2_qlora_matches_peft_bnb_in_outputs_and_gradients(tmp_path):
    """lorakit LoRA on lorakit's 4-bit GPT-2 against PEFT's bitsandbytes LoRA on transformers' 4-bit GPT-2 (the same
    codes, previous test): same logits and the same adapter gradients."""
    from transformers import GPT2LMHeadModel

    from lk_models import tiny_gpt2

    dense = tiny_gpt2(seed=2)
    dense.config.update({"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0})  # train-mode forwards compared
    dense.save_pretrained(tmp_path)
    config = QuantizeConfig()
    targets = ["c_attn", "c_proj", "c_fc"]
    ours = lk.add_adapter(quantize_model(GPT2LMHeadModel.from_pretrained(tmp_path), config),
                          lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    base = keep_qlora_layout(GPT2LMHeadModel.from_pretrained(tmp_path, quantization_config=config.to_transformers(),
                                                             device_map="cpu"))
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert type(theirs.base_model.model.transformer.h[0].attn.c_attn).__module__ == "peft.tuners.lora.bnb"
    _assert_same_logits_and_gradients(ours, theirs, 2 * 4 * 2)
