"""Fixtures for the data tests: a tiny BPE tokenizer trained here on task text (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit.data import pretraining_texts

from lk_models import tiny_bpe_tokenizer



@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    corpus = pretraining_texts(n_per_task=40) + ["user: hello\nassistant: hi there", "plain text line"]
    return tiny_bpe_tokenizer(corpus, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()
