"""LISA (``training/procedures/lisa.py``) against the official LMFlow LISATrainer's update rule.

Reference (OptimalScale/LMFlow ``src/lmflow/pipeline/utils/lisa_trainer.py``): ``_switch_active_layers`` sets
``requires_grad=False`` on every body layer and True on the drawn ones; ``maybe_switch_active_layers`` builds a
new AdamW at each switch (every ``interval_steps``), copying the state of the non-body groups
(``LISA_PARAM_GROUPS_KEEP_STATE_IDX = [0, 1]``) so the active body layers start from fresh moments. The test
replays that with torch AdamW, given the blocks our procedure drew (the draw itself is ours: seeded per interval).
"""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.training import TrainConfig, get_procedure, make_optimizer, train

from lk_models import tiny_llama_for


def _model(tokenizer, layers=4):
    base = tiny_llama_for(tokenizer, num_hidden_layers=layers)
    return lk.add_adapter(base, lk.LoraConfig(r=2, target_modules=["q_proj"])).train()


def test_lisa_matches_lmflow_reinitialised_optimizer(tokenizer):
    ids = torch.randint(3, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(lr=1e-2, weight_decay=0.01, procedure="lisa", procedure_args={
        "lisa_activated_layers": 2, "lisa_interval_steps": 2, "train_adapter": False})
    ours, ref = _model(tokenizer), _model(tokenizer)
    procedure = get_procedure("lisa").build(config)
    optimizer, _ = make_optimizer(ours, "default", config, procedure=procedure)

    ref_blocks = [[p for n, p in block.named_parameters() if ".adapters." not in n] for block in ref.model.layers]
    body = {id(p) for block in ref_blocks for p in block}
    outside = [p for n, p in ref.named_parameters() if ".adapters." not in n and id(p) not in body]
    for p in ref.parameters():
        p.requires_grad_(False)
    for p in outside:
        p.requires_grad_(True)
    ref_opt, draws = None, []
    for step in range(6):
        if step % 2 == 0:  # LMFlow: switch layers, new AdamW, non-body state carried over
            draws.append(list(procedure.active))
            for block in ref_blocks:
                for p in block:
                    p.requires_grad_(False)
            active = [p for i in procedure.active for p in ref_blocks[i]]
            for p in active:
                p.requires_grad_(True)
            new = torch.optim.AdamW([{"params": outside}, {"params": active}], lr=1e-2, weight_decay=0.01)
            if ref_opt is not None:
                for p in outside:
                    new.state[p] = ref_opt.state[p]
            ref_opt = new
        for model, opt in ((ref, ref_opt), (ours, optimizer)):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        procedure.on_step(ours, "default", step + 1, 6)
        # Optimizer state only for the active blocks (and the always-trained parameters).
        with_state = {id(p) for p in optimizer.state}
        ours_blocks = [[p for n, p in b.named_parameters() if ".adapters." not in n] for b in ours.model.layers]
        if (step + 1) % 2:
            assert {i for i, b in enumerate(ours_blocks) if id(b[0]) in with_state} == set(procedure.active)
    assert all(len(d) == 2 for d in draws) and len({tuple(d) for d in draws}) > 1  # redrawn
    ref_params = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, ref_params[n], atol=1e-6, rtol=1e-5, msg=n)
    before = tiny_llama_for(tokenizer, num_hidden_layers=4)
    assert not torch.equal(ours.model.embed_tokens.weight, before.model.embed_tokens.weight)  # always trained
    assert not torch.equal(ours.lm_head.weight, before.lm_head.weight)


def test_lisa_draw_is_reproducible_from_the_seed(tokenizer):
    def draws(seed):
        config = TrainConfig(seed=seed, procedure="lisa", procedure_args={"lisa_activated_layers": 1,
                                                                          "lisa_interval_steps": 1})
        procedure = get_procedure("lisa").build(config)
        model = _model(tokenizer, layers=6)
        make_optimizer(model, "default", config, procedure=procedure)
        out = []
        for step in range(1, 9):
            out.append(procedure.active[0])
            procedure.on_step(model, "default", step, 8)
        return out

    assert draws(0) == draws(0) and draws(0) != draws(1)


def test_lisa_resume_is_bit_exact(tokenizer, reverse_train, tmp_path):
    def run(**kw):
        model = _model(tokenizer)
        config = TrainConfig(steps=6, batch_size=4, lr=1e-2, procedure="lisa", log_every=1,
                             procedure_args={"lisa_activated_layers": 1, "lisa_interval_steps": 2}, **kw)
        train(model, tokenizer, reverse_train, config, progress=False)
        return model

    straight = run(output_dir=str(tmp_path / "a"), save_every=3)  # mid-interval
    resumed = run(output_dir=str(tmp_path / "b"), resume_from=str(tmp_path / "a" / "checkpoint-3"))
    bad = [n for (n, p), q in zip(straight.named_parameters(), resumed.parameters()) if not torch.equal(p, q)]
    assert not bad


def test_lisa_config_errors(tokenizer):
    with pytest.raises(lk.ConfigError, match="lisa_interval_steps"):
        TrainConfig(procedure="lisa", procedure_args={"lisa_interval_steps": 0})
    with pytest.raises(lk.ConfigError, match="exceeds"):
        make_optimizer(_model(tokenizer), "default",
                       TrainConfig(procedure="lisa", procedure_args={"lisa_activated_layers": 9}))
