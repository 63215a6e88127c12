"""LoRA's ``trainable_token_indices`` (PEFT's TrainableTokens beside LoRA): files move between lorakit and the real
``peft`` package with identical logits, training moves only the chosen rows, merging writes them, a tied lm_head
follows them as in PEFT, and bad indices / module names are clear errors.

Reference values come from PEFT itself (peft/tuners/trainable_tokens/layer.py 0.21.2: ``update_layer`` line 145
initialises the rows to ``weight[token_indices]``, ``get_merged_weights`` line 225 ``index_copy``s them into the
weight, ``forward_adapters`` line 267 runs a tied head as ``F.linear(x, W')``; peft/utils/other.py line 1572 picks
the input embedding for the list form, line 1659 ties the output head to it)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lk_models import tiny_gpt2, tiny_llama
from lorakit.core.errors import ConfigError, TargetError
from lorakit.core.model import adapter_parameters, merged_adapters

KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def tied_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def tiny_gemma3(seed: int = 0):
    """Gemma 3: its embedding scales its output (``embed_scale``, PEFT's ``_get_embed_scale``); lm_head tied."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, vocab_size=96, max_position_embeddings=64,
                           sliding_window=16)
    return Gemma3ForCausalLM(cfg).eval()


def tiny_biogpt(seed: int = 0):
    """BioGPT: its embedding scales its output by a float ``embed_scale`` (sqrt(hidden), scale_embedding=True by
    default; BART-family ``*ScaledWordEmbedding`` with scale_embedding too), which PEFT's ``_get_embed_scale``
    applies as a scalar (peft/tuners/tuners_utils.py 0.21.2, lines 1922-1924)."""
    from transformers import BioGptConfig, BioGptForCausalLM

    torch.manual_seed(seed)
    cfg = BioGptConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=96, max_position_embeddings=64)
    model = BioGptForCausalLM(cfg).eval()
    assert isinstance(model.biogpt.embed_tokens.embed_scale, float)
    return model


LLAMA = ["q_proj", "v_proj", "down_proj"]
CASES = {  # model factory, LoRA targets, trainable_token_indices
    "llama-list": (tiny_llama, LLAMA, [3, 5, 90]),
    "llama-dict": (tiny_llama, LLAMA, {"embed_tokens": [7, 1]}),
    "llama-dict-untied-head": (tiny_llama, LLAMA, {"embed_tokens": [3, 5], "lm_head": [5, 9]}),
    "tied-llama-list": (tied_llama, LLAMA, [3, 5, 90]),
    "gpt2-tied-dict": (tiny_gpt2, ["c_attn"], {"wte": [3, 5], "lm_head": [3, 5]}),
    "gemma3-scaled-tied": (tiny_gemma3, ["q_proj", "v_proj"], [3, 5, 90]),
    "biogpt-float-scale": (tiny_biogpt, ["q_proj", "v_proj"], [3, 5, 90]),
    # PEFT ties a head to the embedding only when the embedding is named: alone, the head's logits change, the input
    # rows stay the base's (peft/utils/other.py, should_apply_tying)
    "tied-llama-head-only": (tied_llama, LLAMA, {"lm_head": [5, 9]}),
    # tied twins given different indices: PEFT (without ensure_weight_tying) wraps each with its own rows
    "gpt2-tied-different-indices": (tiny_gpt2, ["c_attn"], {"wte": [3, 5], "lm_head": [5, 9]}),
}


@pytest.fixture
def token_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 96, (3, 10), generator=g)
    ids[0, :5] = torch.tensor([3, 5, 90, 7, 1])  # every trained token occurs
    ids[1, -1] = 9
    return ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("case", CASES)
def test_peft_file_loads_with_identical_logits(case, token_ids, tmp_path):
    factory, targets, indices = CASES[case]
    peft_model = get_peft_model(factory(), PeftLoraConfig(r=4, target_modules=targets, init_lora_weights=False,
                                                          trainable_token_indices=indices))
    _perturb([p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n], 0)
    expected = _logits(peft_model.eval(), token_ids)
    peft_model.save_pretrained(tmp_path)

    model = factory()
    base = _logits(model, token_ids)
    lk.load_adapter(model, tmp_path)
    got = _logits(model, token_ids)
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_lorakit_file_loads_in_peft_with_identical_logits(case, token_ids, tmp_path):
    factory, targets, indices = CASES[case]
    model = factory()
    base = _logits(model, token_ids)
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=targets, init_lora_weights=False,
                                        trainable_token_indices=indices))
    _perturb([p for n, p in model.named_parameters() if "trainable_tokens_delta" in n], 1)
    expected = _logits(model, token_ids)
    lk.save_adapter(model, tmp_path)

    peft_model = PeftModel.from_pretrained(factory(), tmp_path).eval()
    got = _logits(peft_model, token_ids)
    assert (expected - base).abs().max() > 1e-2
    assert (got - expected).abs().max() <= 1e-5
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == indices


def test_file_holds_peft_keys_and_a_tied_head_saves_nothing(tmp_path):
    model = tied_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=LLAMA, trainable_token_indices=[3, 5, 90]))
    lk.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tokens = {k: tuple(v.shape) for k, v in tensors.items() if "lora_" not in k}
    assert tokens == {KEY: (3, 32)}
    # untrained rows are the base rows (PEFT's init, layer.py line 145), so the adapter starts as a no-op for them
    assert torch.equal(tensors[KEY], tied_llama().model.embed_tokens.weight[[3, 5, 90]])


def test_untrained_rows_leave_a_float_scaled_embedding_unchanged(token_ids):
    """An embedding whose ``embed_scale`` is a Python float (BioGPT, BART with scale_embedding). Was: only a tensor
    scale was applied, so the untrained rows came out unscaled and the logits moved by 0.2 at init."""
    model = tiny_biogpt()
    base = _logits(model, token_ids)
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5, 90]))
    assert (_logits(model, token_ids) - base).abs().max() <= 1e-6


def test_untrained_rows_leave_the_base_unchanged(token_ids):
    model = tied_llama()
    base = _logits(model, token_ids)
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=LLAMA, trainable_token_indices=[3, 5, 90]))
    assert torch.equal(_logits(model, token_ids), base)  # LoRA's B = 0, rows = base rows


@pytest.mark.parametrize("factory", [tiny_llama, tied_llama], ids=["untied", "tied"])
def test_training_moves_only_the_chosen_rows(factory, token_ids):
    model = factory()
    before = model.model.embed_tokens.weight.detach().clone()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=LLAMA, trainable_token_indices=[3, 5]))
    params = adapter_parameters(model, "default", trainable_only=True)
    rows = next(p for n, p in params.items() if "trainable_tokens_delta" in n)
    start = rows.detach().clone()
    opt = torch.optim.SGD(params.values(), lr=0.5)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=token_ids, labels=token_ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert (rows.detach() - start).abs().amin(dim=1).gt(0).any()  # the trained rows moved
    assert torch.equal(model.model.embed_tokens.base_layer.weight, before)  # the base embedding did not
    model.eval()
    y = _logits(model, token_ids)
    plain = lk.merge_and_unload(model)
    # merging writes the rows (PEFT's merge, layer.py line 199); every other row is the base's
    merged = plain.model.embed_tokens.weight
    assert torch.equal(merged[[3, 5]], rows.detach())
    keep = [i for i in range(96) if i not in (3, 5)]
    assert torch.equal(merged[keep], before[keep])
    assert (_logits(plain, token_ids) - y).abs().max() <= 1e-5
    if factory is tied_llama:  # the tie is kept, as PEFT's merge writes the shared weight
        assert plain.lm_head.weight is plain.model.embed_tokens.weight and plain.config.tie_word_embeddings


def test_merge_unmerge_restores_the_base_exactly(token_ids):
    model = tied_llama()
    shared = model.lm_head.weight
    before = shared.detach().clone()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=LLAMA, init_lora_weights=False,
                                        trainable_token_indices=[3, 5, 90]))
    _perturb([p for n, p in model.named_parameters() if "trainable_tokens_delta" in n], 2)
    y = _logits(model, token_ids)
    lk.merge_adapter(model)  # no "tied weights" warning: the tie stays
    assert (_logits(model, token_ids) - y).abs().max() <= 1e-5
    assert model.lm_head.base_layer.weight is shared
    lk.unmerge_adapter(model)
    assert torch.equal(shared, before) and model.model.embed_tokens.base_layer.weight is shared  # rows put back
    assert (_logits(model, token_ids) - y).abs().max() <= 1e-5  # (LoRA's layers unmerge arithmetically)


def test_peft_merge_and_unload_matches(token_ids, tmp_path):
    """Both libraries' merged models hold the same weights (PEFT's merge: layer.py line 199)."""
    peft_model = get_peft_model(tied_llama(), PeftLoraConfig(r=4, target_modules=LLAMA, init_lora_weights=False,
                                                             trainable_token_indices=[3, 5, 90]))
    _perturb([p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n], 3)
    peft_model.save_pretrained(tmp_path)
    reference = peft_model.merge_and_unload()
    model = tied_llama()
    lk.load_adapter(model, tmp_path)
    plain = lk.merge_and_unload(model)
    ours, theirs = plain.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0)
    assert torch.equal(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])


def test_cli_flag_trains_token_rows(tmp_path):
    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", "reverse", "--steps", "2", "--batch-size", "2", "--train-examples", "4",
                 "--eval-examples", "2", "--r", "2", "--trainable-token-indices", "[3, 5]", "--output", str(out),
                 "--quiet"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == [3, 5]
    keys = [k for k in load_file(out / "adapter" / "adapter_model.safetensors") if "trainable_tokens_delta" in k]
    assert len(keys) == 1 and keys[0].endswith("embed_tokens.token_adapter.trainable_tokens_delta")


@pytest.mark.parametrize("value,message", [
    ("[3, 3]", "--trainable-token-indices: index 3 appears twice"),
    ('{"embed_tokens": [3, 99999]}', "--trainable-token-indices: index 99999 is out of range for 'model.embed_tokens' "
                                     "(vocabulary size 4096"),
    # the JSON's own types are checked, as LoraConfig checks them (not read as command-line words: 3.0 -> 3)
    ("[3.0]", "--trainable-token-indices must be list[int] | dict[str, list[int]] | None, got [3.0]"),
    ('["3"]', "--trainable-token-indices must be list[int]"),
    ("[true]", "--trainable-token-indices must be list[int]"),
    ("[[3]]", "--trainable-token-indices must be list[int]"),
    ("{}", "--trainable-token-indices is empty"),
])
def test_cli_flag_errors_name_the_flag(value, message, tmp_path, capsys):
    from lorakit.cli import main

    assert main(["train", "--data", "reverse", "--steps", "1", "--trainable-token-indices", value,
                 "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("indices", [{"lm_head": [5, 9]}, {"embed_tokens": [3, 5], "lm_head": [5, 9]}],
                         ids=["head-alone", "different-indices"])
def test_tied_twins_with_rows_of_their_own_merge_into_their_own_copies(indices, token_ids):
    model = tied_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=LLAMA, trainable_token_indices=indices))
    _perturb([p for n, p in model.named_parameters() if "trainable_tokens_delta" in n], 2)
    expected = _logits(model, token_ids)
    if "embed_tokens" in indices:
        embedding[[3, 5]] = model.model.embed_tokens.adapters["default"].values.detach()
    with pytest.warns(UserWarning, match="merging unties them"):
        plain = lk.merge_and_unload(model)
    assert (_logits(plain, token_ids) - expected).abs().max() <= 1e-5
    assert torch.equal(plain.model.embed_tokens.weight, embedding)  # rows 5, 9 of the head never reach the input embedding
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight and not plain.config.tie_word_embeddings


@pytest.mark.parametrize("indices,message", [
    ([3, 5, 3], "index 3 appears twice"),
    ({"embed_tokens": [1, 1]}, r"\['embed_tokens'\]: index 1 appears twice"),
    ([-1], "index -1 is negative"),
    ([], "is empty"),
    ({}, "is empty"),
])
def test_bad_indices_without_a_model(indices, message):
    with pytest.raises(ConfigError, match=message):
        lk.LoraConfig(trainable_token_indices=indices)


def test_index_outside_the_vocabulary_names_module_and_size():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"index 96 is out of range for 'model.embed_tokens' \(vocabulary size 96"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=LLAMA, trainable_token_indices=[3, 96]))
    assert not hasattr(model, "lorakit") or not lk.adapter_names(model)  # nothing attached


def test_dict_key_that_is_not_an_embedding():
    with pytest.raises(TargetError, match=r"'q_proj' names 'model.layers.0.self_attn.q_proj' \(Linear\), which is "
                                          r"not an embedding.*Embeddings of this model: model.embed_tokens"):
        lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["v_proj"], trainable_token_indices={"q_proj": [1]}))


def test_dict_key_matching_nothing_lists_near_matches():
    with pytest.raises(TargetError, match="'embed_token' matches no module.*Did you mean: embed_tokens"):
        lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=LLAMA, trainable_token_indices={"embed_token": [1]}))


def test_module_both_lora_target_and_token_rows_is_refused():
    with pytest.raises(TargetError, match="'lm_head' is in target_modules.*tied twin of 'model.embed_tokens'"):
        lk.add_adapter(tied_llama(), lk.LoraConfig(target_modules=["q_proj", "lm_head"], trainable_token_indices=[1]))


def test_banks_and_adapter_merges_refuse_token_rows(tmp_path):
    """Neither a serving bank (per-row low-rank factors) nor merge_adapters (low-rank combinations) can hold a row
    replacement: both say so instead of dropping the rows (the store serves such an adapter attached:
    tests/serving/test_serving_mixtures.py)."""
    from lorakit.compose.merge import merge_adapters
    from lorakit.core.errors import AdapterLoadError
    from lorakit.serving import load_adapters

    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=LLAMA, trainable_token_indices=[3, 5]), "tokens")
    lk.save_adapter(model, tmp_path / "tokens", "tokens")
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=LLAMA), "plain")
    with pytest.raises(AdapterLoadError, match="trainable_token_indices .* cannot be banked"):
        load_adapters(tiny_llama(), {"tokens": tmp_path / "tokens"})
    with pytest.raises(ConfigError, match="'tokens' trains embedding rows"):
        merge_adapters(["tokens", "plain"], [0.5, 0.5], "linear", model=model)


def test_peft_file_of_a_resized_vocabulary(token_ids, tmp_path):
    """New special tokens: resize, then train their rows. PEFT then also saves the resized embedding
    (``...embed_tokens.token_adapter.base_layer.weight``) and head (peft/utils/save_and_load.py line 327); they load
    when equal to the model's (its resized copy) and are refused, naming the tensor, otherwise."""
    import copy

    from lorakit.core.errors import AdapterLoadError

    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)
    from transformers import AutoModelForCausalLM

    resized = AutoModelForCausalLM.from_pretrained(folder).eval()
    resized.resize_token_embeddings(100)
    mine = copy.deepcopy(resized)
    peft_model = get_peft_model(resized, PeftLoraConfig(r=4, target_modules=LLAMA, init_lora_weights=False,
                                                        trainable_token_indices=[96, 97, 98, 99]))
    _perturb([p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n], 4)
    ids = token_ids.clone()
    ids[:, 1] = torch.tensor([96, 97, 99])
    expected = _logits(peft_model.eval(), ids)
    with pytest.warns(UserWarning, match="resized"):
        peft_model.save_pretrained(tmp_path / "adapter")
    assert "base_model.model.model.embed_tokens.token_adapter.base_layer.weight" in load_file(
        tmp_path / "adapter" / "adapter_model.safetensors")
    lk.load_adapter(mine, tmp_path / "adapter")
    assert (_logits(mine, ids) - expected).abs().max() <= 1e-5

    other = AutoModelForCausalLM.from_pretrained(folder)
    other.resize_token_embeddings(100)  # new rows drawn again: not the ones the adapter was trained with
    with pytest.raises(AdapterLoadError, match="base-model weight that differs"):
        lk.load_adapter(other, tmp_path / "adapter")


def test_per_row_adapters_and_merge_rules(token_ids):
    """Per-row routing gives each row its own adapter's logits (rows replaced for the token rows' adapter only);
    a layer refuses to merge a row replacement together with another adapter's addition (no order-free sum)."""
    from lorakit.core.errors import AdapterError

    model = tied_llama()
    base = _logits(model, token_ids)
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=LLAMA, trainable_token_indices=[3, 5, 90]), "tokens")
    with pytest.warns(UserWarning, match="shares its weight"):  # a LoRA on a tied embedding: untied when merged
        lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False), "emb")
    _perturb([p for n, p in model.named_parameters() if "trainable_tokens_delta" in n], 5)
    alone = {}
    for name in ("tokens", "emb"):
        lk.set_adapter(model, name)
        alone[name] = _logits(model, token_ids)
    with lk.routing(adapter_names=["tokens", None, "emb"]):
        mixed = _logits(model, token_ids)
    assert (mixed[0] - alone["tokens"][0]).abs().max() <= 1e-5 and (alone["tokens"][0] - base[0]).abs().max() > 1e-2
    assert torch.equal(mixed[1], base[1])
    assert (mixed[2] - alone["emb"][2]).abs().max() <= 1e-5
    with pytest.raises(AdapterError, match="replaces slices of this layer's weight"):
        lk.merge_adapter(model, ["tokens", "emb"])
    assert merged_adapters(model) == []  # all or nothing


def test_tied_head_paths_agree_with_peft(tmp_path):
    """A tied head computes its k columns after the base output for few rows, and ``F.linear(x, W')`` on a copy of
    the weight (PEFT's forward, layer.py line 267) for more rows than its input size (64 > 32 here): both give
    PEFT's logits; the per-row path (routing) takes the first way on the same long batch."""
    g = torch.Generator().manual_seed(3)
    long = torch.randint(0, 96, (4, 16), generator=g)
    long[:, 0] = torch.tensor([3, 5, 90, 3])
    peft_model = get_peft_model(tied_llama(), PeftLoraConfig(r=4, target_modules=LLAMA, init_lora_weights=False,
                                                             trainable_token_indices=[3, 5, 90]))
    _perturb([p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n], 6)
    peft_model.eval().save_pretrained(tmp_path)
    model = tied_llama()
    lk.load_adapter(model, tmp_path)
    for ids in (long, long[:1, :8]):
        expected = _logits(peft_model, ids)
        assert (_logits(model, ids) - expected).abs().max() <= 1e-5
    with lk.routing(adapter_names=["default"] * 4):
        assert (_logits(model, long) - _logits(peft_model, long)).abs().max() <= 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq", "eva", "lora_ga", "corda"])
def test_inits_set_the_lora_factors_and_leave_the_token_rows(init, token_ids, tmp_path):
    """An init (``init_lora_weights``) sets LoRA's factors; the token rows beside them keep PEFT's start, the base
    rows (update_layer line 145), and the base embedding is not changed, on a tied model whose lm_head follows the
    rows. An init that is redone on load (pissa, olora, loftq) or rewrites the config (eva) writes a file that loads
    with the same logits. (Was: every such init refused the tied head's rows as "TokenRows at 'lm_head' has no
    trainable B A factors", LoftQ refused the embedding as a target on any model, and EVA wrote the embedding's
    path into target_modules, so its file did not load.)"""
    if init == "loftq":
        pytest.importorskip("bitsandbytes")
    from lorakit.core.inits import find_init
    from lorakit.core.model import adapter_layers, adapter_state

    indices = [3, 5, 90]
    model = tied_llama()
    rows = model.model.embed_tokens.weight[indices].detach().clone()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=indices,
                                        init_lora_weights=init), "a")
    if find_init(init).needs_data:
        g = torch.Generator().manual_seed(1)
        batches = [{"input_ids": (ids := torch.randint(0, 96, (4, 12), generator=g)),
                    "attention_mask": torch.ones_like(ids), "labels": ids} for _ in range(4)]
        lk.init_adapter(model, "a", batches)
    layers = dict(adapter_layers(model))
    assert torch.equal(layers["model.embed_tokens"].adapters["a"].values, rows)
    assert torch.equal(model.model.embed_tokens.weight[indices], rows)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any("embed_tokens" in t or "lm_head" in t for t in adapter_state(model).configs["a"].target_modules)
    if init in ("lora_ga", "corda"):  # (their files are for the base they changed: loading them is refused)
        return
    _perturb(adapter_parameters(model, "a", trainable_only=True).values(), seed=3)
    lk.save_adapter(model, tmp_path / "a", "a")
    loaded = tied_llama()
    lk.load_adapter(loaded, tmp_path / "a", "a")
    lk.set_adapter(loaded, "a")
    torch.testing.assert_close(_logits(loaded, token_ids), _logits(model, token_ids), rtol=0, atol=1e-6)


def test_overlapping_token_rows_cannot_be_active_together(token_ids):
    """PEFT's TrainableTokens refuses adapters with overlapping indices active together (layer.py 0.21.2,
    ``_check_overlapping_tokens`` line 162, from ``forward_adapters`` line 240) and replaces disjoint ones each in
    its rows. lorakit refuses at ``set_adapter`` (nothing changes), naming both adapters and the shared indices; the
    disjoint pair gives PEFT's logits. (Was: both active, a shared row came out as v1 + v2 − E.)"""
    from peft import TrainableTokensConfig

    from lorakit.core.errors import AdapterError

    spec = {"a": [3, 5], "b": [5, 9, 90], "c": [7, 1]}
    peft_model = get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=spec["a"]), adapter_name="a")
    for name in ("b", "c"):
        peft_model.add_adapter(name, TrainableTokensConfig(token_indices=spec[name]))
    _perturb([p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n], 6)
    peft_model.base_model.set_adapter(["a", "c"])
    expected = _logits(peft_model.eval(), token_ids)
    peft_model.base_model.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match="Token indices of adapter b are already defined"):
        _logits(peft_model, token_ids)

    model = tiny_llama()
    base = _logits(model, token_ids)
    for name, indices in spec.items():  # (LoRA's B = 0: only the rows act)
        lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices), name)
        layer = model.model.embed_tokens
        with torch.no_grad():
            layer.adapters[name].values.copy_(
                peft_model.base_model.model.model.embed_tokens.trainable_tokens_delta[name])
    lk.set_adapter(model, ["a", "c"])
    got = _logits(model, token_ids)
    assert (expected - base).abs().max() > 1e-2 and (got - expected).abs().max() <= 1e-5
    with pytest.raises(AdapterError, match=r"adapters 'a' and 'b' cannot be active together at "
                                           r"'model.embed_tokens': they both replace token rows \[5\]"):
        lk.set_adapter(model, ["a", "b"])
    assert layer.active == ["a", "c"] and torch.equal(_logits(model, token_ids), got)  # nothing changed
    lk.set_adapter(model, ["c", "b"])  # disjoint: allowed


def test_vocabulary_resized_under_the_rows(token_ids):
    """Rows find their token by the indices, not by a table sized to the vocabulary when attached: after the wrapped
    embedding is resized (transformers' own resizing, ``_get_resized_embeddings``), new token ids look up the new
    rows and the trained rows stay replaced, as PEFT's ``W.index_copy`` on the live weight (layer.py line 225).
    ``model.resize_token_embeddings`` itself refuses the wrapped embedding (transformers' TypeError, nothing
    changed), in PEFT as here: resize before adding the adapter, or the base layer as below.
    (Was: an IndexError inside the forward for an id at or above the old vocabulary size.)"""
    import copy

    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=LLAMA, trainable_token_indices=[3, 5, 90]))
    _perturb([p for n, p in model.named_parameters() if "trainable_tokens_delta" in n], 7)
    with pytest.raises(TypeError, match="AdapterLayer"):
        model.resize_token_embeddings(100)
    layer = model.model.embed_tokens
    assert layer.base_layer.num_embeddings == 96
    torch.manual_seed(3)
    layer.base_layer = model._get_resized_embeddings(layer.base_layer, 100, mean_resizing=False)
    ids = token_ids.clone()
    ids[:, 1] = torch.tensor([96, 97, 99])

    reference = tiny_llama()  # the same base with the resized embedding and the rows written in (PEFT's W')
    reference.model.embed_tokens = copy.deepcopy(layer.base_layer)
    with torch.no_grad():
        reference.model.embed_tokens.weight[[3, 5, 90]] = layer.adapters["default"].values
    got = _logits(model, ids)
    assert (got - _logits(reference, ids)).abs().max() <= 1e-5


class _MaxNormModel(torch.nn.Module):
    """An embedding that renormalises the rows it looks up (``max_norm``), then a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 8, max_norm=1.0)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(self.emb(x))


def test_max_norm_embedding_renorms_the_rows_as_peft(tmp_path):
    """PEFT looks the rows up with ``F.embedding(x, W', max_norm=...)`` (layer.py line 251): a trained row longer than
    ``max_norm`` is scaled to it (in place, under no_grad, so the gradient reaches the row unscaled). lorakit gives
    PEFT's outputs and row gradients. (Was: the rows went out unscaled.)"""
    ids = torch.tensor([[3, 5, 1, 7, 3], [2, 5, 0, 9, 4]])
    peft_model = get_peft_model(_MaxNormModel(), PeftLoraConfig(r=2, target_modules=["lin"], init_lora_weights=False,
                                                                trainable_token_indices={"emb": [3, 5, 9]}))
    rows = next(p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n)
    with torch.no_grad():
        rows.mul_(torch.tensor([[5.0], [0.5], [3.0]]) / rows.norm(dim=1, keepdim=True))  # norms 5, 0.5, 3
    peft_model.save_pretrained(tmp_path)
    expected = peft_model(ids)
    expected.square().sum().backward()

    model = lk.load_adapter(_MaxNormModel(), tmp_path, is_trainable=True)
    got = model(ids)
    got.square().sum().backward()
    ours = model.emb.adapters["default"].token_adapter.trainable_tokens_delta
    assert (got - expected).abs().max() <= 1e-5
    torch.testing.assert_close(ours.grad, rows.grad, rtol=1e-5, atol=1e-6)
    unscaled = _MaxNormModel()  # the rows must matter: without the renorm the outputs differ
    with torch.no_grad():
        unscaled.emb.max_norm = None
        unscaled.emb.weight[[3, 5, 9]] = rows
    assert (unscaled(ids) - expected).abs().max() > 1e-2


def test_padding_row_gets_no_gradient_as_in_peft(tmp_path):
    """PEFT looks the rows up with ``F.embedding(x, W', padding_idx=...)`` (layer.py line 251), so a trained row at
    the embedding's ``padding_idx`` gets no gradient (the other rows do); the same here. (Was: it trained.)"""
    def padded_llama():
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, pad_token_id=0)
        return LlamaForCausalLM(cfg)

    ids = torch.tensor([[0, 3, 5, 0, 7, 3], [1, 0, 3, 9, 5, 2]])
    peft_model = get_peft_model(padded_llama(), PeftLoraConfig(r=4, target_modules=LLAMA, init_lora_weights=False,
                                                               trainable_token_indices=[0, 3, 5]))
    assert peft_model.base_model.model.model.embed_tokens.token_adapter.base_layer.padding_idx == 0
    peft_model.save_pretrained(tmp_path)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    theirs = next(p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n).grad
    model = lk.load_adapter(padded_llama(), tmp_path, is_trainable=True)
    model(input_ids=ids, labels=ids).loss.backward()
    ours = model.model.embed_tokens.adapters["default"].values.grad
    assert torch.equal(theirs[0], torch.zeros(32)) and theirs[1:].abs().amin(dim=1).gt(0).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_overlapping_token_rows_cannot_meet_on_a_row_of_a_per_row_batch(token_ids):
    """The per-row path refuses what ``set_adapter`` refuses: two token-row adapters with overlapping indices acting
    on one row (a row's ``adapter_names`` adapter plus ``adapter_weights``, or two weighted adapters), as PEFT refuses
    overlapping active adapters (peft/tuners/trainable_tokens/layer.py 0.21.2, ``_check_overlapping_tokens`` line
    162). One adapter per row (``adapter_names`` alone, PEFT's mixed batch ``_forward_wrapped_mixed_batch`` in
    peft/utils/other.py) and disjoint rows stay allowed. (Was: the shared row came out as v1 + v2 − E.)"""
    from lorakit.core.errors import AdapterError

    model = tiny_llama()
    for name, indices in {"a": [3, 5], "b": [5, 9, 90], "c": [7, 1]}.items():
        lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices), name)
    _perturb([p for n, p in model.named_parameters() if "trainable_tokens_delta" in n], 8)
    lk.set_adapter(model, ["a", "c"])
    both = _logits(model, token_ids)
    alone = {}
    for name in ("a", "b"):
        lk.set_adapter(model, name)
        alone[name] = _logits(model, token_ids)
    one, zero = torch.ones(3), torch.zeros(3)
    with pytest.raises(AdapterError, match=r"adapters 'a' and 'b' cannot act together on batch row 1: they both "
                                           r"replace token rows \[5\]"):
        with lk.routing(adapter_weights={"a": torch.tensor([1.0, 1.0, 0.0]), "b": torch.tensor([0.0, 0.5, 1.0])}):
            _logits(model, token_ids)
    with pytest.raises(AdapterError, match=r"adapters 'b' and 'a' cannot act together on batch row 0"):
        with lk.routing(adapter_names=["b", "a", None], adapter_weights={"a": torch.tensor([1.0, 0.0, 0.0])}):
            _logits(model, token_ids)
    with lk.routing(adapter_names=["a", "b", "b"]):  # one adapter per row: PEFT's mixed batch
        mixed = _logits(model, token_ids)
    assert (mixed[0] - alone["a"][0]).abs().max() <= 1e-5 and (mixed[1:] - alone["b"][1:]).abs().max() <= 1e-5
    with lk.routing(adapter_weights={"a": torch.tensor([1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 1.0, 1.0])}):
        weighted = _logits(model, token_ids)  # overlapping adapters on different rows
    assert (weighted - mixed).abs().max() <= 1e-5
    with lk.routing(adapter_weights={"a": one, "c": one, "b": zero}):  # disjoint rows add up, as set_adapter
        assert (_logits(model, token_ids) - both).abs().max() <= 1e-5


class _EmbeddingModel(torch.nn.Module):
    """An embedding with nn.Embedding's options (``scale_grad_by_freq``, ``sparse``), then a linear layer."""

    def __init__(self, **options):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 8, **options)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(self.emb(x))


def test_scale_grad_by_freq_scales_the_row_gradients_as_peft(tmp_path):
    """PEFT looks the rows up with ``F.embedding(x, W', scale_grad_by_freq=...)`` (layer.py 0.21.2 line 257): a
    trained row's gradient is divided by how often its token occurs in the batch (token 3 three times, 5 twice
    here). lorakit gives PEFT's outputs and row gradients. (Was: the summed, unscaled gradient.)"""
    ids = torch.tensor([[3, 5, 1, 3, 7], [2, 5, 0, 9, 3]])
    peft_model = get_peft_model(_EmbeddingModel(scale_grad_by_freq=True),
                                PeftLoraConfig(r=2, target_modules=["lin"], init_lora_weights=False,
                                               trainable_token_indices={"emb": [3, 5, 9]}))
    rows = next(p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n)
    _perturb([rows], 4)
    peft_model.save_pretrained(tmp_path)
    expected = peft_model(ids)
    expected.square().sum().backward()

    model = lk.load_adapter(_EmbeddingModel(scale_grad_by_freq=True), tmp_path, is_trainable=True)
    got = model(ids)
    got.square().sum().backward()
    ours = model.emb.adapters["default"].values
    assert (got - expected).abs().max() <= 1e-5
    torch.testing.assert_close(ours.grad, rows.grad, rtol=1e-5, atol=1e-6)
    unscaled = lk.load_adapter(_EmbeddingModel(), tmp_path, is_trainable=True)  # the option must matter
    unscaled(ids).square().sum().backward()
    assert (unscaled.emb.adapters["default"].values.grad[0] - 3 * rows.grad[0]).abs().max() <= 1e-5


def test_sparse_embedding_gives_the_rows_a_dense_gradient(tmp_path):
    """``sparse=True`` makes an embedding's *weight* gradient sparse (torch.nn.Embedding); under the adapter that
    weight is frozen and the k trained rows are a (k, dim) parameter of their own. PEFT computes the outputs with
    ``F.embedding(x, W', sparse=True)`` (layer.py line 258), and lorakit gives the same outputs; PEFT's backward then
    fails (its sparse gradient of ``W'`` cannot pass ``index_copy``), lorakit's rows get the dense form of the
    gradient a sparse nn.Embedding gives those rows."""
    ids = torch.tensor([[3, 5, 1, 3, 7], [2, 5, 0, 9, 3]])
    peft_model = get_peft_model(_EmbeddingModel(sparse=True),  # (LoRA's B = 0: only the rows act)
                                PeftLoraConfig(r=2, target_modules=["lin"], trainable_token_indices={"emb": [3, 5, 9]}))
    rows = next(p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n)
    _perturb([rows], 4)
    peft_model.save_pretrained(tmp_path)
    expected = peft_model(ids)
    with pytest.raises(RuntimeError, match="Sparse"):
        expected.square().sum().backward()

    model = lk.load_adapter(_EmbeddingModel(sparse=True), tmp_path, is_trainable=True)
    got = model(ids)
    got.square().sum().backward()
    assert (got - expected).abs().max() <= 1e-5
    reference = _EmbeddingModel(sparse=True)  # a plain sparse embedding holding the trained rows, fully trainable
    with torch.no_grad():
        reference.emb.weight[[3, 5, 9]] = rows
    reference(ids).square().sum().backward()
    assert reference.emb.weight.grad.is_sparse
    torch.testing.assert_close(model.emb.adapters["default"].values.grad,
                               reference.emb.weight.grad.to_dense()[[3, 5, 9]], rtol=1e-5, atol=1e-6)


def test_a_named_adapter_that_is_also_weighted_elsewhere_still_conflicts_on_its_named_row(token_ids):
    """A row's ``adapter_names`` adapter acts on that row whatever its own ``adapter_weights`` entry says (the forward
    adds the weighted term on top of the named one): with ``a`` named on row 0 and weighted 0 there, ``b`` weighted
    on row 0 meets ``a`` on row 0, the overlap ``set_adapter`` refuses (peft/tuners/trainable_tokens/layer.py 0.21.2,
    ``_check_overlapping_tokens`` line 162). (Was: ``a``'s rows were read from its weights only, so the shared token
    row came out as v_a + v_b − E without an error.)"""
    from lorakit.core.errors import AdapterError

    model = tiny_llama()
    for name, indices in {"a": [3, 5], "b": [5, 9, 90]}.items():
        lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices), name)
    _perturb([p for n, p in model.named_parameters() if "trainable_tokens_delta" in n], 8)
    with pytest.raises(AdapterError, match=r"adapters 'a' and 'b' cannot act together on batch row 0"):
        with lk.routing(adapter_names=["a", None, None],
                        adapter_weights={"a": torch.tensor([0.0, 1.0, 0.0]), "b": torch.tensor([1.0, 0.0, 0.0])}):
            _logits(model, token_ids)
    with pytest.raises(AdapterError, match=r"adapters 'b' and 'a' cannot act together on batch row 2"):
        with lk.routing(adapter_names=[None, None, "b"],
                        adapter_weights={"b": torch.tensor([1.0, 0.0, 0.0]), "a": torch.tensor([0.0, 0.0, 1.0])}):
            _logits(model, token_ids)
