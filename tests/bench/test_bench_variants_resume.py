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
    assert "--steps 5, here 3" in err and "only --seeds may differ" in err
    with pytest.raises(SystemExit):
        main(["variants", "--quick", "--output", str(tmp_path / "out"), "--resume", str(tmp_path / "missing.json")])
    assert "no such result file" in capsys.readouterr().err


@pytest.mark.parametrize("content,expected", [
    ('{"a":', "not a readable JSON result"),
    ("[1, 2]", "not a saved bench result"),
    ('{"profile": {}, "quality": {"runs": []}}', "lacks"),
    ('{"profile": {"seeds": [0]}, "before": 0.5}', "not a `bench merge` result"),
])
def test_bench_merge_combine_bad_files_are_error_lines_and_write_nothing(tmp_path, capsys, content, expected):
    """A malformed, foreign or incomplete --combine file is an error line (exit 2), and no output folder appears."""
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["merge", "--combine", str(bad), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and "--combine: --combine" not in err
    assert str(bad) in err  # the file is named, not the command stored in it
    assert not (tmp_path / "out").exists()


def test_bench_flags_of_one_bench_are_refused_elsewhere_and_resume_files_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["variants", "--quick", "--combine", "x.json", "--output", str(tmp_path / "o")])
    assert "--combine is an option of `bench merge` / `bench methods` / `bench mixtures` only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tasks", "--quick", "--resume", "--output", str(tmp_path / "o")])
    assert "--resume is an option of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["init", "--quick", "--experiments", "speed", "--output", str(tmp_path / "o")])
    assert "--experiments is an option of `bench merge` / `bench mixtures` only" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        main(["variants", "--quick", "--output", str(tmp_path / "o"), "--resume", str(tmp_path / "list.json")])
    assert "not a saved bench result" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({"profile": {"seeds": [0]}, "command": "lorakit bench init"}))
    with pytest.raises(SystemExit):
        main(["variants", "--quick", "--output", str(tmp_path / "o"), "--resume", str(tmp_path / "other.json")])
    assert "is not a `bench variants` result" in capsys.readouterr().err
    claims = {"profile": {**variants.asdict(variants.QUICK), "seeds": [0, 1]}, "before": 0.5, "runs": []}
    (tmp_path / "claims.json").write_text(json.dumps(claims))
    with pytest.raises(SystemExit):
        main(["variants", "--quick", "--seeds", "1", "--output", str(tmp_path / "o"),
              "--resume", str(tmp_path / "claims.json")])
    assert "lists seed 1 but holds no run of it" in capsys.readouterr().err


@pytest.mark.parametrize("argv,flag", [
    (["perf", "--steps", "1"], "--steps"),  # (0 is refused by the flag's type now; was: 0 == False passed this check)
    (["perf", "--steps", "5"], "--steps"), (["serve", "--tasks", "reverse"], "--tasks"),
    (["tasks", "--seeds", "1"], "--seeds"), (["quantize", "--tasks", "reverse"], "--tasks"),
    (["tasks", "--methods", "lora"], "--methods"), (["merge", "--only", "forward"], "--only"),
    (["perf", "--r", "1"], "--r"),
])
def test_a_shared_option_a_bench_does_not_read_is_refused(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--quick", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"lorakit bench: error: {flag} is an option of" in err
    assert f"only (got `bench {argv[0]}`)" in err and not (tmp_path / "o").exists()
