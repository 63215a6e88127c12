"""A real text-classification set built offline: Python standard-library docstrings labeled by module family.

No nucleotide or protein data ships with the packages this project installs (Biopython, which carries small
GenBank/FASTA test files only in its source distribution, is not a dependency), so the sequences here are real
English technical text: the first paragraph of each public function's, class's and method's docstring in a
family of stdlib modules, labeled by the family ("files", "text", "net", "math", "concurrency"). The text is the
interpreter's own, so the set depends on the Python version (3.11 gave the counts in README.md); the split is a
fixed hash of the text, so it does not depend on import order.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import warnings
from pathlib import Path

from lorakit.io.files import atomic_write_bytes

FAMILIES = {
    "files": ["os", "posixpath", "shutil", "pathlib", "glob", "tempfile", "zipfile", "tarfile", "filecmp", "fnmatch"],
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "html", "html.parser", "codecs", "csv"],
    "net": ["http.client", "http.server", "http.cookies", "urllib.request", "urllib.parse", "email.message",
            "email.utils", "smtplib", "socket", "ftplib", "imaplib", "ssl"],
    "math": ["math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"],
    "concurrency": ["threading", "multiprocessing.pool", "multiprocessing.process", "asyncio.tasks",
                    "asyncio.locks", "asyncio.queues", "asyncio.events", "concurrent.futures", "queue", "subprocess",
                    "sched", "selectors"],
}


def _first_paragraph(doc: str) -> str:
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def family_docstrings(family: str) -> list[str]:
    """The distinct first paragraphs (>= 25 characters) of the family's public docstrings, sorted."""
    texts = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in FAMILIES[family]:
            module = importlib.import_module(name)
            for attr, obj in vars(module).items():
                if attr.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                    continue
                if getattr(obj, "__module__", name) not in (name, "_" + name, "posix", "_socket", "_sre", "_csv",
                                                           "_decimal", "_random", "_thread", "_queue", "_ssl"):
                    continue
                members = [obj] + ([m for a, m in vars(obj).items() if not a.startswith("_") and inspect.isroutine(m)]
                                   if inspect.isclass(obj) else [])
                for member in members:
                    doc = getattr(member, "__doc__", None)
                    if isinstance(doc, str) and len(_first_paragraph(doc)) >= 25:
                        texts.add(_first_paragraph(doc))
    return sorted(texts)


def build(out_dir: str | Path, test_fraction: float = 0.2) -> dict[str, int]:
    """Write ``train.jsonl`` and ``test.jsonl`` ({"text", "label"}) to ``out_dir``; a text shared by two families
    is dropped (its label would be ambiguous). Returns the counts per split and family."""
    by_family = {family: family_docstrings(family) for family in FAMILIES}
    seen: dict[str, int] = {}
    for texts in by_family.values():
        for text in texts:
            seen[text] = seen.get(text, 0) + 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    rows = {"train": [], "test": []}
    for family, texts in by_family.items():
        for text in texts:
            if seen[text] > 1:
                continue
            bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8
            split = "test" if bucket < test_fraction else "train"
            rows[split].append({"text": text, "label": family})
            counts[f"{split}/{family}"] = counts.get(f"{split}/{family}", 0) + 1
    for split, records in rows.items():
        records.sort(key=lambda r: hashlib.sha256(r["text"].encode()).hexdigest())  # mixed labels, fixed order
        atomic_write_bytes(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    return counts


if __name__ == "__main__":
    import sys

    print(build(sys.argv[1] if len(sys.argv) > 1 else "data"))
