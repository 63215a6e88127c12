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


def _run(variant, mb, tok_s, **extra):
    return {"variant": variant, "exact_match": 0.5, "base_weights_mb": mb, "params_removed_fraction": 0.0,
            "trainable_params": 100, "train_tokens_per_s": tok_s, "peak_memory_mb": None, **extra}


def test_bench_smaller_table_gives_ratios_to_lora_from_the_same_run():
    """Was: the table gave base MB and tok/s of each variant only as absolute numbers; the comparison the bench is
    for (the design's "side by side in one run, as ratios") had to be done by hand. Each row now has its base
    memory and its training speed as a ratio to the LoRA row of the same run (mean over seeds first)."""
    from lorakit.bench.smaller import smaller_markdown

    runs = [_run("lora", 20.0, 400.0), _run("lora", 20.0, 200.0), _run("qlora", 6.0, 240.0)]
    table = smaller_markdown({"runs": runs}).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in table[2:]}
    mb_ratio, speed_ratio = header.index("base MB ÷ LoRA"), header.index("tok/s ÷ LoRA")
    assert rows["lora"][mb_ratio] == "1.00" and rows["lora"][speed_ratio] == "1.00"
    assert rows["qlora"][mb_ratio] == "0.30" and rows["qlora"][speed_ratio] == "0.80"  # 6 / 20, 240 / mean(400, 200)
    alone = smaller_markdown({"runs": runs[2:]}).splitlines()[2]  # --only qlora: no LoRA row to divide by
    assert [c.strip() for c in alone.strip("|").split("|")][mb_ratio] == "—"
