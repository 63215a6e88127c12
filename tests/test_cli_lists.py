"""Comma-separated flag values: an empty item (``lora,,dora``, a leading or trailing comma) is its own error naming
the flag, the value and the empty item, before any model loads; it is never dropped silently, nor read as one name
(``unknown method 'lora,,dora'``). List flags that take several values (``bench --methods a b``) take them separated by
commas too (``--methods a,b``)."""

from __future__ import annotations

import pytest

from lorakit.cli import main
from lorakit.core.errors import ConfigError, comma_items


def test_comma_items():
    assert comma_items("lora, dora", "--methods") == ["lora", "dora"]
    assert comma_items("", "--methods") == []
    for text, item in [("lora,,dora", 2), (",lora", 1), ("lora,", 2), ("lora, ,dora", 2)]:
        with pytest.raises(ConfigError) as e:
            comma_items(text, "--methods", "method names")
        assert str(e.value) == (f"--methods {text!r}: give comma-separated method names, none empty (item {item} "
                                "is empty)")


def test_a_config_fields_empty_item_names_the_field():
    from lorakit.training import TrainConfig

    for procedure, field, value in [("longlora", "trainable_params", "embed,,norm"),
                                    ("loraprune", "protected_blocks", "0,,1")]:
        with pytest.raises(ConfigError, match="none empty") as e:
            TrainConfig(procedure=procedure, procedure_args={field: value})
        assert e.value.field.endswith(f".{field}")


def _fails(argv, says, capsys, prefix):
    """``main(argv)`` exits 2 (returned or raised) with ``<prefix>: error: ...says...`` on stderr, no traceback."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prefix}: error: ") and says in last, err


@pytest.mark.parametrize("flag,value", [("--methods", "lora,,dora"), ("--methods", "lora,"), ("--procedures", ",galore"),
                                        ("--inits", "pissa,,eva"), ("--seeds", "0,,1")])
def test_bench_list_flags_refuse_an_empty_item(flag, value, tmp_path, capsys):
    _fails(["bench", "methods", "--quick", flag, value, "--output", str(tmp_path)],
           f"argument {flag}: {value!r}: give comma-separated", capsys, "lorakit bench")
    assert not list(tmp_path.iterdir())


def test_bench_methods_takes_commas_and_checks_each_name(tmp_path, capsys):
    _fails(["bench", "methods", "--quick", "--methods", "lora,dorra", "--output", str(tmp_path)],
           "--methods: unknown method 'dorra'.", capsys, "lorakit bench")


@pytest.mark.parametrize("argv,says,prefix", [
    (["train", "--data", "reverse,,sort"], "--data 'reverse,,sort': give comma-separated", "lorakit train"),
    (["eval", "--data", "reverse,"], "--data 'reverse,': give comma-separated", "lorakit eval"),
    (["federate", "--target-modules", "q_proj,,v_proj"], "--target-modules 'q_proj,,v_proj': give comma-separated",
     "lorakit federate"),
    (["federate", "--stragglers", "0,,1"], "--stragglers '0,,1': give comma-separated", "lorakit federate"),
    (["federate", "--data", ",reverse"], "--data ',reverse': give comma-separated", "lorakit federate"),
    (["train", "--procedure", "longlora", "--trainable-params", "embed,,norm"],
     "--trainable-params 'embed,,norm': give comma-separated", "lorakit train"),
    (["train", "--procedure", "loraprune", "--protected-blocks", "0,,1"],
     "--protected-blocks '0,,1': give comma-separated", "lorakit train"),
    (["train", "--target-modules", "q_proj,,v_proj"], "--target-modules 'q_proj,,v_proj': give comma-separated",
     "lorakit train"),
    (["train", "--method", "routed_lora", "--expert-r", "2,,2"], "--expert-r '2,,2': give comma-separated",
     "lorakit train"),
    (["regmix", "--domains", "code,,tasks"], "--domains 'code,,tasks': give comma-separated", "lorakit regmix"),
    (["pretrain-base", "--mixture", "code=0.5,,tasks=0.5"], "give comma-separated", "lorakit pretrain-base"),
])
def test_comma_flags_refuse_an_empty_item_before_any_model(argv, says, prefix, tmp_path, capsys, monkeypatch):
    import lorakit.hub

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_model)
    out = {"regmix": ["--out"], "pretrain-base": ["--out"], "eval": []}.get(argv[0], ["--output"])
    out = out + [str(tmp_path / "o")] if out else []
    _fails([*argv, *out], says, capsys, prefix)
    assert not (tmp_path / "o").exists()


def test_bench_tasks_reach_the_bench_without_spaces(tmp_path, capsys, monkeypatch):
    """`--tasks "reverse, sort"`: the names were checked stripped, then split again unstripped (' sort') by a bench."""
    import lorakit.bench.methods as methods

    seen = {}

    def run_tasks(profile):
        seen["tasks"] = profile.tasks
        raise ConfigError("stop here")

    monkeypatch.setattr(methods, "run_tasks", run_tasks)
    _fails(["bench", "tasks", "--quick", "--tasks", "reverse, sort", "--output", str(tmp_path)], "stop here", capsys,
           "lorakit bench")
    assert seen["tasks"] == ("reverse", "sort")


@pytest.mark.parametrize("method,comma,spaced", [
    ("lora", ["--target-modules", "q_proj,v_proj"], ["--target-modules", "q_proj", "v_proj"]),
    ("lora", ["--target-modules", "q_proj, v_proj", "o_proj"], ["--target-modules", "q_proj", "v_proj", "o_proj"]),
    ("lora", ["--layers-to-transform", "0,1"], ["--layers-to-transform", "0", "1"]),
    ("routed_lora", ["--expert-r", "2,4", "--adapter-names", "a,b"],
     ["--expert-r", "2", "4", "--adapter-names", "a", "b"]),
])
def test_method_list_flags_take_commas_as_federate_and_bench_do(method, comma, spaced, tmp_path):
    """A method's list flag takes its values comma-separated too (as ``federate --target-modules q_proj,v_proj`` and
    ``bench --methods a,b`` do). Was: ``train --target-modules q_proj,v_proj`` became the regex 'q_proj,v_proj',
    which matched no module (after the model loaded), and ``--expert-r 2,4`` was "must be list[int], got ['2,4']"."""
    from lorakit import get_method
    from lorakit.cli import build_parser
    from lorakit.cli_options import config_from_args

    cls = get_method(method).config_cls

    def config(words):
        args = build_parser(method).parse_args(["train", "--method", method, *words, "--output", str(tmp_path)])
        return config_from_args(cls, args)

    assert config(comma) == config(spaced)


def test_a_regex_with_a_comma_stays_a_regex(tmp_path):
    from lorakit.cli import build_parser
    from lorakit.cli_options import config_from_args
    from lorakit.methods.lora import LoraConfig

    regex = r".*layers\.[0-9]{1,2}\.self_attn\.(q|v)_proj"
    args = build_parser("lora").parse_args(["train", "--target-modules", regex, "--output", str(tmp_path)])
    assert config_from_args(LoraConfig, args).target_modules == regex
