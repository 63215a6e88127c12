"""JSONL loading: the three record formats, task keys, and errors that point at the bad line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.data import DataError, Example, load_examples, load_jsonl


def write(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_three_formats_blank_lines_and_task_keys(tmp_path: Path) -> None:
    path = write(tmp_path, [
        json.dumps({"prompt": "Q: 2+2 =", "completion": " 4", "task": "math", "id": 7}),
        "",
        "   ",
        json.dumps({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ], "key": "chat"}),
        json.dumps({"text": "just some text"}),
    ])
    examples = load_jsonl(path)
    assert examples == [
        Example("Q: 2+2 =", " 4", "math"),
        Example("system: Be brief.\nuser: hi\nassistant:", " hello", "chat"),
        Example("", "just some text", None),
    ]
    assert load_examples(path) == examples
    assert load_examples(str(path), n=2) == examples[:2]


def test_messages_use_the_tokenizer_chat_template(tmp_path: Path, tokenizer) -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "two"},
    ]
    path = write(tmp_path, [json.dumps({"messages": messages})])
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        [example] = load_jsonl(path, tokenizer=tokenizer)
    finally:
        tokenizer.chat_template = original
    # Loss only on the last assistant turn: earlier turns, including "one", are prompt.
    assert example.prompt == "<|user|>first</s><|assistant|>one</s><|user|>second</s><|assistant|>"
    assert example.completion == "two</s>"


def test_messages_without_template_fall_back(tmp_path: Path, tokenizer) -> None:
    assert tokenizer.chat_template is None
    path = write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "x"},
                                                     {"role": "assistant", "content": "y"}]})])
    assert load_jsonl(path, tokenizer=tokenizer) == [Example("user: x\nassistant:", " y")]


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('"text"', "expected a JSON object, got a string"),
    ('{"input": "x"}', "expected a 'prompt'\\+'completion', 'messages' or 'text'"),
    ('{"prompt": "x"}', "missing field 'completion'"),
    ('{"completion": "x"}', "missing field 'prompt'"),
    ('{"prompt": 3, "completion": "x"}', "'prompt' must be a string, got a number"),
    ('{"prompt": "x", "completion": ""}', "'completion' is empty"),
    ('{"text": null}', "'text' must be a string, got null"),
    ('{"text": "a", "prompt": "b", "completion": "c"}', "ambiguous"),
    ('{"messages": []}', "non-empty array"),
    ('{"messages": "hi"}', "non-empty array, got a string"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\].content must be a string, got nothing"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant"),
    ('{"messages": [1]}', r"messages\[0\] must be an object"),
    ('{"text": "a", "task": 5}', "'task' must be a string"),
    ('{"text": "a", "task": "x", "key": "y"}', "disagree"),
    ('{"text": "a", "routing": [1, 2]}', "'routing' must be an object"),
    ('{"text": "a", "routing": {"user_state": []}}', r"routing\['user_state'\] must be a number or a non-empty"),
    ('{"text": "a", "routing": {"user_state": [1, "x"]}}', "finite numbers"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
def test_malformed_line_reports_file_and_line(tmp_path: Path, bad: str, message: str) -> None:
    good = json.dumps({"prompt": "p", "completion": " c"})
    path = write(tmp_path, [good, "", good, bad, good])
    with pytest.raises(DataError, match=message) as info:
        load_jsonl(path)
    assert f"{path}:4:" in str(info.value)  # 1-based, blank lines counted
    assert isinstance(info.value, ValueError)


def test_invalid_utf8_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8"):
        load_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(path)


def test_routing_vectors_are_read_and_frozen(tmp_path: Path) -> None:
    path = write(tmp_path, [json.dumps({"prompt": "p", "completion": " c", "routing": {"user_state": [0.5, -1],
                                                                                       "age": 3}})])
    (ex,) = load_jsonl(path)
    assert ex.routing == (("age", (3.0,)), ("user_state", (0.5, -1.0)))
    assert hash(ex) == hash(Example("p", " c", routing={"user_state": [0.5, -1], "age": 3}))
    with pytest.raises(ValueError, match="finite numbers"):
        Example("p", " c", routing={"u": [float("nan")]})
