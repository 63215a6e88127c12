"""MoS — "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards", Wang et al.,
arXiv:2410.00938.

Every projection type (q, k, v, o, up, gate, down, ... — layers with the same module name and shape) owns one
global pool of shards shared by all L layers; each layer builds its rank-r LoRA factors from shards it picks:

    A_ℓ = concat_{i<l} P_A[idx_A[j·l + i]]   row j of (r, in),     B_ℓ = (same with P_B, idx_B)   (out, r),
    Δ(x) = s · B_ℓ A_ℓ dropout(x),   s = lora_alpha / r,

with ``P_A ∈ R^{(e·L·l) × (in/l)}``, ``P_B ∈ R^{(out/l) × (e·L·l)}`` (e = ``valid_param_lora_r``: the pools hold
as many parameters as a rank-e LoRA on every layer; l = ``num_chunk_per_vec``). The paper's four ingredients:
*vector sharding* (each rank vector is l shards), *subset selection* (r > e shards are routed to each layer from
the pool), *pair dissociation* (A and B draw independent index lists), *shard privatization* (the last p·l
indices of every list are the layer's own pool rows, p = ``valid_param_private_r``).

Follows the official code, ``Forence1999/MoS`` ``modules/Tied_LoRA.py``:

- ``share_lora_tiedly``: one ``nn.Linear(in/l, e·L·l)`` (A pool) and ``nn.Linear(e·L·l, out/l)`` (B pool) per
  projection type, L = number of layers; in and out must be divisible by l.
- ``LoraLayer_reset_lora_parameters``: pool A Kaiming-uniform(a=√5) with fan = (in/l)·l = in, pool B = 0 (ΔW = 0);
  index list = ``randperm((e−p)·L·l)[:(r−p)·l]`` (shared region) followed by ``(e−p)·L·l + arange(ℓ·p·l,
  (ℓ+1)·p·l)`` (layer ℓ's private rows), drawn separately for A (``lora_pair_mask``) and B (``lora_pair_mask_B``).
- ``transform_chunks(mat, mask, l)``: ``cat([mat[mask][i::l] for i in range(l)], dim=1)`` — row j of the result is
  the concatenation of ``mat[mask[j·l + i]]`` for i < l, i.e. ``mat[mask].reshape(r, l·cols)`` (used here).
- ``LoraLinear4bit_Tied_LoRA_forward``: ``((dropout(x) @ A_ℓᵀ·(vec·anti_vec)) @ B_ℓᵀ) · scaling``. ``vec·anti_vec``
  is a frozen all-ones vector (``gen_tied_lora_config`` asserts ``init_lora_A_vec_value == 1``), so it is left out.

Differences, by design: a group is every targeted layer with the same module name and shape (the official code
hard-codes the seven Llama projection names and takes ℓ from the module path); L counts the adapted layers of the
group. The index lists are saved (``mos_index_A``/``mos_index_B``, int64, as the official saves its masks); a pool
is saved once, under its group's first module. The paper's headline setting is r = 2e with a private share
(``ft_*.sh`` pass r, e, p, l per run). Export: ``to_lora`` writes the materialised ``A_ℓ``, ``B_ℓ`` as a plain PEFT
LoRA (the official ``save_tied_lora`` does the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig, check_positive_ints, field_error
from ..core.delta import Delta, LayerInfo, RankUnits
from ..core.errors import TargetError
from ..core.model import adapter_state
from ..core.registry import register_method
from ._plain import export_plain_lora
from ._shared import group_layout, place, prepare_shared, shared_params


@dataclass
class MosConfig(AdapterConfig):
    """MoS fields (official ``LoraConfig_Tied_Sharing`` names).

    - ``r``: rank of every layer's LoRA (shards routed per layer); ``lora_alpha``: s = lora_alpha / r.
    - ``valid_param_lora_r`` (e): the pools hold the parameters of a rank-e LoRA on every layer of the group.
    - ``valid_param_private_r`` (p): ranks per layer built from the layer's private pool rows (0 ≤ p ≤ min(e, r)).
    - ``num_chunk_per_vec`` (l): shards per rank vector; in and out features must be divisible by it.
    - ``lora_dropout``: dropout on the layer input before the update.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    valid_param_lora_r: int = 4
    valid_param_private_r: int = 1
    num_chunk_per_vec: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r", "valid_param_lora_r", "num_chunk_per_vec")
        e, p = self.valid_param_lora_r, self.valid_param_private_r
        if not 0 <= p <= min(e, self.r):
            raise field_error(self, "valid_param_private_r", f"={p} must be in [0, min(valid_param_lora_r, r)] = "
                              f"[0, {min(e, self.r)}].")
        if p == e and self.r != e:  # nothing left to share: official gen_tied_lora_config asserts this
            raise field_error(self, "valid_param_private_r", f" == valid_param_lora_r ({e}) makes every shard "
                              f"private, so r must equal {e} (got r={self.r}); lower valid_param_private_r.")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def shard_indices(config: MosConfig, layer: int, num_layers: int) -> torch.Tensor:
    """One layer's index list (r·l,): ``(r−p)·l`` random rows of the shared region, then its ``p·l`` private rows."""
    e, p, l = config.valid_param_lora_r, config.valid_param_private_r, config.num_chunk_per_vec
    private_start = (e - p) * num_layers * l
    private = private_start + torch.arange(layer * p * l, (layer + 1) * p * l)
    shared = torch.randperm(private_start)[: (config.r - p) * l]
    return torch.cat([shared, private]).long()


def gather_shards(pool: torch.Tensor, index: torch.Tensor, r: int) -> torch.Tensor:
    """``transform_chunks``: rows ``pool[index]`` (r·l, c) regrouped so rank j is its l shards side by side (r, l·c)."""
    return pool[index].reshape(r, -1)


class MosLinear(Delta):
    """Layer ℓ's view of its group's pools: ``mos_pool_A`` (e·L·l, in/l), ``mos_pool_B`` (out/l, e·L·l) (registered
    on the group's first layer only) and its own index lists ``mos_index_A``, ``mos_index_B`` (r·l,)."""

    plain_units = True

    def __init__(self, info: LayerInfo, config: MosConfig, pools: dict[str, nn.Parameter], owner: bool,
                 layer: int, num_layers: int):
        super().__init__(info)
        self.r, self.scaling = config.r, config.scaling
        self.pools = pools  # a plain dict: the same Parameters for every layer of the group
        if owner:
            self.mos_pool_A, self.mos_pool_B = pools["A"], pools["B"]
        self.register_buffer("mos_index_A", shard_indices(config, layer, num_layers))
        self.register_buffer("mos_index_B", shard_indices(config, layer, num_layers))
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    @property
    def dtype(self) -> torch.dtype:  # layers other than the owner register no parameter of their own
        return self.pools["A"].dtype

    def lora_A(self) -> torch.Tensor:
        return gather_shards(self.pools["A"], self.mos_index_A, self.r)  # (r, in)

    def lora_B(self) -> torch.Tensor:
        return gather_shards(self.pools["B"].T, self.mos_index_B, self.r).T  # (out, r)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        A, B = self.lora_A(), self.lora_B()
        h = self.lora_dropout(x.to(A.dtype)) @ A.T  # (..., r)
        return (h @ B.T * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B().float() @ self.lora_A().float() * self.scaling  # (out, in)

    def units(self) -> RankUnits:
        return RankUnits(A=self.lora_A(), B=self.lora_B(), scaling=self.scaling, dropout=self.lora_dropout)


def prepare_mos(model: nn.Module, config: MosConfig) -> MosConfig:
    """Group the targets by (module name, in, out): one pair of pools per group, L = the group's size."""
    return prepare_shared(config, group_layout(model, config, lambda path, i: (path.rpartition(".")[2],
                                                                              i.in_features, i.out_features)))


def build_mos(base_layer: nn.Module, info: LayerInfo, config: MosConfig, path: str = "") -> MosLinear:
    key, layer, num_layers = place(config, path)
    e, p, l = config.valid_param_lora_r, config.valid_param_private_r, config.num_chunk_per_vec
    if info.in_features % l or info.out_features % l:
        raise TargetError(f"MoS: {path!r} ({info.in_features}→{info.out_features}) is not divisible by "
                          f"num_chunk_per_vec={l}; pick a divisor of both sizes.")
    if config.r - p > (e - p) * num_layers:
        raise TargetError(f"MoS: {path!r}'s group has {num_layers} layer(s), whose shared pool holds {(e - p) * num_layers}"
                          f" rank vectors, fewer than the r - p = {config.r - p} each layer draws; lower r or raise "
                          "valid_param_lora_r.")
    rows = e * num_layers * l

    def make() -> dict[str, nn.Parameter]:
        pool_A = torch.empty(rows, info.in_features // l)
        bound = 1.0 / math.sqrt(info.in_features)  # Kaiming-uniform(a=√5) with fan = (in/l)·l
        return {"A": nn.Parameter(pool_A.uniform_(-bound, bound)),
                "B": nn.Parameter(torch.zeros(info.out_features // l, rows))}

    pools, owner = shared_params(config, key, make)
    return MosLinear(info, config, pools, owner, layer, num_layers)


def mos_to_lora(model: nn.Module, name: str):
    """A plain PEFT LoRA with each layer's materialised ``A_ℓ`` (r, in), ``B_ℓ`` (out, r), same r and α."""
    config = adapter_state(model).configs[name]
    return export_plain_lora(model, name, lambda d: (d.lora_A().detach(), d.lora_B().detach()),
                             lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)


register_method(
    "mos", config=MosConfig, build=build_mos, prepare=prepare_mos, to_lora=mos_to_lora,
    description="Mixture of Shards: per-projection shard pools shared across layers; each layer routes r shard "
                "vectors (separate for A and B, some private) into its LoRA.",
    paper="Wang et al. 2024, arXiv:2410.00938",
    variants={"mos": {"r": 4, "valid_param_lora_r": 3, "valid_param_private_r": 1, "num_chunk_per_vec": 2}},
)
