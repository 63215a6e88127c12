"""EVA — "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation", Paischer et al.,
arXiv:2410.07170.

``A`` of every LoRA layer = the top right singular vectors of that layer's input activations (``B = 0``, so the
model is unchanged at step 0), found by incremental PCA over minibatches until they stop moving; then the
rank budget ``Σ r_l`` is redistributed across layers by explained variance:

    X_l = layer inputs (tokens × in) of minibatch t,  IPCA_l.partial_fit(X_l)  → components V_l (k × in), k = round(ρ r)
    converged_l,i  ⇔  cos(V_l,i^(t), V_l,i^(t−1)) ≥ τ;  stop when every layer's top-(its current rank) converged
    ranks: the budget's largest explained-variance ratios over all layers' top-k;  A_l = V_l[:rank_l]  (/√σ if whiten)
    α_l = α · rank_l / r when ``adjust_scaling_factors`` (so α/r stays); rank 0 ⇒ the layer loses the adapter.

Follows PEFT (``peft/tuners/lora/eva.py`` ``get_eva_state_dict`` / ``_load_eva_state_dict`` and
``peft/utils/incremental_pca.py``), itself the port of the official ``ml-jku/EVA``: the same IPCA (sklearn's
update, ``svd_lowrank(q=2k, niter=4)`` seeded 42, sign flip by V), the same convergence loop over the batches
cycled, layers with equal inputs (q/k/v) sharing one PCA, the label mask (tokens with ``labels == -100`` or
``attention_mask == 0`` dropped), ``rank_pattern`` / ``alpha_pattern`` / ``target_modules`` rewritten so the
file is the PEFT LoRA PEFT writes. One difference: PEFT cycles the batches forever; here ``max_passes`` (default
20) bounds it and an AdapterError names the layers that did not converge, leaving the model as it was.
Options are PEFT's ``EvaConfig`` fields: ``rho``, ``tau``, ``use_label_mask``, ``label_mask_value``, ``whiten``,
``adjust_scaling_factors``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import AdapterError, ConfigError
from ..core.inits import BaseEdit, register_init
from ..core.model import _get_parent, adapter_state, disable_adapters, refresh_trainable
from ..core.registry import get_method
from ._common import Target, _device, _to, check_batches, linear_targets, lora_style, method_layers


class IncrementalPCA:
    """Incremental PCA (sklearn's ``partial_fit`` update, as PEFT's torch port) with a seeded low-rank SVD.

    ``partial_fit(X)`` with X (n, d): keeps ``components_`` (k, d), ``singular_values_`` (k,),
    ``explained_variance_ratio_`` (k,), the running mean/variance (float64) and the sample count."""

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4):
        self.n_components = n_components
        self.q = 2 * n_components
        self.seed, self.niter = seed, niter
        self.components_: torch.Tensor | None = None
        self.mean_: torch.Tensor | None = None
        self.var_: torch.Tensor | None = None
        self.n_seen = 0

    def _mean_var(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Chan et al.'s pairwise update of the column mean and (biased) variance, in float64."""
        n_new = X.shape[0]
        total = self.n_seen + n_new
        new_sum = X.sum(0, dtype=torch.float64)
        centred = X - new_sum / n_new
        new_m2 = centred.square().sum(0, dtype=torch.float64) - centred.sum(0, dtype=torch.float64).square() / n_new
        if self.mean_ is None:
            return new_sum / total, new_m2 / total, total
        last_sum = self.mean_ * self.n_seen
        ratio = self.n_seen / n_new
        m2 = self.var_ * self.n_seen + new_m2 + ratio / total * (last_sum / ratio - new_sum).square()
        return (last_sum + new_sum) / total, m2 / total, total

    def partial_fit(self, X: torch.Tensor) -> None:
        X = X.float().clone()
        n = X.shape[0]
        mean, var, total = self._mean_var(X)
        if self.components_ is None:
            X -= mean
        else:
            batch_mean = X.mean(0)
            X -= batch_mean
            correction = ((self.n_seen / total) * n) ** 0.5 * (self.mean_ - batch_mean)  # (d,) float64
            X = torch.vstack((self.singular_values_[:, None] * self.components_, X, correction))
        with torch.random.fork_rng(devices=[] if not X.is_cuda else [X.device]):
            torch.manual_seed(self.seed)
            U, S, V = torch.svd_lowrank(X, q=self.q, niter=self.niter)
        Vh = V.mH
        rows = torch.argmax(Vh.abs(), dim=1)  # sign flip: the largest |entry| of each component is positive
        Vh = Vh * torch.sign(Vh[torch.arange(Vh.shape[0]), rows])[:, None]
        self.n_seen = total
        self.components_ = Vh[: self.n_components]
        self.singular_values_ = S[: self.n_components]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (S ** 2 / torch.sum(var * total))[: self.n_components]


def token_mask(batch: Mapping[str, Any], use_label_mask: bool, label_mask_value: int) -> torch.Tensor:
    """(b, t) bool: the tokens whose activations count (not padding, and not label-masked when asked)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    if use_label_mask and "labels" in batch:
        mask = mask & (batch["labels"] != label_mask_value)
    return mask


def _each_input(model: nn.Module, targets: list[Target], batch: Mapping[str, Any], mask: torch.Tensor | None,
                fn: Callable[[str, torch.Tensor], None], only: set[str] | None = None) -> None:
    """One forward of ``batch``; ``fn(path, x)`` gets each chosen target's base-layer input while its hook runs,
    (tokens, in) at the ``mask``ed tokens (all of them for None), so no layer's input outlives its own hook."""
    handles = []
    for t in targets:
        if only is None or t.path in only:
            def hook(module, args, output, path=t.path):
                x = (args[0] if isinstance(args, tuple) else args).detach()
                fn(path, x[mask] if x.dim() == 3 and mask is not None else x)
            handles.append(t.layer.base_layer.register_forward_hook(hook))
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()


def _fingerprint(x: torch.Tensor) -> tuple:
    """Shape, dtype and a BLAKE2b digest of the bytes: equal for equal tensors, and (but for a hash collision)
    only for them; PEFT's ``HashHook`` hashes the values the same way, without keeping the tensors."""
    data = x.contiguous().view(-1).view(torch.uint8).cpu().numpy()
    return tuple(x.shape), x.dtype, hashlib.blake2b(data, digest_size=32).digest()


def _rank_distribution(pcas: dict[str, IncrementalPCA], owner: dict[str, str], equal: dict[str, str],
                       budget: int, max_components: dict[str, int]) -> dict[str, int]:
    """PEFT's ``_get_rank_distribution``: the budget's largest explained-variance ratios over all layers."""
    ratios = {k: p.explained_variance_ratio_[: max_components[k]] for k, p in pcas.items()}
    keys, values = zip(*[(k, c) for k, name in owner.items() for c in ratios[name]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    counts = {k: counts.get(k, 0) for k in owner}
    for k, k_owner in equal.items():  # a layer sharing another's inputs never gets more than its owner
        if counts[k_owner] < counts[k]:
            counts[k_owner], counts[k] = counts[k], counts[k_owner]
    return counts


def eva_components(model: nn.Module, targets: list[Target], batches: list[Mapping[str, Any]], ranks: dict[str, int],
                   *, rho: float, tau: float, use_label_mask: bool, label_mask_value: int, whiten: bool,
                   max_passes: int, init: str = "eva") -> dict[str, torch.Tensor]:
    """``{path: A (rank, in)}`` for every target (rank may be 0). Runs the base model in eval mode."""
    device = _device(model)
    max_components = {t.path: round(ranks[t.path] * rho) for t in targets}
    for t in targets:  # PEFT's IncrementalPCA refuses more components than features (incremental_pca.py)
        if max_components[t.path] > t.info.in_features:
            raise AdapterError(f"init {init!r}: round(rho·r) = {max_components[t.path]} components (rho={rho}, "
                               f"r={ranks[t.path]}) of the inputs of module {t.path!r}, which have only "
                               f"{t.info.in_features} features; lower r or rho (model left unchanged).")
    budget = sum(ranks.values())
    keys: dict[str, tuple] = {}
    _each_input(model, targets, _to(batches[0], device), None, lambda path, x: keys.__setitem__(path, _fingerprint(x)))
    equal: dict[str, str] = {}  # layer -> the first layer with identical inputs (it owns the PCA)
    owners: list[str] = []
    owner_of: dict[tuple, str] = {}
    for t in targets:
        if keys[t.path] in owner_of:
            equal[t.path] = owner_of[keys[t.path]]
        else:
            owner_of[keys[t.path]] = t.path
            owners.append(t.path)
    equal = {k: o for o in owners for k, v in equal.items() if v == o}  # grouped by owner, as PEFT orders them
    for o in owners:  # equal-input groups share the largest k
        group = [o] + [k for k, v in equal.items() if v == o]
        top = max(max_components[g] for g in group)
        for g in group:
            max_components[g] = top
    pcas = {o: IncrementalPCA(max_components[o]) for o in owners}
    converged = {o: torch.zeros(max_components[o], dtype=torch.bool) for o in owners}
    owner = {**{o: o for o in owners}, **equal}
    done = {o: False for o in owners}
    rank_dist = dict(max_components)
    batches_run = 0
    for batch in itertools.cycle(batches):
        for o in owners:
            now = bool(torch.all(converged[o][: rank_dist[o]]))
            done[o] = now  # PEFT: hook removed once converged, re-added if it falls back
        if all(done.values()):
            break
        if batches_run >= max_passes * len(batches):
            left = [o for o in owners if not done[o]]
            raise AdapterError(f"init {init!r}: the PCA of layer(s) {left[:5]} did not converge (cosine >= tau={tau}) "
                               f"within max_passes={max_passes} passes over the {len(batches)} batches; pass more "
                               "batches, raise max_passes or lower tau (model left unchanged).")
        batch = _to(batch, device)

        def fit(o: str, x: torch.Tensor) -> None:  # in the layer's hook, as PEFT's SVDHook
            x = x.reshape(-1, x.shape[-1])
            if not torch.isfinite(x).all():
                raise AdapterError(f"init {init!r}: the inputs of layer {o!r} have NaN/inf entries; EVA cannot "
                                   "run on them (model left unchanged).")
            if x.shape[0] < max_components[o]:
                return  # fewer tokens than components: PEFT skips this batch for the layer
            previous = None if pcas[o].components_ is None else pcas[o].components_.clone()
            pcas[o].partial_fit(x)
            if previous is not None:
                converged[o] = torch.nn.functional.cosine_similarity(pcas[o].components_, previous) >= tau

        active = {o for o in owners if not done[o]}
        _each_input(model, targets, batch, token_mask(batch, use_label_mask, label_mask_value), fit, active)
        batches_run += 1
        if any(p.components_ is None for p in pcas.values()):
            continue
        rank_dist = _rank_distribution(pcas, owner, equal, budget, max_components)
    out = {}
    for path, rank in rank_dist.items():
        pca = pcas[owner[path]]
        u = pca.components_[:rank].clone()
        if whiten:
            u /= pca.singular_values_[:rank].sqrt().reshape(-1, 1)
        out[path] = u
    return out


def eva_fits(config: Any) -> str | None:
    """``Init.fits``: a LoRA-style adapter without DoRA (EVA changes ranks, which a set DoRA magnitude cannot
    follow)."""
    if getattr(config, "use_dora", False):
        return "a DoRA adapter cannot change rank after its magnitude was set; use plain LoRA (no use_dora)."
    return lora_style(config)


def run_eva(model: nn.Module, adapter_name: str, batches: Sequence[Mapping[str, Any]] | None, spec: str, *,
            rho: float = 2.0, tau: float = 0.99, use_label_mask: bool = True, label_mask_value: int = -100,
            whiten: bool = False, adjust_scaling_factors: bool = True, max_passes: int = 20) -> dict[str, BaseEdit]:
    """EVA on every LoRA linear of ``adapter_name``; rewrites ranks, alphas and targets in the adapter's config.

    Raises ConfigError for rho < 1 or tau outside [0, 1] (PEFT's EvaConfig checks), AdapterError for missing
    data, NaN inputs, or components that do not converge within ``max_passes`` (model then unchanged)."""
    if rho < 1.0:
        raise ConfigError(f"eva: rho must be >= 1.0, got {rho}.")
    if not 0.0 <= tau <= 1.0:
        raise ConfigError(f"eva: tau must be in [0, 1], got {tau}.")
    batches = check_batches(batches, spec)
    state = adapter_state(model)
    config = state.configs[adapter_name]
    reason = eva_fits(config)
    if reason:
        raise AdapterError(f"eva: {reason}")
    targets = linear_targets(model, adapter_name, spec)
    ranks = {t.path: t.delta.units().A.shape[0] for t in targets}
    was_training = model.training
    model.eval()
    try:
        with disable_adapters(model):
            comps = eva_components(model, targets, batches, ranks, rho=rho, tau=tau, use_label_mask=use_label_mask,
                                   label_mask_value=label_mask_value, whiten=whiten, max_passes=max_passes, init=spec)
    finally:
        model.train(was_training)
    _apply(model, adapter_name, config, targets, comps, ranks, adjust_scaling_factors)
    return {}


def _apply(model: nn.Module, name: str, config: Any, targets: list[Target], comps: dict[str, torch.Tensor],
           ranks: dict[str, int], adjust: bool) -> None:
    """PEFT's ``_load_eva_state_dict``: resize, drop rank-0 layers, copy A, rewrite the config's patterns."""
    build = get_method(config).build
    rank_pattern, alpha_pattern, kept = {}, {}, []
    for t in targets:
        A = comps[t.path]
        r, alpha = ranks[t.path], config.for_module(t.path).lora_alpha
        new_r = A.shape[0]
        if new_r == 0:
            del t.layer.adapters[name]
            t.layer.active = [n for n in t.layer.active if n != name]
            if not t.layer.adapters:  # as PEFT (eva.py _load_eva_state_dict): the plain base layer back in its place
                parent, attr = _get_parent(model, t.path)
                setattr(parent, attr, t.layer.base_layer)
            continue
        if new_r != r:
            if adjust:
                alpha *= new_r / r
            old = t.delta
            module_config = replace(config, r=new_r, lora_alpha=alpha, rank_pattern={}, alpha_pattern={},
                                    init_lora_weights="eva")
            new = build(t.layer.base_layer, t.layer.info, module_config, path=t.path)
            ref = next(old.parameters())
            t.layer.adapters[name] = new.to(device=ref.device, dtype=ref.dtype).train(old.training)
            t.delta = t.layer.adapters[name]
        units = t.delta.units()
        units.A.copy_(A.to(units.A.dtype))
        units.B.zero_()
        kept.append(t.path)
        if new_r != config.r:
            rank_pattern[t.path] = new_r
        if alpha != config.lora_alpha:
            alpha_pattern[t.path] = alpha
    others = [p for p, layer in _all_adapted(model, name) if p not in comps]  # e.g. embeddings: default init
    adapter_state(model).configs[name] = replace(config, target_modules=kept + others, rank_pattern=rank_pattern,
                                                 alpha_pattern=alpha_pattern)
    refresh_trainable(model)


def _all_adapted(model: nn.Module, name: str):
    return [(p, layer) for p, layer, _ in method_layers(model, name)]


register_init(
    "eva", run=run_eva, needs_data=True, fits=eva_fits, rewrites=("target_modules", "rank_pattern", "alpha_pattern"),
    description="A = top right singular vectors of each layer's inputs (incremental PCA until converged), ranks "
                "redistributed by explained variance under the same budget, B = 0.",
    paper="Paischer et al. 2024, arXiv:2410.07170",
)
