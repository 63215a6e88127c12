"""Aggregation maths against the papers' equations: FLoRA exact, FedIT not, LoRA-FAIR's correction, FFA's bytes."""

from __future__ import annotations

import pytest
import torch

from lorakit.federated import FederatedConfig, get_strategy, pack
from lorakit.federated.fedit import fedit_error, weighted_mean
from lorakit.federated.flora import stack
from lorakit.federated.lora_fair import fair_correction

OUT, IN = 12, 10


def client_updates(ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"m.lora_A": torch.randn(r, IN, generator=g), "m.lora_B": torch.randn(OUT, r, generator=g)} for r in ranks]


def test_flora_stacking_is_exact_mean_of_client_deltas():
    """FLoRA (arXiv:2409.05976) stacking equation, official ATP-1010/FederatedLLM fed_utils/model_aggregation.py
    (unchanged since c40814c; lines as at 7bea158), stacking=True, heter=True: p_k = normalize(n_k, p=1) (lines 10-13);
    the first client's A times p_k (64-67), every later A_k times p_k concatenated on dim 0 (74-78), B_k concatenated
    unscaled on dim 1 (84-87); main.py keeps the clients' s = α/r = 2 on the stacked adapter (lora_alpha=2·r_k, lines
    258/272). So B_stack A_stack = Σ_k p_k s_k B_k A_k; lorakit folds s_k into B (same product), heterogeneous
    ranks."""
    ranks, scalings = [8, 4, 2], [2.0, 2.0, 0.5]
    updates = client_updates(ranks)
    weights = [0.5, 0.3, 0.2]
    reference = sum(p * s * u["m.lora_B"] @ u["m.lora_A"] for u, p, s in zip(updates, weights, scalings))
    strategy = get_strategy(FederatedConfig(strategy="flora", client_ranks=ranks))
    empty = {"m.stack_A": torch.zeros(0, IN), "m.stack_B": torch.zeros(OUT, 0)}
    state = strategy.aggregate(empty, updates, weights, scalings)
    assert state["m.stack_A"].shape == (sum(ranks), IN) and state["m.stack_B"].shape == (OUT, sum(ranks))
    torch.testing.assert_close(strategy.global_delta(state, 1.0)["m"], reference, rtol=1e-5, atol=1e-5)
    # a second round stacks onto the first: the global ΔW is the sum of the rounds' means
    later = client_updates(ranks, seed=1)
    state = strategy.aggregate(state, later, weights, scalings)
    second = sum(p * s * u["m.lora_B"] @ u["m.lora_A"] for u, p, s in zip(later, weights, scalings))
    torch.testing.assert_close(strategy.global_delta(state, 1.0)["m"], reference + second, rtol=1e-5, atol=1e-5)
    assert stack(updates, weights, scalings)["m.stack_A"].shape[0] == sum(ranks)


def test_fedit_has_nonzero_error_on_the_same_updates():
    """FedIT averages A and B separately: s·B̄Ā ≠ Σ p_k s B_k A_k (the error FLoRA §3 and LoRA-FAIR Challenge 1 name)."""
    updates, weights, s = client_updates([4, 4, 4]), [0.5, 0.3, 0.2], 2.0
    ideal = sum(p * s * u["m.lora_B"] @ u["m.lora_A"] for u, p in zip(updates, weights))
    mean = weighted_mean(updates, weights)
    error = fedit_error(updates, weights, s)["m"]
    torch.testing.assert_close(error, s * mean["m.lora_B"] @ mean["m.lora_A"] - ideal)
    assert error.norm() / ideal.norm() > 0.1
    # identical clients: no error (the average of equal factors is exact)
    assert fedit_error([updates[0]] * 3, weights, s)["m"].abs().max() < 1e-5


def paper_objective(delta_B, B_bar, A_bar, ideal, lam):
    """LoRA-FAIR (arXiv:2411.14961) Eq. 8 with S = 1 − cosine similarity (official server code: cosine over columns,
    dim=0, averaged) and the squared Frobenius norm of ΔB, written here independently of the library."""
    recon = (B_bar + delta_B) @ A_bar
    cos = (ideal * recon).sum(0) / (ideal.norm(dim=0) * recon.norm(dim=0)).clamp(min=1e-8)
    return 1 - cos.mean() + lam * (delta_B ** 2).sum()


def test_lora_fair_correction_minimises_the_paper_objective():
    updates, weights = client_updates([4, 4, 4], seed=3), [0.4, 0.4, 0.2]
    mean = weighted_mean(updates, weights)
    A_bar, B_bar = mean["m.lora_A"], mean["m.lora_B"]
    ideal = sum(p * u["m.lora_B"] @ u["m.lora_A"] for u, p in zip(updates, weights))
    lam = 0.01
    delta = fair_correction({"m": A_bar}, {"m": B_bar}, {"m": ideal}, lam=lam, lr=0.5, steps=3000)["m"]
    zero = paper_objective(torch.zeros_like(B_bar), B_bar, A_bar, ideal, lam)
    ours = paper_objective(delta, B_bar, A_bar, ideal, lam)
    assert ours < zero - 0.05  # the correction removes much of FedIT's misalignment
    # an independent solver (L-BFGS) on the same objective reaches the same value
    x = torch.zeros_like(B_bar, requires_grad=True)
    lbfgs = torch.optim.LBFGS([x], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = paper_objective(x, B_bar, A_bar, ideal, lam)
        loss.backward()
        return loss

    lbfgs.step(closure)
    best = paper_objective(x.detach(), B_bar, A_bar, ideal, lam)
    assert abs(float(ours) - float(best)) < 1e-3 * max(1.0, float(zero))
    # the regulariser dominates: no correction (FedIT's B̄)
    big = fair_correction({"m": A_bar}, {"m": B_bar}, {"m": ideal}, lam=1e3, lr=1e-4, steps=200)["m"]
    assert big.abs().max() < 1e-3


def test_lora_fair_strategy_sends_corrected_B():
    updates, weights = client_updates([4, 4], seed=5), [0.5, 0.5]
    strategy = get_strategy(FederatedConfig(strategy="lora_fair", fair_steps=50, fair_lr=0.1))
    state = strategy.aggregate({}, updates, weights, [2.0, 2.0])
    mean = weighted_mean(updates, weights)
    torch.testing.assert_close(state["m.lora_A"], mean["m.lora_A"])
    torch.testing.assert_close(state["m.lora_B"], mean["m.lora_B"] + strategy.last_correction["m"])
    assert strategy.last_correction["m"].abs().max() > 0


def test_ffa_uplink_is_half_of_fedit_on_square_layers():
    """FFA-LoRA (arXiv:2403.12313): only B (out×r) travels; on square layers that is half of A and B."""
    r, d = 8, 64
    g = torch.Generator().manual_seed(0)
    full = {f"l{i}.lora_A": torch.randn(r, d, generator=g) for i in range(4)}
    full.update({f"l{i}.lora_B": torch.randn(d, r, generator=g) for i in range(4)})
    only_b = {k: v for k, v in full.items() if k.endswith("lora_B")}
    ratio = len(pack(only_b)) / len(pack(full))
    assert 0.49 < ratio < 0.52
    ffa = get_strategy(FederatedConfig(strategy="ffa"))
    assert set(ffa.expected_update({}, r, {"l0": (d, d)})) == {"l0.lora_B"}


def test_heterogeneous_ranks_need_a_strategy_that_handles_them():
    from lorakit import ConfigError

    for strategy in ("lora_fair", "ffa"):
        with pytest.raises(ConfigError, match="'fedit' or 'flora'"):
            FederatedConfig(strategy=strategy, client_ranks=[8, 4])
    # FedIT averages factors: heterogeneous ranks only with one scaling α/r (α = 2r when lora_alpha is unset)
    with pytest.raises(ConfigError, match="lora_alpha"):
        FederatedConfig(strategy="fedit", client_ranks=[8, 4], lora_alpha=16)
    FederatedConfig(strategy="fedit", client_ranks=[8, 4])
    FederatedConfig(strategy="fedit", client_ranks=[4, 4], lora_alpha=16)
    with pytest.raises(ConfigError, match="lora_fair"):
        FederatedConfig(strategy="lora_fiar")


def test_fedit_zero_padding_matches_flora_official_aggregation():
    """FLoRA's official fed_utils/model_aggregation.py (ATP-1010/FederatedLLM at 7bea158, lines 94-116),
    FedAvg(zero_padding=True): each client's A_k (r_k, in) gets ``ZeroPad2d((0, 0, 0, max_lora - r_k))`` (zero rows at
    the bottom, lines 99-101 / 108-111) and B_k (out, r_k) gets ``ZeroPad2d((0, max_lora - r_k, 0, 0))`` (zero
    columns on the right, lines 102-104 / 112-116), both times ``weights_array[k]``, summed. Written out here with
    explicit zero blocks."""
    ranks, weights = [2, 4, 3], [0.5, 0.3, 0.2]
    updates = client_updates(ranks, seed=3)
    r_max = max(ranks)
    ref_A, ref_B = torch.zeros(r_max, IN), torch.zeros(OUT, r_max)
    for u, p, r in zip(updates, weights, ranks):
        ref_A[:r] += p * u["m.lora_A"]
        ref_B[:, :r] += p * u["m.lora_B"]
    strategy = get_strategy(FederatedConfig(strategy="fedit", client_ranks=ranks))
    state = {"m.lora_A": torch.zeros(r_max, IN), "m.lora_B": torch.zeros(OUT, r_max)}
    new = strategy.aggregate(state, updates, weights, [2.0] * 3)
    torch.testing.assert_close(new["m.lora_A"], ref_A)
    torch.testing.assert_close(new["m.lora_B"], ref_B)
    # rows only the rank-4 client trains are its update times its weight alone (no renormalisation)
    torch.testing.assert_close(new["m.lora_A"][3], 0.3 * updates[1]["m.lora_A"][3])
    # equal ranks: plain FedAvg of the factors, unchanged
    same = client_updates([4, 4], seed=4)
    torch.testing.assert_close(strategy.aggregate(state, same, [0.25, 0.75], [2.0, 2.0])["m.lora_A"],
                               0.25 * same[0]["m.lora_A"] + 0.75 * same[1]["m.lora_A"])


def test_fedit_weights_real_client_updates_by_their_example_counts(tiny_config):
    """FedIT's official aggregation (JayZhang42/FederatedGPT-Shepherd fed_utils/model_aggregation.py at 90d8aa6):
    weights ``normalize(local_dataset_len, p=1)`` (lines 10-13), then every LoRA tensor, A and B alike, is the
    weighted sum of the clients' (lines 19-25). (FLoRA's copy of this FedAvg, model_aggregation.py line 122 at
    7bea158, assigns the sum to a misspelled name, ``weighted_sindgle_weights``, so only the first client would
    count; lorakit follows Shepherd's.) Two clients of a Dirichlet split hold different numbers of examples."""
    from lorakit.federated.client import client_round
    from lorakit.federated.server import ServerCore
    from lorakit.federated.base import unpack

    config = tiny_config("fedit", partition="skew", skew_alpha=0.3, evaluate=False)
    core = ServerCore(config)
    down = unpack(core.downlink_bytes())
    updates, counts, replies = [], [], []
    for client in (0, 1):
        update, metrics = client_round(config, client, 1, down)
        updates.append(update)
        counts.append(metrics["num-examples"])
        replies.append((client, pack(update), metrics))
    assert counts[0] != counts[1]
    core.receive(1, replies, sent=2)
    for key in updates[0]:
        expected = (counts[0] * updates[0][key] + counts[1] * updates[1][key]) / (counts[0] + counts[1])
        torch.testing.assert_close(core.state[key], expected, rtol=1e-6, atol=1e-7)
