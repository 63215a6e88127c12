"""``lorakit bench``'s command line: lorakit's own errors raised during a run, and wrong ``--only`` names, read as
``lorakit bench: error: ...`` (no traceback), as every other command's errors do."""

from __future__ import annotations

import pytest

from lorakit.cli import ErrorsReported, main
from lorakit.cli_parser import CommandParser


def test_a_config_error_inside_a_bench_is_the_commands_error(tmp_path, capsys):
    """Was: `bench federated --clients 0` printed a traceback ending in FederatedConfig's ConfigError."""
    assert main(["bench", "federated", "--quick", "--clients", "0", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "lorakit bench: error: --clients must be >= 1, got 0\n", err
    assert not (tmp_path / "federated.json").exists()


def test_errors_reported_maps_lorakit_errors_and_lets_others_through(capsys):
    from lorakit.core.errors import ConfigError
    from lorakit.training import AdapterSaveError

    parser = CommandParser(prog="lorakit bench")
    parser.add_argument("--steps", type=int)
    with ErrorsReported(parser) as run:
        raise ConfigError("{field} must be > 0, got 0", field="steps")
    assert run.status == 2 and capsys.readouterr().err == "lorakit bench: error: --steps must be > 0, got 0\n"
    with ErrorsReported(parser) as run:
        raise AdapterSaveError("cannot write out/adapter (disk full); saved to /tmp/rescue", "/tmp/rescue")
    assert run.status == 1 and "lorakit bench: error: cannot write" in capsys.readouterr().err
    with ErrorsReported(parser) as run:
        run.status = 0
    assert run.status == 0
    with pytest.raises(RuntimeError, match="a bug"), ErrorsReported(parser):  # not lorakit's: its traceback shows
        raise RuntimeError("a bug")
    with pytest.raises(ValueError), ErrorsReported(parser):  # only where a command asks (also=...)
        raise ValueError("not lorakit's")


@pytest.fixture
def no_model(monkeypatch):
    """Any model a bench builds or loads fails the test: the check must come first."""
    import importlib
    import pkgutil

    import lorakit.bench
    import lorakit.bench.perf
    import lorakit.hub

    # Modules that bind ``from .perf import build_model`` at import must be imported before the patch, or the
    # patched function would stay bound in them for the tests that follow.
    for info in pkgutil.iter_modules(lorakit.bench.__path__):
        importlib.import_module(f"lorakit.bench.{info.name}")

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before --only was checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    monkeypatch.setattr(lorakit.bench.perf, "build_model", no_load)


ONLY = [  # bench, a mistyped --only name, its near match, another valid name listed
    ("perf", "forwrd", "forward", "mixed"),
    ("perf", "qlroa", "qlora", "ddp"),
    ("init", "convergance", "convergence", "cost"),
    ("quantize", "cpf", "cfp", "cfp"),
    ("smaller", "loram_alinged", "loram_aligned", "loraprune"),
    ("gamma_mod", "gamma_mod_arank", "gamma_mod_arank_mod", "gamma_mod_unmasked"),
]


@pytest.mark.parametrize("what,wrong,meant,listed", ONLY, ids=[f"{w}-{x}" for w, x, _, _ in ONLY])
def test_a_wrong_only_name_fails_before_any_model_with_near_matches(what, wrong, meant, listed, tmp_path, capsys,
                                                                     no_model):
    """Was: `bench quantize --only cpf` ran the whole quantize table, `bench perf --only forwrd` ran no row, and
    smaller / gamma_mod named the wrong variant only inside the run (a traceback)."""
    with pytest.raises(SystemExit) as e:
        main(["bench", what, "--quick", "--only", wrong, "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lorakit bench: error: --only: unknown bench {what} ") and f"{wrong!r}" in line, line
    assert f"Did you mean: {meant}" in line and "Choose from " in line and listed in line.split("Choose from ")[1]
    assert not list(tmp_path.iterdir())  # nothing written


def test_only_names_are_checked_once_for_python_callers_too():
    """The Python entry points check the same names (core.errors.check_names) before any work."""
    from dataclasses import replace

    from lorakit.bench import gamma_mod, inits, perf, smaller
    from lorakit.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown bench perf row 'forwrd'\. Did you mean: forward\?"):
        perf.run_perf(perf.QUICK, device="cpu", only=["forwrd"])
    with pytest.raises(ConfigError, match=r"unknown bench init part 'costs'\. Did you mean: cost\? Choose from "
                                          r"convergence, cost\."):
        inits.run_inits(inits.QUICK, device="cpu", parts=("costs",))
    with pytest.raises(ConfigError, match="Did you mean: loram_aligned"):
        smaller.run_smaller(replace(smaller.QUICK, variants=("loram_alinged",)))
    with pytest.raises(ConfigError, match="Did you mean: gamma_mod_arank_mod"):
        gamma_mod.run_gamma_mod(replace(gamma_mod.QUICK, variants=("gamma_mod_arank",)))


SERVE_BAD = [  # bench serve flags that describe no workload, and what the error says
    (["--num-adapters", "0"], "--num-adapters must be a positive integer, got 0"),
    (["--req-rate", "0"], "--req-rate must be > 0 and finite, got 0.0"),
    (["--duration", "-1"], "--duration must be > 0 and finite, got -1.0"),
    (["--max-batch", "0"], "--max-batch must be a positive integer, got 0"),
    (["--models", "bundld"], "unknown bench serve model 'bundld'. Did you mean: bundled?"),
    # was: OverflowError / MemoryError tracebacks building the trace, or a run over an empty trace
    (["--req-rate", "inf"], "--req-rate must be > 0 and finite, got inf"),
    (["--duration", "1e9"], "the trace's length, --req-rate x --duration = 4 x 1e+09 = 4000000000 requests, must be 1"),
    (["--req-rate", "0.1", "--duration", "1"], "the trace's length, --req-rate x --duration = 0.1 x 1 = 0 requests"),
]


@pytest.mark.parametrize("flags,says", SERVE_BAD, ids=[f[0] for f, _ in SERVE_BAD])
def test_a_serve_workload_that_cannot_run_is_refused_before_any_model(flags, says, tmp_path, capsys, no_model):
    """Was: `bench serve --num-adapters 0` wrote zero adapters, then a bare StopIteration traceback."""
    assert main(["bench", "serve", "--quick", *flags, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"lorakit bench: error: {says}"), err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tasks,says", [("reverse,nope", "--tasks: unknown task 'nope'."),
                                        ("reverse,", "--tasks 'reverse,': give comma-separated task names")])
def test_bench_tasks_names_are_checked_before_any_model(tasks, says, tmp_path, capsys, no_model):
    """Was: `bench methods --tasks nope` trained nothing and ended in the data module's ValueError traceback."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "methods", "--quick", "--tasks", tasks, "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"lorakit bench: error: {says}"), err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bench", ["methods", "tasks"])
def test_a_malformed_tasks_file_is_named_before_any_model(bench, tmp_path, capsys, no_model):
    """Was: `bench methods --tasks bad.jsonl` ended in a DataError traceback (the bench's errors let data errors
    through); a JSONL file given to --tasks is read with the checks, its bad line named."""
    data = tmp_path / "my data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(SystemExit) as e:
        main(["bench", bench, "--quick", "--tasks", str(data), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"lorakit bench: error: --tasks: {data}:2: missing field 'completion'", err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bench", ["serve", "perf", "methods", "tasks", "mixtures"])
def test_an_output_that_cannot_be_written_is_refused_before_any_model(bench, tmp_path, capsys, no_model):
    """Was: `bench serve --output X` with X unwritable ended in mkdir's FileNotFoundError traceback, and `bench tasks`
    / `mixtures` / `methods` created --output only after the whole run, failing there with the results lost."""
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["bench", bench, "--quick", "--output", str(blocker / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"lorakit bench: error: --output {blocker / 'out'}: {blocker} is a file, "
                                            f"so the folder cannot be created"), err


def test_the_output_check_leaves_another_benchs_temp_files_alone(tmp_path, capsys):
    """Every bench defaults to runs/bench: the up-front --output check (which other commands also use to remove a
    killed save's leftovers) must not delete the temp files a bench running there now is about to rename."""
    in_flight = [tmp_path / ".perf.json.k3j2.tmp", tmp_path / ".adapter.tmp-9f"]
    in_flight[0].write_text("half a report")
    in_flight[1].mkdir()
    assert main(["bench", "federated", "--quick", "--clients", "0", "--output", str(tmp_path)]) == 2  # checked, then
    assert "--clients must be >= 1" in capsys.readouterr().err                                     # refused in the run
    assert all(p.exists() for p in in_flight)


COUNTS_BAD = [  # bench, a count flag at 0 or below; each used to run (or load a model) before failing
    ("reparam", ["--batch-size", "0"]),  # was: collate's "cannot collate an empty batch" traceback
    ("merge", ["--repeats", "0"]),  # was: min() of an empty sequence, a traceback after the timing setup
    ("init", ["--repeats", "0"]),  # was: a cost table of "failed: no sample yet" rows written, exit 0
    ("variants", ["--r", "0"]),  # was: "LoraConfig.lora_alpha must be > 0" (a flag the bench has not)
    ("reparam", ["--r", "0"]),
    ("gamma_mod", ["--r", "-2"]),
    ("smaller", ["--steps", "0"]),  # was: every variant's row an error, the table written, exit 0
    ("quantize", ["--steps", "0"]),  # was: refused only after the model had loaded
    ("federated", ["--steps", "0"]),  # was: named FederatedConfig.local_steps, not the flag
]


@pytest.mark.parametrize("what,flags", COUNTS_BAD, ids=[f"{w}{f[0]}={f[1]}" for w, f in COUNTS_BAD])
def test_a_count_below_one_is_refused_by_its_flag_before_any_model(what, flags, tmp_path, capsys, no_model):
    with pytest.raises(SystemExit) as e:
        main(["bench", what, "--quick", *flags, "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"lorakit bench: error: argument {flags[0]}: must be a positive integer, "
                                            f"got {int(flags[1])}"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("what", ["quantize", "gamma_mod", "serve"])
def test_a_bench_of_one_seed_refuses_several_before_any_model(what, tmp_path, capsys, no_model):
    """Was: `bench quantize --seeds 0 1` ran seed 0 only and reported it as the run asked for (these benches take
    one seed; the others run every seed given)."""
    with pytest.raises(SystemExit) as e:
        main(["bench", what, "--quick", "--seeds", "0", "1", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1] == (
        f"lorakit bench: error: --seeds: bench {what} runs one seed, got 2 (0 1); run it once per seed"), err
    assert not (tmp_path / "o").exists()
