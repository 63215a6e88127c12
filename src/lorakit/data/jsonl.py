"""User data from JSONL: one example per line, in any of three formats (mixable within a file).

- `{"prompt": str, "completion": str}`: loss on the completion.
- `{"messages": [{"role": str, "content": str}, ...]}`: rendered with the tokenizer's chat template
  when it has one, else as "<role>: content\\n" lines; loss on the last message, which must be the
  assistant's.
- `{"text": str}`: loss on every token.
- `{"text": str, "label": str | int}`: a sequence-classification example (`Example(prompt=text,
  completion=str(label))`, see `data.classification`; `lorakit train --task-type seq-cls`).

An optional `"task"` (or `"key"`) string is carried into `Example.task` for multi-task and routed
methods. Other fields are ignored, so datasets with ids or metadata load as they are.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from lorakit.data.errors import DataError
from lorakit.data.example import Example

FORMAT_FIELDS = ("prompt", "messages", "text")


def load_jsonl(path: str | os.PathLike[str], tokenizer: Any = None, limit: int | None = None) -> list[Example]:
    """Examples from a JSONL file; blank lines are skipped, anything malformed raises `DataError`."""
    examples: list[Example] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            where = f"{os.fspath(path)}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
            examples.append(parse_record(record, tokenizer, where))
    if not examples:
        raise DataError(f"{os.fspath(path)}: no examples (the file is empty or has only blank lines)")
    return examples


def parse_record(record: Any, tokenizer: Any = None, where: str = "<record>") -> Example:
    """One decoded JSON value -> `Example`; `where` prefixes error messages ("file:line")."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(record)}")
    present = [field for field in FORMAT_FIELDS if field in record]
    if "completion" in record and "prompt" not in record:
        present.append("completion")
    if not present:
        raise DataError(
            f"{where}: expected a 'prompt'+'completion', 'messages' or 'text' field; "
            f"found keys {sorted(record)}"
        )
    if len(present) > 1:
        raise DataError(f"{where}: ambiguous record with fields {present}; use exactly one format per line")
    task = _task_key(record, where)
    extra = {"task": task, "routing": _routing_field(record, where)}
    if "label" in record:
        if present != ["text"]:
            raise DataError(f"{where}: a 'label' goes with a 'text' (a classification example), found fields {present}")
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise DataError(f"{where}: field 'label' must be a non-empty string or an integer, got {json.dumps(label)}")
        return Example(prompt=_string_field(record, "text", where, allow_empty=False), completion=str(label), **extra)
    if "text" in record:
        text = _string_field(record, "text", where, allow_empty=False)
        return Example(prompt="", completion=text, **extra)
    if "messages" in record:
        prompt, completion = _render_messages(record["messages"], tokenizer, where)
        return Example(prompt=prompt, completion=completion, **extra)
    prompt = _string_field(record, "prompt", where, allow_empty=True)
    completion = _string_field(record, "completion", where, allow_empty=False)
    return Example(prompt=prompt, completion=completion, **extra)


def _routing_field(record: dict[str, Any], where: str) -> dict[str, list[float]]:
    """``"routing": {"user_state": [0.1, ...], ...}``: per-example vectors for routed methods."""
    value = record.get("routing")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: field 'routing' must be an object of name -> list of numbers, got {_json_type(value)}")
    out = {}
    for name, vector in value.items():
        vector = [vector] if isinstance(vector, (int, float)) and not isinstance(vector, bool) else vector
        if (not isinstance(vector, list) or not vector or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vector)):
            raise DataError(f"{where}: routing[{name!r}] must be a number or a non-empty list of finite numbers, "
                            f"got {json.dumps(vector)[:80]}")
        out[name] = vector
    return out


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _string_field(record: dict[str, Any], field: str, where: str, allow_empty: bool) -> str:
    if field not in record:
        raise DataError(f"{where}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {_json_type(value)}")
    if not allow_empty and not value:
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _task_key(record: dict[str, Any], where: str) -> str | None:
    task = record.get("task")
    key = record.get("key")
    for field, value in (("task", task), ("key", key)):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} must be a string, got {_json_type(value)}")
    if task is not None and key is not None and task != key:
        raise DataError(f"{where}: 'task' ({task!r}) and 'key' ({key!r}) disagree; give one of them")
    return task if task is not None else key


def _render_messages(messages: Any, tokenizer: Any, where: str) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty array, got {_json_type(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, got {_json_type(message)}")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                got = _json_type(message[field]) if field in message else "nothing"
                raise DataError(f"{where}: messages[{i}].{field} must be a string, got {got}")
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant's (it is the training target), "
            f"got role {messages[-1]['role']!r}"
        )
    if not messages[-1]["content"]:
        raise DataError(f"{where}: the last assistant message is empty")
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return _render_with_template(plain, tokenizer, where)
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in plain[:-1]) + "assistant:"
    return prompt, " " + plain[-1]["content"]


def _render_with_template(messages: list[dict[str, str]], tokenizer: Any, where: str) -> tuple[str, str]:
    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prefix = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    except Exception as err:  # templates raise their own errors, e.g. on roles they do not alternate
        raise DataError(f"{where}: the tokenizer's chat template rejected these messages: {err}") from None
    if full.startswith(prefix):
        return prefix, full[len(prefix):]
    # Some templates render earlier turns differently once a reply follows (e.g. dropping
    # reasoning); then split the full rendering just before the final reply's text.
    cut = full.rfind(messages[-1]["content"])
    if cut < 0:
        raise DataError(f"{where}: cannot find the last assistant message in the chat template's output")
    return full[:cut], full[cut:]
