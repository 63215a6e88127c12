"""Sequence-classification data: JSONL {text, label}, items, batches and the metrics (accuracy, macro F1, MCC)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lorakit.data import DataError, Example, TokenizedDataset, load_jsonl
from lorakit.data.classification import (ClassificationCollator, classification_metrics, label_names,
                                         tokenize_classification)
from lk_models import word_level_tokenizer

LABELS = [0, 0, 1, 1, 2, 2]
PREDICTIONS = [0, 1, 1, 1, 2, 0]


def test_metrics_match_hand_computed_values_and_sklearn():
    got = classification_metrics(LABELS, PREDICTIONS)
    # By hand: 4 of 6 right. Per-class F1 = 2PR/(P+R): class 0 P=1/2 R=1/2 -> 1/2; class 1 P=2/3 R=1 -> 4/5;
    # class 2 P=1 R=1/2 -> 2/3; macro = their mean.
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # Multi-class MCC (Gorodkin 2004, the formula in scikit-learn's matthews_corrcoef docs):
    # (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)), c = 4 correct, s = 6, p = (2, 3, 1) predicted, t = (2, 2, 2).
    assert got["mcc"] == pytest.approx((4 * 6 - (4 + 6 + 2)) / math.sqrt((36 - 14) * (36 - 12)))
    assert got == pytest.approx({"accuracy": accuracy_score(LABELS, PREDICTIONS),
                                 "f1": f1_score(LABELS, PREDICTIONS, average="macro"),
                                 "mcc": matthews_corrcoef(LABELS, PREDICTIONS)})


def test_jsonl_text_label_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a b", "label": "pos"}) + "\n" + json.dumps({"text": "c", "label": 3}) + "\n")
    examples = load_jsonl(path)
    assert examples == [Example(prompt="a b", completion="pos"), Example(prompt="c", completion="3")]
    assert label_names(examples) == ["3", "pos"]
    for bad, message in (({"prompt": "x", "completion": "y", "label": 1}, "goes with a 'text'"),
                         ({"text": "x", "label": [1]}, "'label' must be")):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=message):
            load_jsonl(path)


def test_items_and_batches():
    examples = [Example("a b c", "pos", task="t1"), Example("d", "neg", task="t2")]
    tok = word_level_tokenizer(examples)
    label2id = {"neg": 0, "pos": 1}
    item = tokenize_classification(examples[0], tok, 2, label2id)
    assert item["labels"] == 1 and len(item["input_ids"]) == 2  # cut on the right at max_length
    data = TokenizedDataset(examples, tok, max_length=8,
                            tokenize=lambda ex, t, n: tokenize_classification(ex, t, n, label2id))
    batch = ClassificationCollator.from_tokenizer(tok)([data[0], data[1]])
    assert batch["labels"].tolist() == [1, 0] and batch["task_ids"].tolist() == [0, 1]
    assert batch["input_ids"].shape == (2, 3) and batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"][1, 1:].eq(tok.pad_token_id).all()
    with pytest.raises(DataError, match="not one of the model's labels"):
        tokenize_classification(Example("a", "other"), tok, 8, label2id)
    assert isinstance(batch["labels"], torch.Tensor)


def test_label_names_refuse_unlabelled_lines_and_a_single_class(tmp_path):
    """A {"text"} line without "label" is a language-modelling example: used as a classification example its
    text would become its label. One distinct label makes a 1-output head with a constant loss of 0."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "good movie", "label": "pos"}) + "\n" + json.dumps({"text": "bad movie"}) + "\n")
    with pytest.raises(DataError, match="example 1 has no 'label'"):
        label_names(load_jsonl(path))
    path.write_text("".join(json.dumps({"text": t, "label": "pos"}) + "\n" for t in ("a", "b")))
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        label_names(load_jsonl(path))
