"""A lorakit model trains under transformers.Trainer; LorakitCallback adds the method hooks and adapter files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import Trainer, TrainerCallback, TrainingArguments

import lorakit
from lorakit.data import CausalLMCollator, TokenizedDataset, load_examples
from lorakit.training import LorakitCallback, TrainConfig, make_optimizer, train


def run_trainer(model, tokenizer, examples, output_dir, optimizer=None) -> Trainer:
    args = TrainingArguments(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, seed=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenizedDataset(examples, tokenizer, max_length=64),
                      data_collator=CausalLMCollator.from_tokenizer(tokenizer), callbacks=[LorakitCallback("default")],
                      optimizers=(optimizer, None))
    trainer.train()
    return trainer


def test_trains_under_hf_trainer(make_model, tokenizer, reverse_train, tmp_path) -> None:
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = run_trainer(model, tokenizer, reverse_train, tmp_path)

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable  # the adapter learned; the base is untouched
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # The callback saved the adapter in PEFT format; it loads into a fresh base.
    fresh = lorakit.unload(make_model())
    lorakit.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(lorakit.adapter_state_dict(fresh), lorakit.adapter_state_dict(model.cpu()))


def test_callback_runs_method_hooks(hooked_method, make_model, tokenizer, reverse_train, tmp_path) -> None:
    model = make_model(hooked_method.config(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer, _ = make_optimizer(model, "default", TrainConfig(lr=1e-2))  # the method's param_groups
    run_trainer(model, tokenizer, reverse_train, tmp_path, optimizer)
    calls = hooked_method.calls
    assert len(calls["init"]) == 1 and len(calls["init"][0]) == 4
    assert calls["on_step"] == [(1, 3), (2, 3), (3, 3)]
    assert calls["extra_loss"] == ["default"] * 3  # once per training forward
    assert "forward" not in model.__dict__  # the callback's forward wrapper is gone after train()
    for n, p in model.named_parameters():
        if "lora_B" in n:  # set by init, kept there by its param group's lr of 0 under Trainer's schedule
            assert torch.all(p == 0.01), n


def _grads_of_one_step(run) -> dict[str, torch.Tensor]:
    """The gradients the optimizer's first step sees (global optimizer pre-step hook)."""
    seen: dict[int, torch.Tensor] = {}

    def capture(optimizer, args, kwargs):
        if not seen:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        seen[id(p)] = p.grad.detach().clone()

    handle = register_optimizer_step_pre_hook(capture)
    try:
        model = run()
    finally:
        handle.remove()
    return {n: seen[id(p)] for n, p in model.named_parameters() if id(p) in seen}


def _method_configs():
    from lorakit.methods.meteora import MeteoraConfig
    from lorakit.methods.mixlora import MixLoraConfig
    from lorakit.methods.mole import MoleConfig

    mlp = ["q_proj", "v_proj", "mlp"]
    return {
        "mixlora": MixLoraConfig(r=4, num_experts=4, top_k=2, lora_dropout=0.0, target_modules=mlp,
                                 router_aux_loss_coef=1.0),
        "mole": MoleConfig(r=4, lora_dropout=0.0, target_modules=mlp, router_aux_loss_coef=1.0),
        "meteora": MeteoraConfig(num_experts=2, expert_r=[4, 4], lora_dropout=0.0, train_adapters=True, top_k=1,
                                 task_to_adapter={"reverse": 0, "sort": 1}, target_modules=["q_proj", "v_proj"]),
    }


@pytest.mark.parametrize("method", ["mixlora", "mole", "meteora"])
def test_trainer_applies_the_method_loss_with_the_loops_gradients(method, make_model, tokenizer, tmp_path):
    """One step of transformers.Trainer + LorakitCallback and one of lorakit.training.train, same model, same
    (whole-dataset) batch: the same gradients, balance / gate loss included."""
    config = _method_configs()[method]
    examples = load_examples("reverse,sort", "train", n=4, seed=0)  # 8 examples: one batch of 8

    def lorakit_loop():
        model = make_model(copy.deepcopy(config))
        train(model, tokenizer, examples, TrainConfig(steps=1, batch_size=8, lr=1e-3, max_length=64,
                                                      max_grad_norm=None, device="cpu"), progress=False)
        return model

    def hf_trainer(callbacks):
        model = make_model(copy.deepcopy(config))
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                                 learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                                 disable_tqdm=True, max_grad_norm=0.0)
        Trainer(model=model, args=args, train_dataset=TokenizedDataset(examples, tokenizer, max_length=64),
                data_collator=CausalLMCollator.from_tokenizer(tokenizer), callbacks=callbacks).train()
        return model

    want = _grads_of_one_step(lorakit_loop)
    got = _grads_of_one_step(lambda: hf_trainer([LorakitCallback("default")]))
    assert want.keys() == got.keys() and any("router" in n for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4, msg=n)
    # Plain Trainer (no callback) misses the method loss: its router gradients differ.
    plain = _grads_of_one_step(lambda: hf_trainer([]))
    assert any(not torch.allclose(plain[n], want[n], atol=1e-6, rtol=1e-4) for n in want if "router" in n)


def test_trainer_with_gradient_checkpointing_keeps_a_routed_methods_gradients(make_model, tokenizer, tmp_path):
    """TrainingArguments(gradient_checkpointing=True): Trainer recomputes each block in backward, after the callback's
    routed forward returned; the callback makes the recompute replay the forward's routing (core.checkpointing), so
    routed LoRA (one expert per task key) gets the gradients of lorakit's loop without checkpointing (without the
    replay its recompute had no keys: other gradients, no error)."""
    from lorakit.methods.routed import RoutedLoraConfig

    config = RoutedLoraConfig(expert_r=[2, 2], lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    examples = load_examples("reverse,sort", "train", n=4, seed=0)

    def lorakit_loop():
        model = make_model(copy.deepcopy(config))
        train(model, tokenizer, examples, TrainConfig(steps=1, batch_size=8, lr=1e-3, max_length=64,
                                                      max_grad_norm=None, device="cpu"), progress=False)
        return model

    def hf_trainer():
        model = make_model(copy.deepcopy(config))
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                                 learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                                 disable_tqdm=True, max_grad_norm=0.0, gradient_checkpointing=True)
        Trainer(model=model, args=args, train_dataset=TokenizedDataset(examples, tokenizer, max_length=64),
                data_collator=CausalLMCollator.from_tokenizer(tokenizer),
                callbacks=[LorakitCallback("default")]).train()
        assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        return model

    want, got = _grads_of_one_step(lorakit_loop), _grads_of_one_step(hf_trainer)
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4, msg=n)


def test_trainer_stops_moving_what_a_step_hook_froze(make_model, tokenizer, reverse_train, tmp_path):
    """LaMDA freezes B wholly at freeze_ratio · steps (lamda.py; lorakit's loop then re-reads what trains). Under
    Trainer the callback did not, so AdamW (weight decay, momentum) kept moving the frozen B. Now B is unchanged
    from the step it froze on, as in lorakit's loop."""
    from transformers import TrainerCallback

    from lorakit.methods.lamda import LamdaConfig

    model = make_model(LamdaConfig(r=4, freeze_ratio=0.5, target_modules=["q_proj", "v_proj"]))
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             weight_decay=0.1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=TokenizedDataset(reverse_train, tokenizer, max_length=64),
            data_collator=CausalLMCollator.from_tokenizer(tokenizer),
            callbacks=[LorakitCallback("default"), Record()]).train()
    assert seen[3] and all(not torch.equal(seen[1][n], seen[3][n]) for n in seen[3])  # B learned before
    for n in seen[3]:
        torch.testing.assert_close(seen[6][n], seen[3][n], atol=0, rtol=0, msg=n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("method", ["lora", "dylora"])
def test_trainer_resume_from_checkpoint_continues_exactly(method, make_model, trainer_with_checkpoints, tmp_path):
    """Trainer(save_strategy="steps") + resume_from_checkpoint with LorakitCallback: the adapter after 4 steps, resumed
    from checkpoint-2, equals the uninterrupted 4-step run's (Trainer restores optimizer, scheduler, RNG and data
    position; the callback's hooks (DyLoRA's rank draw) run on the restored step count)."""
    from lorakit.methods.dylora import DyLoraConfig

    def config():
        return DyLoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if method == "dylora" else None

    def run(output_dir, resume=None):
        model = trainer_with_checkpoints(make_model(config()), output_dir, max_steps=4, save_steps=2, resume=resume)
        return lorakit.adapter_state_dict(model)

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0, msg=key)


def test_a_trainer_checkpoint_on_a_4bit_base_loads_in_plain_transformers(make_model, trainer_with_checkpoints,
                                                                         tmp_path):
    """QLoRA under Trainer on a base ``lorakit.quantize.quantize_model`` made: the checkpoint's model.safetensors
    (base under the host's names) + config.json load in plain transformers, which attaches the adapter the callback
    saved beside them through its PEFT integration, and give the trained model's logits. Was: config.json lacked
    ``quantization_config``, so transformers read the packed 4-bit codes as dense weights and refused them."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from lorakit.quantize import quantize_model

    model = quantize_model(lorakit.unload(make_model()), "nf4")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    model = trainer_with_checkpoints(model, tmp_path, max_steps=2, save_steps=2)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2", device_map="cpu")
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    model.cpu().train(), loaded.train()  # train mode: bitsandbytes repacks 4-bit weights on eval forwards on some CPUs
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


class _FailAtStep2(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("stopped mid-run")


def test_a_train_that_raises_mid_run_leaves_the_models_forward_as_before(make_model, tokenizer, reverse_train,
                                                                          tmp_path):
    """Was: LorakitCallback's forward wrapper (installed for Trainer's run) came off only in on_train_end, which a
    train() that raises never reaches: the model kept the wrapper (its routing context and extra loss) afterwards.
    Now train() removes it on any exit (try/finally), and a second train() on the same Trainer wraps it again."""
    model = make_model(_method_configs()["mixlora"])
    assert "forward" not in model.__dict__
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    seen: list[bool] = []

    class Wrapped(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append("forward" in model.__dict__)

    fail = _FailAtStep2()
    trainer = Trainer(model=model, args=args, train_dataset=TokenizedDataset(reverse_train, tokenizer, max_length=64),
                      data_collator=CausalLMCollator.from_tokenizer(tokenizer),
                      callbacks=[LorakitCallback("default"), fail, Wrapped()])
    with pytest.raises(RuntimeError, match="stopped mid-run"):
        trainer.train()
    assert trainer.state.global_step == 2 and seen == [True, True]  # the routed forward ran the steps
    assert "forward" not in model.__dict__ and model.forward.__func__ is type(model).forward

    trainer.remove_callback(fail)
    trainer.train()  # the same Trainer again: wrapped for its run, unwrapped after it
    assert trainer.state.global_step == 3 and seen[2:] == [True, True, True]
    assert "forward" not in model.__dict__


def test_trainer_refuses_data_the_method_cannot_train_on_before_any_step(make_model, tokenizer, reverse_train,
                                                                          tmp_path) -> None:
    # RecLoRA needs a user vector per example; the reverse task's examples have none. lorakit's own loop refuses
    # them before step 0 (AdapterConfig.check_examples); under Trainer the first forward raised an AdapterError.
    from lorakit.methods.routed import RecLoraConfig

    model = make_model(RecLoraConfig(num_experts=2, r=2, user_dim=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(lorakit.ConfigError, match=r"user_dim.*example 0 of the data has none"):
        run_trainer(model, tokenizer, reverse_train, tmp_path)
    assert calls == []  # refused before any forward
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert "forward" not in model.__dict__ and not (tmp_path / "adapter").exists()
