"""Greedy-generation evaluation: exact match of stripped outputs, overall and per task."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lorakit.core.registry import generate_kwargs_for
from lorakit.core.routing import routing

from lorakit.data.collate import encode_prompt, stack_routing
from lorakit.data.errors import DataError
from lorakit.data.example import Example
from lorakit.data.tasks import exact_match, find_task

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
        task = find_task(ex.task) if ex.task is not None else None
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
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 32, max_new_tokens: int = 32,
    row_routing: Callable[[list[int]], dict[str, Any]] | None = None, progress: bool = False,
    generate_kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
    """Greedy completions of `prompts`, cut at EOS, in input order.

    `row_routing(rows)` (optional) gives the `lorakit.routing(...)` arguments for a batch of prompt indices
    (per-row keys, per-row extras); generation of that batch runs inside that routing context.
    `generate_kwargs` go to `model.generate` as well (e.g. `synced_gpus=True` for a sharded model).

    Batches are left-padded by hand (pad ids, attention mask 0) rather than through
    `tokenizer.padding_side`, so the tokenizer is never mutated and the prompt ids are exactly the
    ones training used (`encode_prompt`). Prompts are sorted by length to keep padding small. An
    encoder-decoder model (``config.is_encoder_decoder``, e.g. T5) reads the prompt in its encoder and returns
    only decoder tokens; its completion is those after the decoder start token.
    Raises DataError for a prompt whose tokens + ``max_new_tokens`` pass the model's positions.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    check_prompt_lengths(model, encoded, max_new_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc="eval", unit="ex", disable=not progress, dynamic_ncols=True, leave=False)
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
            context = routing(**_on(device, row_routing(rows))) if row_routing else contextlib.nullcontext()
            with context:
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    **generate_kwargs_for(model),
                    **(generate_kwargs or {}),
                )
            for r, i in enumerate(rows):
                new = completion_ids(model, generated, width)[r].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return outputs


def completion_ids(model: Any, generated: torch.Tensor, width: int) -> torch.Tensor:
    """The new tokens of ``model.generate``'s output ``generated`` (batch, length) for prompts left-padded to ``width``
    columns: (batch, length - width) after the prompt for a decoder-only model; for an encoder-decoder
    (``config.is_encoder_decoder``, e.g. T5), which returns only decoder tokens, (batch, length - 1) after the decoder
    start token (transformers' ``GenerationMixin.generate``: "only the decoder outputs" for encoder-decoder models)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return generated[:, 1:]
    return generated[:, width:]


def check_prompt_lengths(model: Any, encoded: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """DataError naming the first prompt whose tokens + `max_new_tokens` exceed the model's position limit (an
    encoder-decoder: the prompt the encoder's, the new tokens + the decoder start token the decoder's)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    if getattr(config, "is_encoder_decoder", False):  # the encoder reads the prompt, the decoder the new tokens
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                raise DataError(f"prompt {i + 1} is {len(ids)} tokens; the encoder reads at most {limit} "
                                f"(max_position_embeddings). Shorten the prompt to at most {limit} tokens.")
        if max_new_tokens + 1 > limit:  # + the decoder start token
            raise DataError(f"{max_new_tokens} new tokens and the decoder start token exceed the decoder's {limit} "
                            f"positions (max_position_embeddings). Generate at most {limit - 1} new tokens.")
        return
    for i, ids in enumerate(encoded):
        if len(ids) + max_new_tokens > limit:
            fixes = [f"shorten the prompt to at most {limit - max_new_tokens} tokens"] if limit > max_new_tokens else []
            if len(ids) < limit:
                fixes.append(f"generate at most {limit - len(ids)} new tokens")
            raise DataError(f"prompt {i + 1} is {len(ids)} tokens; with {max_new_tokens} new tokens that exceeds the "
                            f"model's {limit} positions (max_position_embeddings). "
                            + (" or ".join(fixes).capitalize() + "." if fixes else "The prompt alone is too long."))


def _on(device: torch.device, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Routing arguments with their tensors (top level and in extras) moved to ``device``."""
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    out = {k: move(v) for k, v in kwargs.items()}
    if isinstance(out.get("extras"), dict):
        out["extras"] = {k: move(v) for k, v in out["extras"].items()}
    return out


def example_routing(examples: Sequence[Example], task_to_id: Mapping[str, int] | None = None
                    ) -> Callable[[list[int]], dict[str, Any]] | None:
    """The routing arguments for rows of `examples` (see `evaluate_examples`); None when there is nothing to route."""
    has_vectors = any(ex.routing for ex in examples)
    if task_to_id is None and not has_vectors:
        return None
    names = {"task_names": [n for n, _ in sorted(task_to_id.items(), key=lambda kv: kv[1])]} if task_to_id else {}

    def for_rows(rows: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"extras": dict(names)}
        if task_to_id is not None:
            out["keys"] = torch.tensor([task_to_id.get(examples[i].task, -1) for i in rows], dtype=torch.long)
        if has_vectors:
            vectors = stack_routing([dict(examples[i].routing) for i in rows])
            out["extras"].update(vectors)
            out["row_extras"] = tuple(vectors)  # one per row: per-row adapters slice them (core.routing.rows_routing)
        return out

    return for_rows


def default_max_new_tokens(tokenizer: Any, examples: Sequence[Example]) -> int:
    """The longest reference completion in tokens + 2 (room for EOS and a little slack)."""
    return max(len(tokenizer.encode(ex.completion, add_special_tokens=False)) for ex in examples) + 2


def evaluate_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    return_predictions: bool = False,
    task_to_id: Mapping[str, int] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Greedy-decode every prompt and score it: {"exact_match", "n", "per_task"[, "predictions"]}.

    Generation sees the same routing as training: with `task_to_id` (the training data's task index,
    `build_task_index`) each row's task id is its routing key (tasks it does not know: -1, no key) and the task
    names go in the extras; examples' `routing` vectors go in the extras as (batch, d) tensors.

    `max_new_tokens` defaults to the longest reference completion in tokens + 2 (room for EOS and
    a little slack), so a model that rambles is cut off instead of slowing the evaluation down.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to evaluate")
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, examples)
    predictions = generate_completions(
        model, tokenizer, [ex.prompt for ex in examples], batch_size=batch_size, max_new_tokens=max_new_tokens,
        row_routing=example_routing(examples, task_to_id), progress=progress,
    )
    result = score_predictions(examples, predictions, tokenizer)
    if return_predictions:
        result["predictions"] = predictions
    return result
