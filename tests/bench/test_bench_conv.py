"""``lorakit bench perf --only conv``: conv LoRA on a diffusers UNet2DModel against PEFT on the same weights."""

from __future__ import annotations

import json

import pytest

from lorakit.bench.cli import main

pytest.importorskip("diffusers")


def test_conv_perf_rows_compare_with_peft_on_the_same_weights(tmp_path):
    assert main(["perf", "--quick", "--only", "conv", "--device", "cpu", "--output", str(tmp_path)]) == 0
    rows = {r["row"]: r for r in json.loads((tmp_path / "perf.json").read_text())["rows"]}
    assert set(rows) == {"conv LoRA forward, one adapter", "conv LoRA mixed batch, 4 adapters",
                         "conv LoRA training step"}
    for name in ("conv LoRA forward, one adapter", "conv LoRA mixed batch, 4 adapters"):
        assert rows[name]["max_abs_diff_vs_peft"] <= 1e-5, name
    assert all(r["lorakit/peft"]["min"] > 0 for r in rows.values())
