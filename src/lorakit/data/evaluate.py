"""Greedy-generation evaluation: exact match of stripped outputs, overall and per task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorakit.core.registry import generate_kwargs_for

from lorakit.data.collate import encode_prompt
from lorakit.data.example import Example
from lorakit.data.tasks import TASKS, exact_match

UNKEYED = "default"  # per-task bucket for examples without a task key


def score_predictions(
    examples: Sequence[Example], predictions: Sequence[str], tokenizer: Any = None
) -> dict[str, Any]:
    """Score `predictions` against the examples' completions with each task's metric.

    Built-in tasks use their own metric (exact match, numeric for arithmetic); anything else uses
    exact match of stripped strings. With a tokenizer, special-token text in the reference (a chat
    template's end-of-turn marker) is removed first, since decoded predictions skip it too.
    """
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    specials = [tok for tok in getattr(tokenizer, "all_special_tokens", []) if tok]
    totals: dict[str, list[float]] = {}
    for ex, prediction in zip(examples, predictions):
        reference = ex.completion
        for tok in specials:
            reference = reference.replace(tok, "")
        task = TASKS.get(ex.task) if ex.task is not None else None
        score = task.score(prediction, reference) if task is not None else exact_match(prediction, reference)
        totals.setdefault(ex.task if ex.task is not None else UNKEYED, []).append(score)
    n = sum(len(scores) for scores in totals.values())
    return {
        "exact_match": sum(sum(scores) for scores in totals.values()) / n if n else 0.0,
        "n": n,
        "per_task": {
            name: {"exact_match": sum(scores) / len(scores), "n": len(scores)}
            for name, scores in sorted(totals.items())
        },
    }


@torch.no_grad()
def generate_completions(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 32, max_new_tokens: int = 32
) -> list[str]:
    """Greedy completions of `prompts`, cut at EOS, in input order.

    Batches are left-padded by hand (pad ids, attention mask 0) rather than through
    `tokenizer.padding_side`, so the tokenizer is never mutated and the prompt ids are exactly the
    ones training used (`encode_prompt`). Prompts are sorted by length to keep padding small.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids = encoded[i]
                input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[r, width - len(ids):] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=eos,
                **generate_kwargs_for(model),
            )
            for r, i in enumerate(rows):
                new = generated[r, width:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


def evaluate_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Greedy-decode every prompt and score it: {"exact_match", "n", "per_task"[, "predictions"]}.

    `max_new_tokens` defaults to the longest reference completion in tokens + 2 (room for EOS and
    a little slack), so a model that rambles is cut off instead of slowing the evaluation down.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to evaluate")
    if max_new_tokens is None:
        longest = max(len(tokenizer.encode(ex.completion, add_special_tokens=False)) for ex in examples)
        max_new_tokens = longest + 2
    predictions = generate_completions(
        model, tokenizer, [ex.prompt for ex in examples], batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    result = score_predictions(examples, predictions, tokenizer)
    if return_predictions:
        result["predictions"] = predictions
    return result
