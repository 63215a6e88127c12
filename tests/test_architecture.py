"""The package's import layers (docs/architecture.md): no module imports a package of a higher layer, and
``import lorakit`` loads no benchmark, CLI or server code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lorakit

SRC = Path(lorakit.__file__).parent

# Lowest first. A package may import its own layer and the layers below, never above.
LAYERS = [
    {"_version", "core", "assets"},
    {"io", "data", "hub", "quantize", "prune"},
    {"mixtures"},
    {"methods"},
    {"init"},
    {"training", "serving", "compose", "federated", "pretrain"},
    {"bench", "cli", "cli_options"},
]
LAYER_OF = {package: i for i, layer in enumerate(LAYERS) for package in layer}
FACADE_LAYER = LAYER_OF["init"]  # lorakit/__init__.py re-exports up to here: only layers above may use it


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every lorakit import in ``path``, except under ``if TYPE_CHECKING:``."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    is_package = path.name == "__init__.py"
    if is_package:
        module = module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                targets = [".".join(base + [node.module])] if node.module else [".".join(base + [a.name])
                                                                                for a in node.names]
            else:
                targets = [node.module or ""]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, t) for t in targets if t == "lorakit" or t.startswith("lorakit.")]
    return found


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else ""
        if own == "":  # the package facade (lorakit/__init__.py) re-exports the layers it needs
            continue
        if own not in LAYER_OF:
            problems.append(f"{rel}: package {own!r} has no layer; add it to LAYERS here and to docs/architecture.md")
            continue
        for line, target in _imports(path):
            other = _package(target)
            if other == "" or not ((SRC / other).is_dir() or (SRC / f"{other}.py").is_file()):  # `from lorakit import x`
                if FACADE_LAYER >= LAYER_OF[own]:
                    problems.append(f"{rel}:{line} imports the package facade ({target}); import the module itself")
            elif other not in LAYER_OF:
                problems.append(f"{rel}:{line} imports {target}, a package with no layer")
            elif LAYER_OF[other] > LAYER_OF[own]:
                problems.append(f"{rel}:{line}: {own} (layer {LAYER_OF[own]}) imports {target} (layer {LAYER_OF[other]})")
    assert not problems, "\n".join(problems)


def test_import_lorakit_loads_no_benchmark_cli_or_server_code():
    code = ("import sys, lorakit; print(' '.join(sorted(m for m in sys.modules if m.startswith(('lorakit.bench', "
            "'lorakit.cli', 'matplotlib', 'fastapi', 'uvicorn')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_the_version_has_one_home():
    from lorakit._version import __version__

    assert lorakit.__version__ == __version__
    pyproject = (SRC.parents[1] / "pyproject.toml").read_text()
    assert 'version = { attr = "lorakit._version.__version__" }' in pyproject
