"""The training loop: learning, gradient accumulation, schedules, exact resume, files, method hooks."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.training import TrainConfig, lr_multiplier, train


def adapter_weights(model, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lorakit.adapter_state_dict(model, name).items()}


def test_loss_decreases_and_result_is_complete(make_model, tokenizer, reverse_train, reverse_test, tmp_path) -> None:
    model = make_model()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    logs = []
    config = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=3, lr_schedule="cosine", eval_every=15,
                         log_every=10, seed=0, output_dir=str(tmp_path))
    result = train(model, tokenizer, reverse_train, config, eval_examples=reverse_test, progress=False,
                   on_log=[logs.append])

    assert len(result.losses) == 30 and result.steps == 30 and result.start_step == 0
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.75 * first, result.losses
    assert [e["step"] for e in result.eval_history] == [15, 30]
    assert result.final_metrics is result.eval_history[-1] and result.final_metrics["n"] == len(reverse_test)
    assert [r["step"] for r in logs if "loss" in r] == [10, 20, 30]
    assert [r["step"] for r in logs if "eval" in r] == [15, 30]
    assert result.train_tokens > 0 and result.tokens_per_s > 0 and result.peak_memory_mb > 0
    assert 0 < result.trainable_params < result.total_params
    assert result.device == ("cuda" if torch.cuda.is_available() else "cpu")
    # Only the adapter moved; the base model is bit for bit what it was.
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p.detach().cpu(), base_before[n]), n
    # The final adapter is a PEFT-format folder that loads back into a fresh base with the same outputs.
    assert result.adapter_dir == str(tmp_path / "adapter")
    fresh = lorakit.unload(make_model())
    lorakit.load_adapter(fresh, result.adapter_dir)
    ids = torch.tensor([tokenizer.encode("reverse: a b c =>")])
    model.eval().cpu()
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    assert (tmp_path / "train_result.json").is_file()


def test_grad_accum_matches_one_big_batch(make_model, tokenizer, reverse_train) -> None:
    """batch 4 x accum 1 == batch 2 x accum 2: the loss is normalised by the step's supervised tokens."""
    runs = []
    for batch_size, grad_accum in [(4, 1), (2, 2)]:
        model = make_model()
        config = TrainConfig(steps=4, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, seed=3, device="cpu")
        result = train(model, tokenizer, reverse_train, config, progress=False)
        runs.append((result.losses, adapter_weights(model)))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    # Examples have different lengths, so a per-micro-batch mean would not match here.
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule, expected", [
    # total 10 steps, warmup 2: factors for the updates after 0, 1, 2, 6 and 9 completed steps
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.5, 1 / 8]),
    ("cosine", [0.5, 1.0, 1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 7 / 8))]),
])
def test_schedule_values(schedule: str, expected: list[float]) -> None:
    got = [lr_multiplier(step, 10, 2, schedule) for step in (0, 1, 2, 6, 9)]
    assert got == pytest.approx(expected)
    assert all(lr_multiplier(step, 10, 2, schedule) > 0 for step in range(10))


def test_loop_applies_schedule_and_warmup_ratio(make_model, tokenizer, reverse_train) -> None:
    logs = []
    config = TrainConfig(steps=5, batch_size=2, lr=0.1, warmup_ratio=0.4, lr_schedule="linear", log_every=1)
    train(make_model(), tokenizer, reverse_train, config, progress=False, on_log=[logs.append])
    assert [r["lr"] for r in logs] == pytest.approx([0.1 * lr_multiplier(s, 5, 2, "linear") for s in range(5)])


class Stop(Exception):
    pass


def test_resume_is_bit_identical(make_model, tokenizer, reverse_train, reverse_test, tmp_path) -> None:
    """6 steps straight == 3 steps, a crash, and a resume from checkpoint-3 — with dropout, accumulation and
    weight decay, so RNG, data position and optimizer moments must all come back exactly."""

    def config(out: Path, **kw) -> TrainConfig:
        return TrainConfig(steps=6, batch_size=3, grad_accum=2, lr=1e-2, weight_decay=0.01, warmup_steps=2,
                           lr_schedule="cosine", save_every=3, seed=7, output_dir=str(out), **kw)

    # Evaluating in the straight run only also checks that evaluation leaves the training RNG alone.
    straight_model = make_model(lora_dropout=0.1)
    straight = train(straight_model, tokenizer, reverse_train, config(tmp_path / "a", eval_every=2),
                     eval_examples=reverse_test, progress=False)

    def crash_after_step_4(record: dict) -> None:
        if record.get("step") == 4:
            raise Stop
    with pytest.raises(Stop):
        train(make_model(lora_dropout=0.1), tokenizer, reverse_train, config(tmp_path / "b", log_every=1),
              progress=False, on_log=[crash_after_step_4])
    checkpoint = tmp_path / "b" / "checkpoint-3"
    resumed_model = make_model(lora_dropout=0.1)
    with torch.no_grad():  # scramble the adapter: every adapter weight must come from the checkpoint
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.normal_()
    resumed = train(resumed_model, tokenizer, reverse_train, config(tmp_path / "b", resume_from=str(checkpoint)),
                    progress=False)

    assert resumed.start_step == 3 and resumed.steps == 6
    assert resumed.losses == straight.losses
    a, b = adapter_weights(straight_model), adapter_weights(resumed_model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.checkpoints == [str(tmp_path / "a" / f"checkpoint-{s}") for s in (3, 6)]


def test_checkpoints_are_safetensors_and_json_only(make_model, tokenizer, reverse_train, tmp_path) -> None:
    config = TrainConfig(steps=4, batch_size=2, lr=1e-2, save_every=2, output_dir=str(tmp_path))
    for _ in range(2):  # the second run replaces every folder of the first
        train(make_model(), tokenizer, reverse_train, config, progress=False)
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert names == [
        "adapter", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/task_index.json",
        "checkpoint-2", "checkpoint-2/adapter_config.json", "checkpoint-2/adapter_model.safetensors",
        "checkpoint-2/task_index.json", "checkpoint-2/trainer_state.json", "checkpoint-2/trainer_state.safetensors",
        "checkpoint-4", "checkpoint-4/adapter_config.json", "checkpoint-4/adapter_model.safetensors",
        "checkpoint-4/task_index.json", "checkpoint-4/trainer_state.json", "checkpoint-4/trainer_state.safetensors",
        "train_result.json",
    ]  # no .bin/.pt pickles, no temporary folders left behind
    state = lorakit.io.files.load_tensors(tmp_path / "checkpoint-4" / "trainer_state.safetensors")
    assert state["rng.cpu"].dtype == torch.uint8
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg_sq") for k in state)
    # A checkpoint's adapter is an ordinary PEFT-format adapter.
    lorakit.load_adapter(lorakit.unload(make_model()), tmp_path / "checkpoint-2")


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"batch_size": -1}, "batch_size must be a positive integer"),
    ({"steps": "100"}, "steps must be int"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"lr_schedule": "cosin"}, "Did you mean: cosine"),
    ({"warmup_steps": 10, "steps": 10}, "must be shorter than training"),
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "not both"),
    ({"warmup_ratio": 1.5}, "warmup_ratio must be in"),
    ({"max_grad_norm": 0.0}, "or None for no clipping"),
    ({"save_every": 5}, "needs an output_dir"),
    ({"eval_every": -1}, "must be >= 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"resume_from": "/nonexistent/checkpoint-3"}, "not a lorakit checkpoint"),
    ({"device": "gpu"}, "is not a device"),
])
def test_bad_config_values_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(lorakit.ConfigError, match=message):
        TrainConfig(**kwargs)


def test_train_rejects_misuse(make_model, tokenizer, reverse_train, tmp_path) -> None:
    model = make_model()
    with pytest.raises(lorakit.AdapterError, match="no adapter 'other'"):
        train(model, tokenizer, reverse_train, TrainConfig(steps=1), adapter_name="other", progress=False)
    # typed as the store's and the core's unknown names are (a server maps it to 404 by type), with near matches
    with pytest.raises(lorakit.UnknownAdapterError, match="no adapter 'defualt'. Did you mean: default?"):
        train(model, tokenizer, reverse_train, TrainConfig(steps=1), adapter_name="defualt", progress=False)
    with pytest.raises(ValueError, match="no eval_examples"):
        train(model, tokenizer, reverse_train, TrainConfig(steps=1, eval_every=1), progress=False)
    train(model, tokenizer, reverse_train, TrainConfig(steps=1, batch_size=2, save_every=1, output_dir=str(tmp_path)),
          progress=False)
    config = TrainConfig(steps=2, batch_size=2, resume_from=str(tmp_path / "checkpoint-1"))
    with pytest.raises(ValueError, match="same training data"):
        train(make_model(), tokenizer, reverse_train[:10], config, progress=False)


def test_train_warns_of_a_schedule_past_the_last_step(make_model, tokenizer, reverse_train, tmp_path) -> None:
    """save_every > steps wrote no checkpoint, silently: TrainConfig.check_steps names it (lorakit train refuses
    it), and train warns with that message, as it does for an adapter's schedule, then trains."""
    config = TrainConfig(steps=1, batch_size=2, save_every=3, output_dir=str(tmp_path))
    with pytest.raises(lorakit.ConfigError, match=r"save_every=3 is more than steps=1"):
        config.check_steps()
    TrainConfig(steps=3, save_every=3, eval_every=3, output_dir=str(tmp_path)).check_steps()  # the last step checkpoints / evaluates
    with pytest.warns(UserWarning, match=r"save_every=3 is more than steps=1: no checkpoint"):
        result = train(make_model(), tokenizer, reverse_train, config, progress=False)
    assert result.checkpoints == [] and result.steps == 1



def test_method_hooks_are_called_and_take_effect(hooked_method, make_model, tokenizer, reverse_train) -> None:
    model = make_model(hooked_method.config(r=4, target_modules=["q_proj", "v_proj"]))
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    config = TrainConfig(steps=3, batch_size=2, grad_accum=2, lr=1e-2, init_batches=3, device="cpu")
    train(model, tokenizer, reverse_train, config, progress=False)

    calls = hooked_method.calls
    [batches] = calls["init"]
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 2 and "labels" in b for b in batches)
    assert calls["param_groups"] == [1e-2]
    assert calls["on_step"] == [(1, 3), (2, 3), (3, 3)]
    assert len(calls["extra_loss"]) == 3 * 2  # once per micro-batch
    for n, p in model.named_parameters():
        if "lora_B" in n:  # set by init, frozen by its param group's lr of 0
            assert torch.all(p == 0.01), n
        if "lora_A" in n:  # pulled toward 0 by the extra loss
            assert p.norm() < a_before[n].norm(), n


def test_routing_vectors_and_task_keys_reach_training_and_evaluation(make_model, tokenizer, reverse_train) -> None:
    """Per-example routing vectors (RecLoRA's user vector) are stacked into the extras in training and in
    evaluation; with the training task index, evaluation gives keyed methods each row's task id."""
    from dataclasses import replace

    from lorakit.data import evaluate_examples, generate_completions, load_examples
    from lorakit.methods.routed import RecLoraConfig, RoutedLoraConfig

    users = {0: [1.0, 0.0, -1.0], 1: [-2.0, 0.5, 0.0]}
    train_ex = [replace(ex, routing={"user_state": users[i % 2]}) for i, ex in enumerate(reverse_train)]
    model = make_model(RecLoraConfig(num_experts=2, r=2, user_dim=3, lora_dropout=0.0, gate_dropout=0.0))
    config = TrainConfig(steps=3, batch_size=8, lr=1e-2, seed=0)
    with pytest.raises(lorakit.LorakitError, match="user_state"):
        train(model, tokenizer, reverse_train, config, progress=False)  # no user vectors in the data
    train(model, tokenizer, train_ex, config, progress=False)
    test = [replace(ex, routing={"user_state": users[1]}) for ex in load_examples("reverse", "test", n=3, seed=0)]
    got = evaluate_examples(model, tokenizer, test, max_new_tokens=8, return_predictions=True)["predictions"]
    with lorakit.routing(extras={"user_state": torch.tensor([users[1]] * 3)}):
        expected = generate_completions(model, tokenizer, [ex.prompt for ex in test], max_new_tokens=8)
    assert got == expected

    model = make_model(RoutedLoraConfig(expert_r=[2, 2], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    test = load_examples("reverse,upper", "test", n=2, seed=0)
    index = {"reverse": 0, "upper": 1}
    got = evaluate_examples(model, tokenizer, test, max_new_tokens=8, task_to_id=index,
                            return_predictions=True)["predictions"]
    for ex, prediction in zip(test, got):
        with lorakit.routing(keys=torch.tensor([index[ex.task]])):
            assert [prediction] == generate_completions(model, tokenizer, [ex.prompt], max_new_tokens=8)
    unkeyed = evaluate_examples(model, tokenizer, test, max_new_tokens=8, return_predictions=True)["predictions"]
    assert unkeyed != got  # without keys every row gets the base model


def test_router_statistics_are_logged_and_kept_for_mixtures(make_model, tokenizer, reverse_train, reverse_test):
    from lorakit.methods.mixlora import MixLoraConfig

    model = make_model(MixLoraConfig(r=2, expert_r=2, num_experts=4, top_k=2, lora_dropout=0.0))
    logs = []
    config = TrainConfig(steps=4, batch_size=8, lr=1e-2, log_every=2, eval_every=2, seed=0)
    result = train(model, tokenizer, reverse_train, config, eval_examples=reverse_test, progress=False,
                   on_log=[logs.append])
    routed = [r["router"] for r in logs if "loss" in r]
    assert len(routed) == 2 and routed[-1]["layers"] == 2 and routed[-1]["uniform_fraction"] == 0.25
    assert routed[-1]["min_load_fraction"] <= 0.25 <= routed[-1]["max_load_fraction"] and routed[-1]["entropy"] > 0
    assert result.router_stats is not None and len(result.router_stats) == 2
    for stats in result.router_stats.values():  # every real training token, and nothing from the evaluations
        assert stats["tokens"] == result.train_tokens
        assert sum(stats["load"]) == 2 * result.train_tokens  # top-2
    plain = train(make_model(), tokenizer, reverse_train, TrainConfig(steps=1, batch_size=8), progress=False)
    assert plain.router_stats is None


def test_train_restores_mode_when_it_raises(make_model, tokenizer, reverse_train) -> None:
    """Issue 10: a state change restores what it found, also when the block raises."""
    model = make_model().eval()

    def stop(record):
        raise Stop

    with pytest.raises(Stop):
        train(model, tokenizer, reverse_train, TrainConfig(steps=3, batch_size=2, log_every=1), progress=False,
              on_log=[stop])
    assert not model.training


def test_supervised_tokens_reach_the_routing_extras(make_model, tokenizer, reverse_train) -> None:
    """Every training forward (lorakit's loop and the Trainer callback's wrapped forward) offers methods the mask
    of the tokens the loss supervises, SUPERVISED_KEY: the completion tokens, EOS included, and nothing else."""
    from lorakit.core.routing import SUPERVISED_KEY, current_routing
    from lorakit.data import CausalLMCollator, TokenizedDataset
    from lorakit.data.collate import encode_completion
    from lorakit.training import LorakitCallback

    model = make_model()
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["input_ids"], current_routing().extras.get(
        SUPERVISED_KEY))), with_kwargs=True)  # the decoder: inside the routing context the loop / callback opens
    train(model, tokenizer, reverse_train[:8], TrainConfig(steps=2, batch_size=4, lr=1e-3, seed=0), progress=False)
    completions = {tuple(encode_completion(tokenizer, ex.completion)) for ex in reverse_train[:8]}
    assert len(seen) == 2
    for ids, mask in seen:
        assert mask is not None and mask.shape == ids.shape and mask.dtype == torch.bool
        for row in range(ids.shape[0]):
            assert tuple(ids[row][mask[row]].tolist()) in completions  # exactly the row's completion tokens

    batch = CausalLMCollator.from_tokenizer(tokenizer)([TokenizedDataset(reverse_train[:2], tokenizer)[i]
                                                        for i in range(2)])
    seen.clear()
    callback = LorakitCallback("default")
    callback._wrap_forward(model)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # no labels: no mask
    finally:
        callback._restore_forward()
    assert torch.equal(seen[0][1], batch["labels"] != -100) and seen[1][1] is None


def test_gradient_checkpointing_trains_as_without_it(make_model, tokenizer) -> None:
    """TrainConfig.gradient_checkpointing (lorakit train --gradient-checkpointing): same losses and weights as
    without it (checkpointing's contract: the recompute reproduces the forward), for a method routed by task keys,
    with dropout on; the model's checkpointing is off again afterwards, as it was found."""
    from lorakit.core.checkpointing import checkpointing_enabled
    from lorakit.data import load_examples
    from lorakit.methods.routed import RoutedLoraConfig

    data = load_examples("reverse,upper", "train", n=16, seed=0)
    runs = []
    for checkpointing in (False, True):
        model = make_model(RoutedLoraConfig(expert_r=[2, 2], lora_dropout=0.1))
        config = TrainConfig(steps=3, batch_size=4, lr=1e-2, seed=0, gradient_checkpointing=checkpointing)
        result = train(model, tokenizer, data, config, progress=False)
        assert not checkpointing_enabled(model)
        runs.append((result.losses, adapter_weights(model)))
    (losses, weights), (losses_ckpt, weights_ckpt) = runs
    torch.testing.assert_close(losses_ckpt, losses, atol=1e-6, rtol=0)
    for key in weights:
        torch.testing.assert_close(weights_ckpt[key], weights[key], atol=1e-6, rtol=0, msg=key)


def test_gradient_checkpointing_leaves_no_hook_behind(make_model, tokenizer, reverse_train) -> None:
    """Turning checkpointing on also hooks the input embeddings so that their output requires grad (transformers'
    ``enable_input_require_grads``), and transformers' disable removes that hook only for PEFT models: after
    ``train(gradient_checkpointing=True)`` every later forward with gradients on ran backward through the whole
    frozen base (one more hook per run). Now the model's hooks are as found."""
    model = make_model()

    def hooks():
        return {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}

    found = hooks()
    for _ in range(2):
        train(model, tokenizer, reverse_train, TrainConfig(steps=1, batch_size=4, gradient_checkpointing=True),
              progress=False)
    assert hooks() == found
    assert not model.model.embed_tokens(torch.tensor([[1, 2]])).requires_grad


def test_gradient_checkpointing_on_a_model_that_cannot_is_a_config_error(tokenizer, reverse_train) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(lorakit.ConfigError, match="cannot checkpoint activations") as error:
        train(model, tokenizer, reverse_train, TrainConfig(steps=1, gradient_checkpointing=True), progress=False)
    assert error.value.field == "TrainConfig.gradient_checkpointing"


@pytest.mark.parametrize("name", [pytest.param(n, id=f"method={n}")
                                  for n in ("mixlora", "mole", "meteora", "smora", "mola", "xlora")])
def test_gradient_checkpointing_trains_a_mixture_as_without_it(make_model, tokenizer, name) -> None:
    """Several steps of a mixture with gradient checkpointing: the same losses, adapter weights (buffers included:
    SMoRA's balancing bias) and router statistics as the same run without it (checkpointing's contract). Was: the
    recompute in backward appended its router outputs to the aux-loss records, so the next step's aux loss
    (MixLoRA, MoLE, MeteoRA) backpropagated through the previous step's freed graph ("Trying to backward through
    the graph a second time"); SMoRA's recompute routed with the bias its own forward had already moved, and moved
    it again; router statistics counted every checkpointed token twice."""
    from lorakit.data import load_examples
    from lorakit.mixtures.base import router_stats

    method = lorakit.get_method(name)
    kwargs = dict(next(iter(method.variants.values())))
    if not method.config_cls.has_own_targets():
        kwargs.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    data = load_examples("reverse,upper", "train", n=16, seed=0)
    runs = []
    for checkpointing in (False, True):
        model = make_model(method.config_cls(**kwargs))
        config = TrainConfig(steps=3, batch_size=4, lr=1e-2, seed=0, gradient_checkpointing=checkpointing)
        result = train(model, tokenizer, data, config, progress=False)
        runs.append((result.losses, adapter_weights(model), router_stats(model)))
    (losses, weights, stats), (losses_ckpt, weights_ckpt, stats_ckpt) = runs
    torch.testing.assert_close(losses_ckpt, losses, atol=1e-6, rtol=0)
    for key in weights:
        torch.testing.assert_close(weights_ckpt[key], weights[key], atol=1e-6, rtol=0, msg=key)
    assert stats_ckpt.keys() == stats.keys()
    for layer, row in stats.items():
        assert stats_ckpt[layer]["load"] == pytest.approx(row["load"]), layer
        assert stats_ckpt[layer]["entropy"] == pytest.approx(row["entropy"]), layer


def test_reentrant_checkpointing_of_an_aux_loss_mixture_is_an_error(make_model, tokenizer) -> None:
    """Reentrant checkpointing (``use_reentrant=True``, a user's own choice; lorakit and Trainer turn on the
    non-reentrant kind) runs a block's forward under ``no_grad`` and its recompute only in backward, after the loss:
    MixLoRA's router aux loss got no records, so it trained without its balance loss (losses 2.4e-4 off the run
    without checkpointing from step 2) without a word. Now a ConfigError says to use non-reentrant checkpointing;
    a routed method without aux records still trains as without checkpointing."""
    from dataclasses import replace

    from lorakit.data import load_examples
    from lorakit.methods.mixlora import MixLoraConfig
    from lorakit.methods.routed import RoutedLoraConfig

    data = load_examples("reverse,upper", "train", n=16, seed=0)
    config = TrainConfig(steps=2, batch_size=4, lr=1e-2, seed=0, gradient_checkpointing=True)
    model = make_model(MixLoraConfig(num_experts=4, top_k=2, r=4))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(lorakit.ConfigError, match="use_reentrant=False"):
        train(model, tokenizer, data, config, progress=False)

    runs = []
    for checkpointing in (False, True):
        model = make_model(RoutedLoraConfig(expert_r=[2, 2], target_modules=["q_proj", "v_proj"]))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        runs.append(train(model, tokenizer, data, replace(config, gradient_checkpointing=checkpointing),
                          progress=False).losses)
    torch.testing.assert_close(runs[1], runs[0], atol=1e-6, rtol=0)


def test_resume_with_another_seed_warns(make_model, tokenizer, reverse_train, tmp_path) -> None:
    """The data order is a permutation drawn from (seed, epoch) (loop.py's module docstring: what makes resume exact),
    so a resume under another seed goes on at the checkpoint's position in another permutation: some examples of
    the epoch come twice and others never. Allowed, but named, as another global batch is."""
    def config(**kw) -> TrainConfig:
        return TrainConfig(steps=2, batch_size=4, lr=1e-2, save_every=1, output_dir=str(tmp_path / "run"), **kw)

    train(make_model(), tokenizer, reverse_train, config(seed=1), progress=False)
    with pytest.warns(UserWarning, match="resuming .*checkpoint-1 with another seed: the checkpoint's run used seed 1, "
                                         "this run 2"):
        train(make_model(), tokenizer, reverse_train, config(seed=2, resume_from=str(tmp_path / "run" / "checkpoint-1")),
              progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="resuming .* with another seed")
        train(make_model(), tokenizer, reverse_train, config(seed=1, resume_from=str(tmp_path / "run" / "checkpoint-1")),
              progress=False)


@pytest.mark.parametrize("ending", ["returns", "raises", "one_ctrl_c", "two_ctrl_c"])
def test_sigint_handler_is_restored_on_every_exit(make_model, tokenizer, reverse_train, tmp_path, ending) -> None:
    """With an ``output_dir`` the loop installs its own SIGINT handler (first Ctrl-C: finish the step, checkpoint,
    TrainingInterrupted; second: KeyboardInterrupt). A Python-API caller (a notebook, a script) gets theirs back
    however ``train`` ends; a leaked handler would swallow their next Ctrl-C. The signals are real
    (``signal.raise_signal``), sent from a log callback during step 1."""
    import signal

    from lorakit.training import TrainingInterrupted

    before = signal.getsignal(signal.SIGINT)
    sends = {"returns": 0, "raises": 0, "one_ctrl_c": 1, "two_ctrl_c": 2}[ending]

    def at_step_one(record):
        if record["step"] == 1:
            assert signal.getsignal(signal.SIGINT) != before  # the loop's handler is in place
            for _ in range(sends):
                signal.raise_signal(signal.SIGINT)
            if ending == "raises":
                raise Stop

    expected = {"returns": None, "raises": Stop, "one_ctrl_c": TrainingInterrupted,
                "two_ctrl_c": KeyboardInterrupt}[ending]
    config = TrainConfig(steps=3, batch_size=2, log_every=1, output_dir=str(tmp_path), device="cpu")
    if expected is None:
        assert train(make_model(), tokenizer, reverse_train, config, progress=False, on_log=[at_step_one]).steps == 3
    else:
        with pytest.raises(expected) as caught:
            train(make_model(), tokenizer, reverse_train, config, progress=False, on_log=[at_step_one])
        if ending == "one_ctrl_c":
            assert caught.value.step == 1 and Path(caught.value.checkpoint).name == "checkpoint-1"
    assert signal.getsignal(signal.SIGINT) == before
