"""``lorakit bench variants --resume``: seeds already in earlier results are read back, only the missing ones run."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.bench import variants
from lorakit.bench.cli import main


def test_bench_variants_resume_runs_only_missing_seeds_and_combines(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    one, both = tmp_path / "seed1", tmp_path / "both"
    assert main(["variants", "--quick", "--methods", "lora", "--seeds", "1", "--output", str(one)]) == 0
    first = json.loads((one / "variants.json").read_text())

    ran = []
    run_seeds = variants._run_seeds
    monkeypatch.setattr(variants, "_run_seeds", lambda profile, progress=False: ran.append(profile.seeds)
                        or run_seeds(profile, progress))
    assert main(["variants", "--quick", "--methods", "lora", "--seeds", "0", "1", "--output", str(both),
                 "--resume", str(one / "variants.json")]) == 0
    assert ran == [(0,)]  # seed 1 came from the earlier result, not a second training
    combined = json.loads((both / "variants.json").read_text())
    assert combined["resumed_seeds"] == [1] and combined["profile"]["seeds"] == [0, 1]
    assert [(r["method"], r["seed"]) for r in combined["runs"]] == [("lora", 0), ("lora", 1)]
    assert combined["runs"][1] == first["runs"][0]  # read back as recorded, its timing included
    assert [(r["seed"], r["rank"]) for r in combined["lora_ranks"]] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    row = combined["table"][0]
    afters = [r["after"] for r in combined["runs"]]
    assert row["seeds"] == 2 and row["after_mean"] == pytest.approx(sum(afters) / 2)
    assert "seeds [0, 1]" in (both / "variants.md").read_text()

    ran.clear()  # everything recorded: nothing trains, the output's own JSON is read back
    assert main(["variants", "--quick", "--methods", "lora", "--seeds", "0", "1", "--output", str(both), "--resume"]) == 0
    assert ran == [] and json.loads((both / "variants.json").read_text())["runs"] == combined["runs"]


def test_bench_variants_resume_refuses_other_options(tmp_path, capsys):
    earlier = {"profile": {**variants.asdict(variants.QUICK), "steps": 5}, "before": 0.0, "runs": []}
    (tmp_path / "old.json").write_text(json.dumps(earlier))
    with pytest.raises(SystemExit) as e:
        main(["variants", "--quick", "--output", str(tmp_path / "out"), "--resume", str(tmp_path / "old.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "steps=5, here 3" in err and "only --seeds may differ" in err
    with pytest.raises(SystemExit):
        main(["variants", "--quick", "--output", str(tmp_path / "out"), "--resume", str(tmp_path / "missing.json")])
    assert "no such result file" in capsys.readouterr().err
