"""IncreLoRA: the official ΔW, importance score, allocator, orthogonality penalty; export with rank_pattern."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.increlora import (IncreLoraConfig, increlora_extra_loss, increlora_on_step, rank_pattern)

from lk_models import assert_exports_to_peft, tiny_llama, train_with_hooks

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(**kw):
    cfg = dict(r=2, target_rank=4, lora_alpha=16, init_warmup=0, incre_interval=1, top_h=2, incre_rank_num=1)
    cfg.update(kw)
    return lk.add_adapter(tiny_llama(), IncreLoraConfig(target_modules=TARGETS, **cfg))


def _deltas(model):
    return [layer.adapters["default"] for _, layer in adapter_layers(model)]


def _official_pieces(d):
    """The ParameterLists the official SVDLinear would hold: the initial r block, then rank-1 pieces up to the
    reserves (reset_parameters + add_reserve_param)."""
    n = int(d.ranknum) + d.reserve
    A = [d.lora_A[: d.r0]] + [d.lora_A[i:i + 1] for i in range(d.r0, n)]
    B = [d.lora_B[:, : d.r0]] + [d.lora_B[:, i:i + 1] for i in range(d.r0, n)]
    E = [d.lora_E[: int(d.ranknum)]] + [torch.full((1, 1), 1e-5)] * d.reserve
    return A, E, B


def test_increlora_delta_matches_official_loraW():
    d = _deltas(_model())[0]
    with torch.no_grad():
        d.lora_E.normal_()
    A, E, B = _official_pieces(d)
    # increlora.py loraW.forward: cat(B, 1) @ (cat(A, 0) * cat(E, 0)) * scaling / (ranknum + 1e-5), scaling = lora_alpha
    official = torch.cat(B, 1) @ (torch.cat(A, 0) * torch.cat(E, 0)) * 16 / (2 + 1e-5)
    torch.testing.assert_close(d.delta_weight(), official.detach(), atol=1e-6, rtol=1e-5)


def test_increlora_score_is_official_sensitivity():
    model = _model()
    path, layer = next(iter(adapter_layers(model)))
    d = layer.adapters["default"]
    with torch.no_grad():
        d.lora_E.normal_()
    d.train()
    x = torch.randn(4, d.info.in_features)
    out = d(x, torch.zeros(4, d.info.out_features), layer.base_layer)
    out.pow(2).sum().backward()
    dw = d.delta_weight().detach()
    grad = 2 * out.detach().T @ x  # ∂Σ(x ΔWᵀ)² / ∂ΔW
    # SVDLinear.backward_hook: sum(|W * grad_Matrix|) / sqrt(W.numel())
    expected = float((dw * grad).abs().sum()) / math.sqrt(dw.numel())
    assert abs(float(d.score) - expected) < 1e-6 * max(1.0, expected)


def test_increlora_fused_layer_path_keeps_the_output_and_the_official_score(monkeypatch):
    """Through the wrapped layer while scoring, ΔW is added to the base weight (one matmul): the output is still
    base(x) + x ΔWᵀ and the score still SVDLinear.backward_hook's Σ|ΔW ⊙ ∂L/∂ΔW| / √numel."""
    from lorakit.methods.increlora import IncreLoraLinear

    taken = []
    fused = IncreLoraLinear.fused_forward
    monkeypatch.setattr(IncreLoraLinear, "fused_forward",
                        lambda self, x, base: taken.append(1) or fused(self, x, base))
    model = _model()
    _, layer = next(iter(adapter_layers(model)))
    d = layer.adapters["default"]
    with torch.no_grad():
        d.lora_E.normal_()
    layer.train()
    x = torch.randn(4, d.info.in_features)
    out = layer(x)
    assert taken
    dw = d.delta_weight().detach()
    torch.testing.assert_close(out, layer.base_layer(x) + x @ dw.T, atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    grad = 2 * out.detach().T @ x
    expected = float((dw * grad).abs().sum()) / math.sqrt(dw.numel())
    assert abs(float(d.score) - expected) < 1e-5 * max(1.0, expected)


def test_increlora_orth_penalty_matches_compute_orth_regu():
    model = _model()
    increlora_on_step_grow(model, {0: 1.0})  # one module now has a rank-1 active piece beyond the initial block
    total, count = 0.0, 0
    for d in _deltas(model):
        A, _, B = _official_pieces(d)
        # compute_orth_regu: p @ p.T for lora_A pieces, p.T @ p for lora_B pieces, Frobenius to I, mean over pieces
        for p in A:
            total += torch.linalg.norm(p @ p.T - torch.eye(p.shape[0]))
            count += 1
        for p in B:
            total += torch.linalg.norm(p.T @ p - torch.eye(p.shape[1]))
            count += 1
    torch.testing.assert_close(increlora_extra_loss(model, "default"), 0.1 * total / count)


def increlora_on_step_grow(model, scores: dict[int, float], step: int = 1):
    """Give module i the smoothed score ``scores[i]`` (others 0) and run one allocator step."""
    for i, d in enumerate(_deltas(model)):
        d.exp_avg_ipt.fill_(scores.get(i, 0.0))
        d.exp_avg_unc.fill_(1.0 if i in scores else 0.0)
        d.score.fill_(scores.get(i, 0.0))
    increlora_on_step(model, "default", step, 100)


def test_increlora_allocator_grows_top_modules_to_the_budget_then_stops():
    model = _model()
    deltas = _deltas(model)
    n = len(deltas)
    assert sum(rank_pattern(model, "default").values()) == 2 * n
    d0 = deltas[0]
    with torch.no_grad():
        d0.lora_A[2].copy_(torch.full_like(d0.lora_A[2], 0.5))  # the reserve pre-trains with e pinned at 1e-5
    assert float(d0.effective_e().detach()[2]) == torch.tensor(1e-5).item()
    increlora_on_step_grow(model, {0: 5.0, 3: 4.0, 1: 1.0})  # top_h = 2: modules 0 and 3 grow by one
    ranks = list(rank_pattern(model, "default").values())
    assert ranks[0] == 3 and ranks[3] == 3 and sum(ranks) == 2 * n + 2
    assert float(d0.lora_E.detach()[2]) == torch.tensor(1e-5).item() and torch.all(d0.lora_A[2] == 0.5)  # activated from its reserve state
    for step in range(2, 100):
        increlora_on_step_grow(model, {i: float(i + 1) for i in range(n)}, step)
        if bool(d0.finished):
            break
    assert sum(rank_pattern(model, "default").values()) == 4 * n  # budget = target_rank × modules, never over
    assert all(bool(d.finished) for d in deltas)
    assert all(float(d.effective_e().detach()[int(d.ranknum)]) == 0 for d in deltas if int(d.ranknum) < d.capacity)


def test_increlora_exports_rank_pattern_to_peft(ids, tmp_path):
    model = _model()
    increlora_on_step_grow(model, {0: 5.0, 1: 4.0})
    for step in range(2, 40):
        increlora_on_step_grow(model, {0: 5.0, 1: 4.0}, step)
    with torch.no_grad():
        for d in _deltas(model):
            d.lora_E.normal_()
    ranks = rank_pattern(model, "default")
    assert len(set(ranks.values())) > 1 and sum(ranks.values()) == 4 * len(ranks)
    cfg = assert_exports_to_peft(model, "default", tiny_llama, ids, tmp_path)
    exported = {p: cfg["rank_pattern"].get(p.replace(".", "\\."), cfg["r"]) for p in cfg["target_modules"]}
    assert exported == ranks


def test_increlora_trains_and_grows_in_the_loop(ids):
    model = _model(init_warmup=1, incre_interval=2)
    train_with_hooks(model, ids, 4)
    assert sum(rank_pattern(model, "default").values()) > 2 * len(_deltas(model))


def test_increlora_score_ema_matches_official_update_ipt():
    """The per-step smoothing over all modules equals RankAllocator.update_ipt (loralib/loralib/increlora.py:260-277,
    FeiyuZhang98/IncreLoRA) applied module by module, and the growth picks calculate_score's top modules (:285, :305)."""
    beta1, beta2 = 0.85, 0.7
    model = _model(init_warmup=4, incre_interval=5, top_h=2, beta1=beta1, beta2=beta2)
    deltas = _deltas(model)
    ipt, unc = [0] * len(deltas), [0] * len(deltas)  # :263-266, both start at 0
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        # layer.score as SVDLinear.backward_hook leaves it (:82): a float32 0-d tensor, so the official EMAs are too
        scores = list(torch.rand(len(deltas), generator=gen))
        for d, s in zip(deltas, scores):
            d.score.copy_(s)
        for i, s in enumerate(scores):
            ipt[i] = beta1 * ipt[i] + (1 - beta1) * s  # :273-274
            unc[i] = beta2 * unc[i] + (1 - beta2) * (s - ipt[i]).abs()  # :276-277, around the updated ipt
        increlora_on_step(model, "default", step, 100)
        for i, d in enumerate(deltas):  # float32 rounding apart (one fused multiply-add here, two roundings there)
            torch.testing.assert_close(d.exp_avg_ipt, ipt[i], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(d.exp_avg_unc, unc[i], rtol=1e-6, atol=1e-9)
    # step 5 > init_warmup and 5 % incre_interval == 0: the two largest ipt · unc grew by incre_rank_num = 1
    importance = [float(a * b) for a, b in zip(ipt, unc)]
    top = sorted(range(len(deltas)), key=lambda i: -importance[i])[:2]
    assert [int(d.ranknum) for d in deltas] == [3 if i in top else 2 for i in range(len(deltas))]


def test_increlora_loaded_state_drives_the_forward():
    """Ranks grown in one model and loaded into a fresh one (whose forward already ran at the initial ranks) set
    its ΔW, scaling and reserves: the cached masks follow the loaded buffers (resume stays exact)."""
    grown = _model()
    increlora_on_step_grow(grown, {0: 5.0, 2: 4.0})
    with torch.no_grad():
        for d in _deltas(grown):
            d.lora_E.normal_()
    fresh = _model()
    x = torch.randn(2, 5, 32)
    fresh.eval()
    fresh.model.layers[0].self_attn.q_proj(x)  # builds the cache at the initial ranks
    fresh.load_state_dict(grown.state_dict())
    assert rank_pattern(fresh, "default") == rank_pattern(grown, "default")
    for a, b in zip(_deltas(fresh), _deltas(grown)):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())
        torch.testing.assert_close(a.effective_e(), b.effective_e())
        assert a.scaling == b.scaling


def test_increlora_no_orth_penalty_at_zero_weight():
    """reg_orth = 0 computes nothing (the official trainer adds the penalty only when reg_orth_coef > 0,
    NLU/src/transformers/trainer.py:1527): the term is an exact 0 outside the graph."""
    loss = increlora_extra_loss(_model(reg_orth=0.0), "default")
    assert float(loss) == 0.0 and not loss.requires_grad


@pytest.mark.parametrize("warmup,interval,steps,first", [(1000, 1000, 200, 2000), (2, 2, 3, 4), (0, 5, 4, 5)])
def test_increlora_a_run_that_ends_before_the_first_growth_is_refused(warmup, interval, steps, first, capsys,
                                                                      monkeypatch, tmp_path):
    """Was: `lorakit train --method increlora` (init_warmup = incre_interval = 1000, --steps 200) trained a fixed
    rank-1 LoRA and called it IncreLoRA. Growth comes at the first step > init_warmup that is a multiple of
    incre_interval (official RankAllocator.update_and_increase); a run shorter than that is refused before the model
    loads, and the Python loop warns."""
    import lorakit.hub
    from lorakit.cli import main

    config = IncreLoraConfig(init_warmup=warmup, incre_interval=interval)
    with pytest.raises(lk.ConfigError, match=f"first rank growth would come at step {first}, after the run's {steps} "):
        config.check_steps(steps)
    config.check_steps(first)  # the growth step itself is in the run
    IncreLoraConfig(r=4, target_rank=4, init_warmup=warmup, incre_interval=interval).check_steps(steps)  # no growth

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model loaded"))
    status = main(["train", "--method", "increlora", "--init-warmup", str(warmup), "--incre-interval", str(interval),
                   "--steps", str(steps), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and f"--init-warmup {warmup} with --incre-interval {interval}" in err, err
    assert not (tmp_path / "run").exists()


def test_increlora_the_python_loop_warns_about_a_run_shorter_than_the_first_growth():
    from lorakit.data import load_examples
    from lorakit.training import TrainConfig, train

    from lk_models import tiny_llama_for, word_level_tokenizer

    examples = load_examples("reverse", "train", n=4, seed=0)
    tokenizer = word_level_tokenizer(examples)
    model = tiny_llama_for(tokenizer)
    lk.add_adapter(model, IncreLoraConfig(target_modules=TARGETS, r=2, target_rank=4, init_warmup=4, incre_interval=2))
    with pytest.warns(UserWarning, match="first rank growth would come at step 6, after the run's 2 steps"):
        train(model, tokenizer, examples, TrainConfig(steps=2, batch_size=2, device="cpu"), progress=False)
