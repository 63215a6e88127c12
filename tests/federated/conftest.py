"""A tiny real Llama + word-level tokenizer saved as a model folder, for federated runs (clients load it by path)."""

from __future__ import annotations

import pytest

from lk_models import tiny_llama_for, word_level_tokenizer

TASKS = "reverse,sort"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from lorakit.data import load_examples

    examples = [ex for split in ("train", "test") for ex in load_examples(TASKS, split, n=200, seed=0)]
    tokenizer = word_level_tokenizer(examples)
    model = tiny_llama_for(tokenizer, seed=0, eos_token_id=2, bos_token_id=1)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def tiny_config(tiny_model_dir):
    """Builds a FederatedConfig on the tiny model: 2 clients, 2 rounds, a few local steps."""
    from lorakit.federated import FederatedConfig

    def make(strategy: str = "fedit", **overrides) -> FederatedConfig:
        values = dict(strategy=strategy, clients=2, rounds=2, model=tiny_model_dir, data=TASKS, train_examples=16,
                      eval_examples=4, local_steps=2, batch_size=4, r=2, target_modules=["q_proj", "o_proj"],
                      fair_steps=20)
        values.update(overrides)
        return FederatedConfig(**values)

    return make
