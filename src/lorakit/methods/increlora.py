"""IncreLoRA — "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
Zhang et al., arXiv:2308.12043.

An SVD-shaped LoRA whose rank grows during training, module by module, under a total budget:

    Δ(x) = α / k · B diag(e) A dropout(x),   A ∈ R^{C×in}, e ∈ R^{C}, B ∈ R^{out×C}, only the first k units active

Each step (until the budget is spent) every module gets an importance score ``s = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW)``,
smoothed as AdaLoRA does: ``Ī ← β1 Ī + (1−β1) s``, ``Ū ← β2 Ū + (1−β2)|s − Ī|``, importance ``Ī·Ū``. After
``init_warmup`` steps, every ``incre_interval`` steps the ``top_h`` most important modules get
``incre_rank_num`` more ranks, until the total equals ``target_rank × #modules``. "Advance learning": each module
always holds ``incre_rank_num`` reserve units whose a, b already train while their e is pinned at 1e-5; a
module that grows activates its reserves (e now trains, from 1e-5) and the next units become reserves. When
the budget is reached the reserves are switched off (e = 0). Loss: task + ``reg_orth`` × the orthogonality
penalty. Saved per-module ranks make the export a plain PEFT LoRA with ``rank_pattern``.

Follows the official code, ``FeiyuZhang98/IncreLoRA`` ``loralib/loralib/increlora.py``: ``loraW.forward``
(``B @ (A * E) * scaling / (ranknum + 1e-5)``, scaling = lora_alpha), ``SVDLinear.backward_hook`` (the score
from the gradient of the materialised ΔW), ``reset_parameters`` (A, B ~ N(0, 0.02), E = 0),
``add_reserve_param`` (reserve a, b ~ N(0, 0.02), e = 1e-5 frozen), ``RankAllocator.update_ipt`` /
``calculate_score`` / ``increase_to_target_rank`` / ``update_and_increase`` and ``compute_orth_regu``
(one Frobenius penalty ``‖P Pᵀ − I‖`` per stored piece — the initial r-rank block and every later rank-1
piece separately — averaged over pieces). Defaults from ``NLU/scripts/rank=8/run_mnli.sh``.

Where lorakit differs, and why:
- Fixed capacity instead of growing ``ParameterList``s (the loop's optimizer is built once): every module
  holds ``C = max_rank`` units from the start (default: enough for any allocation the budget allows); units
  past the active ones and the reserves are masked out (e = 0 in the forward), so they get exactly zero
  gradient and AdamW leaves them alone except for weight decay (0 in the official scripts). A module at
  capacity is not selected.
- The official allocator adds ranks to every module whose score reaches the k-th largest and can overshoot the
  budget, after which it never switches reserves off; here growth stops once the total reaches the budget.
- While growing, ΔW is materialised in the forward (as the official code always does) to read ∂L/∂ΔW; once
  the budget is spent the forward is the factored two-GEMM one. The score must see ∂L/∂ΔW itself, not the
  factors' gradients: ``backward_hook`` (increlora.py:72-82) is a full backward hook on ``loraW``, whose output
  is ΔW, and sums ``|ΔW| · |grad_output[0]|`` elementwise; with the abs inside the sum it does not factor
  through A and B, so the out×in gradient ``Gᵀ X`` is the one unavoidable extra matmul of a scoring step.
  It is taken on ``P = B diag(e) A`` (``Σ|P ⊙ ∂L/∂P| = Σ|ΔW ⊙ ∂L/∂ΔW|`` since ΔW = s·P), and P is added
  to the base weight (``W + s·P``, one input-gradient matmul instead of two).
- Scoring steps cost nothing per module in Python beyond the forward: the EMAs of all modules update with
  ``torch._foreach_*`` ops, the orthogonality penalty is one masked batched Gram matrix per factor width, and
  ranks/masks are Python copies of the buffers refreshed only when a buffer changes.
All allocator state (active ranks, the EMAs, whether growth is over) lives in per-module buffers saved with
the adapter, so a checkpoint resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import (AdapterConfig, check_non_negative, check_positive_ints,
                           check_range, field_error)
from ..core.delta import Delta, LayerInfo, RankUnits
from ..core.model import adapter_layers, adapter_state
from ..core.parallel import sum_across
from ..core.registry import register_method
from ._plain import export_plain_lora

RESERVE_E = 1e-5  # add_reserve_param: e of a reserve unit under advance learning


@dataclass
class IncreLoraConfig(AdapterConfig):
    """IncreLoRA fields.

    - ``r``: initial rank per module (official ``lora_r``). ``target_rank``: average final rank (budget = target_rank × #modules).
    - ``lora_alpha``: scaling numerator (alpha / active rank). ``lora_dropout``: input dropout, in [0, 1).
    - ``init_warmup`` / ``incre_interval``: steps before the first growth / between growths.
    - ``top_h``: modules grown per round. ``incre_rank_num``: ranks added per grown module (= reserve units).
    - ``advance_learn``: pre-train reserve units (e pinned at 1e-5). ``beta1`` / ``beta2``: EMAs of the score.
    - ``reg_orth``: weight of the orthogonality penalty. ``max_rank``: units stored per module (0 = automatic).
    """

    r: int = 1
    target_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    init_warmup: int = 1000
    incre_interval: int = 1000
    top_h: int = 18
    incre_rank_num: int = 1
    advance_learn: bool = True
    beta1: float = 0.85
    beta2: float = 0.85
    reg_orth: float = 0.1
    max_rank: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r", "incre_interval", "top_h", "incre_rank_num")
        check_non_negative(self, "init_warmup")
        check_non_negative(self, "reg_orth", finite=True)
        if self.target_rank < self.r:
            raise field_error(self, "target_rank", f"={self.target_rank} must be >= r={self.r} (the rank it grows to "
                                                   "from r).")
        for name in ("beta1", "beta2"):
            check_range(self, name, 0, 1, low_open=True, high_open=True)
        if self.max_rank and self.max_rank < self.r + self.incre_rank_num:
            raise field_error(self, "max_rank", f"={self.max_rank} must hold r + incre_rank_num = "
                                                f"{self.r + self.incre_rank_num} units (or 0 for automatic).")

    def check_steps(self, steps: int) -> None:
        # growth comes at the first step that is past init_warmup and a multiple of incre_interval (update_and_increase)
        first = (self.init_warmup // self.incre_interval + 1) * self.incre_interval
        if self.target_rank > self.r and first > steps:
            raise field_error(self, "init_warmup", f"={self.init_warmup} with incre_interval={self.incre_interval}: "
                                                   f"the first rank growth would come at step {first}, after the run's "
                                                   f"{steps} steps, so every module would keep rank r={self.r} (never "
                                                   f"target_rank={self.target_rank}); lower init_warmup and "
                                                   "incre_interval, or train more steps.")

    def capacity(self) -> int:
        """Units stored per module: ``max_rank`` if set, else r + twice the average growth (target_rank − r) +
        the reserves, i.e. a module may end at up to about twice the average final rank."""
        if self.max_rank:
            return self.max_rank
        return self.r + 2 * (self.target_rank - self.r) + self.incre_rank_num


class IncreLoraLinear(Delta):
    """``α/k · B diag(e_eff) A`` with k active units, ``incre_rank_num`` reserve units and a growth score."""

    def __init__(self, info: LayerInfo, config: IncreLoraConfig):
        super().__init__(info)
        C = config.capacity()
        self.capacity, self.reserve, self.r0 = C, config.incre_rank_num, config.r
        self.lora_alpha, self.advance_learn = config.lora_alpha, config.advance_learn
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(C, info.in_features))  # (C, in)
        self.lora_E = nn.Parameter(torch.zeros(C, 1))  # (C, 1)
        self.lora_B = nn.Parameter(torch.empty(info.out_features, C))  # (out, C)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.register_buffer("ranknum", torch.tensor(config.r, dtype=torch.long))  # k
        self.register_buffer("finished", torch.tensor(False))
        self.register_buffer("exp_avg_ipt", torch.zeros((), dtype=torch.float64))
        self.register_buffer("exp_avg_unc", torch.zeros((), dtype=torch.float64))
        self.register_buffer("score", torch.zeros((), dtype=torch.float64), persistent=False)
        self._mirror_key: tuple | None = None

    def _state(self) -> tuple[int, bool, torch.Tensor, torch.Tensor]:
        """(k, finished, keep (C, 1) bool, pinned (C, 1)): Python copies of the ``ranknum`` / ``finished`` buffers and
        the masks of ``effective_e``, rebuilt only when a buffer changed. In-place updates, ``load_state_dict`` and
        ``.to()`` all bump a buffer's ``_version`` or replace it, so the forward reads no tensor value (no host
        sync on an accelerator) and builds no masks on the steps in between."""
        r, f, e = self.ranknum, self.finished, self.lora_E
        key = (r, r._version, f, f._version, e.device, e.dtype)
        cached = self._mirror_key
        if cached is None or any(a is not b if isinstance(a, torch.Tensor) else a != b for a, b in zip(cached[0], key)):
            k, finished = int(r), bool(f)
            idx = torch.arange(self.capacity, device=e.device)[:, None]  # (C, 1)
            pinned_value = RESERVE_E if self.advance_learn and not finished else 0.0
            pinned = torch.where(idx < k + self.reserve, pinned_value, 0.0).to(e.dtype)
            cached = self._mirror_key = (key, (k, finished, idx < k, pinned))
        return cached[1]

    def _live_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``diag(e) A`` (n, in) and ``B`` (out, n) over the n = k (+ reserves while growing) units that can be
        non-zero: the units past them have e = 0, so leaving them out changes no value and spares their share of
        every matmul (their gradient is the same exact zero)."""
        k, finished, keep, pinned = self._state()
        n = min(k + (self.reserve if self.advance_learn and not finished else 0), self.capacity)
        return self.lora_A[:n] * torch.where(keep[:n], self.lora_E[:n], pinned[:n]), self.lora_B[:, :n]

    def reserve_on(self) -> bool:
        return self.advance_learn and not self._state()[1]

    def effective_e(self) -> torch.Tensor:
        """(C, 1): trained e for the k active units, 1e-5 (constant) for reserves, 0 beyond."""
        _, _, keep, pinned = self._state()
        return torch.where(keep, self.lora_E, pinned)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self._state()[0] + 1e-5)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        A, B = self._live_factors()  # (n, in), (out, n)
        if self._scoring():
            P = self._scored_product(A, B)  # (out, in): ΔW / scaling; its gradient is the importance signal
            return F.linear(x, P * self.scaling).to(base_out.dtype)
        return (F.linear(F.linear(x, A), B) * self.scaling).to(base_out.dtype)

    def _scoring(self) -> bool:
        return self.training and torch.is_grad_enabled() and not self._state()[1]

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """While scoring, ``x (W + ΔW)ᵀ + b`` in one matmul with the score hook on ΔW's product: the official code
        materialises ΔW anyway for its gradient (the importance signal), and adding it to W spares the second
        full-size matmul of the input gradient. Declines (the separate path runs) with dropout, a non-``nn.Linear``
        base or mismatched dtypes, and once growth is over (then the factored path is cheaper)."""
        if (not self._scoring() or type(base_layer) is not nn.Linear or not isinstance(self.lora_dropout, nn.Identity)
                or base_layer.weight.dtype != x.dtype or self.lora_A.dtype != x.dtype):
            return None
        P = self._scored_product(*self._live_factors())  # (out, in)
        return F.linear(x, torch.add(base_layer.weight, P, alpha=self.scaling), base_layer.bias)

    def _scored_product(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``P = B diag(e) A`` (out, in) with a hook that sets ``score`` from its gradient in the backward.

        SVDLinear.backward_hook scores ``Σ|ΔW ⊙ ∂L/∂ΔW| / √numel`` with ΔW = s·P. As ∂L/∂P = s·∂L/∂ΔW, that is
        ``Σ|P ⊙ ∂L/∂P| / √numel``: the same number without a separate scaled copy of ΔW in the graph."""
        P = B @ A
        p, root = P.detach(), math.sqrt(P.numel())

        def hook(grad: torch.Tensor) -> None:  # one fused |·| reduction; no host sync
            self.score.copy_(torch.linalg.vector_norm(p * grad, ord=1)).div_(root)

        P.register_hook(hook)
        return P

    def live_ranks(self) -> torch.Tensor:
        return torch.nonzero(self.effective_e().detach()[:, 0] != 0).flatten()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ (self.lora_A.float() * self.effective_e().float())) * self.scaling

    def units(self) -> RankUnits:
        return RankUnits(A=self.lora_A * self.effective_e(), B=self.lora_B, scaling=self.scaling)


def build_increlora(base_layer: nn.Module, info: LayerInfo, config: IncreLoraConfig, path: str = "") -> IncreLoraLinear:
    return IncreLoraLinear(info, config)


def _deltas(model: nn.Module, name: str) -> list[tuple[str, IncreLoraLinear]]:
    return [(path, layer.adapters[name]) for path, layer in adapter_layers(model)
            if name in layer.adapters and isinstance(layer.adapters[name], IncreLoraLinear)]


def increlora_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    """``reg_orth`` × compute_orth_regu: the mean over stored pieces of ``‖P Pᵀ − I‖_F`` (A pieces; ``PᵀP`` for B).

    The pieces of a module are its initial (r0, in) block of A and (out, r0) of B, then every later unit up to the
    reserves (n = k + incre_rank_num) as a rank-1 piece, whose penalty is ``|‖a_i‖² − 1|``. Computed for all modules
    at once: one Gram matrix per group of equal-width factors (stack + bmm), masked to each module's n. With
    ``reg_orth = 0`` nothing is computed (the official trainer skips it too, ``reg_orth_coef > 0``)."""
    deltas = [d for _, d in _deltas(model, name)]
    reg = adapter_state(model).configs[name].reg_orth
    if not deltas or reg == 0:
        return torch.zeros((), device=deltas[0].lora_A.device if deltas else None)
    C, r0 = deltas[0].capacity, deltas[0].r0
    n = torch.stack([d.ranknum for d in deltas]).add(deltas[0].reserve).clamp(max=C)  # (M,) pieces' units
    idx = torch.arange(C, device=n.device)
    eye = torch.eye(r0, device=n.device)
    total = n.new_zeros((), dtype=deltas[0].lora_A.dtype)
    for factors in ((d.lora_A for d in deltas), (d.lora_B.T for d in deltas)):  # rows = units: (C, in) / (C, out)
        groups: dict[int, list[int]] = {}
        factors = list(factors)
        for i, f in enumerate(factors):
            groups.setdefault(f.shape[1], []).append(i)
        for members in groups.values():  # one group per factor width
            rows = torch.stack([factors[i] for i in members])  # (M_g, C, width)
            gram = rows @ rows.transpose(1, 2)  # (M_g, C, C)
            block = torch.linalg.matrix_norm(gram[:, :r0, :r0] - eye.to(gram.dtype))  # (M_g,)
            live = (idx >= r0) & (idx < n[members, None])  # (M_g, C): the rank-1 pieces
            rank1 = torch.where(live, (gram.diagonal(dim1=1, dim2=2) - 1).abs(), 0.0).sum(1)  # (M_g,)
            total = total + (block + rank1).sum()
    pieces = 2 * (len(deltas) + (n - r0).sum())  # per module and factor: the initial block + each rank-1 piece
    return reg * total / pieces


def rank_pattern(model: nn.Module, name: str) -> dict[str, int]:
    """Active rank per module (what the export's rank_pattern holds once growth is over)."""
    return {path: int(d.ranknum) for path, d in _deltas(model, name)}


@torch.no_grad()
def increlora_on_step(model: nn.Module, name: str, step: int, total_steps: int) -> bool:
    """RankAllocator.update_and_increase, after optimizer step ``step``; nothing once the budget is spent. False:
    what trains stays the same (a grown unit's E turns non-zero, its parameters trained all along)."""
    config: IncreLoraConfig = adapter_state(model).configs[name]
    deltas = [d for _, d in _deltas(model, name)]
    if not deltas or deltas[0]._state()[1]:
        return False
    # update_ipt for every module at once: EMA of sensitivity, then of uncertainty around the updated EMA
    # A data-parallel run averages the processes' scores (each read its own ∂L/∂P, and Σ|P ⊙ ∂L/∂P| does not add
    # up over processes), so every process allocates the same ranks.
    score = list(sum_across(torch.stack([d.score for d in deltas]), average=True).unbind())
    ipt, unc = [d.exp_avg_ipt for d in deltas], [d.exp_avg_unc for d in deltas]
    torch._foreach_mul_(ipt, config.beta1)
    torch._foreach_add_(ipt, score, alpha=1 - config.beta1)
    spread = torch._foreach_sub(score, ipt)
    torch._foreach_abs_(spread)
    torch._foreach_mul_(unc, config.beta2)
    torch._foreach_add_(unc, spread, alpha=1 - config.beta2)
    budget = config.target_rank * len(deltas)
    ranks = [d._state()[0] for d in deltas]
    total = sum(ranks)
    if step > config.init_warmup and step % config.incre_interval == 0 and total < budget:
        eligible = [i for i, d in enumerate(deltas) if ranks[i] + 2 * d.reserve <= d.capacity]
        if eligible:
            scores = torch.stack(torch._foreach_mul([ipt[i] for i in eligible], [unc[i] for i in eligible]))
            k = min(config.top_h, budget - total, len(eligible))
            threshold = torch.topk(scores, k).values[-1]
            chosen = torch.nonzero(scores >= threshold).flatten().tolist()
            for i in (eligible[j] for j in chosen):  # growth rounds only, in module order until the budget
                if total >= budget:
                    break
                d, grow = deltas[i], min(config.incre_rank_num, budget - total)
                d.lora_E[ranks[i]:ranks[i] + grow] = RESERVE_E if config.advance_learn else 0.0
                d.ranknum.add_(grow)
                total += grow
    if total >= budget:  # budget spent: reserves off, scores no longer needed
        for d in deltas:
            d.finished.fill_(True)
    return False


def increlora_to_lora(model: nn.Module, name: str):
    """Active (and, before growth ends, reserve) units with e folded into A: ``A' = diag(e) A``,
    ``B' = B · k'/(k + 1e-5)`` so that PEFT's α/k' reproduces α/(k + 1e-5); k' = #units kept."""
    config = adapter_state(model).configs[name]

    def factors(d: IncreLoraLinear):
        live = d.live_ranks()
        if live.numel() == 0:
            return None
        A = (d.lora_A * d.effective_e())[live]
        return A, d.lora_B[:, live] * (d.scaling / (config.lora_alpha / live.numel()))

    return export_plain_lora(model, name, factors, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)


register_method(
    "increlora", config=IncreLoraConfig, build=build_increlora, on_step=increlora_on_step,
    extra_loss=increlora_extra_loss, to_lora=increlora_to_lora,
    description="Rank grows during training: importance-scored modules get ranks under a total budget "
                "(reserve units pre-trained); exports a PEFT LoRA with per-module rank_pattern.",
    paper="Zhang et al. 2023, arXiv:2308.12043",
    variants={"increlora": {"r": 2, "target_rank": 4, "init_warmup": 2, "incre_interval": 2, "top_h": 2},
              # a schedule that spends the budget within a ~60-step run (the official one waits 1000 steps)
              "increlora_short": {"r": 1, "target_rank": 4, "init_warmup": 8, "incre_interval": 4, "top_h": 18,
                                  "incre_rank_num": 2}},
)
