"""The argument parser every ``lorakit`` command builds, so that all of them fail the same way.

- A flag is only ever its full name: a prefix (``--max-lora`` for ``--max-loras``) is an unknown flag, not
  argparse's silent abbreviation, so a typo cannot run as another option.
- A mistyped flag lists the command's near matches (``--densty`` -> ``Did you mean: --density?``), under the
  subcommand that was chosen when the parser has subcommands (its usage line, its options).
- Every error reads ``<prog>: error: <message>`` on stderr with exit status 2 (``lorakit train: error: ...``):
  ``parser.error(text)`` (argparse's, with the usage line) for what is wrong with the flags as typed,
  ``parser.fail(err)`` (no usage line; returns the status) for what a config's validation or the work finds.
- In both, the message's Python config field names become the flags the user typed:
  ``TransLoraConfig.threshold`` -> ``--threshold``, ``saved_modules='first'`` -> ``--saved-modules first``,
  ``AlignConfig.steps=0`` -> ``--loram-align-steps 0``. An error that carries its field as data
  (``LorakitError(..., field="steps")``, the text saying ``{field}``) gets that field's flag exactly, wherever
  the text names it (``{field}=0`` as ``--steps 0``); other names are found in the text by pattern. The map from field to flag is every option's ``dest``
  (automatic) plus the parser's ``field_flags`` for a field whose flag has another name (``n_merges`` ->
  ``--merges``; a key ``Class.field`` names that config's field only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from .core.config import MIN_LENGTH
from .core.errors import ConfigError, LorakitError, comma_items, did_you_mean


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (the filesystem root at worst)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _file_in_the_way(out: Path) -> Path | None:
    """The existing file that keeps the output folder ``out`` from being one: ``out`` itself, or the nearest existing
    parent when that is a file; None when there is none. check_output_dir and CommandParser.file_in_the_way ask it."""
    probe = _nearest_existing(out)
    return probe if probe.exists() and not probe.is_dir() else None


def _check_writable(out: Path, flag: str, what: str) -> None:
    """LorakitError unless ``out`` can be created: its nearest existing folder (itself, for a folder) is a folder
    this process can write in."""
    probe = _nearest_existing(out if what == "folder" else out.parent)
    if not probe.is_dir():
        raise LorakitError(f"{flag} {out}: {probe} is a file, so the {what} cannot be created")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise LorakitError(f"{flag} {out}: cannot write in {probe} ({e.strerror or e}); choose a writable folder") from None


def _clean_leftovers(folder: Path) -> None:
    """Remove temporary files/folders a killed save left (``.<name>.tmp-*``, ``.<name>.old-*``, ``.<name>.*.tmp``)."""
    for entry in folder.glob(".*"):
        if ".tmp-" in entry.name or ".old-" in entry.name or entry.name.endswith(".tmp"):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def check_output_dir(path: str | os.PathLike, flag: str, *, overwrite: bool, allow_existing: bool = False,
                     reads: Sequence[str | os.PathLike | None] = (), clean_leftovers: bool = True,
                     switch: str = "--overwrite") -> Path:
    """Fail now, before any work, if ``path`` cannot become this command's output folder.

    A file in the way, a folder (or its nearest existing parent) that cannot be written, or an existing
    non-empty folder without ``overwrite`` (unless ``allow_existing``, e.g. resuming into it) is a LorakitError.
    ``reads``: the files and folders the command reads (its adapter, model, sources); an output folder that holds one
    of them is an error too, since the output replaces the folder whole (``lorakit export runs/a/adapter --output
    runs/a --overwrite`` deleted the run's adapter, checkpoints and metrics). So is an output that is an input
    folder (``lorakit merge-adapters a b --output b --overwrite`` replaced source ``b`` with the merge: a lost input)
    or lies inside one (``--output a/merged`` nested a new folder into source ``a``, which then held an adapter that
    was not its own). Leftover temporary files of a killed save are removed, unless
    ``clean_leftovers`` is False (a folder other runs may be writing into at the same time, such as the benches'
    shared ``runs/bench``: their temp files in flight look the same). ``switch``: how the message words the way to
    replace the folder (``overwrite=True`` for a Python function's keyword).
    """
    out = Path(path)
    if _file_in_the_way(out) == out:  # under a file: _check_writable says so, below
        raise LorakitError(f"{flag} {out} is an existing file; give a folder path")
    for given in reads:
        if given is None or not Path(given).exists():
            continue
        source, target = Path(given).resolve(), out.resolve()
        if target in source.parents:
            raise LorakitError(f"{flag} {out} holds the input {given}, and this command replaces {out} whole (the input "
                               "with it); choose another folder, e.g. a new one beside it")
        if source.is_dir() and (target == source or source in target.parents):
            where = "is the input" if target == source else "lies inside the input"
            raise LorakitError(f"{flag} {out} {where} {given}; writing there would "
                               f"{'replace that input' if target == source else 'nest the output into that input'}. "
                               "Choose a folder outside every input, e.g. a new one beside it")
    _check_writable(out, flag, "folder")
    if out.is_dir():
        if clean_leftovers:
            _clean_leftovers(out)
        if any(out.iterdir()) and not (overwrite or allow_existing):
            raise LorakitError(f"{flag} {out} already exists and is not empty; pass {switch} to replace what "
                               "this command writes there, or choose a new folder")
    return out


def check_output_file(path: str | os.PathLike, flag: str, *, overwrite: bool) -> Path:
    """:func:`check_output_dir` for a command whose output is one file (``lorakit compose-image --out grid.png``):
    a folder in the way, a folder that cannot be written, or an existing file
    without ``overwrite`` is a LorakitError, raised before any work. The file is then written atomically
    (``io.files.atomic_write_bytes``), so a failed write leaves the old one."""
    out = Path(path)
    if out.is_dir():
        raise LorakitError(f"{flag} {out} is an existing folder; give a file path")
    _check_writable(out, flag, "file")
    if out.exists() and not overwrite:
        raise LorakitError(f"{flag} {out} already exists; pass --overwrite to replace it, or choose a new file name")
    return out


# ``=value`` after a field name: a quoted string, or a token up to a separator (not ``...``: ``model=...`` is
# a Python call written out, not a value the user typed)
_VALUE = r"""=('[^']*'|"[^"]*"|(?!\.\.\.)[^\s,;:()\[\]{}]+)"""
# a list of two or more bare names with at least one comma: "a, b", "a, b and c", "a, b, or c"
_LIST_SEP = r", (?:and |or )?| (?:and|or) "
_LIST = (r"(?<![\w.\-/\\'\"])[A-Za-z_]\w*(?:(?:" + _LIST_SEP + r")[A-Za-z_]\w*)*, (?:and |or )?[A-Za-z_]\w*"
         r"(?:(?:" + _LIST_SEP + r")[A-Za-z_]\w*)*(?![\w\-/\\\[('\"=])")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for flags whose help does not already state it; an empty default ("", [], {}) as
    "(default: none)", and a None default not at all (such a flag's help says what leaving it out does), so no
    --help reads "default: None" or an empty "default: "."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default == argparse.SUPPRESS
        if "default:" in text or hidden or not action.option_strings:  # by identity: a default of 0 is shown
            return text
        if isinstance(default, (str, list, tuple, dict)) and not default:
            return f"{text} (default: none)".strip()
        return f"{text} (default: %(default)s)".strip()


def with_flags(message: str, flags: Mapping[str, str], negated: Mapping[str, str] | None = None) -> str:
    """``message`` with the config fields in ``flags`` (field or ``Class.field`` -> flag) written as flags.

    A field is replaced where it is unmistakably a name: qualified (``PretrainConfig.steps``), with a value
    (``steps=3`` -> ``--steps 3``), or, for a one-word field (``steps``, ``lr``), as the subject of a sentence
    (``density must be ...``); a field with an underscore (``mix_ln_alpha``) wherever it stands as a word.
    A list of names (``it reads density, lambda_, normalize``: comma-separated, at least two of them fields) is
    written as flags whole, one-word fields included (``--density, --lambda, --normalize``), so one list never mixes
    flags and field names.
    A boolean flag with its ``--no-`` form in ``negated`` (flag -> negation) reads as typed: ``save_pruned=False``
    -> ``--no-save-pruned``, ``save_pruned=True`` -> ``--save-pruned`` (argparse's BooleanOptionalAction takes no
    value).
    """
    negated = negated or {}

    def in_list(m: re.Match) -> str:
        items = re.split(_LIST_SEP, m.group(0))
        if sum(item in flags for item in items) < 2:
            return m.group(0)  # names of other things (modules, tasks) that a field name happens to be among
        return re.sub(r"[A-Za-z_]\w*", lambda w: flags.get(w.group(0), w.group(0)) if w.group(0) in items else
                      w.group(0), m.group(0))

    message = re.sub(_LIST, in_list, message)

    def repl(flag: str):
        def sub(m: re.Match) -> str:
            value = m.group(1)
            if value is None:
                return flag
            if value[:1] in ("'", '"'):
                value = value[1:-1]
            if flag in negated and value.lower() in ("true", "false"):
                return flag if value.lower() == "true" else negated[flag]
            return f"{flag} {value}"
        return sub

    # qualified keys first, so AlignConfig.steps gets its own flag before plain ``steps`` gets --steps
    for key in sorted(flags, key=lambda k: ("." not in k, -len(k))):
        flag, name = flags[key], re.escape(key)
        start, end = r"(?<![\w.\-/\\])", r"(?![\w\-/\\\[(])"  # not part of a path (/ or \), flag, call or index
        if "." in key:
            names = name
        elif "_" in key:
            names = rf"(?:[A-Z]\w*\.)?{name}"
        else:  # a plain word: qualified, with a value, or the subject of a sentence
            # ... and not the noun of a phrase ("the data must", "Model output must"): no word right before it
            # but "and" ("--steps and lr must")
            subject = r"(?:(?<![A-Za-z] )|(?<=\band ))"
            message = re.sub(rf"{subject}{start}{name}(?= (?:must|should|and (?:--)?[\w\-]+ must) )", flag, message)
            message = re.sub(rf"{start}{name}{_VALUE}", repl(flag), message)
            names = rf"[A-Z]\w*\.{name}"
        message = re.sub(rf"{start}{names}(?:{_VALUE})?{end}", repl(flag), message)
    return message


def json_arg(text: str):
    """``type=`` for a flag that takes JSON: the parsed value; a malformed one is argparse's usage error naming the
    flag and what is wrong (``argument --rank-pattern: not valid JSON (Expecting ...): '{bad'``) — with
    ``type=json.loads`` argparse would say ``invalid loads value``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None


def _int_at_least(text: str, low: int, what: str) -> int:
    """``int(text)`` when it is >= ``low``, else argparse's ArgumentTypeError ``must be WHAT, got ...``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """``type=`` for a count a command reads itself (rows per batch, examples): an int >= 1, else argparse's usage
    error naming the flag (``argument --eval-batch-size: must be a positive integer, got 0``) before any model loads."""
    return _int_at_least(text, 1, "a positive integer")


def max_length_arg(text: str) -> int:
    """``type=`` for ``--max-length`` (tokens per training example): an int >= ``core.config.MIN_LENGTH`` (2), else
    argparse's usage error naming the flag, before any model loads. One token trained nothing: a causal LM predicts
    each token from the ones before it (``--max-length 1`` ran to the end with loss 0)."""
    return _int_at_least(text, MIN_LENGTH, f"an integer >= {MIN_LENGTH} (a token to predict from and one to predict)")


def int_or_none(text: str) -> int | None:
    """``type=`` for an optional count whose None has a meaning (``--group-size``: one scale per output channel): an
    int, or ``none`` / ``None`` for None, as the method flags read it; the value itself is the config's to check."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or none, got {text!r}") from None


def non_negative_int(text: str) -> int:
    """``type=`` for a count where 0 means none (few-shot examples): an int >= 0, else argparse's usage error naming
    the flag before any work."""
    return _int_at_least(text, 0, "an integer >= 0")


MAX_SEED = 2**63 - 1


def seed_arg(text: str) -> int:
    """``type=`` for a ``--seed`` flag: an int >= 0, else argparse's usage error naming the flag (``argument --seed:
    must be an integer >= 0, got -1``) before any model loads. ``torch.manual_seed`` takes a negative seed, but numpy's
    and Python's seeding refuse one, so it would fail (or seed one library only) after the work has begun. Above 2**63 - 1
    (the signed 64-bit range, leaving room for the offsets seeds are derived with below torch's 2**64 limit)
    ``torch.manual_seed`` failed with a bare ``Overflow when unpacking long long``, after the data had loaded."""
    value = _int_at_least(text, 0, "an integer >= 0")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{MAX_SEED} (2**63 - 1), got {value}")
    return value


def device_arg(text: str) -> str:
    """``type=`` for a ``--device`` flag: ``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where it is available, else
    argparse's usage error naming the flag before any model loads (``--device gpu`` used to fail in torch after the
    model had loaded; ``--device cuda`` on a machine without CUDA, in the first tensor moved)."""
    import torch  # (only when the flag is given: the parser itself stays light)

    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text.strip())
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if match.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use cpu")
        if match.group(2) is not None and int(match.group(2)) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text.strip()


class CommaList(argparse.Action):
    """``action=`` for a flag of several values (``nargs="+"``) that also takes them comma-separated: ``--methods lora
    dora``, ``--methods lora,dora`` and ``--methods lora, dora`` are the same list. An empty item (``lora,,dora``) is
    argparse's usage error naming the flag, not a name ``'lora,,dora'`` nor silently dropped. ``kind``: each item's
    type (a bad one is the usage error too)."""

    def __init__(self, option_strings, dest, kind=str, **kwargs) -> None:
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)
        self.kind = kind

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items, noun = [], "names" if self.kind is str else f"{self.kind.__name__} values"
        for text in values:
            try:
                items += [self.kind(part) for part in comma_items(text, "", noun, required=True)]
            except ConfigError as e:
                raise argparse.ArgumentError(self, str(e)) from None
            except argparse.ArgumentTypeError as e:  # a type= function's own words (seed_arg)
                raise argparse.ArgumentError(self, str(e)) from None
            except ValueError:
                raise argparse.ArgumentError(self, f"{text!r}: expected {self.kind.__name__} values, comma- or "
                                                   "space-separated") from None
        setattr(namespace, self.dest, items)


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with lorakit's error conventions (module docstring); subparsers made with
    ``add_subparsers().add_parser`` are CommandParsers too. ``field_flags``: extra field -> flag names.
    ``allow_abbrev`` is off (module docstring), here and in every subparser."""

    def __init__(self, *args, field_flags: Mapping[str, str] | None = None, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.field_flags: dict[str, str] = dict(field_flags or {})

    def parse_args(self, args=None, namespace=None):  # noqa: D102 (argparse's, with near matches)
        self._share_argv(list(sys.argv[1:] if args is None else args))
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.chosen(parsed).unrecognized(extra)
        return parsed

    def _share_argv(self, argv: list[str]) -> None:
        """Keep the command line on this parser and its subparsers: an error argparse raises while parsing (a
        required flag missing because it was mistyped) can then name the unknown flags' near matches too."""
        self._argv = argv
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                for sub in action.choices.values():
                    if isinstance(sub, CommandParser):
                        sub._share_argv(argv)  # noqa: SLF001

    def chosen(self, parsed: argparse.Namespace) -> "CommandParser":
        """The (sub)command parser that read ``parsed``: the chosen subcommand's, else this one."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                chosen = action.choices.get(getattr(parsed, action.dest, None))
                if isinstance(chosen, CommandParser):
                    return chosen.chosen(parsed)
        return self

    def error(self, message: str):
        """argparse's usage + ``<prog>: error: <message>`` + exit 2, with config field names written as flags and,
        after any other error of argparse's (a required flag missing), the near matches of unknown flags typed."""
        choice = re.search(r"invalid choice: '(.*)' \(choose from (.*)\)$", message)
        if choice:  # argparse (before 3.14) suggests nothing for a mistyped choice; every other lorakit name check does
            choices = [c.strip().strip("'") for c in choice.group(2).split(",")]
            message += did_you_mean(choice.group(1), choices)
        if not message.startswith("unrecognized arguments"):
            known = [o for a in self._actions for o in a.option_strings]  # hidden (renamed) flags too
            unknown = [t.split("=", 1)[0] for t in getattr(self, "_argv", ()) if t.startswith("--")]
            unknown = [t for t in unknown if t not in known]
            hints = "".join(did_you_mean(t, self.options()) for t in unknown)
            if hints:
                message = f"{message} (unrecognized: {' '.join(unknown)}.{hints})"
        super().error(self.message(message))

    def options(self) -> list[str]:
        """The long options this parser shows (hidden, e.g. renamed, ones left out)."""
        return [o for a in self._actions if a.help != argparse.SUPPRESS for o in a.option_strings if o.startswith("--")]

    def unrecognized(self, extra: list[str]):
        """argparse's "unrecognized arguments" error (usage, exit 2) with the near matches of each unknown flag."""
        hints = "".join(did_you_mean(x.split("=", 1)[0], self.options()) for x in extra if x.startswith("--"))
        self.error(f"unrecognized arguments: {' '.join(extra)}.{hints}")

    def flags(self) -> dict[str, str]:
        """Config field -> flag: each shown option's ``dest`` (its first long flag, else its short one: ``n`` ->
        ``-n``), then ``field_flags``."""
        flags: dict[str, str] = {}
        for action in self._actions:
            longs = [o for o in action.option_strings if o.startswith("--")] or action.option_strings  # -n
            if longs and action.help != argparse.SUPPRESS and action.dest not in ("help", argparse.SUPPRESS):
                flags.setdefault(action.dest, longs[0])
        flags.update(self.field_flags)
        return flags

    def message(self, error: BaseException | str) -> str:
        """``error``'s text with config field names written as this command's flags: a LorakitError's ``field``
        (data) by its flag where it has one, then any other field name the text holds (``with_flags``)."""
        flags = self.flags()
        negated = {}  # --flag -> --no-flag of each boolean option
        for action in self._actions:
            if isinstance(action, argparse.BooleanOptionalAction):
                yes = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
                no = [o for o in action.option_strings if o.startswith("--no-")]
                if yes and no:
                    negated[yes[0]] = no[0]
        field = getattr(error, "field", None)
        if isinstance(error, LorakitError) and field is not None:
            flag = flags.get(field) or flags.get(field.rsplit(".", 1)[-1])
            if flag is None:
                return with_flags(error.worded(field), flags, negated)
            # the field's value reads as typed: "{field}='x'" -> "--flag x"
            return with_flags(error.worded(flag), {**flags, flag: flag}, negated)
        return with_flags(str(error), flags, negated)

    def file_in_the_way(self, path, flag: str) -> int | None:
        """Before any work: ``fail`` (status 2) when the output folder ``path`` (given as ``flag``) is an existing
        file or lies under one (:func:`check_output_dir`'s first check, for an output that may already hold a run
        being resumed); None when it can be a folder."""
        blocker = _file_in_the_way(Path(path))
        if blocker is not None:
            where = "is an existing file" if blocker == Path(path) else f"lies under the file {blocker}"
            return self.fail(f"{flag} {path} {where}; give a folder path")
        return None

    def fail(self, error: BaseException | str, status: int = 2) -> int:
        """Print ``<prog>: error: <message>`` (fields as flags) to stderr; returns the exit ``status``."""
        print(f"{self.prog}: error: {self.message(error)}", file=sys.stderr)
        return status
