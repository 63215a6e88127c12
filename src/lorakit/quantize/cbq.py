"""CBQ — "CBQ: Cross-Block Quantization for Large Language Models", Ding et al., arXiv:2312.07950 (ICLR 2025).

Post-training weight quantization (W{b}A16) by reconstruction over a sliding window of transformer blocks:

- **Cross-block dependency (CBD), §3.2**: blocks are optimised K at a time (``window``), consecutive windows
  overlapping by ``overlap`` blocks; for the window of blocks i..k the step sizes and rounding of every linear
  layer in it minimise (eq. 4)

      min_{S^W, ΔW}  E( T_{i,k}(W, X_fp),  T_{i,k}(Q(W) + ΔW, X_q) )
      E(h1, h2) = ‖h1 − h2‖² + D_KL(σ(h1) ‖ σ(h2))                                            (eq. 5)

  with σ the softmax over the hidden dimension, ``X_fp`` the full-precision model's input to block i and
  ``X_q`` the input the already-quantized blocks give it (so the error accumulated so far is seen).
- **LoRA-Rounding, §3.3**: AdaRound's rounding ``Ŵ = s·(clamp(⌊W/s⌋ + h(V) + z, 0, 2^b−1) − z)`` with
  ``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)``, ζ = 1.1, γ = −0.1, but the d×k matrix V is low rank,
  ``V = A₁A₂`` (A₁ ∈ R^{d×r}, A₂ ∈ R^{r×k}): (d + k)·r learned values instead of d·k, and the rounding
  regulariser ``L_com = Σ_{i,j} 1 − |2h(V_{ij}) − 1|^β`` (β annealed 20 → 2 as in AdaRound, Nagel et al.,
  arXiv:2004.10568, eq. 24) is added with weight ``round_weight``. After optimisation ``h`` is made hard
  (``V ≥ 0`` rounds up) and ``Ŵ`` is written into the model.
- **Coarse-to-fine pre-processing (CFP), §3.4**, for weights: coarse stage, the candidate outliers are the
  magnitudes above ``Q3 + λ₁·IQR`` (quartiles of |W|, λ₁ = 1.5); fine stage, the sorted candidates are split in
  two where ``M = M_inter − λ₂·M_intra`` is largest; the upper part are the outliers and are truncated to the
  largest kept magnitude before the reconstruction. M_inter / M_intra are read as the between- and
  within-part variances weighted by the parts' sizes (Otsu's split); the unweighted distance of the means
  isolates the single largest value even when several outliers stand together.
  **Truncation is kept only where it lowers the layer's quantization error** (``cfp_truncate``): CFP is meant for
  LLMs whose outliers stand far outside the bulk, where truncating them pays; the rule above has no
  "no outlier" outcome once the coarse stage finds candidates, so on a model without outliers it cuts the top of an
  ordinary tail. On the bundled base (max |w| 4–10 std per layer) it cut 17,721 weights and *raised* the summed
  relative layer-output error of per-channel RTN at W4 from 0.089 to 0.139 (clipping error > the finer step),
  while lowering it at W2 from 2.33 to 2.10 (the range dominates); see benchmarks/quantize.md. The check compares
  ``Σ h_j (W − Q(clip(W)))²`` with ``Σ h_j (W − Q(W))²`` at the layer's bit width, h_j the mean square of input
  column j on the calibration rows (read off the full-precision window pass), so CFP truncates at W2 where it
  helps and leaves most W4 layers alone.

No official code was found (searched GitHub and the paper's pages; the paper links none), so this follows
the paper's equations. Choices the text leaves open, made here:
- V is ``V₀ + A₁A₂`` with ``V₀`` (frozen) AdaRound's initialisation ``h(V₀) = W/s − ⌊W/s⌋`` and A₁ = 0, so the
  learned rounding offset is the low-rank part and a window starts at round-to-nearest (``V₀ ≥ 0`` exactly
  where RTN rounds up). Step sizes are learned as ``s = s₀·exp(t)`` per output channel / group (``⌊W/s⌋``
  with a straight-through gradient, as LSQ), zero points stay at their min-max values.
- The optimised weight uses the hard rounding ``1[V ≥ 0]`` in the forward pass and the gradient of h(V) in the
  backward pass (straight-through), where AdaRound/CBQ use h(V) itself and harden at the end. With a low-rank
  V the entries cannot settle at 0/1 one by one, so the soft loss stops tracking the hard one: on the bundled
  model (blocks 0-1, W4, 40 steps) the soft relaxation lowered its own loss but left the hard error at
  0.111 → 0.109, while the straight-through form took it to 0.085. L_com is kept (it still pulls h to 0/1).
- ‖·‖² is the mean squared error over hidden units divided by the target's mean square (scale-free across
  blocks, whose residual streams grow with depth); D_KL is averaged over tokens.
- Only the weight half of CFP is implemented: activations stay 16-bit (A16), so the activation-outlier
  scaling (for W4A4 / W4A8) has nothing to act on and is not provided.
- The full-precision targets come from copies of the window's blocks taken before quantization (memory: one
  window of blocks).
- A window keeps its last step's rounding, made hard, even where its calibration error ends a little above the
  round-to-nearest start (``error_end`` > ``error_start`` in the summary): the paper (§3.2-3.3) optimises each
  window and then fixes the rounding, with no pick of the best step or fallback to RTN, as the AdaRound
  reconstruction it builds on does (BRECQ's official code, yhhhli/BRECQ quant/block_recon.py lines 77-102 at
  2cbdc7e: the iterations, then ``soft_targets = False`` on the final rounding). β's annealing and L_com aim the
  last step at the hard rounding; an earlier step is not a finished one, and a block shared with the next window
  is optimised further there.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..core.config import check_non_negative, check_positive, check_positive_ints, check_range, field_error
from .model import (block_inputs, block_linears, block_output, check_quantizable, check_token_rows, decoder_blocks,
                    oriented, slice_kwargs)
from .uniform import QuantSpec, minmax_params, rtn

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch (arXiv:2004.10568, eq. 23)


@dataclass
class CBQConfig:
    """CBQ's settings (paper defaults where it gives them: windows of 2 blocks overlapping by 1).

    - ``bits`` / ``group_size``: the weight format (W{bits}A16; group_size None = one scale per output channel).
    - ``window`` blocks optimised together; ``overlap`` blocks shared by consecutive windows (< window).
    - ``r``: rank of the LoRA-Rounding matrices A₁ (d×r), A₂ (r×k).
    - ``steps`` optimisation steps per window on mini-batches of ``batch_size`` calibration rows.
    - ``lr`` for A₁, A₂, ``scale_lr`` for the step-size exponents t; ``round_weight`` multiplies L_com;
      ``round_warmup`` the fraction of steps before L_com starts; β goes from ``beta_start`` to ``beta_end``.
    - ``kl_weight`` multiplies the KL term of E (0: MSE only).
    - ``cfp``: truncate weight outliers first; ``iqr_factor`` (λ₁) and ``split_weight`` (λ₂) of its two stages.
    """

    bits: int = 4
    group_size: int | None = None
    window: int = 2
    overlap: int = 1
    r: int = 8
    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    scale_lr: float = 1e-5
    round_weight: float = 0.01
    round_warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    kl_weight: float = 1.0
    cfp: bool = True
    iqr_factor: float = 1.5
    split_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_non_negative(self, "seed")  # numpy's and Python's seeding refuse a negative seed
        self.spec = QuantSpec(self.bits, self.group_size)  # validates bits / group_size
        check_positive_ints(self, "window", "r", "steps", "batch_size")
        if not 0 <= self.overlap < self.window:
            raise field_error(self, "overlap", f"={self.overlap}: need 0 <= overlap < window, got window={self.window}.")
        check_range(self, "round_warmup", 0, 1, high_open=True)
        check_positive(self, "lr")
        check_non_negative(self, "scale_lr", "round_weight", "kl_weight")


# -- coarse-to-fine pre-processing (weights) ---------------------------------------------------------------
def cfp_threshold(w: torch.Tensor, iqr_factor: float = 1.5, split_weight: float = 1.0) -> float | None:
    """The magnitude above which entries of ``w`` are outliers (None: no outlier), CBQ §3.4.

    Coarse: candidates ``|w| > Q3 + λ₁·(Q3 − Q1)``. Fine: candidates sorted ascending, c₁..c_m, split after j
    where ``j(m−j)/m²·(mean(c_{>j}) − mean(c_{≤j}))² − λ₂·(j·var(c_{≤j}) + (m−j)·var(c_{>j}))/m`` is largest;
    returns c_j (the largest kept magnitude). A single candidate is cut at the coarse threshold.
    """
    a = w.detach().abs().float().flatten()
    q1, q3 = torch.quantile(a[torch.randperm(a.numel())[:1 << 22]] if a.numel() > 1 << 22 else a,
                            torch.tensor([0.25, 0.75]))
    coarse = float(q3 + iqr_factor * (q3 - q1))
    c = a[a > coarse].sort().values.double()
    m = c.numel()
    if m == 0:
        return None
    if m == 1:
        return coarse
    s1, s2 = torch.cumsum(c, 0), torch.cumsum(c * c, 0)
    j = torch.arange(1, m, dtype=torch.float64)  # size of the lower part
    lo_mean, lo_sq = s1[:-1] / j, s2[:-1] / j
    hi_n = m - j
    hi_mean, hi_sq = (s1[-1] - s1[:-1]) / hi_n, (s2[-1] - s2[:-1]) / hi_n
    inter = j * hi_n / m ** 2 * (hi_mean - lo_mean) ** 2  # between-part variance (size-weighted, as Otsu's)
    intra = (j * (lo_sq - lo_mean ** 2) + hi_n * (hi_sq - hi_mean ** 2)) / m  # within-part variance
    score = inter - split_weight * intra
    return float(c[int(score.argmax())])


def cfp_truncate(w: torch.Tensor, spec: QuantSpec, iqr_factor: float = 1.5, split_weight: float = 1.0,
                 where: str = "weight", col_power: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(``w`` (out, in) with CFP's outliers truncated to ±``cfp_threshold``, number truncated), or (``w``, 0) when
    there is no outlier or the truncation does not lower the round-to-nearest error at ``spec``:
    ``Σ_ij h_j (W − Q(·))²_ij`` with ``h = col_power`` (in,) the mean square of each input column on calibration
    data (the layer-output error with independent inputs), or h = 1 without it (module doc)."""
    t = cfp_threshold(w, iqr_factor, split_weight)
    if t is None:
        return w, 0
    h = torch.ones(w.shape[1], device=w.device) if col_power is None else col_power.to(w.device)
    clipped = w.clamp(-t, t)
    if ((w - rtn(clipped, spec, where)).pow(2) * h).sum() >= ((w - rtn(w, spec, where)).pow(2) * h).sum():
        return w, 0
    return clipped, int((w.abs() > t).sum())


# -- LoRA-Rounding ----------------------------------------------------------------------------------------
def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1) (arXiv:2004.10568, eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class LoraRounding(nn.Module):
    """Learned quantization of one (out, in) weight: step sizes ``s = s₀·exp(t)`` and rounding offsets
    ``h(V₀ + A₁A₂)`` (CBQ §3.3). ``straight_through()`` is the weight trained (hard value, soft gradient),
    ``hard()`` the final one."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, r: int, where: str = "weight"):
        super().__init__()
        self.spec = spec
        w = weight.detach().float()
        scale, zero = minmax_params(w, spec, where)
        self.register_buffer("w", spec.grouped(w, where))  # (out, groups, g)
        self.register_buffer("scale0", scale)  # (out, groups, 1)
        self.register_buffer("zero", zero)
        rest = self.w / scale - torch.floor(self.w / scale)  # in [0, 1)
        self.register_buffer("v0", -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1).reshape(w.shape))
        out_f, in_f = w.shape
        self.log_gain = nn.Parameter(torch.zeros_like(scale))
        self.lora_A1 = nn.Parameter(torch.zeros(out_f, r))  # d×r, zero: V starts at V₀ (RTN)
        a2 = torch.empty(r, in_f)
        nn.init.kaiming_uniform_(a2, a=math.sqrt(5))
        self.lora_A2 = nn.Parameter(a2)  # r×k

    def v(self) -> torch.Tensor:
        return (self.v0 + self.lora_A1 @ self.lora_A2).view_as(self.w)

    def _weight(self, h: torch.Tensor) -> torch.Tensor:
        s = self.scale0 * torch.exp(self.log_gain)
        x = self.w / s
        q = torch.clamp(x + (torch.floor(x) - x).detach() + h + self.zero, 0, self.spec.qmax)
        return (s * (q - self.zero)).reshape(self.w.shape[0], -1)

    def straight_through(self) -> torch.Tensor:
        """The weight with hard rounding in value and the gradient of the soft rounding h(V) (see module doc)."""
        v = self.v()
        h = rectified_sigmoid(v)
        return self._weight(h + ((v >= 0).float() - h).detach())

    @torch.no_grad()
    def hard(self) -> torch.Tensor:
        return self._weight((self.v() >= 0).float())

    def rounding_loss(self, beta: float) -> torch.Tensor:
        """Mean over entries of ``1 − |2h(V) − 1|^β`` (L_com per entry)."""
        return (1 - (2 * rectified_sigmoid(self.v()) - 1).abs().pow(beta)).mean()


def reconstruction_error(target: torch.Tensor, out: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
    """E(h1, h2) = MSE(h1, h2) + kl_weight · mean_tokens D_KL(σ(h1) ‖ σ(h2)), σ = softmax over hidden units."""
    mse = (target.float() - out.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-12)
    if not kl_weight:
        return mse
    log_p, log_q = F.log_softmax(target.float(), -1), F.log_softmax(out.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return mse + kl_weight * kl


# -- the sliding-window reconstruction ----------------------------------------------------------------------
def window_starts(n_blocks: int, window: int, overlap: int) -> list[int]:
    """First block of each window: every ``window − overlap`` blocks, the last window ending at the last block."""
    if n_blocks <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, n_blocks - window + 1, stride))
    if starts[-1] + window < n_blocks:
        starts.append(n_blocks - window)
    return starts


def _run(blocks, ids, x, kwargs, weights: dict[int, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    for i in ids:
        if weights is None:
            x = block_output(blocks[i](x, **kwargs))
        else:
            x = block_output(functional_call(blocks[i], weights[i], (x,), kwargs))
    return x


def quantize_cbq(model: nn.Module, calib_ids: torch.Tensor, config: CBQConfig | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize every linear layer of every block of ``model`` in place with CBQ, calibrating on ``calib_ids``
    (N, T) token rows. Returns a summary with, per window, the reconstruction error E of its hard-rounded
    weights at the start (round-to-nearest, after CFP's truncation when on) and at the end of the optimisation,
    and the first / last training loss. Raises LorakitError before any change for calibration rows that are not
    (N, T) token ids, and for blocks without linears or already quantized (``check_quantizable``)."""
    check_token_rows(calib_ids, "CBQ calibration rows (calib_ids)")
    check_quantizable(model)
    config = config or CBQConfig()
    spec = config.spec
    torch.manual_seed(config.seed)
    blocks = decoder_blocks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    x_fp, kwargs = block_inputs(model, calib_ids)
    x_fp = x_fp.detach()
    x_q = x_fp.clone()
    n = x_fp.shape[0]
    linears = {i: block_linears(b) for i, b in enumerate(blocks)}
    fp_copies: dict[int, nn.Module] = {}
    rounders: dict[int, dict[str, LoraRounding]] = {}
    truncated: dict[str, float] = {}
    windows = []
    starts = window_starts(len(blocks), config.window, config.overlap)
    for k, start in enumerate(starts):
        ids = list(range(start, min(start + config.window, len(blocks))))
        new = [i for i in ids if i not in rounders]
        for i in new:
            fp_copies[i] = copy.deepcopy(blocks[i])
        col_power, hooks = {}, []  # mean square of each input column of every new linear, on the fp inputs
        for i in new:
            for name, layer, _ in block_linears(fp_copies[i]):
                hooks.append(layer.register_forward_hook(lambda m, a, o, key=(i, name): col_power.__setitem__(
                    key, a[0].detach().float().pow(2).reshape(-1, a[0].shape[-1]).mean(0))))
        with torch.no_grad():
            target = _run(fp_copies, ids, x_fp, kwargs)
        for h in hooks:
            h.remove()
        for i in new:
            rounders[i] = {}
            for name, layer, fifo in linears[i]:
                w = oriented(layer.weight, fifo).detach().float()
                if config.cfp:
                    w, n_cut = cfp_truncate(w, spec, config.iqr_factor, config.split_weight, f"block {i} {name}",
                                            col_power.get((i, name)))
                    if n_cut:
                        truncated[f"{i}.{name}"] = n_cut
                rounders[i][name] = LoraRounding(w, spec, config.r, f"block {i} {name}").to(layer.weight.device)

        def weights(hard: bool) -> dict[int, dict[str, torch.Tensor]]:
            out = {}
            for i in ids:
                out[i] = {}
                for (name, layer, fifo), rd in zip(linears[i], rounders[i].values()):
                    w = rd.hard() if hard else rd.straight_through()
                    out[i][f"{name}.weight"] = oriented(w, fifo).to(layer.weight.dtype)
            return out

        def error(hard_weights) -> float:
            with torch.no_grad():
                return float(reconstruction_error(target, _run(blocks, ids, x_q, kwargs, hard_weights), config.kl_weight))

        before = error(weights(True))
        rds = [rd for i in ids for rd in rounders[i].values()]
        optimizer = torch.optim.Adam([{"params": [p for rd in rds for p in (rd.lora_A1, rd.lora_A2)], "lr": config.lr},
                                      {"params": [rd.log_gain for rd in rds], "lr": config.scale_lr}])
        warm = int(config.round_warmup * config.steps)
        losses = []
        for step in range(config.steps):
            rows = torch.randint(0, n, (min(config.batch_size, n),))
            out = _run(blocks, ids, x_q[rows], slice_kwargs(kwargs, rows, n), weights(False))
            loss = reconstruction_error(target[rows], out, config.kl_weight)
            losses.append(float(loss.detach()))
            if step >= warm and config.round_weight:
                frac = (step - warm) / max(config.steps - warm - 1, 1)
                beta = config.beta_end + (config.beta_start - config.beta_end) * (1 - frac)
                reg = sum(rd.rounding_loss(beta) for i in ids for rd in rounders[i].values())
                loss = loss + config.round_weight * reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        final = weights(True)
        after = error(final)
        windows.append({"blocks": ids, "error_start": before, "error_end": after,
                        "train_loss_first": losses[0], "train_loss_last": losses[-1]})
        if progress is not None:
            progress(f"window {k + 1}/{len(starts)} blocks {ids}: error {before:.4g} -> {after:.4g}")
        done = ids if k == len(starts) - 1 else [i for i in ids if i < starts[k + 1]]
        with torch.no_grad():
            for i in done:
                for name, layer, _ in linears[i]:
                    layer.weight.copy_(final[i][f"{name}.weight"])
                x_q = _run(blocks, [i], x_q, kwargs)
                x_fp = _run(fp_copies, [i], x_fp, kwargs)
                del fp_copies[i], rounders[i]
    return {"method": "cbq", "layers": sum(len(v) for v in linears.values()), "bits": config.bits,
            "group_size": config.group_size, "window": config.window,
            "overlap": config.overlap, "r": config.r, "steps": config.steps, "cfp": config.cfp,
            "truncated_weights": truncated, "windows": windows}
