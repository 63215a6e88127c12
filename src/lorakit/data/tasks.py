"""Built-in generative tasks: tiny, deterministic, with held-out test inputs.

Every task renders as `"<task name>: <input> =>"` followed by the completion `" <answer>"`, so the
task name in the prompt tells a multi-task model what to do. `reverse`, `rotate` and `sort` read the
same inputs and disagree on the output: a mixture has to use the prompt (or a router) to tell them
apart. Strings are short enough (well under 48 tokens of a small BPE) for a ~5M-parameter model to
learn on CPU.

Splits:
- "train" and "test" partition the input space by a stable hash of the input (`is_held_out`), so a
  test input never appears in training, for this task or for any task sharing its inputs.
- "pretrain" draws from the train partition with its own seed stream: same format, so a base model
  can learn the format (and part of each task) without ever seeing a test input.

Letters are space-separated ("c a t") so that a byte-level BPE gives one token per letter; random
glued strings ("cat") get split by arbitrary merges that differ between input and output, which makes
the string tasks needlessly hard for a tiny model.
"""

from __future__ import annotations

import ast
import functools
import random
import string
import sysconfig
import zlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.core.errors import ConfigError, did_you_mean
from lorakit.data.example import Example

SPLITS = ("train", "test", "pretrain")
HOLDOUT_PERCENT = 20


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process (Python's `hash()` of str is salted per run)."""
    return zlib.crc32(":".join(str(part) for part in parts).encode("utf-8"))


def is_held_out(key: str) -> bool:
    """Whether an input belongs to the test partition.

    Keyed on the input alone, not the task, so an input held out of `reverse` is also absent from
    the training data of `rotate` and `sort`: a multi-task mixture cannot leak it.
    """
    return zlib.crc32(f"holdout:{key}".encode("utf-8")) % 100 < HOLDOUT_PERCENT


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the stripped strings are equal, else 0.0."""
    return float(prediction.strip() == reference.strip())


def numeric_match(prediction: str, reference: str) -> float:
    """Exact match on integers, tolerant of formatting such as leading zeros or '+'."""
    try:
        return float(int(prediction.strip()) == int(reference.strip()))
    except ValueError:
        return exact_match(prediction, reference)


@dataclass(frozen=True)
class Task(ABC):
    """A generative task: inputs, their answers, a train/test partition and a metric.

    Subclasses either enumerate a finite `pool()` of inputs or `draw()` from an unbounded space.
    Items are whatever the subclass finds convenient; `key(item)` is the string that decides the
    partition.
    """

    name: str
    description: str

    @abstractmethod
    def render(self, item: Any) -> tuple[str, str]:
        """(prompt, completion) for one input."""

    def key(self, item: Any) -> str:
        return str(item)

    def pool(self) -> Sequence[Any] | None:
        """All inputs, in a fixed order, for tasks with a finite input space; None otherwise."""
        return None

    def draw(self, rng: random.Random) -> Any:
        raise NotImplementedError(f"task {self.name!r} has neither pool() nor draw()")

    def score(self, prediction: str, reference: str) -> float:
        return exact_match(prediction, reference)

    def generate(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` examples of `split`, a pure function of (task name, split, seed)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(stable_seed(self.name, split, seed))
        want_test = split == "test"
        pool = self.pool()
        items: list[Any] = []
        if pool is not None:
            part = [item for item in pool if is_held_out(self.key(item)) == want_test]
            if not part and n:
                raise ValueError(f"task {self.name!r} has no inputs in split {split!r}")
            # Without replacement until the partition is used up, then another shuffled pass.
            while len(items) < n:
                order = list(part)
                rng.shuffle(order)
                items.extend(order[: n - len(items)])
        else:
            while len(items) < n:
                item = self.draw(rng)
                if is_held_out(self.key(item)) == want_test:
                    items.append(item)
        return [Example(*self.render(item), task=self.name) for item in items]


# ---------------------------------------------------------------- string transforms


@dataclass(frozen=True)
class LetterTask(Task):
    """Input: 3-6 random lowercase letters; output: `answer(letters)`."""

    answer: Callable[[str], str]
    min_len: int = 3
    max_len: int = 6

    def draw(self, rng: random.Random) -> str:
        return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(self.min_len, self.max_len)))

    def render(self, item: str) -> tuple[str, str]:
        return f"{self.name}: {' '.join(item)} =>", f" {self.answer(item)}"


def _spaced(letters: str) -> str:
    return " ".join(letters)


# ---------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class ArithmeticTask(Task):
    """All ordered pairs (a, b) with low <= a, b <= high; answer `op(a, b)`."""

    symbol: str
    op: Callable[[int, int], int]
    low: int
    high: int

    def pool(self) -> Sequence[tuple[int, int]]:
        values = range(self.low, self.high + 1)
        return [(a, b) for a in values for b in values]

    def key(self, item: tuple[int, int]) -> str:
        # Ordered pairs: "7 * 8" may be held out while "8 * 7" is trained, so commutativity helps.
        return f"{self.name}:{item[0]},{item[1]}"

    def render(self, item: tuple[int, int]) -> tuple[str, str]:
        a, b = item
        return f"{self.name}: {a} {self.symbol} {b} =>", f" {self.op(a, b)}"

    def score(self, prediction: str, reference: str) -> float:
        return numeric_match(prediction, reference)


# ---------------------------------------------------------------- in-context lookup


@dataclass(frozen=True)
class LookupTask(Task):
    """A short in-context table of letter=digit pairs and one queried letter."""

    min_pairs: int = 3
    max_pairs: int = 5

    def draw(self, rng: random.Random) -> tuple[tuple[tuple[str, int], ...], str]:
        keys = rng.sample(string.ascii_lowercase, rng.randint(self.min_pairs, self.max_pairs))
        pairs = tuple((k, rng.randint(0, 9)) for k in keys)
        return pairs, rng.choice(keys)

    def key(self, item: tuple[tuple[tuple[str, int], ...], str]) -> str:
        return self.render(item)[0]

    def render(self, item: tuple[tuple[tuple[str, int], ...], str]) -> tuple[str, str]:
        pairs, query = item
        table = " ".join(f"{k}={v}" for k, v in pairs)
        return f"{self.name}: {table} ; {query} =>", f" {dict(pairs)[query]}"


# ---------------------------------------------------------------- facts about the real stdlib

# Pure-Python modules present on every CPython >= 3.10 and importable without side effects or
# deprecation warnings. Facts are parsed from source, never imported, so the list only bounds work.
STDLIB_MODULES: tuple[str, ...] = tuple(sorted((
    "argparse", "base64", "bisect", "calendar", "colorsys", "copy", "csv", "dataclasses",
    "difflib", "dis", "email.utils", "fnmatch", "fractions", "ftplib", "functools",
    "genericpath", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html", "inspect",
    "ipaddress", "json", "keyword", "linecache", "locale", "mimetypes", "ntpath", "operator",
    "os", "pickle", "platform", "posixpath", "pprint", "quopri", "random", "re", "secrets",
    "shlex", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tokenize", "traceback", "types", "typing", "urllib.parse", "uuid",
    "warnings", "weakref", "zipfile",
)))

MAX_NAME_CHARS = 24
MAX_DOC_CHARS = 48


@dataclass(frozen=True)
class FunctionFact:
    """A public module-level function as written in the stdlib source."""

    module: str
    name: str
    n_params: int  # positional-only + positional-or-keyword + keyword-only; *args/**kwargs not counted
    doc_line: str  # first docstring line, whitespace collapsed; "" when there is none

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def _module_source(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=1)
def stdlib_function_facts() -> tuple[FunctionFact, ...]:
    """Facts about the public top-level functions of `STDLIB_MODULES`, parsed with `ast`.

    Only undecorated definitions directly in the module body count (not ones under `if`/`try`),
    and a later definition of the same name replaces an earlier one, as it does at import time.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    facts: dict[str, FunctionFact] = {}
    for module in STDLIB_MODULES:
        path = _module_source(root, module)
        if path is None:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_") or not node.name.isascii():
                continue
            # A decorator can turn the def into something else (typing.Literal is a special form).
            if node.decorator_list:
                continue
            args = node.args
            doc = ast.get_docstring(node) or ""
            doc_line = " ".join(doc.strip().splitlines()[0].split()) if doc.strip() else ""
            fact = FunctionFact(
                module=module,
                name=node.name,
                n_params=len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs),
                doc_line=doc_line,
            )
            facts[fact.qualname] = fact
    return tuple(sorted(facts.values(), key=lambda f: f.qualname))


@dataclass(frozen=True)
class StdlibTask(Task):
    """Base for stdlib facts: items are `FunctionFact`s, partitioned by qualified function name."""

    def key(self, item: FunctionFact) -> str:
        return item.qualname

    def pool(self) -> Sequence[FunctionFact]:
        return [f for f in stdlib_function_facts() if len(f.name) <= MAX_NAME_CHARS]


@dataclass(frozen=True)
class FunctionNameTask(StdlibTask):
    """Docstring first line -> function name."""

    def pool(self) -> Sequence[FunctionFact]:
        candidates = [
            f for f in super().pool()
            # A "(" usually means a signature-style docstring that spells the answer out.
            if 8 <= len(f.doc_line) <= MAX_DOC_CHARS and f.doc_line.isascii() and "(" not in f.doc_line
        ]
        # A docstring line shared by two functions ("Deprecated.") has no single right answer.
        counts = Counter(f.doc_line for f in candidates)
        return [f for f in candidates if counts[f.doc_line] == 1]

    def render(self, item: FunctionFact) -> tuple[str, str]:
        return f"{self.name}: {item.doc_line} =>", f" {item.name}"


@dataclass(frozen=True)
class ArgCountTask(StdlibTask):
    """module.function -> number of named parameters."""

    def render(self, item: FunctionFact) -> tuple[str, str]:
        return f"{self.name}: {item.qualname} =>", f" {item.n_params}"

    def score(self, prediction: str, reference: str) -> float:
        return numeric_match(prediction, reference)


# ---------------------------------------------------------------- registry


def _rotate(letters: str, k: int = 1) -> str:
    k %= len(letters)
    return letters[k:] + letters[:k]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        LetterTask("reverse", "reverse the letters", answer=lambda s: _spaced(s[::-1])),
        LetterTask("rotate", "move the first letter to the end", answer=lambda s: _spaced(_rotate(s))),
        LetterTask("sort", "sort the letters alphabetically", answer=lambda s: _spaced("".join(sorted(s)))),
        LetterTask("upper", "uppercase the letters", answer=lambda s: _spaced(s.upper())),
        LetterTask("length", "count the letters", answer=lambda s: str(len(s))),
        ArithmeticTask("add", "add two numbers from 0 to 99", symbol="+", op=int.__add__, low=0, high=99),
        ArithmeticTask("mul", "multiply two numbers from 2 to 12", symbol="*", op=int.__mul__, low=2, high=12),
        LookupTask("lookup", "read the value of a queried key from an in-context table"),
        FunctionNameTask("py_name", "name the stdlib function whose docstring starts with this line"),
        ArgCountTask("py_argc", "count the named parameters of a stdlib function"),
    )
}


# A family of related tasks with one integer parameter, for methods that relate tasks to each other
# (ICM-LoRA generates an adapter for an offset it never saw). "rotate<k>" moves the first k letters to
# the end (k modulo the length); `rotate` is k=1 and keeps its own name. The family stays out of
# `TASKS` so the pretraining corpus, the method leaderboard and calibration sets do not change.
ROTATE_FAMILY = "rotate<k>"
MAX_ROTATE_OFFSET = 9


def rotate_task(k: int) -> Task:
    """The task "rotate<k>" (k in 1..MAX_ROTATE_OFFSET; k=1 is the built-in `rotate`).

    Raises ValueError for k outside 1..MAX_ROTATE_OFFSET.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_ROTATE_OFFSET:
        raise ValueError(f"rotate offset k must be an int in 1..{MAX_ROTATE_OFFSET}, got {k!r}")
    if k == 1:
        return TASKS["rotate"]
    return _rotate_k_task(k)


@functools.lru_cache(maxsize=None)
def _rotate_k_task(k: int) -> Task:
    return LetterTask(f"rotate{k}", f"move the first {k} letters to the end (mod length)",
                      answer=lambda s: _spaced(_rotate(s, k)))


def _family_task(name: str) -> Task | None:
    digits = name.removeprefix("rotate")
    if digits != name and digits.isdigit() and not digits.startswith("0"):
        k = int(digits)
        return rotate_task(k) if k <= MAX_ROTATE_OFFSET else None
    return None


def list_tasks() -> list[str]:
    return sorted(TASKS)


def find_task(name: str) -> Task | None:
    """The built-in task or family member called `name`, or None."""
    return TASKS.get(name) or _family_task(name)


def get_task(name: str) -> Task:
    """A built-in task by name, including family members such as "rotate3".

    Raises ConfigError (a ValueError) naming the closest task names when `name` is unknown.
    """
    task = find_task(name)
    if task is not None:
        return task
    family = [f"rotate{k}" for k in range(2, MAX_ROTATE_OFFSET + 1)]
    raise ConfigError(f"unknown task {name!r}.{did_you_mean(name, [*TASKS, *family])} Available: "
                      f"{', '.join(list_tasks())}, {ROTATE_FAMILY} for k in 2..{MAX_ROTATE_OFFSET}") from None


def pretraining_texts(n_per_task: int, seed: int = 0) -> list[str]:
    """`prompt + completion` strings from the pretrain split of every task, task by task."""
    return [
        ex.prompt + ex.completion
        for name in list_tasks()
        for ex in TASKS[name].generate("pretrain", n_per_task, seed)
    ]
