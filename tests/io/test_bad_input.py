"""Bad input gets a clear error and loses nothing: the model is exactly as before a failed call."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

import lorakit as lk
from lk_models import tiny_gpt2, tiny_llama


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
        lk.adapter_names(model) if hasattr(model, "lorakit") else [],
    )


def _assert_same(model, snap):
    sd, grads, mods, names = snap
    now = _snapshot(model)
    assert now[2] == mods
    assert now[1] == grads
    assert now[3] == names
    assert now[0].keys() == sd.keys()
    for k in sd:
        assert torch.equal(now[0][k], sd[k]), k


@pytest.fixture
def saved(tmp_path):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lk.save_adapter(model, tmp_path / "ok")
    return tmp_path / "ok"


@pytest.fixture
def model_with_adapter():
    # A model that already holds an adapter: a failed load must leave it untouched too.
    return lk.add_adapter(tiny_llama(seed=5), lk.LoraConfig(target_modules=["k_proj"]), name="existing")


def _load_fails(model, path, match):
    snap = _snapshot(model)
    with pytest.raises(lk.LorakitError, match=match):
        lk.load_adapter(model, path, name="new")
    _assert_same(model, snap)


def test_target_typo_lists_near_matches():
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(lk.TargetError, match=r"'q_prj'.*q_proj"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=["q_prj", "v_proj"]))
    _assert_same(model, snap)


def test_regex_matching_nothing_lists_module_names():
    with pytest.raises(lk.TargetError, match=r"matched no module.*q_proj"):
        lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=r".*\.attention\.query"))


def test_unsupported_layer_type_is_named():
    with pytest.raises(lk.TargetError, match=r"LlamaRMSNorm.*cannot take"):
        lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["input_layernorm"]))


def test_layers_to_transform_and_exclude():
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules="all-linear", layers_to_transform=[1],
                                                       exclude_modules=["o_proj"]))
    names = [n for n, _ in lk.core.model.adapter_layers(model)]
    assert names and all(".layers.1." in n and not n.endswith("o_proj") for n in names)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive"),
    (dict(r="8"), "r must be int"),
    (dict(lora_dropout=1.5), "lora_dropout"),
    (dict(init_lora_weights="pisa"), "init_lora_weights"),
    (dict(target_modules="(unclosed"), "not a valid regular expression"),
    (dict(target_modules=[1, 2]), "target_modules must be"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(lk.ConfigError, match=match):
        lk.LoraConfig(**kwargs)


def test_unknown_method_name():
    with pytest.raises(lk.UnknownMethodError, match=r"lorra.*Did you mean: lora"):
        lk.get_method("lorra")


def test_duplicate_and_unknown_adapter_names():
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lk.AdapterError, match="already exists"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lk.AdapterError, match="unknown adapter 'defualt'.*default"):
        lk.set_adapter(model, "defualt")
    # every unknown-name refusal is typed and names the near match (were: a bare list of the loaded names)
    from lorakit.core.model import adapter_parameters
    for call in (lambda: lk.adapter_state_dict(model, "defualt"), lambda: adapter_parameters(model, "defualt")):
        with pytest.raises(lk.UnknownAdapterError, match="unknown adapter 'defualt'. Did you mean: default?"):
            call()


def test_lora_bias_merge_without_base_bias_is_refused():
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(lk.AdapterError, match="has a bias but the base layer has none"):
        lk.merge_adapter(model)


def test_rank_mismatch_names_the_tensor(saved, model_with_adapter):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["r"] = 4
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    _load_fails(model_with_adapter, saved, r"q_proj\.lora_A\.weight' has shape \(8, 32\) but .* expect \(4, 32\)")


@pytest.mark.parametrize("edit", [{"r": 10**12}, {"rank_pattern": {"layers.1.self_attn.v_proj": 10**12}},
                                  {"r": 10**12, "use_dora": True}], ids=["r", "rank_pattern", "dora"])
def test_a_huge_edited_rank_is_named_by_its_tensor_before_it_is_allocated(edit, saved, model_with_adapter):
    """The deltas were built at the config's size before any tensor was compared: an adapter_config.json edited to a
    huge rank failed with torch's "can't allocate memory" (no tensor named, no LorakitError), or, at a size the
    allocator grants, filled gigabytes before the shape check ran. The file's shapes are now checked first."""
    if edit.get("use_dora"):  # (DoRA's build reads the base weight: sized on the meta device all the same)
        lk.save_adapter(lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True)),
                        saved)
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    _load_fails(model_with_adapter, saved, r"_proj\.lora_A\.weight' has shape \(8, 32\) but .* expect "
                                           r"\(1000000000000, 32\)")


def test_adapter_for_another_model(saved):
    model = tiny_gpt2()
    snap = _snapshot(model)
    with pytest.raises(lk.TargetError, match="matched no module"):
        lk.load_adapter(model, saved)
    _assert_same(model, snap)


def test_tensors_matching_no_module(saved, model_with_adapter):
    t = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 8),
         "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.zeros(8, 32),
         "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.zeros(32, 8),
         "base_model.model.model.layers.9.self_attn.q_prj.lora_A.weight": torch.zeros(8, 32)}
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["layers_to_transform"] = [0]
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(t, str(saved / "adapter_model.safetensors"))
    _load_fails(model_with_adapter, saved, r"match no adapted module.*layers\.9\.self_attn\.q_prj")


def test_missing_tensor(saved, model_with_adapter):
    from safetensors.torch import load_file
    t = load_file(str(saved / "adapter_model.safetensors"))
    t.pop(next(k for k in t if "layers.1" in k and "lora_B" in k))
    save_file(t, str(saved / "adapter_model.safetensors"))
    _load_fails(model_with_adapter, saved, "missing from adapter_model.safetensors")


def test_non_finite_values(saved, model_with_adapter):
    from safetensors.torch import load_file
    t = load_file(str(saved / "adapter_model.safetensors"))
    k = next(iter(t))
    t[k][0, 0] = float("nan")
    save_file(t, str(saved / "adapter_model.safetensors"))
    _load_fails(model_with_adapter, saved, r"non-finite")


def test_missing_files(saved, model_with_adapter, tmp_path):
    _load_fails(model_with_adapter, tmp_path / "nowhere", "does not exist")
    os.remove(saved / "adapter_model.safetensors")
    _load_fails(model_with_adapter, saved, "missing weights file")
    os.remove(saved / "adapter_config.json")
    _load_fails(model_with_adapter, saved, "missing config file")


def test_a_mistyped_adapter_folder_lists_the_near_folders(saved, model_with_adapter, tmp_path):
    """Was only "does not exist": the folder beside it, one letter off, went unnamed."""
    (tmp_path / "runs" / "rotate" / "adapter").mkdir(parents=True)
    (tmp_path / "runs" / "rotate2").mkdir()
    (tmp_path / "runs" / "sort").mkdir()
    _load_fails(model_with_adapter, tmp_path / "runs" / "rotat" / "adapter",
                re.escape(f"does not exist. Did you mean: {tmp_path / 'runs' / 'rotate' / 'adapter'}, "
                          f"{tmp_path / 'runs' / 'rotate2' / 'adapter'}?"))
    _load_fails(model_with_adapter, tmp_path / "xyz" / "qqq", r"does not exist\.$")  # nothing near: no hint


def test_a_peft_folder_of_named_adapters_names_them(model_with_adapter, tmp_path):
    """PEFT's save_pretrained writes an adapter that is not named "default" into a subfolder named after it; the
    parent folder was refused only as 'missing config file'."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="task").save_pretrained(
        str(tmp_path / "p"))
    _load_fails(model_with_adapter, tmp_path / "p", rf"missing config file .*holds adapter folders: "
                                                    rf"{re.escape(str(tmp_path / 'p' / 'task'))} \(PEFT saves")
    lk.load_adapter(tiny_llama(), tmp_path / "p" / "task")


def test_truncated_and_corrupted_safetensors(saved, model_with_adapter):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _load_fails(model_with_adapter, saved, "truncated|not a valid safetensors")
    path.write_bytes(data[:4])
    _load_fails(model_with_adapter, saved, "truncated")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[24:])
    _load_fails(model_with_adapter, saved, "not a valid safetensors")


def test_invalid_json_and_bad_fields(saved, model_with_adapter):
    cfg_path = saved / "adapter_config.json"
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text("{'r': 8")
    _load_fails(model_with_adapter, saved, "not valid JSON")
    cfg_path.write_text("[1, 2]")
    _load_fails(model_with_adapter, saved, "JSON object")
    cfg_path.write_text(json.dumps({**good, "lora_alpah": 16}))
    _load_fails(model_with_adapter, saved, r"unknown field 'lora_alpah'.*lora_alpha")
    # a field of a newer PEFT than lorakit reads: named, with the PEFT version that wrote it and what to do
    cfg_path.write_text(json.dumps({**good, "peft_version": "0.99.0", "use_quantum_lora": False}))
    _load_fails(model_with_adapter, saved, r"unknown field 'use_quantum_lora'.*written by PEFT 0\.99\.0.*if it holds "
                                           r"PEFT's default .* delete it from the file")
    cfg_path.write_text(json.dumps({**good, "r": "eight"}))
    _load_fails(model_with_adapter, saved, r"r must be int")
    cfg_path.write_text(json.dumps({**good, "r": 0}))  # a value error names the file it is in
    _load_fails(model_with_adapter, saved, re.escape(str(cfg_path)) + r": LoraConfig\.r must be a positive integer")
    cfg_path.write_text(json.dumps({**good, "layer_replication": [[0, 1]]}))
    _load_fails(model_with_adapter, saved, r"layer_replication.*not support")
    cfg_path.write_text(json.dumps({**good, "peft_type": "LOHA"}))
    _load_fails(model_with_adapter, saved, r"peft_type 'LOHA' is not supported")
    cfg_path.write_text(json.dumps({**good, "lorakit_method": "nola_typo"}))
    _load_fails(model_with_adapter, saved, r"unknown method 'nola_typo'")


class _Boom:
    """Unpickling this would create a marker file: proof that lorakit never unpickles."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_bin_is_refused_and_never_unpickled(saved, model_with_adapter, tmp_path):
    marker = tmp_path / "unpickled"
    os.remove(saved / "adapter_model.safetensors")
    (saved / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    _load_fails(model_with_adapter, saved, r"pickle.*never unpickles.*save_file")
    assert not marker.exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    import lorakit.io.files as files

    def failing_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(files.os, "replace", failing_replace)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(OSError):
        lk.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_save_failing_at_its_second_file_keeps_the_old_pair(tmp_path, monkeypatch, ids):
    """Saving a rank-4 adapter over a rank-8 one, the disk fills up while the config is written: the folder must still
    hold the rank-8 pair and load as it (DESIGN: saves are atomic). Before, the new tensors were already renamed into
    place beside the old config, and the folder failed to load with a shape error."""
    old = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False))
    expected = old(input_ids=ids).logits
    lk.save_adapter(old, tmp_path)
    new = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    import lorakit.io.files as files

    real_fsync, calls = files.os.fsync, []

    def fsync_then_full(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second file of the save
            raise OSError(28, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(files.os, "fsync", fsync_then_full)
    with pytest.raises(OSError, match="No space"):
        lk.save_adapter(new, tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = lk.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_a_save_interrupted_between_its_two_files_is_not_loaded_silently(tmp_path, monkeypatch, ids):
    """A save renames its two finished files into place one after the other; killed between the renames (simulated:
    the second raises KeyboardInterrupt), the folder held the new tensors beside the old config. Same rank, another
    lora_alpha: it loaded without a word and ran the new tensors at the old scaling. The tensors now carry the config
    they were saved with, and a load (attached or banked) names what differs."""
    from lorakit.serving import load_adapters

    old = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    lk.save_adapter(old, tmp_path)
    new = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj"],
                                                     init_lora_weights=False))
    import lorakit.io.files as files

    real_replace, calls = files.os.replace, []

    def killed_after_first(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(files.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        lk.save_adapter(new, tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 8  # the old config stayed
    says = r"not the config its tensors were saved with \(.*lora_alpha: saved 32, now 8\).*interrupted"
    with pytest.warns(UserWarning, match=says):
        lk.load_adapter(tiny_llama(), tmp_path)
    with pytest.warns(UserWarning, match=says):
        load_adapters(tiny_llama(), {"a": tmp_path})


def test_moving_the_base_folder_in_the_config_is_no_mismatch(tmp_path):
    import warnings

    lk.save_adapter(lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"])), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/elsewhere"}))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not the config its tensors")
        lk.load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("targets", [["embed_tokens"], ["q_proj"]], ids=["embedding", "linear"])
def test_dora_sized_on_meta_has_the_real_magnitude_shape(targets):
    """DoRA's magnitude sized on the meta device (the loader's pre-check, which skips the norm arithmetic there) has
    the shape the real build gives it, (rows of the oriented base weight,)."""
    from lorakit.core.model import planned_shapes

    model = tiny_llama()
    config = lk.LoraConfig(target_modules=targets, use_dora=True)
    _, deltas, _ = planned_shapes(model, config, "default", set())
    lk.add_adapter(model, config)
    from lorakit.core.model import adapter_layers

    real = {path: {k: tuple(v.shape) for k, v in layer.adapters["default"].state_dict().items()}
            for path, layer in adapter_layers(model)}
    assert deltas == real
    assert all("lora_magnitude_vector" in keys for keys in deltas.values())


@pytest.mark.parametrize("extra", [{"init_lora_weights": "mica"}, {"use_dora": True}], ids=["mica", "dora"])
def test_load_computes_no_initial_value_the_file_replaces(extra, tmp_path, monkeypatch):
    """Loading a MiCA adapter ran MiCA's SVD of every adapted base weight (and a DoRA one its initial norm) only for
    the file's lora_B (magnitude) to overwrite it: about 12 times a plain LoRA's load time on the bundled base, more
    on larger ones. The loaded adapter is the saved one, and no SVD / initial norm runs during the load."""
    import lorakit.methods.lora as lora_module

    config = lk.LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"], **extra)
    saved = lk.add_adapter(tiny_llama(), config)
    lk.save_adapter(saved, tmp_path)
    calls = []
    real_svd, real_norm = lora_module.minor_left_vectors, lora_module.DoraLinear._weight_norm
    monkeypatch.setattr(lora_module, "minor_left_vectors", lambda *a: calls.append("svd") or real_svd(*a))
    monkeypatch.setattr(lora_module.DoraLinear, "_weight_norm",
                        staticmethod(lambda *a: calls.append("norm") or real_norm(*a)))
    model = lk.load_adapter(tiny_llama(), tmp_path)
    assert calls == []
    want = lk.adapter_state_dict(saved)
    got = lk.adapter_state_dict(model)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
