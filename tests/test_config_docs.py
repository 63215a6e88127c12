"""Every option a user can set has a one-line doc: each field of each registered method's and training
procedure's config is named in ``double backticks`` in its class docstring (or a parent's) or carries
``metadata["help"]``; that text is what ``lorakit train --method NAME --help`` shows next to the flag."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import lorakit as lk
from lorakit.core.config import AdapterConfig
from lorakit.training import list_procedures

SHARED = {f.name for f in dataclasses.fields(AdapterConfig)}  # documented once, in AdapterConfig's docstring


def undocumented(config_cls: type, skip: set[str] = frozenset()) -> list[str]:
    doc = " ".join(inspect.getdoc(c) or "" for c in config_cls.__mro__ if c is not object)
    return [f.name for f in dataclasses.fields(config_cls)
            if f.name not in skip and f"``{f.name}``" not in doc and not f.metadata.get("help")]


@pytest.mark.parametrize("method", [m.name for m in lk.list_methods()], ids=lambda n: f"method={n}")
def test_every_method_config_field_is_documented(method):
    assert undocumented(lk.get_method(method).config_cls, SHARED) == []


@pytest.mark.parametrize("procedure", [p.name for p in list_procedures()])
def test_every_procedure_config_field_is_documented(procedure):
    from lorakit.training import get_procedure

    assert undocumented(get_procedure(procedure).config_cls) == []


def test_shared_fields_are_documented_once():
    assert undocumented(AdapterConfig, {"inference_mode", "base_model_name_or_path"}) == []
