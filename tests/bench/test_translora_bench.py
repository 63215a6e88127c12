"""The Trans-LoRA benchmark's graded metric (letter accuracy, a companion to exact match) and the join of runs
made in separate processes."""

import json

import pytest

from lorakit.bench.translora import COLUMNS, main, letter_accuracy


@pytest.mark.parametrize("prediction, reference, expected", [
    (" b c a", " b c a", 1.0),
    (" b c x", " b c a", 2 / 3),
    (" b c", " b c a", 2 / 3),          # a missing symbol counts as wrong
    (" b c a d", " b c a", 3 / 4),      # an extra one too
    (" c a b", " b c a", 0.0),          # positions matter
    ("", " b", 0.0),
    ("", "", 0.0),
])
def test_letter_accuracy(prediction, reference, expected):
    assert letter_accuracy(prediction, reference) == pytest.approx(expected)


def _part(folder, task, seeds, **profile):
    folder.mkdir()
    rows = [{"task": task, "seed": s, **{c: 0.5 for c in COLUMNS}, **{c + "_letters": 0.75 for c in COLUMNS},
             "kept": 10, "candidates": 90, "discriminator_train_accuracy": 0.9, "transfer_s": 1.0} for s in seeds]
    full = {"tasks": [task], "seeds": list(seeds), "source": "bundled", "target": "bundled-small", "steps": 150,
            **profile}
    (folder / "results.json").write_text(json.dumps({"profile": full, "machine": {}, "rows": rows}))


def test_merge_joins_runs_of_one_profile(tmp_path):
    _part(tmp_path / "a", "upper", [1, 0])
    _part(tmp_path / "b", "rotate", [0])
    assert main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert [(r["task"], r["seed"]) for r in merged["rows"]] == [("rotate", 0), ("upper", 0), ("upper", 1)]
    assert merged["profile"]["tasks"] == ["rotate", "upper"] and merged["profile"]["seeds"] == [0, 1]
    table = (tmp_path / "all" / "results.md").read_text()
    assert "| upper | 1 | 0.50 | 0.50 | 0.50 | 0.50 | 0.50 | 10 / 90 |" in table and "0.75" in table
    assert "| upper | 2 | 0.50 ± 0.00 (0.75 ± 0.00) |" in table and "| rotate | 1 | 0.50 ± 0.00" in table
    _part(tmp_path / "c", "sort", [0], steps=10)
    with pytest.raises(ValueError, match="steps"):
        main(["--merge", str(tmp_path / "a"), str(tmp_path / "c"), "--output", str(tmp_path / "bad")])
