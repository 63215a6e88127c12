"""LoRA-LEGO: "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through Rank-Wise
Clustering", Zhao et al., ICLR 2025, arXiv:2409.16167.

A rank-r LoRA is r rank-one *minimal semantic units* (MSUs) ``ΔW = s Σ_j b_j a_jᵀ`` (the core's ``units()``).
Concatenating LoRAs along the rank equals summing their ΔW, so the MSUs of N LoRAs form one pool. LoRA-LEGO
clusters the pool with k-means into k clusters and uses the k centroids as the units of a rank-k merged LoRA:

    pool  u_j = [a_j ; b_j] ∈ R^{in+out}     (source weight w_i and scaling s_i folded in, see below)
    k-means:  min Σ_m Σ_{j ∈ C_m} ‖u_j − μ_m‖²,  μ_m = [ā_m ; b̄_m]
    ΔW_merged = γ · Σ_m β_m² b̄_m ā_mᵀ

Dual reweighting (paper §4.3): averaging non-parallel units shrinks the centroid ("norm decay"), so
*parameter reweighting* rescales each centroid half to the mean norm of its members,
``β_m = mean_{j∈C_m} ‖a_j‖ / ‖ā_m‖`` on ā and likewise on b̄; summing k units grows the output variance with k
("variance expansion"), so *output reweighting* scales the merged LoRA's output by ``γ = √(r̄ / k)``, r̄ the mean
source rank (γ = 1 at k = r̄). ``reweighting`` picks "dual" (both, default), "parameter" (parameter-level only),
"output" (output-level only) or "none".

Provenance: no official code was found (the authors' GitHub, StyxXuan, holds SMoRA but not LoRA-LEGO; the
project's reference notes say the same), and the paper's reweighting equations could not be retrieved here. The
two factors above are lorakit's reading of the paper's description (norm matching; variance ∝ number of
summed units) — treat them as such. Also lorakit's choice, not stated in the paper: each unit is first made
canonical, since (a, b), (t·a, b/t) and (−a, −b) are the same unit — the source coefficient w_i·s_i goes into b,
then ‖a‖ = ‖b‖ is balanced and the sign is fixed by a's largest-magnitude entry, so k-means compares units and
not their arbitrary parameterisation. k-means is scikit-learn's (k-means++ init, ``n_init`` restarts, seeded).
"""

from __future__ import annotations

import math

import torch

from ..core.errors import ConfigError, did_you_mean
from .methods import LowRank, MergeMethod, MergeOptions, ModuleTerms, register_merge_method

REWEIGHTINGS = ("dual", "parameter", "output", "none")


def canonical_units(terms: ModuleTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool of MSUs as (U_a (R, in), U_b (R, out)), balanced and sign-fixed; Σ_j b_j a_jᵀ = Σ_i w_i ΔW_i."""
    A = torch.cat(terms.A, 0)  # (R, in)
    coef = torch.repeat_interleave(terms.weights * terms.scaling, torch.tensor([a.shape[0] for a in terms.A]))  # (R,)
    B = torch.cat(terms.B, 1).T * coef[:, None]  # (R, out)
    na, nb = A.norm(dim=1), B.norm(dim=1)
    t = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-30)).sqrt(), torch.ones_like(na))
    A, B = A * t[:, None], B / t[:, None]
    sign = torch.sign(A.gather(1, A.abs().argmax(1, keepdim=True))).squeeze(1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return A * sign[:, None], B * sign[:, None]


def kmeans_labels(points: torch.Tensor, k: int, seed: int, n_init: int = 4, max_iter: int = 100) -> torch.Tensor:
    """Cluster index per row (scikit-learn KMeans, float64)."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError("LoRA-LEGO needs scikit-learn for k-means: pip install 'lorakit[compose]'") from None
    km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed)
    return torch.from_numpy(km.fit_predict(points.double().numpy())).long()


def lego_merge(terms: ModuleTerms, opts: MergeOptions, gen) -> LowRank:
    """One module: pool MSUs, k-means into k = ``svd_rank`` (default: largest source rank) centroids, reweight."""
    reweighting = opts.extra.get("reweighting", "dual")
    if reweighting not in REWEIGHTINGS:
        raise ConfigError(f"LoRA-LEGO reweighting must be one of {REWEIGHTINGS}, got {reweighting!r}."
                          f"{did_you_mean(str(reweighting), REWEIGHTINGS)}")
    ranks = [a.shape[0] for a in terms.A]
    ua, ub = canonical_units(terms)
    R = ua.shape[0]
    k = min(opts.svd_rank or max(ranks), R)
    if k == R:  # every unit its own cluster: the pool itself (cat), no averaging to undo
        labels = torch.arange(R)
    else:
        labels = kmeans_labels(torch.cat([ua, ub], 1), k, opts.seed, int(opts.extra.get("kmeans_n_init", 4)))
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(ua.dtype)[:, None]
    cent_a = torch.zeros(k, ua.shape[1]).index_add_(0, labels, ua) / counts  # (k, in)
    cent_b = torch.zeros(k, ub.shape[1]).index_add_(0, labels, ub) / counts  # (k, out)
    if reweighting in ("dual", "parameter"):
        mean_na = torch.zeros(k).index_add_(0, labels, ua.norm(dim=1)) / counts[:, 0]
        mean_nb = torch.zeros(k).index_add_(0, labels, ub.norm(dim=1)) / counts[:, 0]
        cent_a = cent_a * (mean_na / cent_a.norm(dim=1).clamp_min(1e-30))[:, None]
        cent_b = cent_b * (mean_nb / cent_b.norm(dim=1).clamp_min(1e-30))[:, None]
    gamma = math.sqrt(sum(ranks) / len(ranks) / k) if reweighting in ("dual", "output") else 1.0
    bias = None if terms.bias is None else (terms.weights[:, None] * terms.bias).sum(0)
    return LowRank(A=cent_a, B=cent_b.T * gamma, bias=bias)


register_merge_method(MergeMethod(
    "lego", "Zhao et al. 2025 (ICLR), arXiv:2409.16167 'Merging LoRAs like Playing LEGO'",
    "paper (no official code found); reweighting factors are lorakit's reading", lego_merge, low_rank=True,
    extra_options=("reweighting", "kmeans_n_init"), reads=("svd_rank",)))
