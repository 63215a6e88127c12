"""``lorakit bench merge --quick`` runs end to end (tiny profile) and writes its table and plot."""

from __future__ import annotations

import json

import pytest

from lorakit.bench.cli import main
from lorakit.bench.merge import FULL

FULL_SPEED = {**FULL.__dict__, "seeds": []}


def test_bench_merge_quick(tmp_path):
    assert main(["merge", "--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "merge.json").read_text())
    rows = {r["row"] for r in result["quality"]["table"]}
    assert {"oracle (own adapter per task)", "linear (mean)", "ties d=0.5", "lego k=8 dual"} <= rows
    assert {r["row"] for r in result["collapse"]["table"]} >= {"collapsed, uniform expert weights (linear)"}
    assert [r["combination"] for r in result["speed"]] == ["svd", "cat"]
    assert all(r["peft_over_lorakit"]["min"] > 0 for r in result["speed"])
    assert (tmp_path / "merge.png").is_file() and "## Merge time" in (tmp_path / "merge.md").read_text()


def _run(seed, score, speed=None):
    """A saved bench-merge result holding one seed's quality run (shape as run_merge writes it)."""
    from lorakit.bench.merge import summarise

    runs = [{"row": "linear (mean)", "kind": "merge", "method": "linear", "seed": seed, "merged_rank": 32,
             "exact_match": score, "per_task": {"reverse": score}}]
    result = {"profile": {**FULL.__dict__, "seeds": [seed]}, "seeds_done": [seed], "before": {"exact_match": 0.5},
              "quality": {"runs": runs, "table": summarise(runs)}, "command": f"seed {seed}", "note": seed}
    if speed is not None:
        result["speed"] = speed
    return result


def test_bench_merge_combine_pools_seeds_and_takes_the_latest_speed(tmp_path):
    from lorakit.bench.merge import combine_results
    from lorakit.core.errors import ConfigError

    speed = [{"combination": "cat", "peft": {"min_s": 2.0, "median_s": 2.0, "repeats": 1},
              "lorakit": {"min_s": 1.0, "median_s": 1.0, "repeats": 1}, "peft_over_lorakit": {"min": 2.0, "median": 2.0}}]
    old, new = _run(0, 0.5), _run(1, 0.7)
    result = combine_results([old, _run(1, 0.1), new, {"profile": FULL_SPEED, "speed": speed}])
    assert result["seeds_done"] == [0, 1] and result["profile"]["seeds"] == [0, 1]
    (row,) = result["quality"]["table"]
    assert row["seeds"] == 2 and abs(row["mean"] - 0.6) < 1e-12  # seed 1 from the later file
    assert abs(row["sd"] - 0.1414213562373095) < 1e-12  # sample sd of (0.5, 0.7)
    assert result["speed"] == speed and result["note"] == 0 and len(result["combined_from"]) == 4
    with pytest.raises(ConfigError, match="task_steps"):
        combine_results([old, {**new, "profile": {**new["profile"], "task_steps": 7}}])
    # the CLI writes the pooled report from the files
    paths = []
    for i, r in enumerate((old, new)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    assert main(["merge", "--combine", *map(str, paths), "--output", str(tmp_path / "out")]) == 0
    assert "seeds [0, 1]" in (tmp_path / "out" / "merge.md").read_text()
