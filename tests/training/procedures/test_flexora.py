"""Flexora (``training/procedures/flexora.py``) against the official bi-level step.

Reference, written here from kithib/Flexora ``src/llamafactory/train/flora.py`` (commit 4449be8):
``hyper_param = zeros(block_num)``, ``Adam([hyper_param], lr=0.01)`` (lines 123-124); the LoRA path of block
l weighted by ``block_num * softmax(hyper_param)[l]`` (271), detached while training (273); after every
optimizer ``step`` (245) ``hyper_step(n=8)`` (288-305): eval mode, ``loss.backward()`` once per validation batch
(batch size 1), one Adam step on ``hyper_param``; ``selected_layer``: ``hyper_param > 0`` (253-255). The weight
multiplies each layer's LoRA output once here (the paper's form; see the module docstring), applied in the
reference by a forward hook on lora_B's output rather than on lora_A's input.
"""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.core.errors import ConfigError
from lorakit.data import CausalLMCollator, TokenizedDataset
from lorakit.training import TrainConfig, get_procedure, make_optimizer, train

from lk_models import tiny_llama_for


def _model(tokenizer, layers=3):
    base = tiny_llama_for(tokenizer, num_hidden_layers=layers)
    return lk.add_adapter(base, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights="gaussian")).train()


def test_flexora_matches_the_official_bilevel_step(tokenizer, reverse_train):
    collate = CausalLMCollator.from_tokenizer(tokenizer)
    data = TokenizedDataset(reverse_train, tokenizer, max_length=64)
    val = TokenizedDataset(reverse_train[-10:], tokenizer, max_length=64)
    ours, ref = _model(tokenizer), _model(tokenizer)
    config = TrainConfig(lr=1e-2, max_grad_norm=None, procedure="flexora", procedure_args={"val_batches": 3})
    procedure = get_procedure("flexora").build(config)
    procedure.set_validation(lambda idx: collate([val[i] for i in idx]), len(val))
    optimizer, _ = make_optimizer(ours, "default", config, procedure=procedure)

    # the official reference
    hyper = torch.zeros(3, requires_grad=True)
    hyper_opt = torch.optim.Adam([hyper], lr=0.01)
    weight = {"w": 3 * torch.softmax(hyper, -1).detach()}
    for name, module in ref.named_modules():
        if name.endswith("lora_B"):
            layer = int(name.split("layers.")[1].split(".")[0])
            module.register_forward_hook(lambda m, a, out, layer=layer: out * weight["w"][layer])
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    position = 0
    for step in range(1, 4):
        batch = collate([data[i] for i in range(4 * step, 4 * step + 4)])
        for model, opt in ((ref, ref_opt), (ours, optimizer)):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        procedure.on_step(ours, "default", step, 3)
        ref.eval()
        weight["w"] = 3 * torch.softmax(hyper, -1)  # not detached in hyper_step
        hyper_opt.zero_grad()
        for _ in range(3):
            one = collate([val[position % len(val)]])
            position += 1
            ref(input_ids=one["input_ids"], attention_mask=one["attention_mask"],
                labels=one["labels"]).loss.backward(retain_graph=True)
        hyper_opt.step()
        ref_opt.zero_grad(set_to_none=True)  # the HF Trainer zeroes the LoRA grads the validation pass left
        weight["w"] = 3 * torch.softmax(hyper, -1).detach()
        ref.train()
        torch.testing.assert_close(procedure.alpha.detach(), hyper.detach(), atol=1e-6, rtol=1e-5)
    assert procedure.alpha.abs().max() > 0
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    assert procedure.selected_layers() == [i for i in range(3) if hyper[i] > 0]


def test_run_holds_out_validation_writes_selection_and_resumes_exactly(tokenizer, reverse_train, tmp_path, capsys):
    def config(out, **kw):
        return TrainConfig(steps=4, batch_size=4, lr=1e-2, save_every=2, output_dir=str(out), procedure="flexora",
                           procedure_args={"val_size": 8, "val_batches": 2}, **kw)

    straight = _model(tokenizer)
    train(straight, tokenizer, reverse_train, config(tmp_path / "a"), progress=False)
    report = json.loads((tmp_path / "a" / "flexora.json").read_text())
    assert report["layers"] == [0, 1, 2] and len(report["alpha"]) == 3
    assert report["selected_layers"] == [i for i, a in enumerate(report["alpha"]) if a > 0]
    assert "Flexora selected layers" in capsys.readouterr().err
    state = json.loads((tmp_path / "a" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_train_examples"] == len(reverse_train) - 8  # the validation split is not trained on
    assert not any(m._forward_pre_hooks for n, m in straight.named_modules() if n.endswith("lora_A"))  # removed

    resumed = _model(tokenizer)
    train(resumed, tokenizer, reverse_train, config(tmp_path / "b", resume_from=str(tmp_path / "a" / "checkpoint-2")),
          progress=False)
    again = json.loads((tmp_path / "b" / "flexora.json").read_text())
    assert again["alpha"] == report["alpha"]
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_bad_input_says_what_to_change(tokenizer, reverse_train):
    with pytest.raises(ConfigError, match="hyper_lr"):
        TrainConfig(procedure="flexora", procedure_args={"hyper_lr": 0.0})
    with pytest.raises(ConfigError, match="FlexoraConfig.val_size=100 validation examples are held out of a run of 20") as e:
        train(_model(tokenizer), tokenizer, reverse_train[:20], TrainConfig(
            steps=1, procedure="flexora", procedure_args={"val_size": 100}), progress=False)
    assert e.value.field == "FlexoraConfig.val_size"  # the command line words it --val-size, the flag to change
    config = TrainConfig(procedure="flexora")
    procedure = get_procedure("flexora").build(config)
    model = _model(tokenizer)
    make_optimizer(model, "default", config, procedure=procedure)
    with pytest.raises(ConfigError, match="set_validation"):
        procedure.on_step(model, "default", 1, 1)
    nola = lk.add_adapter(tiny_llama_for(tokenizer), lk.get_method("nola").config_cls(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="lora_A"):
        make_optimizer(nola, "default", config, procedure=get_procedure("flexora").build(config))
    # MixLoRA's FFN experts keep lora_A in a ParameterDict that is indexed, never called: the hook would never
    # fire there and the FFN path would go unweighted, so it is refused (found by a new-user break test)
    mixlora = lk.add_adapter(tiny_llama_for(tokenizer), lk.get_method("mixlora").config_cls())
    with pytest.raises(ConfigError, match="no such lora_A module"):
        make_optimizer(mixlora, "default", config, procedure=get_procedure("flexora").build(config))


def test_a_method_whose_forward_never_calls_lora_a_is_named(tokenizer, reverse_train):
    """Was: DyLoRA (its forward slices lora_A's weight to the sampled rank instead of calling the module) trained
    one step and then failed in the validation step with torch's "The differentiated Tensor at index 0 appears to
    not have been used in the graph": the hooks weighting each layer never ran, so α had no gradient."""
    model = lk.add_adapter(tiny_llama_for(tokenizer), lk.get_method("dylora").config_cls(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"forward at 'model\.layers\.0\.self_attn\.q_proj' \(DyLoraLinear\) never "
                                          r"calls .*use it with method lora"):
        train(model, tokenizer, reverse_train[:12], TrainConfig(steps=2, batch_size=2, procedure="flexora",
                                                                procedure_args={"val_size": 4, "val_batches": 1},
                                                                device="cpu"), progress=False)
