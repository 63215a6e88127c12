"""Every ``lorakit`` command fails the same way (lorakit.cli_parser): a mistyped flag lists its near matches, and
an error a config's validation finds names the flag the user typed, as ``lorakit <command>: error: ...``."""

from __future__ import annotations

import pytest

from lorakit.cli import main
from lorakit.cli_parser import CommandParser, with_flags


def test_field_names_become_flags_only_where_they_are_names():
    flags = {"steps": "--steps", "lr": "--lr", "AlignConfig.steps": "--loram-align-steps",
             "saved_modules": "--saved-modules", "density": "--density", "epsilon": "--epsilon",
             "hidden_size": "--hidden-size", "num_heads": "--num-heads"}
    assert with_flags("AlignConfig.steps=0: must be > 0", flags) == "--loram-align-steps 0: must be > 0"
    assert with_flags("PretrainConfig.steps must be > 0, got 0.", flags) == "--steps must be > 0, got 0."
    assert with_flags("steps must be > 0", flags) == "--steps must be > 0"
    assert with_flags("steps and hidden_size must be positive", flags) == "--steps and --hidden-size must be positive"
    assert (with_flags("Choose a rule: saved_modules='first' (the first source's copy wins)", flags)
            == "Choose a rule: --saved-modules first (the first source's copy wins)")
    assert (with_flags("got density=0.9, epsilon=0.2.", flags) == "got --density 0.9, --epsilon 0.2.")
    assert (with_flags("hidden_size (256) must be divisible by num_heads (3).", flags)
            == "--hidden-size (256) must be divisible by --num-heads (3).")
    # prose, paths, other flags and other configs' qualified names stay as they are
    for text in ("density 0 keeps no entry", "the 5 steps of /runs/steps_x.json", "--mix-ln-alpha 0.5 is read only",
                 "AlignConfig.warmup_steps=30: give 0..steps (20)", "lr_scheduler_x"):
        assert with_flags(text, flags) == text


def test_a_field_word_inside_prose_or_a_windows_path_is_left_alone():
    flags = {"data": "--data", "output": "--output", "lr": "--lr", "steps": "--steps", "lora_alpha": "--lora-alpha"}
    # a one-word field is a flag only as the subject itself, not as the noun after another word
    for text in ("the data must be JSONL lines", "Model output must be a tensor", r"C:\runs\lora_alpha\x.json",
                 r"runs\steps=3\x", "key layers.0.q_proj.lora_alpha.weight is missing"):
        assert with_flags(text, flags) == text
    assert with_flags("--steps and lr must be > 0", flags) == "--steps and --lr must be > 0"
    assert with_flags("adapter_config.json: steps must be > 0", flags) == "adapter_config.json: --steps must be > 0"


def test_a_short_only_option_is_named_as_typed(capsys):
    # `lorakit tasks -n` has no long form: its field n is written -n
    assert main(["tasks", "--jsonl", "reverse", "-n", "-1"]) == 2
    err = capsys.readouterr().err
    assert "lorakit tasks: error: -n must be >= 0, got -1" in err, err


def test_a_parser_maps_its_own_dests_and_its_field_flags():
    p = CommandParser(prog="lorakit x", field_flags={"n_merges": "--merges"})
    p.add_argument("--num-proxies", dest="n_proxies", type=int)
    p.add_argument("--old", dest="n_proxies", help=__import__("argparse").SUPPRESS)  # a hidden alias: not shown
    assert p.flags() == {"n_proxies": "--num-proxies", "n_merges": "--merges"}
    assert p.message("RegMixConfig.n_proxies must be > 0; n_merges must be > 0") == \
        "--num-proxies must be > 0; --merges must be > 0"


# One mistyped flag per lorakit command (and subcommand): argparse's exit 2 under the command's name, with the
# near match of the flag meant (also when the mistyped flag was a required one: merge, export).
MISTYPED = [
    (["train", "--lora-alfa", "2"], "lorakit train", "--lora-alpha"),
    (["eval", "--adaptr", "x", "--data", "reverse"], "lorakit eval", "--adapter"),
    (["generate", "--promt", "x"], "lorakit generate", "--prompt"),
    (["merge", "--adaptr", "x", "--output", "o"], "lorakit merge", "--adapter"),
    (["export", "x", "--outpt", "o"], "lorakit export", "--output"),
    (["serve", "--max-lroas", "3"], "lorakit serve", "--max-loras"),
    (["federate", "--ruonds", "3"], "lorakit federate", "--rounds"),
    (["merge-adapters", "a", "b", "--densty", "0.5", "--output", "o"], "lorakit merge-adapters", "--density"),
    (["generate-adapter", "--task", "t", "--generator", "g", "--output", "o", "--sed", "1"],
     "lorakit generate-adapter", "--seed"),
    (["generate-adapter", "train", "--adapters", "a", "--output", "o", "--latnet-dim", "4"],
     "lorakit generate-adapter train", "--latent-dim"),
    (["quantize", "--bitz", "3"], "lorakit quantize", "--bits"),
    (["transfer", "--adapter", "a", "--target-model", "b", "--data", "c", "--output", "d", "--treshold", "0.5"],
     "lorakit transfer", "--threshold"),
    (["bench", "merge", "--experimnets", "speed"], "lorakit bench", "--experiments"),
    (["diffusion", "train-base", "--stepz", "3"], "lorakit diffusion train-base", "--steps"),
    (["compose-image", "--lora", "x", "--scale", "2"], "lorakit compose-image", "--lora-scale"),
    (["pretrain-base", "--stepz", "3"], "lorakit pretrain-base", "--steps"),
    (["regmix", "--out", "x", "--n-proxy", "3"], "lorakit regmix", "--n-proxies"),
    (["infer-mixture", "--tokenizer", "x", "--sampel-chars", "3"], "lorakit infer-mixture", "--sample-chars"),
]


@pytest.mark.parametrize("argv,prog,meant", MISTYPED, ids=[" ".join(a[:2]) for a, _, _ in MISTYPED])
def test_a_mistyped_flag_lists_near_matches_in_every_command(argv, prog, meant, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: {prog}" in err and f"{prog}: error: " in err and "unrecognized" in err
    assert "Did you mean: " in err and meant in err.split("Did you mean: ", 1)[1]


def test_config_errors_name_the_flags_typed(tmp_path, capsys):
    """Validation the command's config does (before any model is loaded) speaks in flags, under the command."""
    (tmp_path / "a.txt").write_text("def f(x):\n    return x\n")
    (tmp_path / "b.txt").write_text("The quick brown fox.\n")
    from lorakit.assets import BASE_MODEL_PATH

    out = str(tmp_path / "out")
    cases = [
        (["train", "--loram-ratio", "0.2", "--loram-align-steps", "5", "--loram-align-lr", "-1", "--output", out],
         "lorakit train: error: --loram-align-lr must be > 0 and finite, got -1.0."),
        (["transfer", "--adapter", "a", "--target-model", "b", "--data", "reverse", "--output", out,
          "--threshold", "1.5"], "lorakit transfer: error: --threshold must be in [0, 1)"),
        (["transfer", "--adapter", "a", "--target-model", "b", "--data", "reverse", "--output", out,
          "--max-new-tokens", "0"], "lorakit transfer: error: --max-new-tokens must be a positive integer"),
        (["transfer", "--adapter", "a", "--target-model", "b", "--data", "reverse", "--output", out,
          "--generator", "tagret"], "lorakit transfer: error: --generator tagret is not one of"),
        (["pretrain-base", "--out", out, "--steps", "0"], "lorakit pretrain-base: error: --steps must be > 0"),
        (["pretrain-base", "--out", out, "--norm", "mix", "--mix-ln-alpha", "2"],
         "lorakit pretrain-base: error: --mix-ln-alpha must be a number in [0, 1]"),
        (["pretrain-base", "--out", out, "--mixture", "regmix"],
         "lorakit pretrain-base: error: --mixture regmix needs --regmix-dir"),
        (["regmix", "--out", out, "--n-proxies", "2"],
         "lorakit regmix: error: --n-proxies 2 with --test-every 4 leaves 2 proxies"),
        (["infer-mixture", "--tokenizer", str(BASE_MODEL_PATH), "--category", f"a={tmp_path / 'a.txt'}",
          "--category", f"b={tmp_path / 'b.txt'}", "--merges", "0"], "lorakit infer-mixture: error: --merges must be > 0"),
        (["merge-adapters", "a", "b", "--saved-modules", "firts", "--output", out],
         "lorakit merge-adapters: error: --saved-modules must be one of"),
        (["merge-adapters", "a", "b", "--method", "ties", "--density", "0", "--output", out],
         "lorakit merge-adapters: error: --density must be in (0, 1]"),
        (["quantize", "--method", "cbq", "--window", "2", "--overlap", "2"],
         "lorakit quantize: error: --overlap 2: need 0 <= overlap < window, got --window 2."),
        (["generate-adapter", "train", "--adapters", "a", "--output", out, "--lr", "0"],
         "lorakit generate-adapter train: error: --lr must be > 0"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert expected in captured.err, (argv, captured.err)
        assert captured.err.startswith(expected.split(" error: ")[0] + " error: ")
        assert "Config." not in captured.err and "_" not in captured.err.split("error: ", 1)[1].split(" ")[0]
    assert not (tmp_path / "out").exists()


def test_runtime_errors_carry_the_command_prefix(tmp_path, capsys):
    """Errors after parsing, in commands with subcommands and in their own-parser commands, say the command."""
    assert main(["train", "--method", "lroa"]) == 2  # read before train's parser is built
    assert capsys.readouterr().err.startswith("lorakit train: error: ")
    assert main(["inspect", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("lorakit inspect: error: ")
    assert main(["diffusion", "train-loras", "--base", str(tmp_path / "nope"), "--concepts", "digit3"]) == 2
    assert capsys.readouterr().err.startswith("lorakit diffusion train-loras: error: ")
    assert main(["regmix", "--out", str(tmp_path), "--fit-only"]) == 2
    assert capsys.readouterr().err.startswith("lorakit regmix: error: no proxies")


def test_serve_names_a_bad_adapters_root_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Was: the model loaded, then '[Errno 2] No such file or directory'; an adapter folder given itself served
    nothing (only folders under --adapters are scanned)."""
    import lorakit.hub

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --adapters was checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    adapter = tmp_path / "adapters" / "a"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "f.txt").write_text("x")
    for root, says in ((tmp_path / "nope", "does not exist: give a folder of adapter folders"),
                       (tmp_path / "f.txt", "is a file: give a folder of adapter folders"),
                       (adapter, f"is an adapter folder itself; give the folder that holds it ('{adapter.parent}')")):
        assert main(["serve", "--adapters", str(root), "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lorakit serve: error: --adapters '{root}' {says}"), err


@pytest.mark.parametrize("flag", ["--rank-pattern", "--init-options"])
def test_a_malformed_json_flag_says_json_not_a_python_name(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "reverse", "--steps", "1", flag, "{bad"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "loads" not in err
    assert f"lorakit train: error: argument {flag}: not valid JSON (Expecting property name" in err and "'{bad'" in err


@pytest.mark.parametrize("flag,value,says", [("--rank-pattern", "[1]", "must be dict[str, int], got [1] (list)"),
                                              ("--alpha-pattern", '["q"]', "must be dict[str, float], got ['q'] (list)")])
def test_valid_json_of_the_wrong_type_is_a_clear_error(flag, value, says, capsys):
    """Was an AttributeError traceback ('int' object has no attribute 'lower') for a JSON list of numbers."""
    assert main(["train", "--data", "reverse", "--steps", "1", flag, value]) == 2
    assert capsys.readouterr().err.startswith(f"lorakit train: error: {flag} {says}")


@pytest.mark.parametrize("argv", [["eval", "--data", "reverse"], ["generate", "--prompt", "x"], ["export", "--output"]])
def test_rank_on_an_adapter_without_nested_ranks_is_named_before_the_model_loads(argv, tmp_path, capsys, monkeypatch):
    """Was, after loading the model: "'lora' adapters have no setting 'rank'. Did you mean: rank_pattern? Settings:
    alpha_pattern, ..." (config fields the user never typed)."""
    import lorakit as lk
    import lorakit.hub
    from lorakit.hub import load_model_and_tokenizer

    model = load_model_and_tokenizer(None)[0]
    lk.add_adapter(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    adapter = lk.save_adapter(model, tmp_path / "a")
    capsys.readouterr()

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --rank was checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    monkeypatch.setattr(lorakit.hub, "load_model_for_merge", no_load)
    args = ([argv[0], str(adapter), "--output", str(tmp_path / "o")] if argv[0] == "export"
            else [*argv, "--adapter", str(adapter)])
    assert main([*args, "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit {argv[0]}: error: --rank applies to nested-rank adapters (dylora); {adapter} is a "
                          f"'lora' adapter"), err
    assert "rank_pattern" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["pretrain-base", "regmix"])
@pytest.mark.parametrize("under", [False, True])
def test_an_out_folder_that_is_a_file_is_refused_before_any_work(command, under, tmp_path, capsys):
    """Was: pretrain-base trained the whole base and then failed at the save; regmix: a FileExistsError traceback."""
    blocker = tmp_path / "data.jsonl"
    blocker.write_text("keep me\n")
    out = blocker / "run" if under else blocker
    extra = ["--steps", "2"] if command == "pretrain-base" else ["--n-proxies", "8"]
    assert main([command, *extra, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    where = f"lies under the file {blocker}" if under else "is an existing file"
    assert captured.err == f"lorakit {command}: error: --out {out} {where}; give a folder path\n"
    assert captured.out == "" and blocker.read_text() == "keep me\n"


# A prefix of a flag is not that flag (argparse's allow_abbrev is off in every lorakit parser and subparser): was,
# `lorakit serve --max-lora 3` ran as --max-loras 3 and `lorakit merge-adapters ... --out o` as --output o.
ABBREVIATED = [
    (["serve", "--max-lora", "3"], "lorakit serve", "--max-loras"),
    (["train", "--lora-alph", "2"], "lorakit train", "--lora-alpha"),
    (["merge-adapters", "a", "b", "--out", "o"], "lorakit merge-adapters", "--output"),
    (["transfer", "--adapter", "a", "--target-model", "b", "--data", "c", "--output", "d", "--thresh", "0.5"],
     "lorakit transfer", "--threshold"),
    (["bench", "merge", "--experiment", "speed"], "lorakit bench", "--experiments"),
    (["diffusion", "train-base", "--step", "3"], "lorakit diffusion train-base", "--steps"),
]


@pytest.mark.parametrize("argv,prog,meant", ABBREVIATED, ids=[" ".join(a[:2]) for a, _, _ in ABBREVIATED])
def test_a_prefix_of_a_flag_is_an_unknown_flag_with_its_near_match(argv, prog, meant, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{prog}: error: " in err and argv[-2] in err, err
    assert "Did you mean: " in err and meant in err.split("Did you mean: ", 1)[1], err


@pytest.mark.parametrize("command", [["merge-adapters"], ["quantize"], ["generate-adapter"], ["generate-adapter", "train"],
                                     ["bench"]])
def test_help_is_a_user_description_not_a_docstring(command, capsys):
    """Was: `merge-adapters --help` (and quantize, generate-adapter, bench) printed the function's docstring, with
    ``markup``, module paths and notes on the parser."""
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert e.value.code == 0 and len(description) > 80, out
    for developer in ("``", "lorakit.compose", "Its own parser", "(argv"):
        assert developer not in out, (developer, out)


def test_an_error_carrying_its_field_is_worded_with_the_flag_wherever_it_names_it():
    """LorakitError(field=...): the field is data, so the flag goes exactly where the text says {field} (here a
    noun after another word and before a path, where the pattern rules of with_flags rightly leave a word alone)."""
    import pickle

    from lorakit.core.errors import AdapterError, ConfigError

    p = CommandParser(prog="lorakit x", field_flags={"AlignConfig.steps": "--loram-align-steps"})
    p.add_argument("--num-proxies", dest="n_proxies", type=int)
    p.add_argument("--adapters", action="append")
    err = AdapterError("the {field} root '/a' does not exist; give {field} a folder", field="adapters")
    assert str(err) == "the adapters root '/a' does not exist; give adapters a folder"  # from Python: the name
    assert p.message(err) == "the --adapters root '/a' does not exist; give --adapters a folder"
    assert p.message(ConfigError("{field} must be > 0; steps and lr_x too", field="n_proxies")) == \
        "--num-proxies must be > 0; steps and lr_x too"
    assert p.message(ConfigError("{field}=0: must be > 0", field="AlignConfig.steps")) == "--loram-align-steps 0: must be > 0"
    assert p.message(ConfigError("{field} must be set", field="other")) == "other must be set"  # no flag: the name
    assert str(pickle.loads(pickle.dumps(err))) == str(err)  # across processes (torchrun, Flower) too
    assert str(ConfigError("{field} in a message without a field stays as written")).startswith("{field}")


def test_serve_from_python_checks_the_adapter_roots_before_the_model_loads(tmp_path, monkeypatch):
    """The check lives in lorakit.serving.server.serve (the CLI calls it), so Python callers get it too; from
    Python the message names the argument, the CLI's the flag (test above). An invalid adapter folder under a good
    root is not a startup error (it was: one bad folder stopped the server): the model loads and that folder is
    skipped at registration (tests/serving/test_serving_bad_adapters.py)."""
    pytest.importorskip("fastapi")
    import lorakit.hub
    from lorakit.core.errors import AdapterError
    from lorakit.serving.server import serve

    class ModelLoaded(Exception):
        pass

    def no_load(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    with pytest.raises(AdapterError, match=f"^adapters '{tmp_path / 'nope'}' does not exist: give a folder of adapter"):
        serve(None, [str(tmp_path / "nope")], port=0)
    bad = tmp_path / "root" / "bad"  # an adapter under a root whose config registering it would refuse
    bad.mkdir(parents=True)
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0, "lora_alpha": 4, "target_modules": ["q"]}')
    with pytest.raises(ModelLoaded):
        serve(None, [str(tmp_path / "root")], port=0)


# Counts a command reads itself (not a config field): was, `eval --eval-batch-size -2` scored 0.000 on 100 examples,
# `--eval-batch-size 0` failed after the model loaded with "range() arg 3 must not be zero", `--eval-examples 0` and
# `train --train-examples 0` silently used the defaults (100, 2000), `--eval-examples -1` said "n must be >= 0",
# `train --init lora_ga --init-batches 0` loaded the model, then "init 'lora_ga' is data-driven: pass batches".
COUNTS = [(["eval", "--data", "reverse"], "--eval-batch-size", "-2"),
          (["eval", "--data", "reverse"], "--eval-batch-size", "0"),
          (["eval", "--data", "reverse"], "--eval-examples", "0"),
          (["eval", "--data", "reverse"], "--eval-examples", "-1"),
          (["train", "--steps", "1"], "--eval-batch-size", "0"),
          (["train", "--steps", "1"], "--eval-examples", "0"),
          (["train", "--steps", "1"], "--train-examples", "0"),
          (["train", "--steps", "1", "--init", "lora_ga"], "--init-batches", "0")]


@pytest.mark.parametrize("argv,flag,value", COUNTS, ids=[f"{a[0]}{f}={v}" for a, f, v in COUNTS])
def test_a_count_below_one_is_named_before_the_model_loads(argv, flag, value, tmp_path, capsys, monkeypatch):
    import lorakit.hub

    def no_load(*args, **kwargs):
        raise AssertionError(f"the model was loaded before {flag} was checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main([*argv, flag, value, *(["--output", str(tmp_path / "o")] if argv[0] == "train" else [])])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"lorakit {argv[0]}: error: argument {flag}: must be a positive integer, got {value}" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method,field,mine,theirs", [("increlora", "beta1", "0.8", "0.7"),
                                                      ("dylora", "rank", "2", "16")])
def test_a_procedure_option_named_like_a_method_option_gets_the_procedure_prefix(method, field, mine, theirs, capsys):
    """Was: `lorakit train --method increlora --procedure galore` crashed building its parser (argparse's
    "conflicting option string: --beta1"): IncreLoRA's score EMAs and GaLore's Adam betas share the name, as DyLoRA's
    serving rank and GaLore's projection rank. The method keeps --FIELD, the procedure's is --galore-FIELD, and each
    value reaches its own config."""
    from lorakit.cli import _procedure_settings, build_parser

    args = build_parser(method, "galore").parse_args(
        ["train", "--method", method, "--procedure", "galore", f"--{field}", mine, f"--galore-{field}", theirs])
    assert str(getattr(args, field)) == mine
    assert str(_procedure_settings(args)["procedure_args"][field]) == theirs
    with pytest.raises(SystemExit):
        main(["train", "--method", method, "--procedure", "galore", "--help"])
    assert f"--galore-{field}" in capsys.readouterr().out


def test_a_boolean_field_with_a_value_reads_as_its_flag_or_its_no_form():
    """argparse's BooleanOptionalAction (every bool config field: cli_options) takes no value: ``save_pruned=False``
    is typed ``--no-save-pruned`` and ``save_pruned=True`` ``--save-pruned``, never ``--save-pruned False``."""
    import argparse

    from lorakit.core.errors import ConfigError

    parser = CommandParser(prog="x")
    parser.add_argument("--save-pruned", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--rank", type=int)
    got = parser.message(ConfigError("Set save_pruned=False to keep it in memory, or save_pruned=True with rank=4."))
    assert got == "Set --no-save-pruned to keep it in memory, or --save-pruned with --rank 4."
    # without the negation map (a plain mapping), a value stays a value
    assert with_flags("save_pruned=False", {"save_pruned": "--save-pruned"}) == "--save-pruned False"


def test_a_list_of_fields_is_worded_as_flags_whole():
    """Was: ``it reads density, --lambda, --majority-sign-method, normalize``: only names with an underscore (or a
    field_flags entry) became flags in a list, one-word ones stayed field names. A comma list with two or more fields
    is now written as flags whole; a list of other names (modules, methods) with at most one field in it, or a field
    in prose, is left as it is."""
    flags = {"density": "--density", "lambda_": "--lambda", "normalize": "--normalize", "steps": "--steps",
             "majority_sign_method": "--majority-sign-method"}
    assert (with_flags("it reads density, lambda_, majority_sign_method, normalize. Drop it", flags)
            == "it reads --density, --lambda, --majority-sign-method, --normalize. Drop it")
    assert with_flags("set density, steps, or normalize", flags) == "set --density, --steps, or --normalize"
    assert with_flags("targets q_proj, v_proj, density", flags) == "targets q_proj, v_proj, density"
    assert with_flags("keys 'density', 'steps'", flags) == "keys 'density', 'steps'"
    assert with_flags("the density and steps of it", flags) == "the density and steps of it"


def test_merge_options_a_method_ignores_are_named_as_flags_on_the_cli_and_as_fields_in_python(tmp_path, capsys):
    from lorakit.compose import merge_adapters
    from lorakit.core.errors import ConfigError

    assert main(["merge-adapters", "a", "b", "--method", "ties", "--epsilon", "0.1", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert ("--epsilon 0.1 has no effect on merge method 'ties'; it reads --density, --lambda, --majority-sign-method, "
            "--normalize, --rescale, --seed. Drop it") in err, err
    with pytest.raises(ConfigError) as e:
        merge_adapters(["a", "b"], None, "ties", epsilon=0.1)
    assert ("epsilon=0.1 has no effect on merge method 'ties'; it reads density, lambda_, majority_sign_method, "
            "normalize, rescale, seed.") in str(e.value)


def test_pretrain_base_replaces_a_non_empty_out_only_with_overwrite(tmp_path, capsys):
    """Was: only the bundled base folder needed --overwrite; any other non-empty --out was replaced whole (its files
    lost) after the training. Now the main CLI's output check runs first, before any work."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    assert main(["pretrain-base", "--out", str(out), "--steps", "2"]) == 2
    assert capsys.readouterr().err == (f"lorakit pretrain-base: error: --out {out} already exists and is not empty; "
                                       "pass --overwrite to replace what this command writes there, or choose a new "
                                       "folder\n")
    assert (out / "notes.txt").read_text() == "keep me\n"


@pytest.mark.parametrize("argv,meant", [
    (["trian"], "train"), (["pretrain"], "pretrain-base"), (["bench", "perff"], "perf"),
    (["quantize", "--method", "cqb"], "cbq"), (["train", "--quantize", "nf5"], "nf4"),
    (["bench", "merge", "--experiments", "qualty"], "quality"),
])
def test_an_invalid_choice_names_its_near_matches(argv, meant, capsys):
    """Was: argparse's "invalid choice: 'trian' (choose from 'train', 'eval', ...)" with no near match, where every
    name lorakit itself checks (methods, tasks, objectives, domains) says "Did you mean"."""
    from lorakit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "invalid choice" in err and "Did you mean: " in err, err
    assert meant in err.split("Did you mean: ")[1].rstrip("?").split(", "), err
