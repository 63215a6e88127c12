"""examples/controllable_generation: the property checker, the scoring, and the whole recipe (base rows, lorakit
train, LoRA row) on a tiny Llama with the bundled tokenizer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lk_models import tiny_llama_for

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "controllable_generation"


def _module(name: str):
    sys.path.insert(0, str(RECIPE))
    try:
        spec = importlib.util.spec_from_file_location(f"recipe_cg_{name}", RECIPE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(RECIPE))


@pytest.mark.parametrize("name, tag", [("OrderedDict", "class"), ("HTTPServer", "class"), ("SEEK_END", "constant"),
                                       ("make_archive", "function"), ("_check_arg", "private"), ("_abs", "private")])
def test_checker_accepts_each_style_and_only_it(name, tag):
    identifiers = _module("identifiers")
    assert [t for t in identifiers.TAGS if identifiers.has_property(name, t)] == [tag]


def test_checker_rejects_non_names():
    identifiers = _module("identifiers")
    for bad in ("", "SEEK", "abs", "__init__", "Ordered Dict", "get-size", "x_", "HTTP_"):
        assert not any(identifiers.has_property(bad, t) for t in identifiers.TAGS), bad


def test_stdlib_names_are_real_and_tagged_by_style():
    import os
    import collections

    identifiers = _module("identifiers")
    found = identifiers.stdlib_identifiers()
    assert "OrderedDict" in found["class"] and "SEEK_END" in found["constant"] and "get_terminal_size" in found["function"]
    assert all(identifiers.has_property(n, t) for t, names in found.items() for n in names)
    assert hasattr(collections, "OrderedDict") and os.SEEK_END == 2
    assert all(len(names) > 200 for names in found.values())


def test_score_counts_property_novelty_and_realness():
    run = _module("run")
    samples = ["make_archive", "copy_tree", "zz_top", "Foo", "make_archive"]
    got = run.score(samples, "function", train_names={"make_archive"}, stdlib={"make_archive", "copy_tree"})
    # 4 of 5 are snake_case with an underscore; of those, copy_tree and zz_top are not training names;
    # copy_tree is a real stdlib name; 4 distinct samples of 5.
    assert got["property"] == pytest.approx(4 / 5) and got["novel"] == pytest.approx(2 / 4)
    assert got["real"] == pytest.approx(1 / 2) and got["unique"] == pytest.approx(4 / 5)
    assert (got["with_property"], got["novel_count"], got["real_count"], got["distinct"]) == (4, 2, 1, 4)


def test_recipe_runs_on_a_tiny_model(tmp_path, capsys):
    from lorakit.hub import load_tokenizer

    tok = load_tokenizer()
    folder = tmp_path / "tiny"
    tiny_llama_for(tok, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = _module("run").main(["--model", str(folder), "--out", str(tmp_path / "out"), "--per-tag", "8",
                                "--steps", "2", "--batch-size", "4", "--samples", "3", "--max-new-tokens", "4"])
    assert list(rows) == ["base, tag prompt", "base, 5-shot prompt", "LoRA r=8, tag prompt"]
    for row in rows.values():
        assert set(row["per_tag"]) == {"class", "constant", "function", "private"}
        assert all(0.0 <= row[k] <= 1.0 for k in ("property", "novel", "real", "unique"))
    lines = (tmp_path / "out" / "data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 32 and json.loads(lines[0])["prompt"].startswith("<tag=")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| LoRA r=8, tag prompt |" in capsys.readouterr().out
