"""``lorakit bench methods --combine`` / ``--inits`` and ``lorakit bench mixtures --combine``: saved results of the
same settings pooled into one table; files that cannot be pooled are refused with an error naming them."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lorakit.bench import methods, mixtures
from lorakit.bench.cli import main
from lorakit.core.errors import ConfigError


def _methods_quick(out, *extra):
    assert main(["methods", "--quick", "--first-variant-only", "--steps", "1", "--output", str(out), *extra]) == 0
    return json.loads((out / "methods.json").read_text())


def test_bench_methods_init_rows_and_combine_with_a_rerun(tmp_path):
    torch.set_num_threads(1)
    first = _methods_quick(tmp_path / "a", "--methods", "lora")
    second = _methods_quick(tmp_path / "b", "--methods", "lora", "--inits", "pissa")
    assert [(r["method"], r["variant"]) for r in second["runs"]] == [("lora", "lora"), ("lora+pissa", "init")]
    assert second["profile"]["inits"] == ["pissa"]
    partial = json.loads((tmp_path / "b" / "methods.partial.json").read_text())  # written before the init row
    assert [r["method"] for r in partial["runs"]] == ["lora"] and partial["command"].endswith("(partial)")

    assert main(["methods", "--combine", str(tmp_path / "a" / "methods.json"), str(tmp_path / "b" / "methods.json"),
                 "--output", str(tmp_path / "c")]) == 0
    combined = json.loads((tmp_path / "c" / "methods.json").read_text())
    assert [(r["method"], r["seed"]) for r in combined["runs"]] == [("lora", 0), ("lora+pissa", 0)]
    assert combined["runs"][0] == second["runs"][0]  # the later file's run of (lora, seed 0) replaces the earlier
    # the same method, seed and data trained twice: the control reproduces exactly
    assert combined["reruns"] == [{"method": "lora", "variant": "lora", "seed": 0, "before": first["runs"][0]["after"],
                                   "after": second["runs"][0]["after"], "file": str(tmp_path / "b" / "methods.json")}]
    assert first["runs"][0]["after"] == second["runs"][0]["after"]
    md = (tmp_path / "c" / "methods.md").read_text()
    assert "| lora+pissa | init |" in md and "all reproduced exactly" in md and "rows lora, lora+pissa" in md
    assert (tmp_path / "c" / "methods_exact_match.png").is_file()


def _methods_result(seed=0, after=0.5, method="lora", **profile):
    run = {"method": method, "variant": method, "seed": seed, "trainable_params": 10, "after": after,
           "per_task": {"reverse": after}, "final_loss": 1.0, "s_per_step": 0.1, "peak_memory_mb": 1.0}
    prof = {**{k: v for k, v in vars(methods.QUICK).items()}, "seeds": [seed], "methods": [method], **profile}
    return {"profile": prof, "before": 0.25, "runs": [run], "command": f"lorakit bench methods --seeds {seed}"}


def test_methods_combine_pools_seeds_and_refuses_other_settings():
    result = methods.combine_results([_methods_result(0, 0.5), _methods_result(1, 0.7),
                                      _methods_result(0, 0.3, "dylora")], names=["x.json", "y.json", "z.json"])
    table = {r["method"]: r for r in result["table"]}
    assert table["lora"]["seeds"] == 2 and table["lora"]["after_mean"] == pytest.approx(0.6)
    # a row of fewer seeds is compared with LoRA on its own seeds (0.3 - 0.5), and says how many it has
    assert table["dylora"]["vs_lora"] == pytest.approx(-0.2) and result["profile"]["seeds"] == [0, 1]
    assert result["reruns"] == []
    md = methods.methods_markdown(result)
    assert "| dylora | dylora | 0.300 ± 0.000 (1 seed: [0]) | -0.200 |" in md
    assert "| lora | lora | 0.600 ± 0.141 | +0.000 |" in md and "- `z.json`: `lorakit bench methods --seeds 0`" in md
    with pytest.raises(ConfigError, match=r"y.json: its profile differs from x.json's in \{'steps': \(3, 7\)\}"):
        methods.combine_results([_methods_result(0), _methods_result(1, steps=7)], names=["x.json", "y.json"])
    with pytest.raises(ConfigError, match="y.json: the untrained model scores 0.5 there"):
        methods.combine_results([_methods_result(0), {**_methods_result(1), "before": 0.5}], names=["x.json", "y.json"])
    with pytest.raises(ConfigError, match="y.json: not a `bench methods` result"):
        methods.combine_results([_methods_result(0), {"profile": {}, "budget": {}}], names=["x.json", "y.json"])


def test_bench_inits_names_and_scope(tmp_path, capsys):
    assert methods.init_method("nlora") == ("slora", "nlora")
    assert methods.init_method("lora_sb") == ("lora_xs", "lora_sb")
    assert methods.init_method("pissa") == ("lora", "pissa")
    with pytest.raises(ConfigError, match="unknown bench init 'pisa'.*Did you mean: pissa"):
        methods.init_method("pisa")
    with pytest.raises(SystemExit):
        main(["methods", "--inits", "pisa", "--output", str(tmp_path)])
    assert "--inits: unknown bench init 'pisa'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tasks", "--inits", "pissa", "--output", str(tmp_path)])
    assert "--inits is an option of `bench methods` only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["variants", "--combine", "x.json", "--output", str(tmp_path)])
    assert "--combine is an option of `bench merge` / `bench methods` / `bench mixtures` only" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv,says", [
    (["methods", "--methods", "lora", "lroa"], "--methods: unknown method 'lroa'. Did you mean: lora"),
    (["methods", "--procedures", "galore", "galroe"],
     "--procedures: unknown training procedure 'galroe'. Did you mean: galore"),
    (["variants", "--methods", "dylora", "sroa"], "--methods: unknown method 'sroa'. Did you mean: sora"),
    (["init", "--methods", "lora", "pisa@2e-4"], "--methods: unknown init contender 'pisa'. Did you mean: pissa"),
    (["federated", "--methods", "fedit", "flroa"], "--methods: unknown federated strategy 'flroa'. Did you mean: flora"),
], ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None)
def test_bench_names_are_checked_before_the_model_loads(argv, says, tmp_path, capsys, monkeypatch):
    """Was: an unknown `bench methods --methods` name ran no row (silently filtered out), an unknown --procedures
    name failed after every method had trained, variants / init loaded the model first, federated a traceback."""
    import lorakit.hub

    def no_load(*args, **kwargs):
        raise AssertionError("the base model was loaded before the names were checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    with pytest.raises(SystemExit) as e:
        main([*argv[:1], "--quick", *argv[1:], "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"lorakit bench: error: {says}" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,ignored", [
    (["methods", "--methods", "lora"], "--methods would be ignored; leave it out"),
    (["methods", "--seeds", "1", "--inits", "pissa"], "--seeds, --inits would be ignored; leave them out"),
    (["mixtures", "--quick", "--experiments", "budget"], "--quick, --experiments would be ignored; leave them out"),
    (["merge", "--repeats", "3"], "--repeats would be ignored; leave it out"),
])
def test_combine_refuses_the_options_of_a_run(argv, ignored, tmp_path, capsys):
    """Was: `bench methods --combine A B --methods lora` pooled every method of A and B, ignoring --methods."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--combine", "a.json", "b.json", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--combine pools saved results and runs nothing, so {ignored}" in err, err
    assert not (tmp_path / "o").exists()


def _mixtures_result(seed: int) -> dict:
    """A ``bench mixtures --quick --experiments budget compose`` result's schema, for the refusal paths."""
    per_task = {"reverse": 0.5, "upper": 1.0}
    budget = [{"row": "lora r=8 (= active)", "method": "lora", "seed": seed, "trainable_params": 100,
               "s_per_step": 0.1, "final_loss": 1.0, "exact_match": 0.75 - 0.1 * seed, "per_task": per_task}]
    compose = [{"row": "adapter 'reverse' alone", "seed": seed, "exact_match": 0.5, "per_task": per_task}]
    profile = {**vars(mixtures.QUICK), "seeds": [seed], "experiments": ["budget", "compose"]}
    return {"profile": profile, "before": {"exact_match": 0.25, "per_task": per_task},
            "budget": {"runs": budget, "table": mixtures.summarise(budget)},
            "compose": {"runs": compose, "table": mixtures.summarise(compose)},
            "command": f"lorakit bench mixtures --quick --seeds {seed}"}


def test_mixtures_combine_pools_seeds_and_refuses_duplicates_and_other_settings(tmp_path):
    result = mixtures.combine_results([_mixtures_result(0), _mixtures_result(1)], names=["s0.json", "s1.json"])
    row = result["budget"]["table"][0]
    assert row["seeds"] == 2 and row["mean"] == pytest.approx(0.7) and row["sd"] == pytest.approx(0.0707, abs=1e-4)
    assert result["profile"]["seeds"] == [0, 1] and len(result["compose"]["runs"]) == 2
    assert row["trainable_params"] == 100 and isinstance(row["trainable_params"], int)  # a count, not a mean of two
    assert "- `s1.json` (seeds [1])" in mixtures.mixtures_markdown(result)
    assert mixtures.plot_mixtures(result, tmp_path).is_file()
    with pytest.raises(ConfigError, match="s0b.json: seed 0 is also in s0.json"):
        mixtures.combine_results([_mixtures_result(0), _mixtures_result(0)], names=["s0.json", "s0b.json"])
    other = _mixtures_result(1)
    other["profile"]["steps"] = 9
    with pytest.raises(ConfigError, match=r"s1.json: its settings differ from s0.json's in \{'steps': \(2, 9\)\}"):
        mixtures.combine_results([_mixtures_result(0), other], names=["s0.json", "s1.json"])
    budget_only = copy.deepcopy(_mixtures_result(1))
    budget_only["profile"]["experiments"] = ["budget"]
    with pytest.raises(ConfigError, match=r"differ from s0.json's in \{'experiments'"):
        mixtures.combine_results([_mixtures_result(0), budget_only], names=["s0.json", "s1.json"])
    with pytest.raises(ConfigError, match="s1.json: not a `bench mixtures` result"):
        mixtures.combine_results([_mixtures_result(0), {"profile": {}, "runs": []}], names=["s0.json", "s1.json"])


@pytest.mark.slow
def test_bench_mixtures_combine_real_quick_runs(tmp_path):
    torch.set_num_threads(1)
    for seed in (0, 1):
        assert main(["mixtures", "--quick", "--experiments", "budget", "--seeds", str(seed),
                     "--output", str(tmp_path / f"seed{seed}")]) == 0
    files = [str(tmp_path / f"seed{s}" / "mixtures.json") for s in (0, 1)]
    runs = [json.loads(open(f).read())["budget"]["runs"] for f in files]
    assert main(["mixtures", "--combine", *files, "--output", str(tmp_path / "all")]) == 0
    combined = json.loads((tmp_path / "all" / "mixtures.json").read_text())
    assert combined["profile"]["seeds"] == [0, 1] and combined["budget"]["runs"] == runs[0] + runs[1]
    lora = next(r for r in combined["budget"]["table"] if r["row"] == "lora r=8 (= active)")
    scores = [r["exact_match"] for rs in runs for r in rs if r["row"] == lora["row"]]
    assert lora["seeds"] == 2 and lora["mean"] == pytest.approx(sum(scores) / 2)
    assert (tmp_path / "all" / "mixtures.png").is_file() and "seeds [0, 1]" in (tmp_path / "all" / "mixtures.md").read_text()
    with pytest.raises(SystemExit):  # the same seed twice
        main(["mixtures", "--combine", files[0], files[0], "--output", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
