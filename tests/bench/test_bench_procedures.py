"""``lorakit bench methods --procedures ... --full-finetune`` (procedure rows beside LoRA and full fine-tuning) and
the LongLoRA perf row, at smoke size."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.bench.cli import main


@pytest.mark.slow
def test_procedure_rows_beside_lora_and_full_finetuning(tmp_path):
    torch.set_num_threads(1)
    assert main(["methods", "--quick", "--methods", "lora", "--first-variant-only", "--procedures", "flexora",
                 "loraplus", "--full-finetune", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "methods.json").read_text())
    rows = {r["method"]: r for r in result["table"]}
    assert {"lora", "full", "lora+flexora", "lora+loraplus"} <= set(rows)
    assert rows["full"]["trainable_params"] > 10 * rows["lora"]["trainable_params"]  # every base weight
    flexora = [r for r in result["runs"] if r["method"] == "lora+flexora"]
    assert flexora and all(r["selected_layers"] for r in flexora)
    assert rows["lora+flexora"]["trainable_params"] <= rows["lora"]["trainable_params"]
    assert "Layers Flexora selected" in (tmp_path / "methods.md").read_text()


def test_longlora_perf_row_reports_ratio_memory_and_perplexity():
    from lorakit.bench.longlora import longlora_markdown, longlora_perf_rows
    from lorakit.bench.perf import QUICK

    (row,) = longlora_perf_rows(QUICK, "cpu")
    assert row["context"] == 4 * QUICK.seq and row["group_size"] == QUICK.seq
    assert set(row["times"]) == {"s2_attn", "full_attn"} and row["s2_attn/full_attn"]["median"] > 0
    assert all(v > 0 for v in row["activations_mb"].values())
    assert set(row["perplexity"]) == {"s2_attn", "full_attn", "s2_attn_lora_only", "base_no_interpolation",
                                      "base_interpolated"}
    assert "S²-Attn" in longlora_markdown({"rows": [row]})
