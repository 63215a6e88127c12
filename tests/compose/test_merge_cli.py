"""``lorakit merge-adapters``: the CLI front end of merge_adapters (bundled base model, real subprocess-free main)."""

from __future__ import annotations

import json
import re

import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.hub import load_model_and_tokenizer


def _bundled_adapter(path, seed):
    model = load_model_and_tokenizer(None)[0]
    torch.manual_seed(seed)
    lk.add_adapter(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return lk.save_adapter(model, path)


def test_merge_adapters_cli_writes_a_loadable_adapter_with_its_recipe(tmp_path, capsys):
    a, b = _bundled_adapter(tmp_path / "a", 0), _bundled_adapter(tmp_path / "b", 1)
    rc = main(["merge-adapters", str(a), str(b), "--weights", "0.5", "-0.25", "--method", "ties_svd", "--density",
               "0.5", "--svd-rank", "3", "--output", str(tmp_path / "out")])
    assert rc == 0 and "merged 2 adapters (ties_svd)" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lorakit_merge"]["method"] == "ties_svd"
    assert cfg["lorakit_merge"]["weights"] == [0.5, -0.25] and cfg["lorakit_merge"]["options"]["density"] == 0.5
    lk.load_adapter(load_model_and_tokenizer(None)[0], tmp_path / "out")


def test_merge_adapters_cli_unknown_method_is_a_clear_error(tmp_path, capsys):
    a = _bundled_adapter(tmp_path / "a", 0)
    assert main(["merge-adapters", str(a), "--method", "dare_lineer", "--output", str(tmp_path / "o")]) == 2
    assert "Did you mean: dare_linear" in capsys.readouterr().err


def test_merge_adapters_overwrite_onto_a_source_folder_is_refused_and_the_source_kept(tmp_path, capsys):
    """--output onto a source folder, even with --overwrite, is refused before anything is written: the source
    folder keeps every file (was: the folder was replaced by the merge, the source adapter lost)."""
    a, b = _bundled_adapter(tmp_path / "a", 0), _bundled_adapter(tmp_path / "b", 1)
    (a / "task_index.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    assert main(["merge-adapters", str(a), str(b), "--method", "cat", "--output", str(a), "--overwrite"]) == 2
    assert "would replace that input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folder left


def test_merge_adapters_overwrite_replaces_the_whole_folder(tmp_path):
    """--overwrite onto a folder holding an older adapter: the folder is replaced whole — no stale file of the old
    adapter (e.g. a training run's task_index.json) is left beside the merged one."""
    a, b = _bundled_adapter(tmp_path / "a", 0), _bundled_adapter(tmp_path / "b", 1)
    out = _bundled_adapter(tmp_path / "out", 2)
    (out / "task_index.json").write_text("{}")
    assert main(["merge-adapters", str(a), str(b), "--method", "cat", "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # no temporary folder left


def test_merge_adapters_cli_missing_or_file_first_source_is_named(tmp_path, capsys):
    a = _bundled_adapter(tmp_path / "a", 0)
    assert main(["merge-adapters", str(tmp_path / "nope"), str(a), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["merge-adapters", str(a / "adapter_model.safetensors"), str(a), "--output", str(tmp_path / "o")]) == 2
    assert "is a file, not an adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_merge_adapters_cli_names_sources_of_different_bases(tmp_path, capsys):
    """A first source trained on another base: the error names both bases (the bundled ones by name, as their
    the message names them: hub.bundled_name), not the tensors that do not fit."""
    a = _bundled_adapter(tmp_path / "a", 0)
    small = load_model_and_tokenizer("bundled-small")[0]
    lk.add_adapter(small, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    b = lk.save_adapter(small, tmp_path / "b")
    capsys.readouterr()  # the loading bars above
    assert main(["merge-adapters", str(b), str(a), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit merge-adapters: error: the sources were trained on different base models")
    assert "on 'bundled-small'" in err and "on 'bundled'" in err and "missing" not in err
    assert not (tmp_path / "o").exists()


def test_merge_adapters_cli_checks_every_source_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """A later source missing, a file, with a truncated safetensors or a malformed config: named before the base
    loads (from the first source, or --model), so a typo costs no model load; nothing is written."""
    import lorakit.hub

    a = _bundled_adapter(tmp_path / "a", 0)
    truncated, malformed = tmp_path / "truncated", tmp_path / "malformed"
    for folder in (truncated, malformed):
        folder.mkdir()
    (truncated / "adapter_config.json").write_bytes((a / "adapter_config.json").read_bytes())
    (truncated / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes()[:100])
    (malformed / "adapter_config.json").write_text("{bad")
    (malformed / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes())

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the sources were checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    capsys.readouterr()  # the loading bars above
    for source, says in ((tmp_path / "nope", "source '.*nope' does not exist"),
                         (a / "adapter_model.safetensors", "is a file, not an adapter folder"),
                         (truncated, "truncated.adapter_model.safetensors is not a valid safetensors file"),
                         (malformed, "malformed.adapter_config.json is not valid JSON")):
        for model in ([], ["--model", str(tmp_path / "no_such_model")]):
            assert main(["merge-adapters", str(a), str(source), "--output", str(tmp_path / "o"), *model]) == 2
            err = capsys.readouterr().err
            assert re.match(rf"lorakit merge-adapters: error: .*{says}", err), err
            assert "--model" not in err and "Traceback" not in err
    # options too: an unknown method is named before --model is read
    assert main(["merge-adapters", str(a), "--method", "tie", "--model", str(tmp_path / "no_such_model"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "unknown merge method 'tie'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_merge_adapters_cli_a_non_finite_weight_is_named(tmp_path, capsys):
    """Was: --weights nan 1 (or inf) ended in a torch LinAlgError traceback from the SVD of a non-finite delta."""
    a = _bundled_adapter(tmp_path / "a", 0)
    for bad in ("nan", "inf"):
        assert main(["merge-adapters", str(a), str(a), "--weights", bad, "1", "--output", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "--weights" in err and "finite" in err, err
        assert not (tmp_path / bad).exists()


def test_merge_adapters_cli_a_missing_factor_is_named_not_called_another_base(tmp_path, capsys):
    """Was: a source whose safetensors lacks one module's lora_B was refused as 'trained on different base models'
    ('bundled' and 'bundled'), since its sizes for that module had no 'out'; the missing tensor is what to name."""
    from safetensors.torch import load_file, save_file

    a, b = _bundled_adapter(tmp_path / "a", 0), _bundled_adapter(tmp_path / "b", 1)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors = load_file(b / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != key}, b / "adapter_model.safetensors")
    capsys.readouterr()  # the loading bars above
    assert main(["merge-adapters", str(a), str(b), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "different base models" not in err and "missing" in err and key in err, err
    assert not (tmp_path / "o").exists()


def test_merge_adapters_cli_all_zero_weights_or_lambda_are_refused(tmp_path, capsys):
    """Was: --weights 0 0 (or --lambda 0) wrote an all-zero adapter with exit 0, where --density 0, which does the
    same, is refused; every method's result is then 0 (mergekit generalized_task_arithmetic.py:124 multiplies each
    delta by its weight, :144 the sum by lambda)."""
    a, b = _bundled_adapter(tmp_path / "a", 0), _bundled_adapter(tmp_path / "b", 1)
    for extra, says in ((["--weights", "0", "0"], "--weights are all 0"),
                        (["--weights", "0", "0", "--method", "ties"], "--weights are all 0"),
                        (["--lambda", "0", "--method", "ties"], "--lambda must be a finite, non-zero number, got 0.0")):
        assert main(["merge-adapters", str(a), str(b), *extra, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert says in err and "all-zero adapter" in err, err
    assert not (tmp_path / "o").exists()
    # one zero weight among others is a choice (that source drops out), not an error
    assert main(["merge-adapters", str(a), str(b), "--weights", "0", "1", "--output", str(tmp_path / "o")]) == 0


def test_merge_adapters_cli_a_mistyped_choice_lists_its_near_match(tmp_path, capsys):
    """Was: --reweighting dul, --rescale L1 and --majority-sign-method Total listed the choices but no near match."""
    a = _bundled_adapter(tmp_path / "a", 0)
    for extra, says in ((["--method", "lego", "--reweighting", "dul"], "Did you mean: dual"),
                        (["--method", "dare_ties", "--rescale", "L1"], "Did you mean: l1"),
                        (["--method", "ties", "--majority-sign-method", "Total"], "Did you mean: total")):
        assert main(["merge-adapters", str(a), str(a), *extra, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
