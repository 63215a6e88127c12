"""Merge methods in adapter space: how N per-module LoRA deltas become one.

Each method sees one adapted module at a time as :class:`ModuleTerms` — the sources' rank-one units stacked
(``ΔW_i = s_i · B_i A_i``, A_i (r_i, in), B_i (out, r_i)) — and returns either low-rank factors (exact, no
materialisation) or a dense ΔW (out, in) that :mod:`.merge` re-factors (exactly, or truncated for the ``_svd``
forms). Formulas, with ``w_i`` the user's weights and ``τ_i = ΔW_i`` the task vectors:

- ``linear``   Σ w_i τ_i, re-factored exactly (thin SVD of the concatenated factors; rank = rank of the sum).
  PEFT's ``linear`` instead sums A's and B's separately (cross terms; PEFT itself calls it "a very rough
  approximation"); lorakit's is the weighted sum of ΔW. ``normalize=True`` divides by Σ w_i (mergekit's
  ``linear`` default, "Model soups", arXiv:2203.05482).
- ``task_arithmetic``  λ Σ w_i τ_i, negative weights allowed ("Editing Models with Task Arithmetic",
  Ilharco et al., arXiv:2212.04089; mergekit ``task_arithmetic``).
- ``cat``      ranks concatenated: A = [A_1; …; A_N], B = [w_1 s_1 B_1, …, w_N s_N B_N]; exact, rank Σ r_i
  (PEFT ``cat``).
- ``svd``      Σ w_i τ_i truncated to ``svd_rank`` singular directions (PEFT ``svd``, default rank = the largest
  source rank), computed from the factors without forming the dense sum where that is cheaper.
- ``ties``     trim each τ_i to its top-``density`` magnitudes, elect the sign of Σ w_i τ̂_i per entry, average
  the agreeing w_i τ̂_i divided by Σ w_i over agreeing entries ("TIES-Merging", Yadav et al., arXiv:2306.01708).
  Follows mergekit ``generalized_task_arithmetic.py`` (weighted sign election, ``normalize`` by the weights);
  PEFT's ``ties`` elects on unweighted tensors and divides by the count — identical when all weights are 1.
- ``dare_linear`` / ``dare_ties``  random drop with keep probability ``density``, rescale the kept entries, then
  sum / TIES ("Language Models are Super Mario", Yu et al., arXiv:2311.03099). ``rescale="density"`` divides by
  the keep probability (the paper; PEFT); ``rescale="l1"`` matches each τ̂_i's L1 norm to τ_i's (mergekit's
  ``rescale``). Masks: one ``torch.bernoulli`` draw over the stacked (N, out, in) tensor from a generator seeded
  with ``seed``, the same stream as mergekit's per-source draws after ``torch.manual_seed(seed)``.
- ``magnitude_prune``  magnitude trim then weighted sum (PEFT ``magnitude_prune``).
- ``della`` / ``della_linear``  drop with probabilities linear in each row's magnitude rank (keep probability in
  [density − ε, density + ε], larger entries kept more often), then TIES / sum ("DELLA-Merging", Deep et al.,
  arXiv:2406.11617; mergekit ``sparsify.della_magprune``, rescale ``l1`` as mergekit's default). Rows, and the
  order DARE/DELLA draw their masks in, are those of the layer's stored weight (``ModuleTerms.to_stored``), as
  mergekit sees it.
- ``breadcrumbs`` / ``breadcrumbs_ties``  drop the ``gamma`` largest and the smallest entries so ``density``
  remain, then sum / TIES ("Model Breadcrumbs", Davari & Belilovsky, arXiv:2312.06795; mergekit
  ``magnitude_outliers``).
- ``sce``      keep the ``select_topk`` fraction of entries with the largest variance across sources, weight each
  τ_i by its mean square (normalised), elect signs, average the agreeing ("FuseChat / SCE", Wan et al.,
  arXiv:2408.07990; mergekit ``sce.py``; the user's weights multiply the τ_i first).

Where mergekit keeps a tensor whole, lorakit does too: each module's ΔW and its ``lora_bias`` vector are two
tensors, merged separately with the same method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral
from typing import Callable

import torch

from ..core.errors import FIELD, ConfigError, did_you_mean


@dataclass
class ModuleTerms:
    """One module's N sources: ``A[i]`` (r_i, in), ``B[i]`` (out, r_i), ``scaling`` (N,) s_i, ``weights`` (N,) w_i,
    ``bias`` (N, out) — each source's ``lora_bias`` already times s_i, zeros where a source has none — or None."""

    A: list[torch.Tensor]
    B: list[torch.Tensor]
    scaling: torch.Tensor  # (N,) s_i
    weights: torch.Tensor  # (N,) w_i
    bias: torch.Tensor | None = None
    # weights of the merge's other sources, which do not adapt this module: their ΔW here is 0, but they still
    # count where a method divides by Σ w (normalize) or takes statistics over the sources (SCE's variance)
    absent_weights: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    # how the layer stores its weight, which ΔW (out, in) is a view of: transposed (in, out) for GPT-2 Conv1D and
    # nn.Embedding, (out, in, *kernel) for convolutions. DARE/DELLA draw their masks and DELLA ranks its rows in
    # that layout, as mergekit does on the stored weights.
    stored_transposed: bool = False
    stored_kernel: tuple[int, ...] = ()

    def weight_total(self) -> torch.Tensor:
        """Σ w over every source of the merge, those absent from this module included."""
        return self.weights.sum() + self.absent_weights.sum()

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (N, r_max, in), B (N, out, r_max), zero-padded so different ranks stack."""
        r_max = max(a.shape[0] for a in self.A)
        if all(a.shape[0] == r_max for a in self.A):
            return torch.stack(self.A), torch.stack(self.B)
        A = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in self.A])
        B = torch.stack([torch.nn.functional.pad(b, (0, r_max - b.shape[1])) for b in self.B])
        return A, B

    def to_stored(self, tv: torch.Tensor) -> torch.Tensor:
        """(N, out, in) -> (N, *stored weight shape), contiguous (so random draws follow the stored order)."""
        if self.stored_kernel:
            return tv.reshape(*tv.shape[:2], -1, *self.stored_kernel)  # (N, out, in, *kernel): same memory order
        return (tv.transpose(1, 2) if self.stored_transposed else tv).contiguous()

    def from_stored(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_stored`: (N, out, in)."""
        if self.stored_kernel:
            return t.reshape(*t.shape[:2], -1)
        return t.transpose(1, 2) if self.stored_transposed else t

    def task_vectors(self) -> torch.Tensor:
        """τ_i = s_i B_i A_i stacked: (N, out, in), one batched matmul."""
        A, B = self.padded()
        return torch.bmm(B * self.scaling[:, None, None], A)


@dataclass
class LowRank:
    """Result as factors: ΔW = B @ A (scaling 1), ``bias`` (out,) or None."""

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class Dense:
    """Result as a full ΔW (out, in) to re-factor, ``bias`` (out,) or None."""

    delta: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class MergeOptions:
    """Options shared by the methods (names as mergekit / PEFT)."""

    density: float = 1.0
    svd_rank: int | None = None
    majority_sign_method: str = "total"  # PEFT name; "total" = mergekit consensus "sum", "frequency" = "count"
    normalize: bool | None = None  # None: the method's mergekit default
    rescale: str | None = None  # None: the method's default ("density", "l1" or "none")
    lambda_: float = 1.0
    epsilon: float = 0.15  # DELLA
    gamma: float = 0.01  # breadcrumbs
    select_topk: float = 1.0  # SCE
    seed: int = 0
    rank_tolerance: float = 1e-6  # relative singular-value cut for exact re-factoring
    extra: dict = field(default_factory=dict)  # method-specific (LoRA-LEGO)

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            why = ("density 0 keeps no entry, so the merge would be an all-zero adapter" if self.density <= 0 else
                   "it is the fraction of entries kept, 1 keeps them all")
            raise ConfigError(f"{FIELD} must be in (0, 1], got {self.density}: {why}.", field="density")
        if self.svd_rank is not None and (isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, Integral)
                                          or self.svd_rank <= 0):
            raise ConfigError(f"{FIELD} must be a positive integer, got {self.svd_rank!r}.", field="svd_rank")
        if self.normalize not in (None, True, False):
            raise ConfigError(f"{FIELD} must be True, False or None (the method's default), got {self.normalize!r}.",
                              field="normalize")
        # NaN/inf reach the SVD as a LinAlgError; a negative gamma kept no entry (an all-zero adapter, silently) and a
        # negative epsilon inverts DELLA (larger entries dropped more often)
        if not math.isfinite(self.lambda_) or self.lambda_ == 0:
            why = "it scales the merged delta, so 0 would write an all-zero adapter" if self.lambda_ == 0 else ""
            raise ConfigError(f"{FIELD} must be a finite, non-zero number, got {self.lambda_}{': ' + why if why else ''}.",
                              field="lambda_")
        if not 0.0 <= self.epsilon < 1.0:
            raise ConfigError(f"{FIELD} must be in [0, 1), got {self.epsilon}: DELLA keeps entries with probabilities "
                              f"density ± epsilon, the larger entries the more often.", field="epsilon")
        if not 0.0 <= self.gamma < 1.0:
            raise ConfigError(f"{FIELD} must be in [0, 1), got {self.gamma}: it is the fraction of the largest entries "
                              f"breadcrumbs drops.", field="gamma")
        if not 0.0 <= self.rank_tolerance < 1.0:
            raise ConfigError(f"{FIELD} must be in [0, 1), got {self.rank_tolerance}: singular values below it times "
                              f"the largest are cut.", field="rank_tolerance")
        if self.majority_sign_method not in ("total", "frequency"):
            raise ConfigError(f"{FIELD} must be 'total' or 'frequency', got {self.majority_sign_method!r}."
                              f"{did_you_mean(self.majority_sign_method, ('total', 'frequency'))}",
                              field="majority_sign_method")
        if self.rescale not in (None, "density", "l1", "none"):
            raise ConfigError(f"{FIELD} must be 'density' (paper/PEFT), 'l1' (mergekit) or 'none', got "
                              f"{self.rescale!r}.{did_you_mean(self.rescale, ('density', 'l1', 'none'))}",
                              field="rescale")
        if not 0.0 < self.select_topk <= 1.0:
            why = ("0 selects no entry, so the merge would be an all-zero adapter" if self.select_topk <= 0 else
                   "it is the fraction of entries selected, 1 selects them all")
            raise ConfigError(f"{FIELD} must be in (0, 1], got {self.select_topk}: {why}.", field="select_topk")


# ---- sparsifiers: (N, out, in) -> (N, out, in), batched over sources --------------------------------------
def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def magnitude_mask(tv: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of |τ_i| per source (at least one entry), as mergekit ``magnitude``."""
    n = tv[0].numel()
    k = max(1, int(density * n))
    idx = torch.topk(_flat(tv).abs(), k, dim=1).indices
    return torch.zeros_like(_flat(tv)).scatter_(1, idx, 1.0).reshape(tv.shape)


def outlier_mask(tv: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest, then the smallest, keeping ``density`` (mergekit layout)."""
    n = tv[0].numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(_flat(tv).abs(), dim=1).indices
    mask = torch.zeros_like(_flat(tv))
    mask.scatter_(1, order[:, n_bot:n_bot + target], 1.0)
    return mask.reshape(tv.shape)


def della_probs(tv: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities of stacked sources ``tv`` (N, *weight shape): each source's entries
    ranked along its dim 1 (mergekit ``della_magprune``'s ``argsort(dim=1)``; a 1-D bias as one row), mapped
    linearly to [d − ε, d + ε]. Where that dim has one entry (a 1-channel convolution's (out, 1, kh, kw), a
    single-output bias) there is nothing to rank and the probability is d; mergekit divides 0 by 0 there."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ConfigError(f"DELLA needs density ± epsilon inside (0, 1); got density={density}, epsilon={epsilon}.")
    dim = min(2, tv.dim() - 1)
    ranks = torch.argsort(torch.argsort(tv.abs(), dim=dim), dim=dim).to(tv.dtype) + 1
    lo, hi = ranks.amin(dim, keepdim=True), ranks.amax(dim, keepdim=True)
    norm = torch.where(hi > lo, (ranks - lo) / (hi - lo).clamp_min(1), torch.full_like(ranks, 0.5))
    return (density - epsilon) + norm * 2 * epsilon


def apply_mask(tv: torch.Tensor, mask: torch.Tensor, rescale: str, density: float) -> torch.Tensor:
    out = tv * mask
    if rescale == "density":
        return out / density if density > 0 else out
    if rescale == "l1":  # mergekit rescaled_masked_tensor(norm=l1): match each source's L1 norm
        before, after = _flat(tv).abs().sum(1), _flat(out).abs().sum(1)
        ok = (before >= 1e-7) & (after >= 1e-7)
        factor = torch.where(ok, before / after.clamp_min(1e-7), torch.ones_like(before))
        return out * factor.view(-1, *([1] * (tv.dim() - 1)))
    return out


def sign_consensus(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """Mask of entries whose sign agrees with the elected one (mergekit get_mask; ties at 0 elect +)."""
    sign = weighted.sign()
    votes = weighted.sum(0) if method == "total" else sign.sum(0)
    majority = (votes >= 0).to(weighted.dtype) * 2 - 1
    return (sign == majority).to(weighted.dtype)


# ---- the method strategies ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeMethod:
    """A named merge: ``low_rank`` methods return factors, others a dense ΔW (see module docstring)."""

    name: str
    paper: str
    follows: str
    merge: Callable[[ModuleTerms, MergeOptions, torch.Generator], LowRank | Dense]
    low_rank: bool = False
    # Linear-family methods: the coefficient c_i of each source's ΔW_i in the result (DoRA merging needs them).
    coefficients: Callable[[ModuleTerms, MergeOptions], torch.Tensor] | None = None
    extra_options: tuple[str, ...] = ()  # method-specific option names, passed in MergeOptions.extra
    linear_in_weights: bool = False  # result scales linearly with the weights (property-tested)
    # the MergeOptions fields ``merge`` reads (``seed`` is always accepted); another one given is an error rather
    # than silently ignored. None: not declared (not checked).
    reads: tuple[str, ...] | None = None


def _coefficients(terms: ModuleTerms, opts: MergeOptions, normalize_default: bool) -> torch.Tensor:
    w = terms.weights * opts.lambda_
    normalize = normalize_default if opts.normalize is None else opts.normalize
    if normalize:
        total = terms.weight_total()
        w = w / (total if total.abs() >= 1e-8 else 1.0)
    return w


def _cat(terms: ModuleTerms, coef: torch.Tensor) -> LowRank:
    A = torch.cat(terms.A, 0)  # (R, in), R = Σ r_i
    per_unit = torch.repeat_interleave(coef * terms.scaling, torch.tensor([a.shape[0] for a in terms.A]))  # (R,)
    B = torch.cat(terms.B, 1).mul_(per_unit.to(A.device))  # (out, R): source i's columns times w_i s_i
    bias = None if terms.bias is None else (coef[:, None] * terms.bias).sum(0)
    return LowRank(A=A, B=B, bias=bias)


def lowrank_svd(A: torch.Tensor, B: torch.Tensor, rank: int | None, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of B @ A's best rank-``rank`` approximation (all of its numerical rank when ``rank`` is None),
    balanced as B' = U √S, A' = √S Vᵀ. Uses QR of the factors when they are thin, else the dense product."""
    out_f, R = B.shape
    in_f = A.shape[1]
    if R < min(out_f, in_f):
        qb, rb = torch.linalg.qr(B)  # (out, R), (R, R)
        qa, ra = torch.linalg.qr(A.T)  # (in, R), (R, R)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        u, vh = qb @ u, vh @ qa.T
    else:
        u, s, vh = torch.linalg.svd(B @ A, full_matrices=False)
    return _truncated(u, s, vh, rank, tol)


def dense_svd(delta: torch.Tensor, rank: int | None, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A, B) of a dense ΔW (out, in): exact at its numerical rank, or its best rank-``rank`` approximation."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _truncated(u, s, vh, rank, tol)


def _truncated(u, s, vh, rank, tol):
    keep = int((s > tol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    keep = max(1, keep if rank is None else min(rank, keep))
    root = s[:keep].sqrt()
    return root[:, None] * vh[:keep], u[:, :keep] * root


def _linear_family(normalize_default: bool, truncate: bool):
    def merge(terms: ModuleTerms, opts: MergeOptions, gen) -> LowRank:
        cat = _cat(terms, _coefficients(terms, opts, normalize_default))
        rank = (opts.svd_rank or max(a.shape[0] for a in terms.A)) if truncate else None
        A, B = lowrank_svd(cat.A, cat.B, rank, opts.rank_tolerance)
        return LowRank(A=A, B=B, bias=cat.bias)
    return merge


def _plain_coefficients(terms: ModuleTerms, opts: MergeOptions) -> torch.Tensor:
    return _coefficients(terms, opts, False)


def _cat_merge(terms: ModuleTerms, opts: MergeOptions, gen) -> LowRank:
    return _cat(terms, _plain_coefficients(terms, opts))


def _task_family(sparsify: str | None, consensus: bool, normalize_default: bool, rescale_default: str):
    """mergekit's generalized task arithmetic: sparsify each τ_i, weight, optional sign consensus, normalise."""

    def on_tensor(tv: torch.Tensor, w: torch.Tensor, opts: MergeOptions, gen, absent: torch.Tensor,
                  layout: ModuleTerms | None = None) -> torch.Tensor:
        rescale = opts.rescale or rescale_default
        d = opts.density
        if sparsify and d < 1:
            stored = layout.to_stored(tv) if layout is not None else tv  # ``layout``: ΔW's, None for a bias
            back = layout.from_stored if layout is not None else (lambda t: t)
            if sparsify == "magnitude":
                mask = magnitude_mask(tv, d)
            elif sparsify == "random":
                mask = back(torch.bernoulli(torch.full_like(stored, d), generator=gen))
            elif sparsify == "della":
                mask = back(torch.bernoulli(della_probs(stored, d, opts.epsilon), generator=gen))
            else:  # "outliers"
                mask = outlier_mask(tv, d, opts.gamma)
            tv = apply_mask(tv, mask, rescale, d)
        wv = w.view(-1, *([1] * (tv.dim() - 1)))
        weighted = tv * wv
        normalize = normalize_default if opts.normalize is None else opts.normalize
        if consensus:
            mask = sign_consensus(weighted, opts.majority_sign_method)
            merged, divisor = (weighted * mask).sum(0), (wv * mask).sum(0)
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        else:
            merged, divisor = weighted.sum(0), w.sum() + absent.sum()  # absent sources: τ = 0, weight counted
            divisor = divisor if divisor.abs() >= 1e-8 else torch.ones_like(divisor)
        if normalize:
            merged = merged / divisor
        return merged * opts.lambda_

    def merge(terms: ModuleTerms, opts: MergeOptions, gen) -> Dense:
        delta = on_tensor(terms.task_vectors(), terms.weights, opts, gen, terms.absent_weights, terms)
        bias = None if terms.bias is None else on_tensor(terms.bias, terms.weights, opts, gen, terms.absent_weights)
        return Dense(delta=delta, bias=bias)

    return merge


def _sce_tensor(tv: torch.Tensor, w: torch.Tensor, opts: MergeOptions, n_absent: int = 0) -> torch.Tensor:
    tv = tv * w.view(-1, *([1] * (tv.dim() - 1)))
    if opts.select_topk < 1:  # the variance over every source, those absent from this module as zeros
        var = torch.var(torch.cat([tv, tv.new_zeros((n_absent, *tv.shape[1:]))]), dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * opts.select_topk)
        mask = torch.zeros_like(var)
        if k > 0:
            mask.view(-1)[torch.topk(var.abs().view(-1), k).indices] = 1
        tv = tv * mask
    erase = sign_consensus(tv, "total")
    ms = _flat(tv).square().mean(1)
    total = ms.sum()
    ms = ms / total if total.abs() >= 1e-6 else torch.full_like(ms, 1.0 / len(ms))
    weights = ms.view(-1, *([1] * (tv.dim() - 1))) * erase
    return (tv * weights).sum(0) / weights.sum(0).clamp(min=1e-6)


def _sce_merge(terms: ModuleTerms, opts: MergeOptions, gen) -> Dense:
    n_absent = terms.absent_weights.numel()
    bias = None if terms.bias is None else _sce_tensor(terms.bias, terms.weights, opts, n_absent)
    return Dense(delta=_sce_tensor(terms.task_vectors(), terms.weights, opts, n_absent), bias=bias)


METHODS: dict[str, MergeMethod] = {}


def register_merge_method(method: MergeMethod) -> None:
    METHODS[method.name] = method


MK = "mergekit merge_methods/generalized_task_arithmetic.py + sparsify.py"
LIN = ("normalize", "lambda_")  # _coefficients
GTA = ("density", "rescale", "normalize", "lambda_")  # _task_family
SIGN = ("majority_sign_method",)  # sign consensus
for _m in (
    MergeMethod("linear", "Wortsman et al. 2022, arXiv:2203.05482 (weighted sum of ΔW)",
                "sum of ΔW as mergekit linear (normalize off by default); exact thin-SVD re-factoring",
                _linear_family(False, truncate=False), low_rank=True, linear_in_weights=True,
                coefficients=_plain_coefficients, reads=LIN),
    MergeMethod("task_arithmetic", "Ilharco et al. 2023, arXiv:2212.04089", "mergekit task_arithmetic (λ, no normalize)",
                _linear_family(False, truncate=False), low_rank=True, linear_in_weights=True,
                coefficients=_plain_coefficients, reads=LIN),
    MergeMethod("cat", "concatenation-summation equivalence (LoRA-LEGO arXiv:2409.16167 §3; PEFT cat)", "PEFT cat",
                _cat_merge, low_rank=True, linear_in_weights=True, coefficients=_plain_coefficients, reads=LIN),
    MergeMethod("svd", "PEFT add_weighted_adapter svd (kohya-ss svd_merge_lora)", "PEFT svd",
                _linear_family(False, truncate=True), low_rank=True, coefficients=_plain_coefficients,
                reads=LIN + ("svd_rank",)),
    MergeMethod("ties", "Yadav et al. 2023, arXiv:2306.01708", MK,
                _task_family("magnitude", True, True, "none"), reads=GTA + SIGN),
    MergeMethod("dare_linear", "Yu et al. 2024, arXiv:2311.03099", MK + " (rescale 1/density as the paper by default)",
                _task_family("random", False, False, "density"), reads=GTA),
    MergeMethod("dare_ties", "Yu et al. 2024, arXiv:2311.03099", MK + " (rescale 1/density as the paper by default)",
                _task_family("random", True, False, "density"), reads=GTA + SIGN),
    MergeMethod("magnitude_prune", "magnitude pruning then sum (PEFT merge_utils.magnitude_prune)", "PEFT",
                _task_family("magnitude", False, False, "none"), linear_in_weights=True, reads=GTA),
    MergeMethod("della", "Deep et al. 2024, arXiv:2406.11617", MK, _task_family("della", True, True, "l1"),
                reads=GTA + SIGN + ("epsilon",)),
    MergeMethod("della_linear", "Deep et al. 2024, arXiv:2406.11617", MK, _task_family("della", False, False, "l1"),
                reads=GTA + ("epsilon",)),
    MergeMethod("breadcrumbs", "Davari & Belilovsky 2024, arXiv:2312.06795", MK,
                _task_family("outliers", False, False, "none"), linear_in_weights=True, reads=GTA + ("gamma",)),
    MergeMethod("breadcrumbs_ties", "Davari & Belilovsky 2024, arXiv:2312.06795", MK,
                _task_family("outliers", True, False, "none"), reads=GTA + SIGN + ("gamma",)),
    MergeMethod("sce", "Wan et al. 2024, arXiv:2408.07990", "mergekit merge_methods/sce.py", _sce_merge,
                reads=("select_topk",)),
):
    register_merge_method(_m)


def get_merge_method(name: str) -> tuple[MergeMethod, bool]:
    """(method, truncate) for ``name``; ``<dense method>_svd`` truncates the re-factored result to ``svd_rank``."""
    if name in METHODS:
        return METHODS[name], False
    if name.endswith("_svd") and name[:-4] in METHODS and not METHODS[name[:-4]].low_rank:
        return METHODS[name[:-4]], True
    choices = list_merge_methods()
    raise ConfigError(f"unknown merge method {name!r}.{did_you_mean(name, choices)} Choose one of: {', '.join(choices)}.")


def list_merge_methods() -> list[str]:
    names = list(METHODS)
    return names + [f"{n}_svd" for n, m in METHODS.items() if not m.low_rank]


def methods_table() -> str:
    """Markdown table of the registered merge methods (for the docs): name, paper, whose code it follows."""
    rows = ["| method | paper | follows | output |", "|---|---|---|---|"]
    for name, m in METHODS.items():
        output = "low-rank factors (exact)" if m.low_rank else "dense ΔW re-factored exactly (`_svd`: truncated)"
        rows.append(f"| `{name}` | {m.paper} | {m.follows} | {output} |")
    return "\n".join(rows)


def default_rank(terms: ModuleTerms) -> int:
    return max(a.shape[0] for a in terms.A)


__all__ = ["MergeMethod", "MergeOptions", "ModuleTerms", "LowRank", "Dense", "METHODS", "get_merge_method",
           "list_merge_methods", "register_merge_method", "lowrank_svd", "dense_svd", "methods_table"]
