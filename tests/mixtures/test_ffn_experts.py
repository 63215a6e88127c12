"""mixtures.ffn_experts.ExpertRows: token→expert assignments as rows grouped by expert, packed (segment matmul) or
padded ((E, C) slots, bmm), both equal to a loop over tokens and their experts: Σ_e w_te · x_t W_e."""

from __future__ import annotations

import pytest
import torch

from lorakit.mixtures.ffn_experts import ExpertRows, packed_rows_supported
from lorakit.mixtures.router import RouterOutput


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_rows_equal_a_loop_over_tokens_and_their_experts(packed):
    if packed and not packed_rows_supported(torch.device("cpu"), torch.float32, (8, 4)):
        pytest.skip("this torch has no grouped_mm")
    g = torch.Generator().manual_seed(0)
    n, e, d, m = 9, 4, 8, 4
    selected = torch.rand(n, e, generator=g) < 0.5
    selected[0] = False  # a token with no expert
    selected[:, 3] = False  # an expert with no token
    weights = torch.rand(n, e, generator=g) * selected
    routed = RouterOutput(logits=torch.zeros(n, e), probs=torch.zeros(n, e), weights=weights, selected=selected)
    x, W = torch.randn(n, d, generator=g), torch.randn(e, d, m, generator=g)

    rows = ExpertRows(routed, packed)
    out = rows.combine(rows.matmul(rows.gather(x), W) * rows.weight.view(*rows.shape, 1))
    want = torch.zeros(n, m)
    for t in range(n):
        for k in selected[t].nonzero().flatten().tolist():
            want[t] += weights[t, k] * (x[t] @ W[k])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
