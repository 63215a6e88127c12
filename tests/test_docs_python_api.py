"""docs/python-api.md's Python blocks run as written, so the page cannot drift from the API.

Each ```python block of the page runs after the import lines of the blocks above it (a later block uses what an
earlier one imported), on the bundled-small base copied to ``path/to/model`` and on real PEFT adapters written by
``peft``. A block's free names (``model``, ``ids``, ``examples``, ...) are set up before it, from the block's first
line (the ``SETUPS`` below); a new block without a setup fails ``test_every_block_has_a_setup``. Only sizes change:
step counts become 2 (also where a block leaves them at the default) and Flexora's held-out split 4 examples.
Each block's result is then checked. Every block runs in CI (about 15 s).
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import lorakit as lk

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"
SMALL_BASE = ROOT / "src" / "lorakit" / "assets" / "base_model_small"
SMALLER = [(r"\bsteps=\d+", "steps=2"), (r"TrainConfig\((?!steps=)", "TrainConfig(steps=2, "),  # TrainConfig.steps defaults to 1000
           (r'"val_size": \d+', '"val_size": 4'),
           (r"from_pretrained\(\.\.\.\)", 'from_pretrained("path/to/model")')]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def first_line(block: str) -> str:
    """A block's key: its first line without a trailing comment."""
    return re.sub(r"\s+#.*$", "", block.splitlines()[0])


def _fresh_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained("path/to/model")


def _base(ns):
    ns.update(model=_fresh_model(), input_ids=torch.randint(0, 100, (3, 8)), ids=torch.randint(0, 100, (3, 8)))


def _mixtures(ns):
    from lorakit.methods.mixlora import MixLoraConfig
    from lorakit.methods.routed import RecLoraConfig

    _base(ns)
    lk.add_adapter(ns["model"], MixLoraConfig(r=4, num_experts=4, top_k=2))  # "default": trained, traced
    for name in ("a", "b"):  # per-row adapters reading the per-row user vectors
        lk.add_adapter(ns["model"], RecLoraConfig(r=4, num_experts=2, user_dim=4), name)
    lk.set_adapter(ns["model"], "default")
    ns.update(ids=torch.randint(0, 100, (2, 8)), users=torch.randn(2, 4))


def _inits(ns):
    _base(ns)
    rows = torch.randint(0, 100, (4, 24))
    ns["batches"] = [{"input_ids": rows, "labels": rows}]


def _procedures(ns):
    _base(ns)
    lk.add_adapter(ns["model"], lk.LoraConfig(r=8))
    ns["fresh_base"] = _fresh_model()


# first line of a block (trailing comment dropped) -> what it needs that the page leaves to the reader
SETUPS = {
    "import torch, lorakit as lk": _base,
    "from lorakit.mixtures import router_stats, router_summary, record_routing": _mixtures,
    "from lorakit.serving import load_adapters, bank_routing, generate": _base,
    "from lorakit.serving import AdapterStore, Engine, SamplingParams": _base,
    'lk.add_adapter(model, lk.LoraConfig(r=16, init_lora_weights="pissa"))': _inits,
    "# LongLoRA: S²-Attn while training at 4x the context, full attention at inference; embeddings + norms "
    "trained": _procedures,
    "from lorakit.training import Job, train_concurrent": _base,
}


def _check_core(ns):
    assert ns["logits"].shape == ns["base_logits"].shape == (3, 8, ns["model"].config.vocab_size)
    assert not any(type(m).__module__.startswith("lorakit") for m in ns["plain"].modules())
    assert json.loads(Path("out/adapter/adapter_config.json").read_text())["peft_type"] == "LORA"


def _check_mixtures(ns):
    assert ns["result"].router_stats and any(ns["traces"].values())
    assert ns["logits"].shape[:2] == (2, 8)


def _check_serving(ns):
    assert "math" in ns["reg"] and "sql" in ns["reg"]
    assert ns["out"].shape[0] == 3 and ns["out"].shape[1] > ns["ids"].shape[1]


def _check_engine(ns):
    assert ns["store"].failed == {}


def _check_inits(ns):
    saved = json.loads(Path("out/a/adapter_config.json").read_text())
    assert saved["r"] == 32  # rank 2r for the untouched base
    from lorakit.core.inits import BaseSwap, base_edits
    assert base_edits(ns["model"], "loftq") and all(isinstance(e, BaseSwap) for e in base_edits(ns["model"], "loftq").values())


def _check_procedures(ns):
    assert Path("out/long/trainable_params.safetensors").is_file()
    assert ns["layers"] and lk.adapter_names(ns["fresh_base"]) == ["default"]


def _check_concurrent(ns):
    jobs = ns["out"]["jobs"]
    assert len(jobs["a"].losses) == 2 and Path(jobs["a"].adapter_dir, "adapter_config.json").is_file()


CHECKS = dict(zip(SETUPS, [_check_core, _check_mixtures, _check_serving, _check_engine, _check_inits,
                           _check_procedures, _check_concurrent]))


def test_every_block_has_a_setup():
    firsts = [first_line(block) for block in python_blocks()]
    assert firsts == list(SETUPS), "a python block of docs/python-api.md was added or changed: update SETUPS here"


@pytest.fixture
def doc_dir(tmp_path, monkeypatch):
    import peft

    monkeypatch.chdir(tmp_path)
    shutil.copytree(SMALL_BASE, "path/to/model")
    for folder, r in (("peft_adapter_dir", 4), ("adapters/math", 4), ("adapters/sql", 2)):
        peft.get_peft_model(_fresh_model(), peft.LoraConfig(r=r, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False)).save_pretrained(folder)
    return tmp_path


def earlier_imports(index: int) -> str:
    """The import lines of the blocks before ``index``: a block may use what the page imported above it."""
    lines = [line for block in python_blocks()[:index] for line in block.splitlines()
             if re.match(r"(import|from) \S+", line)]
    return "\n".join(re.sub(r"\s+#.*$", "", line) for line in lines)


@pytest.mark.parametrize("first", list(SETUPS), ids=lambda f: re.sub(r"\W+", "_", f)[:40])
def test_python_api_block_runs(doc_dir, first):
    from transformers import AutoTokenizer

    from lorakit.data import load_examples

    index = [first_line(block) for block in python_blocks()].index(first)
    examples = load_examples("reverse", "train", 8)
    ns = {"tokenizer": AutoTokenizer.from_pretrained("path/to/model"), "examples": examples, "data_a": examples,
          "data_b": load_examples("upper", "train", 8)}
    exec(earlier_imports(index), ns)  # noqa: S102
    SETUPS[first](ns)
    source = python_blocks()[index]
    for pattern, replacement in SMALLER:
        source = re.sub(pattern, replacement, source)
    exec(compile(source, f"docs/python-api.md: {first}", "exec"), ns)  # noqa: S102 (the doc's own code)
    CHECKS[first](ns)


def test_api_shown_in_python_api_md_is_documented():
    """Every ``lk.NAME`` and ``from lorakit... import NAME`` of the page exists and has a docstring."""
    import importlib

    text = DOC.read_text()
    code = "\n".join(python_blocks())
    found = {f"lk.{n}": getattr(lk, n, None) for n in set(re.findall(r"\blk\.([A-Za-z_]\w*)", text))}
    for module, names in re.findall(r"from (lorakit[\w.]*) import ([\w, ]+)", code):
        mod = importlib.import_module(module)
        found.update({f"{module}.{n.strip()}": getattr(mod, n.strip(), None) for n in names.split(",")})
    assert [n for n, obj in found.items() if obj is None] == []
    assert [n for n, obj in found.items() if not inspect.getdoc(obj)] == []
