"""``lorakit bench perf --only qlora`` and ``lorakit bench smaller``: QLoRA / LoRAPrune / LoRAM evidence rows."""

from __future__ import annotations

import json

import pytest

from lorakit.bench.cli import main

pytest.importorskip("bitsandbytes")


def test_qlora_perf_row_compares_with_peft_on_the_same_weights(tmp_path):
    assert main(["perf", "--quick", "--only", "qlora", "--output", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "perf.json").read_text())["rows"][0]
    assert row["max_abs_diff_vs_peft"] <= 1e-5
    assert set(row["memory"]) == {"lora", "qlora", "peft_lora", "peft_qlora", "qlora_gc", "peft_qlora_gc"}
    assert row["memory"]["qlora"]["params_mb"] < row["memory"]["lora"]["params_mb"]
    assert row["lorakit/peft"]["min"] > 0 and row["memory qlora/peft_qlora"] > 0
    # QLoRA's own setting, gradient checkpointing on both sides: fewer activations kept than without it
    for ours, without in (("qlora_gc", "qlora"), ("peft_qlora_gc", "peft_qlora")):
        assert row["memory"][ours]["activations_mb"] < row["memory"][without]["activations_mb"]
    assert row["lorakit/peft (checkpointing)"]["min"] > 0 and row["memory qlora_gc/peft_qlora_gc"] > 0


@pytest.mark.slow
def test_bench_smaller_quick(tmp_path):
    assert main(["smaller", "--quick", "--output", str(tmp_path)]) == 0
    runs = {r["variant"]: r for r in json.loads((tmp_path / "smaller.json").read_text())["runs"]}
    assert set(runs) == {"lora", "qlora", "loraprune", "loram", "loram_aligned"}
    assert not any("error" in r for r in runs.values())
    aligned = runs["loram_aligned"]
    assert aligned["align_tokens"] == 2 * 16 * 128 and aligned["align_eval_loss_full_model"] > 0
    assert runs["qlora"]["base_weights_mb"] < runs["lora"]["base_weights_mb"] / 2
    assert runs["loram"]["base_weights_mb"] < runs["lora"]["base_weights_mb"]
    assert runs["loraprune"]["params_removed_fraction"] > 0.2


def test_bench_smaller_names_an_unknown_variant(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # a usage error, before any model (tests/bench/test_bench_cli.py)
        main(["smaller", "--quick", "--only", "loram_alinged", "--output", str(tmp_path)])
    assert e.value.code == 2 and "Did you mean: loram_aligned" in capsys.readouterr().err
