"""``lorakit inspect`` checks a saved adapter's tensors against its adapter_config.json as ``load_adapter`` does
(the base model built on the meta device from ``base_model_name_or_path``), for every registered method.

Was: inspect only parsed the config, so a MixLoRA folder whose ``num_experts`` or ``r`` had been edited "passed"
while load_adapter refused it. Now both fail alike, naming the tensor and the config field that would fit it."""

from __future__ import annotations

import dataclasses
import json

import pytest

import lorakit as lk
from lorakit.cli import main

from lk_models import tiny_llama

# first layer case of tiny_llama a method adapts: (targets, layer kind)
CASES = [(["q_proj", "v_proj", "down_proj"], "linear"), (["mlp"], "ffn"), (["embed_tokens"], "embedding")]


def _saved(method, folder, base_dir, own_targets: bool = False):
    """A fresh adapter of ``method`` (its first variant; on the method's default targets when ``own_targets``) on
    tiny_llama, saved to ``folder`` with the base saved at ``base_dir`` as its base_model_name_or_path."""
    targets = next((t for t, kind in CASES if kind in method.layer_kinds), None)
    if targets is None:
        pytest.skip(f"{method.name} adapts no layer kind of tiny_llama")
    model = tiny_llama()
    model.save_pretrained(base_dir)  # weights too: methods whose deltas are built from them are checked on them
    model.config._name_or_path = str(base_dir)
    options = dict(next(iter(method.variants.values())))
    config = method.config_cls(**options) if own_targets else method.config_cls(target_modules=targets, **options)
    lk.add_adapter(model, config)
    lk.save_adapter(model, folder)
    return config


@pytest.mark.parametrize("name", [m.name for m in lk.list_methods()], ids=lambda n: f"method={n}")
def test_inspect_checks_tensors_against_the_config_for_every_method(name, tmp_path, capsys):
    method = lk.get_method(name)
    config = _saved(method, tmp_path / "adapter", tmp_path / "base")
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    assert f"checked:   tensors match the config on {tmp_path / 'base'}" in capsys.readouterr().out
    # an edited size field: inspect now fails as load does (both checks are one function)
    field = next((f for f in ("num_experts", "r") if isinstance(getattr(config, f, None), int)), None)
    if field is None:
        return
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    raw[field] = raw[field] + 1
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(raw))
    code = main(["inspect", str(tmp_path / "adapter")])
    err = capsys.readouterr().err
    try:
        lk.load_adapter(tiny_llama(), tmp_path / "adapter")
        loaded = None
    except lk.LorakitError as e:
        loaded = str(e)
    if loaded is None:  # the field sizes no saved tensor of this method (e.g. num_experts on plain linear targets)
        assert code == 0, err
        return
    # the tensor (or the config's own check, e.g. expert_r entries per expert) named as load names it
    assert code == 2 and err.split("error: ", 1)[1].strip() == loaded.strip(), (err, loaded)


def test_inspect_names_the_edited_mixlora_field(tmp_path, capsys):
    """The issue's case: a MixLoRA folder with num_experts edited (then r): the error names the field."""
    method = lk.get_method("mixlora")
    _saved(method, tmp_path / "adapter", tmp_path / "base", own_targets=True)  # attention + FFN experts
    path = tmp_path / "adapter" / "adapter_config.json"
    raw = json.loads(path.read_text())
    experts, r = raw["num_experts"], raw["r"]
    for field, value, want in (("num_experts", experts + 2, f"num_experts={experts}"), ("r", r * 2, f"r={r}")):
        path.write_text(json.dumps({**raw, field: value}))
        assert main(["inspect", str(tmp_path / "adapter")]) == 2
        err = capsys.readouterr().err
        assert "tensor 'base_model.model.model.layers.0.mlp." in err, err
        assert f"adapter_config.json has {field}={value}, but the tensors were saved with {want}" in err, err
        assert "(r / rank_pattern, module size) expect" in err  # load_adapter's words, which callers match
