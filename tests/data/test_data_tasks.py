"""Built-in tasks: determinism, held-out test inputs, gold scores and stdlib provenance."""

from __future__ import annotations

import ast
import importlib
import inspect
import sysconfig
import warnings
from pathlib import Path

import pytest

from lorakit.core.errors import ConfigError
from lorakit.data import TASKS, Example, get_task, list_tasks, load_examples, pretraining_texts
from lorakit.data.tasks import SPLITS, is_held_out, numeric_match, stdlib_function_facts

TASK_NAMES = list_tasks()


def test_at_least_nine_tasks_with_descriptions() -> None:
    assert len(TASKS) >= 9
    for name, task in TASKS.items():
        assert task.name == name
        assert task.description and "\n" not in task.description


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_data_other_seed_other_data(name: str) -> None:
    task = get_task(name)
    for split in SPLITS:
        first = task.generate(split, 20, seed=3)
        assert first == task.generate(split, 20, seed=3)
        assert first != task.generate(split, 20, seed=4)
    assert task.generate("train", 20, 3) != task.generate("pretrain", 20, 3)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_examples_are_well_formed(name: str) -> None:
    for ex in get_task(name).generate("train", 50, seed=0):
        assert isinstance(ex, Example) and ex.task == name
        assert ex.prompt.startswith(f"{name}: ") and ex.prompt.endswith(" =>")
        assert ex.completion.startswith(" ") and ex.completion.strip()
        assert not ex.completion.endswith("\n")
        assert len(ex.prompt) + len(ex.completion) < 120


@pytest.mark.parametrize("name", TASK_NAMES)
def test_test_split_is_held_out(name: str) -> None:
    task = get_task(name)
    test_prompts = {ex.prompt for ex in task.generate("test", 200, seed=0)}
    for split in ("train", "pretrain"):
        seen = {ex.prompt for seed in (0, 1) for ex in task.generate(split, 300, seed=seed)}
        assert not test_prompts & seen
    # The partition is by input, so inputs held out of one task never train any other task either.
    test_inputs = {ex.prompt.split(": ", 1)[1] for ex in task.generate("test", 100, seed=0)}
    for other in ("rotate", "sort"):
        if other != name and name in ("reverse", "rotate", "sort"):
            trained = {ex.prompt.split(": ", 1)[1] for ex in get_task(other).generate("train", 300, 0)}
            assert not test_inputs & trained


@pytest.mark.parametrize("name", TASK_NAMES)
def test_gold_completions_score_one(name: str) -> None:
    task = get_task(name)
    examples = task.generate("test", 50, seed=0)
    assert all(task.score(ex.completion, ex.completion) == 1.0 for ex in examples)
    assert all(task.score(ex.completion.strip() + "\n", ex.completion) == 1.0 for ex in examples)
    assert task.score(" definitely wrong", examples[0].completion) == 0.0


def test_conflicting_string_tasks_share_inputs_but_disagree() -> None:
    word = "dbca"
    answers = {name: get_task(name).render(word) for name in ("reverse", "rotate", "sort")}
    assert {prompt.split(": ", 1)[1] for prompt, _ in answers.values()} == {"d b c a =>"}
    assert answers["reverse"][1] == " a c b d"
    assert answers["rotate"][1] == " b c a d"
    assert answers["sort"][1] == " a b c d"


def test_arithmetic_and_lookup_answers_are_correct() -> None:
    for ex in get_task("add").generate("train", 30, 0):
        a, b = ex.prompt.removeprefix("add: ").removesuffix(" =>").split(" + ")
        assert int(ex.completion) == int(a) + int(b)
    for ex in get_task("mul").generate("test", 30, 0):
        a, b = ex.prompt.removeprefix("mul: ").removesuffix(" =>").split(" * ")
        assert int(ex.completion) == int(a) * int(b)
    for ex in get_task("lookup").generate("train", 30, 0):
        table, query = ex.prompt.removeprefix("lookup: ").removesuffix(" =>").split(" ; ")
        assert dict(pair.split("=") for pair in table.split())[query] == ex.completion.strip()


def test_numeric_metric_ignores_formatting() -> None:
    assert numeric_match(" 007", " 7") == 1.0
    assert numeric_match("+12", "12") == 1.0
    assert numeric_match("12x", "12") == 0.0


def _runtime_function(qualname: str):
    module_name, name = qualname.rsplit(".", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    return getattr(module, name)


def test_stdlib_facts_come_from_the_real_stdlib() -> None:
    facts = stdlib_function_facts()
    assert len(facts) > 300
    assert facts == stdlib_function_facts()  # cached, and deterministic
    by_name = {f.qualname: f for f in facts}
    assert by_name["posixpath.join"].n_params == 1  # def join(a, *p)
    assert by_name["textwrap.dedent"].n_params == 1

    for ex in get_task("py_argc").generate("test", 15, seed=0) + get_task("py_argc").generate("train", 15, 0):
        qualname = ex.prompt.removeprefix("py_argc: ").removesuffix(" =>")
        func = _runtime_function(qualname)
        params = inspect.signature(func).parameters.values()
        named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert len(named) == int(ex.completion), qualname


def test_py_name_answer_is_a_function_with_that_docstring() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    by_doc = {f.doc_line: f for f in get_task("py_name").pool()}
    for ex in get_task("py_name").generate("test", 10, seed=0):
        fact = by_doc[ex.prompt.removeprefix("py_name: ").removesuffix(" =>")]
        assert fact.name == ex.completion.strip()
        assert " ".join(inspect.getdoc(_runtime_function(fact.qualname)).split()).startswith(fact.doc_line)
        # Independently of the cached extractor: the def is in the module's own source file.
        base = stdlib.joinpath(*fact.module.split("."))
        path = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert any(isinstance(node, ast.FunctionDef) and node.name == fact.name for node in tree.body)


def test_stdlib_train_test_partition_is_by_function() -> None:
    for name in ("py_name", "py_argc"):
        task = get_task(name)
        train = {task.key(item) for item in task.pool() if not is_held_out(task.key(item))}
        test = {task.key(item) for item in task.pool() if is_held_out(task.key(item))}
        assert train and test and not train & test
        assert 0.1 < len(test) / (len(train) + len(test)) < 0.3


def test_generate_more_than_a_finite_pool_cycles() -> None:
    task = get_task("mul")
    test_size = sum(is_held_out(task.key(item)) for item in task.pool())
    examples = task.generate("test", test_size + 5, seed=0)
    assert len(examples) == test_size + 5
    assert len({ex.prompt for ex in examples[:test_size]}) == test_size


def test_get_task_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match="reverse") as info:
        get_task("revers")
    assert "Available" in str(info.value) and "py_argc" in str(info.value)


def test_bad_split_and_n() -> None:
    with pytest.raises(ValueError, match="split"):
        get_task("add").generate("validation", 3, 0)
    with pytest.raises(ValueError, match="n must be"):
        get_task("add").generate("train", -1, 0)


def test_pretraining_texts() -> None:
    texts = pretraining_texts(n_per_task=5, seed=0)
    assert len(texts) == 5 * len(TASKS)
    assert texts == pretraining_texts(5)
    assert texts != pretraining_texts(5, seed=1)
    assert all(" => " in text or "=> " in text for text in texts)
    assert {text.split(":", 1)[0] for text in texts} == set(TASKS)


def test_load_examples_multi_task_is_shuffled_and_deterministic() -> None:
    examples = load_examples("reverse, add", "train", n=10, seed=0)
    assert len(examples) == 20
    assert {ex.task for ex in examples} == {"reverse", "add"}
    assert examples == load_examples("reverse,add", "train", n=10, seed=0)
    assert [ex.task for ex in examples] != ["reverse"] * 10 + ["add"] * 10
    assert load_examples("sort", "test", 4, 1) == get_task("sort").generate("test", 4, 1)
    with pytest.raises(ValueError, match="required"):
        load_examples("sort")
    with pytest.raises(ValueError, match="unknown task"):
        load_examples("sort,nope", n=3)


def test_rotate_family_rotates_by_k_and_stays_out_of_the_registry():
    from lorakit.data import find_task, rotate_task

    assert rotate_task(1) is TASKS["rotate"]
    three = get_task("rotate3")
    assert three.render("abcde") == ("rotate3: a b c d e =>", " d e a b c")
    assert three.render("abc")[1] == " a b c"  # k modulo the length
    assert get_task("rotate2").render("abcd")[1] == " c d a b"
    assert find_task("rotate10") is None and find_task("rotate03") is None and find_task("rotate0") is None
    assert "rotate3" not in TASKS and "rotate3" not in list_tasks()
    assert not any(t.startswith("rotate3:") for t in pretraining_texts(n_per_task=2))
    ex = load_examples("rotate3", "test", n=3)
    assert all(e.task == "rotate3" for e in ex)
    with pytest.raises(ValueError, match="offset k"):
        rotate_task(0)
    with pytest.raises(ConfigError, match="Did you mean: rotate3"):
        get_task("rotat3")
