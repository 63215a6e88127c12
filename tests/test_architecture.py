"""The package's import layers (docs/architecture.md): no module imports a package of a higher layer, and
``import lorakit`` loads no benchmark, CLI or server code; one name per idea (expert count, aux-loss weight, routing,
class names), with old config names still loading from files and CLI flags."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from lk_models import tiny_llama

SRC = Path(lorakit.__file__).parent

# Lowest first. A package may import its own layer and the layers below, never above.
LAYERS = [
    {"_version", "core", "assets", "cli_parser"},
    {"io", "data", "hub", "quantize", "prune"},
    {"mixtures"},
    {"methods"},
    {"init"},
    {"training", "serving", "compose", "federated", "pretrain", "diffusion", "model_types"},
    {"bench", "cli", "cli_options", "__main__"},
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


# -- one name per idea ---------------------------------------------------------------------------------------------
# Names that meant "number of experts" before it became ``num_experts`` everywhere (PEFT / MoE-PEFT / transformers).
OLD_EXPERT_COUNT_NAMES = {"n_experts", "n_adapters", "n_meta", "n_domains", "experts_per_layer"}
RENAMED = [m for m in lorakit.list_methods() if m.config_cls.renamed_fields]


def test_method_configs_use_one_name_per_idea():
    """The expert count is ``num_experts``, the auxiliary (router) loss weight ``router_aux_loss_coef`` (MoE-PEFT and
    transformers' name), and ``routing`` names only the per-call context ``lorakit.routing`` (how a router picks
    experts is ``routing_strategy``, as MoE-PEFT's MixLoRA)."""
    problems = []
    for m in lorakit.list_methods():
        names = {f.name for f in dataclasses.fields(m.config_cls)}
        problems += [f"{m.name}: {n} (use num_experts)" for n in sorted(names & OLD_EXPERT_COUNT_NAMES)]
        problems += [f"{m.name}: {n} (use router_aux_loss_coef)" for n in sorted(names)
                     if n.endswith("aux_loss_coef") and n != "router_aux_loss_coef"]
        problems += [f"{m.name}: routing (use routing_strategy)" for n in names if n == "routing"]
        for old, new in m.config_cls.renamed_fields.items():
            if new not in names or old in names:
                problems.append(f"{m.name}: renamed_fields {old!r} -> {new!r} must map an old name to a field")
    assert not problems, "\n".join(problems)
    assert {"mixlora", "mole", "mola", "meteora", "xlora", "routed_lora", "mm_lora", "reclora", "mixda"} <= {
        m.name for m in lorakit.list_methods() if "num_experts" in {f.name for f in dataclasses.fields(m.config_cls)}}


def test_no_two_classes_share_a_name():
    """Two classes of one name (there were two ``LoraBank``: the serving bank and the mixtures' rank-block experts)
    make imports and docs ambiguous."""
    where: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(str(path.relative_to(SRC)))
    assert not {name: files for name, files in where.items() if len(files) > 1}


def _old_file(config: dict, renamed: dict[str, str]) -> dict:
    """An adapter_config.json as written before the renames."""
    old = dict(config)
    for before, now in renamed.items():
        old[before] = old.pop(now)
    return old


@pytest.mark.parametrize("method", RENAMED, ids=[f"method={m.name}" for m in RENAMED])
def test_files_with_old_field_names_load_with_one_warning_per_name(method, tmp_path, ids):
    """A real saved adapter whose config uses the old names loads as before (same outputs), with one one-line
    FutureWarning per old name saying the new one; saving it again writes the new names."""
    config = method.config_cls(**next(iter(method.variants.values())))
    model = lorakit.add_adapter(tiny_llama(), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero experts and routers, so equal outputs mean the same adapter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    route = method.example_routing(ids) if method.example_routing else {}
    with lorakit.routing(**route):
        want = model(input_ids=ids).logits
    lorakit.save_adapter(model, tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_config.json"
    file.write_text(json.dumps(_old_file(json.loads(file.read_text()), method.config_cls.renamed_fields)))

    with pytest.warns(FutureWarning) as caught:
        loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "adapter")
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    for old, new in method.config_cls.renamed_fields.items():
        said = [m for m in messages if f"{old!r} is deprecated, renamed to {new!r}" in m]
        assert len(said) == 1 and "\n" not in said[0], messages
    with lorakit.routing(**route):
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-6, rtol=0)
    lorakit.save_adapter(loaded, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert not set(method.config_cls.renamed_fields) & set(again)
    assert all(new in again for new in method.config_cls.renamed_fields.values())


def test_a_file_with_both_the_old_and_the_new_name_is_refused():
    from lorakit.methods.meteora import MeteoraConfig

    with pytest.raises(lorakit.ConfigError, match="'n_adapters' .*'num_experts'"):
        MeteoraConfig.from_dict({"n_adapters": 2, "num_experts": 2})


def test_a_near_miss_of_an_old_name_points_at_the_new_name():
    from lorakit.methods.meteora import MeteoraConfig
    from lorakit.methods.mola import MolaConfig

    with pytest.raises(lorakit.ConfigError, match="Did you mean 'num_experts' \\(formerly 'n_adapters'\\)"):
        MeteoraConfig.from_dict({"n_adapter": 2})
    with pytest.raises(lorakit.ConfigError, match="Did you mean 'num_experts' \\(formerly 'experts_per_layer'\\)"):
        MolaConfig.from_dict({"experts_per_layers": "2-4"})
    with pytest.raises(lorakit.ConfigError, match="positive expert counts"):
        MolaConfig(num_experts="2-4-")


def test_the_old_and_the_new_flag_together_are_refused(capsys):
    from lorakit.cli import build_parser

    for order in (["--num-experts", "3", "--n-adapters", "2"], ["--n-adapters", "2", "--num-experts", "3"]):
        with warnings.catch_warnings(), pytest.raises(SystemExit):
            warnings.simplefilter("ignore", FutureWarning)
            build_parser("meteora").parse_args(["train", "--method", "meteora", *order, "--output", "x"])
        assert "give only --num-experts" in capsys.readouterr().err
    args = build_parser("meteora").parse_args(["train", "--method", "meteora", "--num-experts", "3", "--num-experts", "4",
                                               "--output", "x"])
    assert args.num_experts == 4  # the same flag twice: the last one, as argparse does


@pytest.mark.parametrize("method", RENAMED, ids=[f"method={m.name}" for m in RENAMED])
def test_old_cli_flags_still_work_with_a_warning(method, tmp_path, capsys):
    from lorakit.cli import build_parser
    from lorakit.cli_options import config_from_args, flag

    variant = next(iter(method.variants.values()))
    want = method.config_cls(**variant)
    for old, new in method.config_cls.renamed_fields.items():
        value = getattr(want, new)
        words = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        argv = ["train", "--method", method.name, flag(old), *words, "--output", str(tmp_path)]
        with pytest.warns(FutureWarning, match=f"{flag(old)} is deprecated, renamed to {flag(new)}"):
            args = build_parser(method.name).parse_args(argv)
        assert config_from_args(method.config_cls, args, **{k: v for k, v in variant.items() if k != new}) == want
    with pytest.raises(SystemExit):
        build_parser(method.name).parse_args(["train", "--method", method.name, "--help"])
    shown = capsys.readouterr().out
    for old, new in method.config_cls.renamed_fields.items():  # --help shows the new names only
        assert re.search(rf"{flag(new)}(?![\w-])", shown) and not re.search(rf"{flag(old)}(?![\w-])", shown)
