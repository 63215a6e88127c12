"""What the training loop optimises and how it scores, chosen from the model's head (PEFT's task types).

The loop is the same for every head; an objective supplies the parts that differ:

- ``dataset`` / ``collator``: examples -> items -> padded batches;
- ``loss_sum(logits, batch)`` and ``count(batch)``: the summed task loss and what it is a sum over, so a step's
  loss is the mean over the whole step (supervised tokens for a causal LM, rows for a classifier);
- ``evaluate``: the metrics of the eval examples (sharded over processes under torchrun).

``CAUSAL_LM`` (``*ForCausalLM`` and any other model): next-token cross-entropy on the completion, exact match of
greedy generations. ``SEQ_CLS`` (``*ForSequenceClassification``): an example's prompt is the text and its
completion the label name (ids from ``model.config.label2id``), cross-entropy of the head's logits, accuracy /
macro F1 / MCC (``data.classification``). ``objective_for(model)`` picks one; a new head adds one class and one
entry in ``OBJECTIVES``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.routing import SUPERVISED_KEY, routing
from ..data import IGNORE_INDEX, CausalLMCollator, Example, TokenizedDataset
from ..data.classification import (ClassificationCollator, classification_metrics, evaluate_classification,
                                   label_index, predict_labels, tokenize_classification)
from ..io.peft_format import task_type


class Objective(Protocol):
    name: str

    def dataset(self, examples: Sequence[Example], tokenizer: Any, max_length: int | None,
                task_to_id: dict[str, int] | None = None) -> TokenizedDataset: ...

    def collator(self, tokenizer: Any) -> Any: ...

    def loss_sum(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def count(self, batch: Mapping[str, torch.Tensor]) -> int: ...

    def evaluate(self, ctx: Any, model: nn.Module, tokenizer: Any, examples: Sequence[Example], *, batch_size: int,
                 task_to_id: Mapping[str, int] | None, progress: bool) -> dict[str, Any]: ...


class CausalLM:
    """Next-token cross-entropy on the completion tokens; exact match of greedy generations."""

    name = "CAUSAL_LM"

    def dataset(self, examples, tokenizer, max_length, task_to_id=None) -> TokenizedDataset:
        return TokenizedDataset(examples, tokenizer, max_length=max_length, task_to_id=task_to_id)

    def collator(self, tokenizer: Any) -> CausalLMCollator:
        return CausalLMCollator.from_tokenizer(tokenizer)

    def loss_sum(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over supervised positions (labels shifted here, as HF does)."""
        logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    def count(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def evaluate(self, ctx, model, tokenizer, examples, *, batch_size, task_to_id, progress) -> dict[str, Any]:
        from .distributed import evaluate_sharded

        return evaluate_sharded(ctx, model, tokenizer, examples, batch_size=batch_size, task_to_id=task_to_id,
                                progress=progress)


class SequenceClassification:
    """Cross-entropy of the classification head's logits (batch, num_labels); accuracy, macro F1 and MCC.

    ``label2id`` maps label names (the examples' completions) to the head's output index; ``max_length`` cuts
    texts at evaluation as in training.
    """

    name = "SEQ_CLS"

    def __init__(self, label2id: Mapping[str, int], max_length: int | None = None):
        if not label2id:
            raise ConfigError("a sequence-classification model needs config.label2id (label name -> head index)")
        self.label2id = dict(label2id)
        self.max_length = max_length

    @property
    def labels(self) -> list[str]:
        """The label names in head-output order (what ``labels.json`` beside a saved adapter holds)."""
        return [name for name, _ in sorted(self.label2id.items(), key=lambda kv: kv[1])]

    def dataset(self, examples, tokenizer, max_length, task_to_id=None) -> TokenizedDataset:
        self.max_length = max_length
        return TokenizedDataset(examples, tokenizer, max_length=max_length, task_to_id=task_to_id,
                                tokenize=partial(tokenize_classification, label2id=self.label2id))

    def collator(self, tokenizer: Any) -> ClassificationCollator:
        return ClassificationCollator.from_tokenizer(tokenizer)

    def loss_sum(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")  # logits (B, num_labels)

    def count(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def evaluate(self, ctx, model, tokenizer, examples, *, batch_size, task_to_id, progress) -> dict[str, Any]:
        examples = list(examples)
        if ctx is None or not ctx.enabled:
            return evaluate_classification(model, tokenizer, examples, self.label2id, batch_size, self.max_length,
                                           task_to_id, progress)
        indices = ctx.shard(range(len(examples)))
        if ctx.mode == "fsdp":  # sharded layers need the same number of forwards on every rank: pad the shares
            share = -(-len(examples) // ctx.world_size)
            indices = indices + [indices[0] if indices else 0] * (share - len(indices))
        mine = predict_labels(model, tokenizer, [examples[i] for i in indices], self.label2id, batch_size,
                              self.max_length, task_to_id, progress)
        gathered: dict[int, int] = {}
        for part in ctx.gather_objects(list(zip(indices, mine))):
            for index, prediction in part:
                gathered.setdefault(index, prediction)
        labels = [label_index(self.label2id, ex.completion) for ex in examples]
        metrics = classification_metrics(labels, [gathered[i] for i in range(len(examples))])
        return {**metrics, "exact_match": metrics["accuracy"], "n": len(examples)}


def supervised_extras(labels: Any, input_ids: Any) -> dict[str, torch.Tensor]:
    """The routing extra ``{SUPERVISED_KEY: labels != IGNORE_INDEX}`` ((batch, seq) bool: a causal LM's completion
    tokens) when ``labels`` are per token (the shape of ``input_ids``); ``{}`` otherwise (no labels, or one label per
    row as for a classifier). Training loops offer it to every method; γ-MoD always keeps those tokens."""
    if not (isinstance(labels, torch.Tensor) and isinstance(input_ids, torch.Tensor)) or labels.shape != input_ids.shape:
        return {}
    return {SUPERVISED_KEY: labels != IGNORE_INDEX}


def batch_routing(batch: Mapping[str, Any], extras: Mapping[str, Any] | None = None, **fields: Any):
    """The routing context of a training forward on a collated ``batch`` (``input_ids``, ``attention_mask`` and,
    when present, ``labels``, ``task_ids``, ``routing``): the task ids as the routing keys, the attention mask as
    the token mask, and as extras the caller's ``extras``, the supervised mask (``supervised_extras``, declared per
    token: ``token_extras``) and the batch's per-example routing vectors (declared per row: ``row_extras``).
    ``fields`` are further ``routing`` fields (e.g. ``adapter_names``).
    Every path that runs a forward with labels (the loop, the Trainer callback, concurrent jobs, DP-SGD clients,
    a procedure's validation forward, the federated server's eval loss) enters this one, so every method sees the
    same routing information; a method decides what it uses out of training (γ-MoD: not the supervised mask)."""
    supervised, vectors = supervised_extras(batch.get("labels"), batch.get("input_ids")), batch.get("routing") or {}
    extras = {**(extras or {}), **supervised, **vectors}
    return routing(keys=batch.get("task_ids"), token_mask=batch.get("attention_mask"), extras=extras,
                   row_extras=tuple(vectors), token_extras=tuple(supervised), **fields)


OBJECTIVES = {"CAUSAL_LM": lambda model: CausalLM(),
              "SEQ_CLS": lambda model: SequenceClassification(model.config.label2id)}


def objective_for(model: nn.Module) -> Objective:
    """The objective of ``model``'s head: SEQ_CLS for ``*ForSequenceClassification``, else CAUSAL_LM."""
    return OBJECTIVES.get(task_type(model) or "CAUSAL_LM", OBJECTIVES["CAUSAL_LM"])(model)
