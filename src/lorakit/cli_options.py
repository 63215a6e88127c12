"""Command-line flags generated from a method's config dataclass, with help text and choices.

Every field of a method's config becomes ``--field-name``. Help text comes, in this order, from the field's
``metadata["help"]``, from this module's notes on the fields all LoRA-family configs share (PEFT's meanings),
or from the sentence of the config's docstring (or a parent's) that names the field in ``double backticks``.
Choices come from ``metadata["choices"]``, a ``Literal[...]`` type, or the method module's ``<FIELD>S``
tuple (e.g. ``MODES`` for a field ``mode``), the constant its ``__post_init__`` validates against. A field's old
names (the config's ``renamed_fields``) stay accepted as hidden flags that warn and name the new flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
import warnings
from typing import Any, Literal, Mapping

from .cli_parser import json_arg

NOT_ON_CLI = {"inference_mode", "base_model_name_or_path"}

# PEFT's meanings of the fields every LoRA-family config shares (peft/tuners/lora/config.py docstrings).
SHARED_HELP = {
    "r": "rank of the update B·A",
    "lora_alpha": "scaling numerator: the update is scaled by lora_alpha / r (by lora_alpha / sqrt(r) with "
                  "--use-rslora); must be > 0",
    "lora_dropout": "dropout on the adapter's input during training, in [0, 1)",
    "target_modules": "modules to adapt: names or dotted suffixes (q_proj v_proj), one regex, or 'all-linear'",
    "exclude_modules": "modules to leave alone (names / suffixes, or one regex)",
    "layers_to_transform": "only adapt modules in these layer indices (0-based)",
    "layers_pattern": "name of the layer list when it is not 'layers'/'h' (with --layers-to-transform)",
    "modules_to_save": "modules trained and saved in full (e.g. a classification head)",
    "use_rslora": "rank-stabilised scaling lora_alpha / sqrt(r) (arXiv:2312.03732)",
    "use_dora": "DoRA: weight-decomposed LoRA with a trained magnitude vector (arXiv:2402.09353)",
    "init_lora_weights": "initialisation of A and B (True: Kaiming A, zero B; 'gaussian'; False: both random)",
    "lora_bias": "also train a bias on lora_B",
    "rank_pattern": "per-module ranks, {module regex: r}",
    "alpha_pattern": "per-module alphas, {module regex: alpha}",
    "expert_r": "rank of each expert, one value per expert",
    "expert_alpha": "lora_alpha of each expert, one value per expert (default 2 * its rank)",
    "expert_use_rslora": "rank-stabilised scaling per expert, one true/false per expert",
    "top_k": "experts each token uses",
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _docstrings(config_cls: type) -> str:
    return " ".join(inspect.getdoc(c) or "" for c in config_cls.__mro__ if c is not object)


# What an unset (None / empty) default means, for shared fields whose help does not say it.
EMPTY_DEFAULTS = {
    "exclude_modules": "none excluded", "layers_to_transform": "every layer", "layers_pattern": "'layers' or 'h'",
    "modules_to_save": "none", "rank_pattern": "r for every module", "alpha_pattern": "lora_alpha for every module",
}


def default_text(config_cls: type, f: dataclasses.Field, text: str, default: Any) -> str:
    """The ``(default: …)`` tail of a field's --help: the value, or for an unset one (None, "", [], {}) what it means
    (the help's own "None: …" clause, ``EMPTY_DEFAULTS``), never a bare None or an empty value; "" when the help
    already says it ("by default …")."""
    if default not in (None, "", [], {}) or isinstance(default, bool):
        return f"(default: {default!r})" if not isinstance(default, str) else f"(default: {default})"
    said = re.search(r"None(?::| =| means) ([^;)]+)", text)
    if said:
        return f"(default: {said.group(1).strip()})"
    if re.search(r"\bdefault\b", text):
        return ""
    return f"(default: {EMPTY_DEFAULTS.get(f.name, 'none')})"


def field_help(config_cls: type, f: dataclasses.Field) -> str:
    if f.metadata.get("help"):
        return str(f.metadata["help"])
    if f.name in SHARED_HELP:
        return SHARED_HELP[f.name]
    text = " ".join(_docstrings(config_cls).split())
    for sentence in re.split(r"(?<=[.;])\s+(?=[A-Z`(-])|\s+-\s+", text):
        if re.search(rf"``{re.escape(f.name)}(?![A-Za-z0-9_])", sentence):
            sentence = sentence.replace("``", "").strip(" -;.")
            return sentence if len(sentence) <= 200 else sentence[:197] + "..."
    return ""


def field_choices(config_cls: type, f: dataclasses.Field, hint: Any) -> list[Any] | None:
    if f.metadata.get("choices"):
        return list(f.metadata["choices"])
    for h in (hint, *typing.get_args(hint)):
        if typing.get_origin(h) is Literal:
            return list(typing.get_args(h))
    if hint is str:
        module = sys.modules.get(config_cls.__module__)
        constant = getattr(module, f.name.upper() + "S", None)
        if isinstance(constant, (tuple, list, frozenset, set)) and all(isinstance(c, str) for c in constant):
            return sorted(constant) if isinstance(constant, (set, frozenset)) else list(constant)
    return None


def _scalar(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def add_config_options(parser: argparse.ArgumentParser, config_cls: type, prefixed: Mapping[str, str] | None = None
                       ) -> None:
    """One flag per field of ``config_cls`` (default None: the config's own default applies). ``prefixed``:
    fields whose plain flag another option group already has (a method and a procedure with the same field name)
    -> a prefix; such a field gets ``--PREFIX-FIELD`` and the dest ``PREFIX_FIELD`` instead."""
    prefixed = prefixed or {}
    group = parser.add_argument_group(f"{config_cls.method} options (from {config_cls.__name__})")
    hints = typing.get_type_hints(config_cls)
    old_names: dict[str, list[str]] = {}
    for old, new in getattr(config_cls, "renamed_fields", {}).items():  # procedure configs have none
        old_names.setdefault(new, []).append(old)
    for f in dataclasses.fields(config_cls):
        if f.name in NOT_ON_CLI:
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if f.name == "target_modules" and not config_cls.has_own_targets():
            default = "all-linear"
        text = field_help(config_cls, f)
        choices = field_choices(config_cls, f, hint)
        tail = default_text(config_cls, f, text, default)
        help_text = f"{text} {tail}".strip()
        args = typing.get_args(hint)
        if hint is bool:
            kwargs = dict(action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif choices is not None:
            kwargs = dict(type=type(choices[0]) if hint in (int, str) else _scalar, default=None, choices=choices,
                          help=help_text)
        elif hint in (int, float, str):
            kwargs = dict(type=hint, default=None, help=help_text)
        elif typing.get_origin(hint) is dict or any(typing.get_origin(a) is dict for a in args):
            shape = "a JSON list or object" if any(typing.get_origin(a) is list for a in args) else "a JSON object"
            kwargs = dict(type=json_arg, default=None, metavar="JSON", help=f"{text}; {shape} {tail}".strip("; "))
        elif any(typing.get_origin(a) is list for a in args) or typing.get_origin(hint) is list:
            kwargs = dict(nargs="+", default=None, metavar="X", help=help_text)
        else:  # unions like bool | str, int | None
            kwargs = dict(type=_scalar, default=None, help=help_text)
        olds = old_names.get(f.name, ())
        if olds:  # the new flag, too, notes that it was given: one field may not be given under both names
            kwargs["action"] = _renamed_flag(kwargs.get("action"), flag(f.name), old=False)
        if f.name in prefixed:
            dest = f"{prefixed[f.name]}_{f.name}"
            group.add_argument(flag(dest), dest=dest, **kwargs)
            if hasattr(parser, "field_flags"):  # errors about this field name the flag it has here
                parser.field_flags[f"{config_cls.__name__}.{f.name}"] = flag(dest)
            continue
        group.add_argument(flag(f.name), **kwargs)
        rest = {k: v for k, v in kwargs.items() if k not in ("action", "help")}
        for old in olds:
            group.add_argument(flag(old), dest=f.name, action=_renamed_flag(kwargs.get("action").base, flag(f.name)),
                               help=argparse.SUPPRESS, **rest)


def _renamed_flag(base: type[argparse.Action] | None, new_flag: str, old: bool = True) -> type[argparse.Action]:
    """An action for a renamed field's flags: an old spelling does what the new flag does, after one FutureWarning
    naming it (``old=False``: the new flag itself, unchanged); either refuses the field given under both names."""

    class RenamedFlag(base or argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            given = namespace.__dict__.setdefault("_renamed_flags_given", {})
            earlier = given.get(self.dest)
            if earlier is not None and earlier != option_string:
                parser.error(f"{earlier} and {option_string} set the same option ({new_flag}); give only {new_flag}")
            given[self.dest] = option_string
            if old:
                warnings.warn(f"{option_string} is deprecated, renamed to {new_flag}.", FutureWarning, stacklevel=2)
            if base is None:
                setattr(namespace, self.dest, values)
            else:
                super().__call__(parser, namespace, values, option_string)

    RenamedFlag.base = base
    return RenamedFlag


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _comma_words(words: list, flag_name: str) -> list:
    """A list flag's words with each comma list split (``q_proj,v_proj`` as ``q_proj v_proj``, ``2,4`` as ``2 4``, as
    the ``CommaList`` flags take them); an empty item (``q_proj,,v_proj``) is ``comma_items``' error naming the flag.
    A word with a comma and an item that is not a plain name or number stays whole: a regex (``[0-9]{1,2}``)."""
    from .core.errors import comma_items

    out = []
    for word in words:
        if isinstance(word, str) and "," in word and all(
                _PLAIN_NAME.fullmatch(item.strip()) or not item.strip() for item in word.split(",")):
            out += comma_items(word, flag_name, "values", required=True)
        else:
            out.append(word)
    return out


def config_from_args(config_cls: type, args: argparse.Namespace, **overrides: Any):
    """The config from the parsed flags; ``overrides`` fill fields the user left unset."""
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        hint_args = typing.get_args(hints[f.name])
        if any(typing.get_origin(h) is dict for h in (hints[f.name], *hint_args)):
            kwargs[f.name] = value  # a JSON flag (json_arg): its values are typed already, the config checks them
            continue
        number_lists = [h for h in hint_args if typing.get_origin(h) is list and str not in typing.get_args(h)]
        if isinstance(value, list) and any(typing.get_origin(h) is list for h in (hints[f.name], *hint_args)):
            value = _comma_words(value, flag(f.name))
        one_word = isinstance(value, list) and len(value) == 1 and isinstance(value[0], str)  # (JSON flags: any)
        if one_word and str in hint_args and number_lists:
            value = _scalar(value[0])  # one value of e.g. int | str | list[int] (MoLA's 8, "2-4-6-8" or 2 4 6 8)
        elif one_word and str in hint_args:
            # One value: "all-linear" or a regex stays a string; a plain name stays a list, so it matches as a
            # module name / suffix (PEFT) and a typo gets the near-match hint of list entries.
            only = value[0]
            if only.lower() == "all-linear" or not _PLAIN_NAME.fullmatch(only):
                value = only
        elif isinstance(value, list):
            lists = [h for h in (hints[f.name], *hint_args) if typing.get_origin(h) is list]
            if lists and str not in typing.get_args(lists[0]):  # numbers / booleans: "16", "true"
                value = [_scalar(v) for v in value]
        kwargs[f.name] = value
    for k, v in overrides.items():
        kwargs.setdefault(k, v)
    return config_cls(**kwargs)
