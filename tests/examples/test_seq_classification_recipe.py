"""examples/seq_classification end to end on a tiny BERT (word-level vocabulary of the recipe's own data):
the data set it builds, the three runs (lorakit train --task-type seq-cls, full fine-tuning, linear probe) and
the table it writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from lk_models import word_level_tokenizer

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "seq_classification"


def _module(name: str):
    sys.path.insert(0, str(RECIPE))
    try:
        spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(RECIPE))


def test_docstring_data_is_real_labeled_and_split_by_text(tmp_path):
    counts = _module("docstring_data").build(tmp_path)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert {r["label"] for r in train} == {"files", "text", "net", "math", "concurrency"}
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert sum(counts.values()) == len(train) + len(test) > 500
    import os
    assert {"text": " ".join(os.path.join.__doc__.split("\n\n")[0].split()), "label": "files"} in train + test


def test_recipe_runs_on_a_tiny_encoder(tmp_path, capsys):
    data = tmp_path / "vocab"
    _module("docstring_data").build(data)
    from lorakit.data import load_jsonl
    examples = load_jsonl(data / "train.jsonl") + load_jsonl(data / "test.jsonl")
    tok = word_level_tokenizer(examples)
    folder = tmp_path / "encoder"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)).save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = _module("run").main(["--model", str(folder), "--out", str(tmp_path / "out"), "--steps", "3",
                                "--batch-size", "4", "--limit", "40", "--max-length", "24"])
    assert [r["method"].split()[0] for r in rows] == ["LoRA", "full", "frozen"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and -1.0 <= row["mcc"] <= 1.0 and row["trainable_params"] > 0
    lora, full, probe = rows
    assert probe["trainable_params"] < lora["trainable_params"] < full["trainable_params"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"] == rows
    assert "| LoRA r=8 (+ head) |" in (tmp_path / "out" / "results.md").read_text()
    assert "| method | accuracy | macro F1 | MCC |" in capsys.readouterr().out
