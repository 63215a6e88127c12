"""``generate_completions`` (what ``lorakit generate`` / ``eval`` decode with) against transformers' own
``generate`` on the same base with the same LoRA merged into its weights by the real ``peft``
(``PeftModel.from_pretrained(...).merge_and_unload()``): greedy for a decoder-only Llama and an encoder-decoder T5,
and seeded sampling (Trans-LoRA's candidate sampler) on the Llama."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from lk_models import tiny_llama_for
from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.compose import translora_synthesis as tl
from lorakit.compose.translora import TransLoraConfig
from lorakit.data import Example, encode_prompt, generate_completions
from lorakit.hub import load_tokenizer

peft = pytest.importorskip("peft")

PROMPTS = ["abc =>", "reverse: hello world =>", "7 + 5 =", "x"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled")


def tiny_t5_for(tokenizer, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
                   vocab_size=len(tokenizer), decoder_start_token_id=tokenizer.pad_token_id,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T5ForConditionalGeneration(cfg).eval()


def with_adapter_and_merged(make, targets, tmp_path):
    """(base + a lorakit LoRA whose B is non-zero, the same LoRA merged into a fresh base by peft)."""
    model = make()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a visible delta: greedy tokens differ from the base's
    save_adapter(model, tmp_path / "adapter")
    merged = peft.PeftModel.from_pretrained(make(), str(tmp_path / "adapter")).merge_and_unload().eval()
    return model.eval(), merged


def reference_greedy(merged, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """transformers' greedy decoding of one unpadded prompt, cut at EOS."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)[0]
    new = out[1:] if merged.config.is_encoder_decoder else out[ids.shape[1]:]  # T5: after the decoder start token
    new = new.tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_greedy_equals_transformers_on_the_peft_merged_model(kind, tokenizer, tmp_path):
    make, targets = {"llama": (lambda: tiny_llama_for(tokenizer, pad_token_id=tokenizer.pad_token_id),
                               ["q_proj", "v_proj"]),
                     "t5": (lambda: tiny_t5_for(tokenizer), ["q", "v"])}[kind]
    model, merged = with_adapter_and_merged(make, targets, tmp_path)
    expected = [reference_greedy(merged, tokenizer, p, 10) for p in PROMPTS]
    assert all(expected)  # a random tiny model that never stops at once: the comparison has text to compare
    # batched (left padding, length-sorted) through the unmerged adapter, as `lorakit generate` decodes
    assert generate_completions(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=10) == expected


def test_seeded_sampling_equals_transformers_on_the_peft_merged_model(tokenizer, tmp_path):
    model, merged = with_adapter_and_merged(
        lambda: tiny_llama_for(tokenizer, pad_token_id=tokenizer.pad_token_id), ["q_proj", "v_proj"], tmp_path)
    seeds = [Example(f"{w} =>", f" {w[::-1]}") for w in ("abc", "hello", "lorakit")]
    config = TransLoraConfig(separator="\n", prompt_end="", max_new_tokens=12, temperature=0.9, top_p=0.9)
    ours = tl.sample_candidates(model, tokenizer, seeds, 5, config, random.Random(3))
    reference = tl.sample_candidates(merged, tokenizer, seeds, 5, config, random.Random(3))
    assert ours == reference and ours[0]


def test_an_encoder_decoder_checks_prompt_and_new_tokens_against_their_own_positions(tokenizer, tmp_path):
    """Was: prompt + new tokens checked against one limit, as for a decoder-only model, so BART (64 learned
    positions in the encoder and 64 in the decoder) was refused a 40-token prompt with 30 new tokens."""
    from transformers import BartConfig, BartForConditionalGeneration

    from lorakit.data import DataError

    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id)).eval()
    prompt = " ".join(["ab"] * 60)
    n = len(encode_prompt(tokenizer, prompt))
    assert 32 < n <= 64
    out = generate_completions(bart, tokenizer, [prompt], max_new_tokens=30)
    assert len(out) == 1
    with pytest.raises(DataError, match="exceed the decoder's 64 positions"):
        generate_completions(bart, tokenizer, [prompt], max_new_tokens=64)
    with pytest.raises(DataError, match="the encoder reads at most 64"):
        generate_completions(bart, tokenizer, [prompt * 3], max_new_tokens=4)
