"""examples/fewshot_vs_qlora: the stdlib QA set, k-shot prompts that fit the context, multiple-choice scoring
(against a full forward per choice), and the whole recipe on a tiny Llama with a 4-bit (bitsandbytes) base."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from lk_models import tiny_llama_for

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("fewshot_vs_qlora",
                                                  ROOT / "examples" / "fewshot_vs_qlora" / "fewshot_vs_qlora.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fs = _load()


@pytest.fixture(scope="module")
def tokenizer():
    from lorakit.hub import load_tokenizer
    return load_tokenizer(None)


def test_qa_set_is_true_of_the_stdlib_and_split_by_function():
    train_set, test_set = fs.build_qa()
    assert len(train_set) > 300 and len(test_set) > 80
    assert not {e.prompt for e in train_set} & {e.prompt for e in test_set}
    for example in test_set:  # importing the module (not the parser behind the set) finds the function there
        name = example.prompt.removeprefix(f"{fs.TASK}: ").removesuffix(" =>")
        assert callable(getattr(importlib.import_module(example.completion.strip()), name)), example


def test_max_shots_is_the_largest_k_that_fits(tokenizer):
    train_set, test_set = fs.build_qa()
    k = fs.max_shots(tokenizer, train_set, test_set, positions=128, new_tokens=8)
    length = lambda k, q: len(tokenizer(fs.kshot_prompt(train_set[:k], q)).input_ids)  # noqa: E731
    assert 0 < k < 20
    assert max(length(k, q) for q in test_set) + 8 <= 128 < max(length(k + 1, q) for q in test_set) + 8
    assert fs.kshot_prompt(train_set[:2], test_set[0]).count("\n") == 2


def test_choice_scores_equal_a_full_forward_per_choice(tokenizer):
    from lorakit.data.collate import encode_prompt

    model = tiny_llama_for(tokenizer, max_position_embeddings=128).eval()
    train_set, test_set = fs.build_qa()
    prompt = fs.kshot_prompt(train_set[:3], test_set[0])
    choices = ["os", "urllib.parse", "heapq", "email.utils"]
    got = fs.choice_scores(model, tokenizer, prompt, choices)
    prefix = encode_prompt(tokenizer, prompt)
    for i, choice in enumerate(choices):
        tokens = tokenizer.encode(f" {choice}", add_special_tokens=False)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([prefix + tokens])).logits[0].log_softmax(-1)
        expected = sum(float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(tokens))
        assert float(got[i]) == pytest.approx(expected, abs=1e-4)


def test_recipe_runs_on_a_tiny_model_with_a_4bit_base(tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = tiny_llama_for(tokenizer, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    results = fs.main(["--quick", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")])
    assert [r["n"] for r in results["prompting"]] == [0, 2] and [r["n"] for r in results["qlora"]] == [4]
    for row in results["prompting"] + results["qlora"]:
        assert 0.0 <= row["closed_set"] <= 1.0 and 0.0 <= row["exact_match"] <= 1.0
    saved = json.loads((tmp_path / "out" / "fewshot_vs_qlora.json").read_text())
    assert saved["n_test"] == 8 and saved["max_shots"] >= 2
    assert (tmp_path / "out" / "fewshot_vs_qlora.png").stat().st_size > 1000


@pytest.mark.parametrize("flags,says", [(["--shots", "0", "-1"], "--shots takes integers >= 0"),
                                        (["--train-sizes", "0"], "--train-sizes takes integers >= 1"),
                                        (["--test-size", "-5"], "--test-size takes integers >= 1"),
                                        (["--steps", "0"], "--steps takes integers >= 1"),
                                        (["--lr", "nan"], "--lr must be > 0 and finite")])
def test_bad_sizes_are_refused_before_any_work(flags, says, tmp_path, capsys, monkeypatch):
    """--shots -1 sliced train_set[:-1] (every question but one into the prompt), --test-size -5 dropped the last 5
    test questions, --train-sizes 0 / --steps 0 failed only after the whole prompting sweep."""
    monkeypatch.setattr(fs, "build_qa", lambda seed: pytest.fail("work started before the flags were checked"))
    with pytest.raises(SystemExit) as e:
        fs.main([*flags, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
