"""Sequence classification data: an example's ``prompt`` is the text, its ``completion`` the label name.

JSONL records ``{"text": str, "label": str | int}`` load as such examples (``data.jsonl``); a label id comes from
the model's ``config.label2id``, so training, evaluation and the saved head agree on it. Metrics are
scikit-learn's: accuracy, macro-averaged F1 and the Matthews correlation coefficient (MCC), which stays
informative when the classes are imbalanced (0 for a constant or random predictor, 1 for a perfect one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from lorakit.core.routing import routing
from lorakit.data.collate import add_keys
from lorakit.data.errors import DataError
from lorakit.data.example import Example


LABELS_FILE = "labels.json"  # a SEQ_CLS adapter's label names in head order, beside its files: {"labels": [...]}


def label_names(examples: Sequence[Example]) -> list[str]:
    """The distinct labels of ``examples``, sorted (label id = position): the mapping does not depend on order.
    Integer labels sort as numbers (0, 1, 2, ..., 10: label ``i`` of class ids 0..k-1 is head output ``i``), others
    as strings.

    Raises DataError for an example without a label (a ``{"text": ...}`` line without ``"label"`` parses as a
    language-modelling example: its text would become its label) and for fewer than two distinct labels (a
    one-output head has a constant cross-entropy of 0: nothing to learn)."""
    for i, ex in enumerate(examples):
        if not ex.prompt:
            raise DataError(f"example {i} has no 'label' field: sequence classification needs "
                            f'{{"text": ..., "label": ...}} on every line (got text {ex.completion[:40]!r} alone)')
    names = sorted({ex.completion for ex in examples})
    if all(_is_integer(name) for name in names):  # class ids 0..k-1: output i is class i, as transformers users expect
        names.sort(key=int)
    if len(names) < 2:
        raise DataError(f"sequence classification needs at least 2 distinct labels in the training data, found "
                        f"{names}")
    return names


def config_labels(config: Mapping) -> list[str] | None:
    """The label names of a model ``config.json`` (a dict) in head-output order: ``id2label`` sorted by id (JSON keys
    are strings: ``{"0": "neg", "1": "pos"}``); None without one, or when its ids are not 0..n-1."""
    id2label = config.get("id2label")
    if not isinstance(id2label, Mapping) or not id2label:
        return None
    try:
        ids = {int(i): str(name) for i, name in id2label.items()}
    except (TypeError, ValueError):
        return None
    return [ids[i] for i in range(len(ids))] if sorted(ids) == list(range(len(ids))) else None


def head_labels(data_labels: Sequence[str], checkpoint_labels: Sequence[str] | None) -> tuple[list[str], str | None]:
    """The head's labels for training, in output order, and a note for the user (None: nothing to say).

    ``checkpoint_labels``: a classifier checkpoint's ``config.id2label`` in order (None for a model without a
    classification head). A checkpoint that knows every label of the data keeps its head and its order, so each
    output keeps the meaning it was trained with (the data's names sorted would swap them whenever the checkpoint's
    order is another). Otherwise the data's labels (``data_labels``, sorted) are used: a checkpoint head with another
    number of outputs is replaced by a new one, one with as many is trained on under the new names, as transformers
    does."""
    data_labels = list(data_labels)
    if checkpoint_labels is None:
        return data_labels, None
    known = list(checkpoint_labels)
    if set(data_labels) <= set(known):
        return known, None
    shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
    if len(known) != len(data_labels):
        return data_labels, (f"its classification head has {len(known)} outputs ({shown}); the data's "
                             f"{len(data_labels)} labels {data_labels} get a new head")
    return data_labels, (f"its classification head's outputs ({shown}) are trained as the data's labels "
                         f"{data_labels}, in that order")


def _is_integer(name: str) -> bool:
    return name.lstrip("-").isdigit() and name.lstrip("-").isascii()


def label_index(label2id: Mapping[str, int], label: str, where: str = "") -> int:
    """The id of ``label``; DataError naming the known labels when it has none."""
    if label not in label2id:
        raise DataError(f"{where}label {label!r} is not one of the model's labels {sorted(label2id)} (the head was "
                        "built from the training data's labels)")
    return int(label2id[label])


def tokenize_classification(example: Example, tokenizer: Any, max_length: int | None,
                            label2id: Mapping[str, int]) -> dict[str, Any]:
    """``input_ids`` and ``attention_mask`` of the text with the tokenizer's own special tokens ([CLS] ... [SEP]
    for BERT), cut on the right at ``max_length``, and ``labels``: the label id (an int)."""
    encoded = tokenizer(example.prompt, truncation=max_length is not None, max_length=max_length)
    return {"input_ids": list(encoded["input_ids"]), "attention_mask": list(encoded["attention_mask"]),
            "labels": label_index(label2id, example.completion)}


@dataclass(frozen=True)
class ClassificationCollator:
    """Right-pads classification items: ``input_ids``/``attention_mask`` (batch, T), ``labels`` (batch,)."""

    pad_token_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ClassificationCollator:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        return cls(pad_token_id=pad)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        length = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
            mask[row, :n] = torch.tensor(item["attention_mask"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.tensor([item["labels"] for item in items], dtype=torch.long)}
        return add_keys(batch, items)


def classification_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """``{"accuracy", "f1", "mcc"}``: scikit-learn's accuracy_score, f1_score(average="macro") and
    matthews_corrcoef. Raises ImportError naming the extra when scikit-learn is missing."""
    try:
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    except ImportError as error:
        raise ImportError("classification metrics need scikit-learn: pip install 'lorakit[recipes]'") from error
    labels, predictions = list(labels), list(predictions)
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
            "mcc": float(matthews_corrcoef(labels, predictions))}


@torch.no_grad()
def predict_labels(model: Any, tokenizer: Any, examples: Sequence[Example], label2id: Mapping[str, int],
                   batch_size: int = 64, max_length: int | None = None,
                   task_to_id: Mapping[str, int] | None = None, progress: bool = False) -> list[int]:
    """The argmax label id of each example, in input order. With ``task_to_id`` each row's task id is its
    routing key (unknown task: -1), as in training."""
    device = next(model.parameters()).device
    collate = ClassificationCollator.from_tokenizer(tokenizer)
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="eval", disable=not progress, leave=False):
            items = []
            for ex in examples[start:start + batch_size]:
                item = tokenize_classification(ex, tokenizer, max_length, label2id)
                if task_to_id is not None:
                    item["task_id"] = task_to_id.get(ex.task, -1)
                if ex.routing:
                    item["routing"] = dict(ex.routing)
                items.append(item)
            batch = collate(items)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            keyed = task_to_id is not None or "routing" in batch
            scope = routing(keys=batch["task_ids"].to(device) if "task_ids" in batch else None, token_mask=mask,
                            extras={n: t.to(device) for n, t in batch.get("routing", {}).items()}
                            ) if keyed else contextlib.nullcontext()
            with scope:
                logits = model(input_ids=ids, attention_mask=mask).logits  # (B, num_labels)
            predictions.extend(logits.argmax(-1).tolist())
    finally:
        model.train(was_training)
    return predictions


def evaluate_classification(model: Any, tokenizer: Any, examples: Sequence[Example], label2id: Mapping[str, int],
                            batch_size: int = 64, max_length: int | None = None,
                            task_to_id: Mapping[str, int] | None = None, progress: bool = False,
                            return_predictions: bool = False) -> dict[str, Any]:
    """``{"accuracy", "f1", "mcc", "exact_match", "n"}`` of the model's argmax labels on ``examples``
    (``exact_match`` = accuracy: the predicted label name equals the reference, the name other commands print)."""
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to evaluate")
    predictions = predict_labels(model, tokenizer, examples, label2id, batch_size, max_length, task_to_id, progress)
    labels = [label_index(label2id, ex.completion) for ex in examples]
    metrics = classification_metrics(labels, predictions)
    result: dict[str, Any] = {**metrics, "exact_match": metrics["accuracy"], "n": len(examples)}
    if return_predictions:
        id2label = {i: name for name, i in label2id.items()}
        result["predictions"] = [id2label[p] for p in predictions]
    return result
