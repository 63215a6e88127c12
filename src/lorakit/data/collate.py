"""Examples -> causal-LM training items and right-padded batches.

Prompt and completion are tokenized separately and concatenated, so the prompt tokens seen in
training are exactly the ones `evaluate_examples` feeds to `generate` (`encode_prompt` is shared).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from lorakit.core.config import MIN_LENGTH
from lorakit.data.example import Example

IGNORE_INDEX = -100


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids, starting with BOS when the tokenizer has one.

    Special tokens are added by hand rather than by `add_special_tokens=True` because tokenizers
    disagree on what that adds (some append EOS too), and a chat template may already have written
    the BOS text into the prompt.
    """
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def encode_completion(tokenizer: Any, completion: str) -> list[int]:
    """Completion token ids ending with EOS, unless the text already holds EOS (chat templates
    close the assistant turn themselves)."""
    ids = list(tokenizer.encode(completion, add_special_tokens=False))
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids:
        ids.append(eos)
    return ids


def tokenize_example(example: Example, tokenizer: Any, max_length: int | None = None) -> dict[str, list[int]]:
    """`input_ids`, `attention_mask` and `labels` (-100 on the prompt) for one example.

    When too long, prompt tokens after BOS are dropped from the left first, so the supervised
    tokens survive; only a completion that alone exceeds `max_length` is cut on the right.
    """
    prompt_ids = encode_prompt(tokenizer, example.prompt)
    completion_ids = encode_completion(tokenizer, example.completion)
    if max_length is not None:
        if max_length < MIN_LENGTH:  # (a one-token item has nothing to predict)
            raise ValueError(f"max_length must be >= {MIN_LENGTH}, got {max_length}")
        excess = len(prompt_ids) + len(completion_ids) - max_length
        if excess > 0:
            keep_bos = int(bool(prompt_ids) and prompt_ids[0] == tokenizer.bos_token_id)
            droppable = len(prompt_ids) - keep_bos
            drop = min(excess, droppable)
            prompt_ids = prompt_ids[:keep_bos] + prompt_ids[keep_bos + drop:]
            completion_ids = completion_ids[: max_length - len(prompt_ids)]
    input_ids = prompt_ids + completion_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }


def build_task_index(examples: Sequence[Example]) -> dict[str, int]:
    """Task name -> integer id, sorted by name so the mapping does not depend on example order."""
    return {name: i for i, name in enumerate(sorted({ex.task for ex in examples if ex.task is not None}))}


class TokenizedDataset(Dataset):
    """Examples tokenized on first access and cached; items are dicts of int lists.

    Lazy so that each process of a distributed run (and a short run over a large file) tokenizes only the
    examples it reads: under ``torchrun`` rank r reads its rows of the seeded global stream, about 1/N of them.
    Items carry `task_id` when the examples have task keys (or a `task_to_id` mapping is given); then every
    example needs a key that the mapping knows — checked here, up front, for all examples (no tokenization).
    `tokenize(example, tokenizer, max_length)` makes an item (None: `tokenize_example`, the causal-LM item;
    `data.classification` gives the classifier's).

    Raises ValueError for an example whose task key the mapping lacks.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        max_length: int | None = None,
        task_to_id: dict[str, int] | None = None,
        tokenize: Callable[[Example, Any, int | None], dict[str, Any]] | None = None,
    ) -> None:
        self.examples = list(examples)
        self.tokenizer, self.max_length, self.tokenize = tokenizer, max_length, tokenize
        if task_to_id is None and any(ex.task is not None for ex in self.examples):
            task_to_id = build_task_index(self.examples)
        self.task_to_id = task_to_id
        if task_to_id is not None:
            for i, ex in enumerate(self.examples):
                if ex.task not in task_to_id:
                    raise ValueError(
                        f"example {i} has task {ex.task!r}, which is not in the task mapping "
                        f"{sorted(task_to_id)}; give every example a task key, or none of them"
                    )
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokenized(self) -> int:
        """How many examples have been tokenized so far (each at most once)."""
        return len(self._cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self.examples))[index]  # IndexError for out-of-range, negative indices allowed
        item = self._cache.get(index)
        if item is None:
            ex = self.examples[index]
            item = (self.tokenize or tokenize_example)(ex, self.tokenizer, self.max_length)
            if self.task_to_id is not None:
                item["task_id"] = self.task_to_id[ex.task]
            if ex.routing:
                item["routing"] = dict(ex.routing)
            self._cache[index] = item
        return item


@dataclass(frozen=True)
class CausalLMCollator:
    """Right-pads a list of `tokenize_example` items into tensors; labels are -100 on padding."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> CausalLMCollator:
        # Padding is masked out everywhere, so any id works; EOS is the usual stand-in.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        return cls(pad_token_id=pad, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(items), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(items), length), dtype=torch.long),
            "labels": torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
            batch["attention_mask"][row, :n] = torch.tensor(item["attention_mask"], dtype=torch.long)
            batch["labels"][row, :n] = torch.tensor(item["labels"], dtype=torch.long)
        return add_keys(batch, items)


def add_keys(batch: dict[str, Any], items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``batch`` with the items' routing keys: ``task_ids`` (batch,) when they have a ``task_id``, and
    ``routing`` {name: (batch, d)} when they have per-example vectors."""
    has_task = ["task_id" in item for item in items]
    if any(has_task):
        if not all(has_task):
            raise ValueError("some items in the batch have a task_id and some do not")
        batch["task_ids"] = torch.tensor([item["task_id"] for item in items], dtype=torch.long)
    vectors = stack_routing([item.get("routing") or {} for item in items])
    if vectors:
        batch["routing"] = vectors
    return batch


def stack_routing(rows: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, torch.Tensor]:
    """Per-example routing vectors -> {name: (batch, d) float32}; every row needs every name, at one size."""
    names = sorted({name for row in rows for name in row})
    out = {}
    for name in names:
        missing = [i for i, row in enumerate(rows) if name not in row]
        if missing:
            raise ValueError(f"routing vector {name!r} is missing from {len(missing)} of {len(rows)} examples in the "
                             f"batch (e.g. row {missing[0]}); give it to every example or to none")
        sizes = sorted({len(row[name]) for row in rows})
        if len(sizes) > 1:
            raise ValueError(f"routing vector {name!r} has different sizes {sizes} within one batch")
        out[name] = torch.tensor([list(row[name]) for row in rows], dtype=torch.float32)
    return out
