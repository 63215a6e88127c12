"""``lorakit bench merge --quick`` runs end to end (tiny profile) and writes its table and plot."""

from __future__ import annotations

import json

from lorakit.bench.cli import main


def test_bench_merge_quick(tmp_path):
    assert main(["merge", "--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "merge.json").read_text())
    rows = {r["row"] for r in result["quality"]["table"]}
    assert {"oracle (own adapter per task)", "linear (mean)", "ties d=0.5", "lego k=8 dual"} <= rows
    assert {r["row"] for r in result["collapse"]["table"]} >= {"collapsed, uniform expert weights (linear)"}
    assert [r["combination"] for r in result["speed"]] == ["svd", "cat"]
    assert all(r["peft_over_lorakit"]["min"] > 0 for r in result["speed"])
    assert (tmp_path / "merge.png").is_file() and "## Merge time" in (tmp_path / "merge.md").read_text()
