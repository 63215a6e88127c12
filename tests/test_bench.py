"""``lorakit bench methods|perf --quick``: the smoke profiles CI affords, writing JSON, markdown and plots."""

from __future__ import annotations

import json

import torch

import lorakit as lk
from lorakit.bench.cli import main


def test_bench_methods_quick_covers_the_registry(tmp_path):
    torch.set_num_threads(1)
    assert main(["methods", "--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "methods.json").read_text())
    seen = {r["method"] for r in result["runs"]}
    assert seen == {m.name for m in lk.list_methods()}  # every method trained or skipped with a reason
    assert all(0.0 <= r["after"] <= 1.0 for r in result["runs"] if "skipped" not in r)
    assert (tmp_path / "methods.md").read_text().count("| lora |") >= 1
    assert (tmp_path / "methods_exact_match.png").stat().st_size > 1000


def test_bench_perf_quick_reports_ratios(tmp_path):
    assert main(["perf", "--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "perf.json").read_text())
    rows = {r["row"] for r in result["rows"]}
    assert {"forward, one adapter", "training step"} <= rows
    assert any(r.startswith("mixed batch") for r in rows)
    forward = next(r for r in result["rows"] if r["row"] == "forward, one adapter")
    assert forward["max_abs_diff_vs_peft"] <= 1e-5 and forward["lorakit/peft"]["min"] > 0
