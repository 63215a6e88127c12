"""Typed adapter configs: the fields every method shares, validation, and (de)serialisation.

A method's config is a dataclass subclassing :class:`AdapterConfig`. Validation is driven by the type
annotations, so a method only writes checks of *values* (``r > 0``) in its own ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Sequence, Union

from .errors import FIELD, ConfigError, did_you_mean


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is a fine float (alpha=16)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if origin in (dict, typing.Mapping):
        k, v = typing.get_args(hint) or (Any, Any)
        return isinstance(value, Mapping) and all(_type_ok(a, k) and _type_ok(b, v) for a, b in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def plain_scalars(value: Any) -> Any:
    """``value`` with every NumPy scalar (``np.int64(4)``, ``np.float32(0.5)``, ``np.bool_(True)``: a number read from
    an array, a sweep grid or a pandas frame) turned into the Python ``int`` / ``float`` / ``bool`` it holds
    (``.item()``), also inside lists, tuples and dicts; anything else is returned as it is (the same object when
    nothing changed). Such a scalar is a plain number to the user (PEFT's configs take them), and as a Python number
    it passes the type checks and saves to JSON (``json.dumps`` refuses ``np.float32``)."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [plain_scalars(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if isinstance(value, dict):
        pairs = [(plain_scalars(k), plain_scalars(v)) for k, v in value.items()]
        same = all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(pairs, value.items()))
        return value if same else type(value)(pairs)
    return value


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def field_error(config: Any, name: str, says: str) -> ConfigError:
    """The ConfigError ``"<Class>.<name><says>"`` about field ``name`` of ``config`` (``says`` goes right after the
    name: ``" must be > 0, got 0."`` or ``"=3 exceeds num_experts=2."``); its ``field`` is ``"<Class>.<name>"``, so a
    command line words it with that field's flag exactly (``--top-k=3 exceeds ...``). Every value check of a config
    raises through this or the ``check_*`` validators below, never a bare message."""
    return ConfigError(f"{FIELD}{says}", field=f"{type(config).__name__}.{name}")


def check_positive_ints(config: Any, *names: str, optional: bool = False) -> None:
    """ConfigError ``"<Class>.<name> must be a positive integer, got <value>."`` for the first field of ``names``
    on ``config`` that is not >= 1 (the one check every config with counts, ranks or steps needs); its ``field`` is
    ``"<Class>.<name>"`` (a command line words it as the field's flag). ``optional``: None is fine too."""
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or value <= 0:  # NaN and 2.5 passed a bare `value <= 0`
            raise field_error(config, name, f" must be a positive integer{' or None' if optional else ''}, "
                                            f"got {value!r}.")


# the fewest tokens per example that train anything: a causal LM predicts token t+1 from tokens 1..t, so an example
# cut to one token (BOS, or the completion's first) has no token to predict: its loss was 0 and nothing was learned
MIN_LENGTH = 2


def check_max_length(config: Any, name: str = "max_length") -> None:
    """ConfigError naming ``<Class>.<name>`` (a command line words it as its flag, ``--max-length``) when the
    tokens-per-example budget of ``config`` is below :data:`MIN_LENGTH`: ``max_length=1`` cut every example to one
    token, and a run trained on nothing, with loss 0 and no word. Non-integers are left to the type checks."""
    value = getattr(config, name)
    if isinstance(value, int) and not isinstance(value, bool) and value < MIN_LENGTH:
        raise field_error(config, name, f" must be >= {MIN_LENGTH}, got {value}: every example is cut to {value} "
                                        "token(s), and a causal LM predicts each token from the ones before it, so "
                                        "nothing would be trained (loss 0). Give room for the prompt and the "
                                        "completion, e.g. 128.")


def check_non_negative(config: Any, *names: str, note: str = "", finite: bool = False) -> None:
    """ConfigError ``"<Class>.<name> must be >= 0<note>, got <value>."`` (field: ``"<Class>.<name>"``) for the first
    field of ``names`` below 0 (None is skipped: an unset optional value; NaN fails; with ``finite``, inf too)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (not value >= 0 or (finite and value == float("inf"))):
            raise field_error(config, name, f" must be >= 0{' and finite' if finite else ''}{note}, got {value}.")


def check_positive(config: Any, *names: str, note: str = "", finite: bool = False) -> None:
    """ConfigError ``"<Class>.<name> must be > 0<note>, got <value>."`` (field: ``"<Class>.<name>"``) for the first
    field of ``names`` that is not > 0 (None is skipped: an unset optional value; NaN fails; with ``finite``, inf
    too)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (not value > 0 or (finite and value == float("inf"))):
            raise field_error(config, name, f" must be > 0{' and finite' if finite else ''}{note}, got {value}.")


def check_range(config: Any, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                note: str = "") -> None:
    """ConfigError ``"<Class>.<name> must be in [low, high)<note>, got <value>."`` (brackets after ``low_open`` /
    ``high_open``; field: ``"<Class>.<name>"``) when field ``name`` lies outside; None is skipped (an unset optional
    value: say ``" or None"`` in ``note``). NaN is outside every range."""
    value = getattr(config, name)
    if value is None:
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise field_error(config, name, f" must be in {span}{note}, got {value}.")


def check_dropout(config: Any, *names: str) -> None:
    """``check_range(config, name, 0, 1, high_open=True)`` for each of ``names``: a dropout probability in [0, 1)."""
    for name in names:
        check_range(config, name, 0, 1, high_open=True)


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, once per class (it evaluates the string annotations anew on every call:
    about 3 ms for a LoraConfig, paid at every adapter load of a server)."""
    return typing.get_type_hints(cls)


def check_field_types(config: Any) -> None:
    """Check every field of dataclass ``config`` against its type annotation (the one validator of lorakit's
    configs: adapter, training, procedure). Tuples become lists and NumPy scalars Python numbers
    (:func:`plain_scalars`), so configs stay JSON as they are.

    Raises ConfigError naming the class, the field, the expected type and the value given (``field``:
    ``"<Class>.<name>"``, as data for a command line to word as its flag).
    """
    hints = _type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        plain = plain_scalars(value)
        if plain is not value:
            value = plain
            setattr(config, f.name, value)
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(f"{FIELD} must be {_type_name(hints[f.name])}, got {value!r} ({type(value).__name__}).",
                              field=f"{type(config).__name__}.{f.name}")
        if isinstance(value, tuple):
            setattr(config, f.name, list(value))


# PEFT task types whose model class also trains (and saves) the task head, named by modules_to_save in lorakit.
_HEAD_TASKS = {"SEQ_CLS": "['classifier'] (BERT-style) or ['score'] (Llama-style)",
               "TOKEN_CLS": "['classifier'] (BERT-style) or ['score'] (Llama-style)",
               "QUESTION_ANS": "['qa_outputs']"}


class _PeftKeywords(type):
    """Lets a config be constructed with PEFT's keyword arguments: ``LoraConfig(r=8, bias="none",
    task_type="CAUSAL_LM", fan_in_fan_out=True)`` as PEFT's docs write it. Fields lorakit reads from the model
    (``fan_in_fan_out``) or from nothing (``bias="none"``, ``task_type``) are dropped at their neutral values, as a
    saved file's are (:meth:`AdapterConfig.from_dict`); a value asking for a feature the method lacks, a
    ``task_type`` whose PEFT class would train a head the config does not name, and an unknown name (with near
    matches) raise ConfigError instead of a bare TypeError."""

    def __call__(cls, *args, **kwargs):
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        if all(k in known for k in kwargs):
            return super().__call__(*args, **kwargs)
        task = kwargs.get("task_type")
        if task in _HEAD_TASKS and not kwargs.get("modules_to_save"):
            raise ConfigError(f"{cls.__name__}(task_type={task!r}): PEFT then also trains the task head; lorakit "
                              f"trains what modules_to_save names: pass modules_to_save={_HEAD_TASKS[task]} (or drop "
                              "task_type to leave the head frozen).")
        return super().__call__(*args, **cls.known_fields(kwargs, source=f"{cls.__name__}(...)"))


@dataclass
class AdapterConfig(metaclass=_PeftKeywords):
    """Where to inject an adapter (PEFT conventions) and what else to train.

    - ``target_modules``: list = exact module name or dotted suffix; str = regex full match;
      ``"all-linear"`` = every Linear / GPT-2 Conv1D except the output head; None = per-architecture default.
    - ``exclude_modules``: same rules, removes matches.
    - ``layers_to_transform`` (+ ``layers_pattern``): only modules inside these layer indices (a module a
      target_modules list names in full is adapted in any layer, as in PEFT).
    - ``modules_to_save``: modules trained and saved in full (e.g. a classifier head).
    """

    method: ClassVar[str] = ""
    # PEFT fields lorakit reads and ignores, with the values that mean "feature not used". A file with
    # another value asks for a feature this method does not have, so loading it is refused.
    foreign_fields: ClassVar[Mapping[str, Any]] = {}
    # Fields renamed after files were written, {old name: new name}: saved files (``from_dict``) and CLI flags
    # (``--old-name``) with an old name still work, with one FutureWarning naming the new one. A subclass extends
    # its parent's table ({**Parent.renamed_fields, ...}).
    renamed_fields: ClassVar[Mapping[str, str]] = {}
    # PEFT fields that hold the settings of a data-driven init, {field: init name} (LoRA's eva_config). A saved
    # file's tensors hold that init's result, so from_dict drops them at any value; given to the constructor they are
    # refused with where lorakit takes those settings (init options), rather than dropped.
    init_settings_fields: ClassVar[Mapping[str, str]] = {}

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if isinstance(self.target_modules, str) and self.target_modules.lower() != "all-linear":
            self._check_regex("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, str):
            self._check_regex("exclude_modules", self.exclude_modules)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise field_error(self, "layers_pattern", " only makes sense with layers_to_transform; set both or neither.")
        # PEFT's shared hyperparameters, checked alike in every method that has them (not each method on its own:
        # most did not, and a NaN, infinite, zero or negative alpha trained an adapter of NaNs or of nothing)
        if hasattr(self, "lora_alpha"):
            check_positive(self, "lora_alpha", finite=True,
                           note=f" (the update is scaled by lora_alpha / r, so {self.lora_alpha} trains an adapter that "
                                "does nothing, the opposite, or NaNs; PEFT's usual choice is 2 * r)")
        if hasattr(self, "lora_dropout"):
            check_dropout(self, "lora_dropout")

    def _check_regex(self, name: str, pattern: str) -> None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{FIELD}={pattern!r} is not a valid regular expression: {e}",
                              field=f"{type(self).__name__}.{name}") from None

    def requested_init(self) -> str | None:
        """The registered init (``lorakit.list_inits()``) this config asks for, or None for the method's own
        initialisation. LoRA reads PEFT's ``init_lora_weights``; other methods may name a field of their own."""
        return None

    def with_init(self, init: str) -> "AdapterConfig":
        """A copy of this config that asks for init ``init`` (raises ConfigError where the method has no init field)."""
        raise ConfigError(f"method {self.method!r} has no field that selects an init, so {init!r} cannot be applied "
                          "to it; inits work on methods whose config overrides with_init (e.g. lora).")

    def check_inputs(self) -> None:
        """Check what the config names outside itself (files it reads, e.g. a mixture's source adapters) without a
        model: front ends (``lorakit train``) call it before loading one. Raises the errors reading them would;
        the default has nothing to read."""

    def check_examples(self, examples: Sequence[Any]) -> None:
        """Check what the config needs of its training examples (``lorakit.data.Example``: ``task``, ``routing``)
        without a model: ``lorakit train`` calls it before loading one, the training loop before step 0. Raises
        ConfigError saying what to change where the data would train nothing or fail mid-run (keyed methods whose
        tasks have no expert, a routed method's missing per-example vectors); the default takes any examples."""

    def check_steps(self, steps: int) -> None:
        """Check the config's step schedules against a run of ``steps`` optimizer steps (the total, when resuming):
        ConfigError naming the field where one would never act, leaving the method something else (IncreLoRA's first
        rank growth after the last step: a fixed-rank LoRA). ``lorakit train`` calls it before any model loads; the
        training loop warns with its message (a short Python run may mean it). The default has no schedule."""

    def for_module(self, module_name: str) -> "AdapterConfig":
        """The config as it applies to one module (methods with per-module patterns override this)."""
        return self

    def extra_deltas(self, model: Any, targets: list[str]) -> dict[str, tuple[Any, Any, Any]]:
        """Deltas the config adds beside its method's on ``targets`` (the method's adapted module paths):
        ``{module path: (base layer, LayerInfo, Delta)}``, built without touching the model; they are attached, saved
        and loaded under the same adapter name (LoRA's ``trainable_token_indices``). Raises what a bad setting is
        (TargetError, ConfigError). Default: none."""
        return {}

    def check_patterns(self, targets: list[str]) -> None:
        """Raise when a per-module pattern the user typed matches none of ``targets`` (the adapted modules).

        Called when an adapter is added, not when one is loaded (a file's patterns may name modules this model
        lacks; its tensors say what was trained). Methods with per-module patterns override this.
        """

    @classmethod
    def has_own_targets(cls) -> bool:
        """True when the method defines its default ``target_modules`` (e.g. MixLoRA: attention + FFN blocks);
        front ends that default to "all-linear" must then leave the method's own choice alone."""
        field = cls.__dataclass_fields__["target_modules"]
        return field.default is not None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "AdapterConfig":
        """Build from a (PEFT or lorakit) JSON dict; unknown or unusable fields are a ConfigError. Old field
        names (``renamed_fields``) load as their new names with a FutureWarning; a data-driven init's settings
        (``init_settings_fields``) are dropped, its result being in the file."""
        data = {k: v for k, v in data.items() if k not in cls.init_settings_fields}
        kwargs = cls.known_fields(data, source=source)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def known_fields(cls, data: Mapping[str, Any], *, source: str = "config") -> dict[str, Any]:
        """``data`` reduced to this config's fields: old names (``renamed_fields``) renamed with a FutureWarning,
        PEFT's fields this method reads elsewhere (``foreign_fields``) and a file's bookkeeping dropped at their
        neutral values. ConfigError (naming ``source``) for a non-neutral foreign value or an unknown name."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in renamed_to_current(cls, data, source).items():
            if key in known:
                kwargs[key] = value
            elif key in cls.init_settings_fields:
                init = cls.init_settings_fields[key]
                raise ConfigError(
                    f"{source}: {key!r} sets PEFT's {init!r} init; lorakit takes that init's settings as init options: "
                    f"lorakit.init_adapter(model, name, batches, **options) or set_init_options(model, name, "
                    f"**options) before training (--init-options on the command line).")
            elif key in cls.foreign_fields or key in _BOOKKEEPING_FIELDS:
                neutral = cls.foreign_fields.get(key, _ANY)
                if neutral is not _ANY and not _is_neutral(value, neutral):
                    raise ConfigError(
                        f"{source}: field {key!r}={value!r} asks for a feature lorakit's {cls.method!r} method does "
                        f"not support (expected {neutral!r} or absent)."
                    )
            else:
                # a near-miss of an old name points at its new name (e.g. "n_adapter" -> num_experts)
                old = difflib.get_close_matches(key, list(cls.renamed_fields), n=1, cutoff=0.75)
                hint = (f" Did you mean {cls.renamed_fields[old[0]]!r} (formerly {old[0]!r})?" if old
                        else did_you_mean(key, known))
                if not old and "peft_version" in data:
                    hint += (f" The file was written by PEFT {data['peft_version']}: {key!r} is probably a setting of a "
                            f"PEFT newer than lorakit reads, and loading without it could give other outputs; if it "
                            f"holds PEFT's default (the feature unused), delete it from the file.")
                raise ConfigError(
                    f"{source}: unknown field {key!r} for method {cls.method!r}.{hint} "
                    f"Known fields: {', '.join(sorted(known))}."
                )
        return kwargs


def renamed_to_current(cls: type[AdapterConfig], data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``data`` with every old field name of ``cls.renamed_fields`` replaced by its new name, warning once per
    name (FutureWarning: old name -> new name). Raises ConfigError when both spellings are given."""
    out = dict(data)
    for old, new in cls.renamed_fields.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{source}: both {old!r} (the old name) and {new!r} are set; keep only {new!r}.")
        warnings.warn(f"{source}: {cls.method} field {old!r} is deprecated, renamed to {new!r} (it loads; saving "
                      f"writes {new!r}).", FutureWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


ANY_VALUE = _ANY = object()
# Fields any PEFT/lorakit config file may carry that describe the file rather than the adapter.
_BOOKKEEPING_FIELDS = {"peft_type", "lorakit_method", "peft_version", "lorakit_version", "task_type", "revision",
                       "auto_mapping", "lorakit_merge"}


def _is_neutral(value: Any, neutral: Any) -> bool:
    if isinstance(neutral, tuple):  # several neutral spellings
        return any(_is_neutral(value, n) for n in neutral)
    return value == neutral


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def field_list(default: list | None = None):
    return field(default_factory=lambda: list(default or []))


def field_dict():
    return field(default_factory=dict)
