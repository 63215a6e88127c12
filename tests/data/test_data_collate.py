"""Tokenization and collation: prompt and padding masked with -100, EOS appended, task ids."""

from __future__ import annotations

import pytest
import torch

from lorakit.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    Example,
    TokenizedDataset,
    encode_prompt,
    get_task,
    tokenize_example,
)


def test_prompt_masked_eos_appended(tokenizer) -> None:
    ex = Example("reverse: a b c =>", " c b a", "reverse")
    item = tokenize_example(ex, tokenizer)
    prompt = encode_prompt(tokenizer, ex.prompt)
    completion = tokenizer.encode(ex.completion, add_special_tokens=False)
    assert prompt[0] == tokenizer.bos_token_id
    assert item["input_ids"] == prompt + completion + [tokenizer.eos_token_id]
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [tokenizer.eos_token_id]
    assert item["attention_mask"] == [1] * len(item["input_ids"])
    assert tokenizer.decode(item["input_ids"], skip_special_tokens=True) == ex.prompt + ex.completion


def test_text_example_supervises_everything_but_bos(tokenizer) -> None:
    item = tokenize_example(Example("", "plain text line"), tokenizer)
    assert item["labels"][0] == IGNORE_INDEX and item["input_ids"][0] == tokenizer.bos_token_id
    assert IGNORE_INDEX not in item["labels"][1:]


def test_no_double_bos_or_eos(tokenizer) -> None:
    item = tokenize_example(Example("<s>user: hi", " yo</s>"), tokenizer)
    assert item["input_ids"].count(tokenizer.bos_token_id) == 1
    assert item["input_ids"].count(tokenizer.eos_token_id) == 1


def test_truncation_keeps_the_completion(tokenizer) -> None:
    ex = Example("lookup: a=1 b=2 c=3 d=4 e=5 ; c =>", " 3")
    full = tokenize_example(ex, tokenizer)
    cut = tokenize_example(ex, tokenizer, max_length=6)
    assert len(cut["input_ids"]) == 6
    assert cut["input_ids"][0] == tokenizer.bos_token_id
    assert cut["input_ids"][-3:] == full["input_ids"][-3:]
    assert cut["labels"][-3:] == full["labels"][-3:]
    text = tokenize_example(Example("", "plain text line " * 4), tokenizer, max_length=5)
    assert len(text["input_ids"]) == 5 and text["labels"][1:] == text["input_ids"][1:]


def test_collator_right_pads_and_masks_padding(tokenizer) -> None:
    examples = get_task("add").generate("train", 2, 0) + get_task("lookup").generate("train", 2, 0)
    dataset = TokenizedDataset(examples, tokenizer)
    assert dataset.task_to_id == {"add": 0, "lookup": 1}
    batch = CausalLMCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))])
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["task_ids"].tolist() == [0, 0, 1, 1]
    for row, n in enumerate(lengths):
        item = dataset[row]
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"]
        assert batch["labels"][row, :n].tolist() == item["labels"]
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    for key in ("input_ids", "attention_mask", "labels", "task_ids"):
        assert batch[key].dtype == torch.long


def test_dataloader_with_fixed_task_mapping(tokenizer) -> None:
    examples = get_task("sort").generate("train", 3, 0)
    dataset = TokenizedDataset(examples, tokenizer, task_to_id={"reverse": 0, "sort": 1})
    collator = CausalLMCollator.from_tokenizer(tokenizer, pad_to_multiple_of=8)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collator)))
    assert batch["task_ids"].tolist() == [1, 1, 1]
    assert batch["input_ids"].shape[1] % 8 == 0


def test_untasked_examples_have_no_task_ids(tokenizer) -> None:
    dataset = TokenizedDataset([Example("a", " b"), Example("c", " d")], tokenizer)
    assert dataset.task_to_id is None
    assert "task_ids" not in CausalLMCollator.from_tokenizer(tokenizer)([dataset[0], dataset[1]])


def test_mixed_task_keys_rejected(tokenizer) -> None:
    with pytest.raises(ValueError, match="task key"):
        TokenizedDataset([Example("a", " b", "x"), Example("c", " d")], tokenizer)


def test_routing_vectors_stack_per_batch(tokenizer) -> None:
    collate = CausalLMCollator.from_tokenizer(tokenizer)
    rows = [Example("a", " b", routing={"u": [1, 2]}), Example("aa", " bb", routing={"u": [3, 4]})]
    batch = collate(list(TokenizedDataset(rows, tokenizer)))
    assert torch.equal(batch["routing"]["u"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert "routing" not in collate(list(TokenizedDataset([Example("a", " b")], tokenizer)))
    with pytest.raises(ValueError, match="'u' is missing from 1 of 2"):
        collate(list(TokenizedDataset([rows[0], Example("a", " b")], tokenizer)))
    with pytest.raises(ValueError, match=r"'u' has different sizes \[1, 2\]"):
        collate(list(TokenizedDataset([rows[0], Example("a", " b", routing={"u": 1})], tokenizer)))
