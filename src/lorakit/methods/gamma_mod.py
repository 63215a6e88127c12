"""γ-MoD — "γ-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language Models", Luo et al.,
arXiv:2410.13859; official code github.com/Yaxin9Luo/Gamma-MOD (``gamma_mod/model/language_model/llava_llama_mod.py``).

Dense transformer blocks become mixture-of-depth (MoD) blocks that only a share of the tokens go through; the others
skip the block (their hidden state passes unchanged), and the model is fine-tuned with LoRA:

- **ARank** chooses the blocks: the rank of each head's attention map, causal part with the diagonal removed,
  averaged over heads (official ``compute_attention_rank``: ``matrix_rank(tril(A) with diag 0)``); the blocks of
  lowest ARank are redundant and become MoD blocks.
- **Shared router**: ONE ``Linear(d, 2, bias=False)`` for every MoD block, applied to each block's input norm
  (``router(input_layernorm(h))``); a token's keep probability is ``r = softmax(logits)[1]``.
- **Routing**: per sequence the ``k`` tokens of highest r are kept; the block runs on them alone (attention
  among the kept tokens), its MLP branch is weighted by r (so the task loss trains the router; official
  ``MoDLlamaDecoderLayer_forward`` lines 160-175), and the result is scattered back: on kept tokens
  ``h1 = h + Attn(LN1(h))``, ``h' = h1 + r·MLP(LN2(h1))``; ``h' = h`` on the others.
- **Masked routing learning**: tokens named by a mask are always kept (official: ``topk(r + mask)``, mask 1 on the
  question tokens); only the others are routed, and ``capacity_factor`` of those are kept (official:
  ``top_k = ceil(T·(1 − 0.5·n_routable/T))``, i.e. half of the routable tokens).
- **Router loss**: per MoD block the cross-entropy of the 2-way router logits against "kept" targets, summed
  over blocks, × ``router_aux_loss_coef`` (0.01, the official default).

Choices where this differs from the official code (which edits LLaVA's Llama classes):
- Host blocks are called whole, through the block's own forward (hooks/wrappers only); r reaches the MLP branch
  through a forward hook on the block's ``mlp`` (for GPT-2 blocks after the MLP's own dropout);
- kept tokens keep their own positions (rotary embeddings, mask entries are gathered), where the official
  code renumbers them 0..k−1;
- the mask of always-kept tokens comes from ``lorakit.routing(extras={"gamma_mod_keep": mask})`` ((batch, seq)
  bool), since text-only data has no image/question split; without it every real token is routable. Padding
  (the routing context's ``token_mask``) is skipped first and never counted in k;
- inference uses the same top-k as training (the official evaluation keeps tokens with r > 0.005 at prefill);
  generation runs without KV cache (``use_cache=False``), every step routing the whole sequence;
- ARank is computed on every row of the init batches over their real tokens (official: row 0 of one sample).

The LoRA part is plain LoRA on ``target_modules``; every decoder block gets a wrapper (so ARank can pick any)
that only routes when its index is in ``mod_layers``. With ``mod_layers=None`` the method's ``init`` (run by the
training loop on its first batches) computes ARank, picks the ``num_mod_layers`` lowest (default half the blocks)
and records them in the config, so the saved adapter reloads with the same blocks.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import LayerInfo, register_layer_kind
from ..core.errors import AdapterError, ConfigError
from ..core.registry import register_method
from ..core.routing import current_routing
from ..mixtures.base import MixtureDelta, router_loss, token_mask_for
from ..mixtures.router import RouterOutput
from .lora import LoraConfig
from .mixlora import SharedLora

KEEP_KEY = "gamma_mod_keep"  # routing extras: (batch, seq) bool, tokens every MoD block must process
NORMS = ("input_layernorm", "ln_1")  # the block's input norm the router reads (Llama family, GPT-2)
ATTENTIONS = ("self_attn", "attn")


def block_norm(module: nn.Module) -> nn.Module | None:
    for name in NORMS:
        norm = getattr(module, name, None)
        if isinstance(norm, nn.Module) and isinstance(getattr(norm, "weight", None), torch.Tensor):
            return norm
    return None


def describe_block(module: nn.Module) -> LayerInfo | None:
    """A transformer block ("block" kind): an input norm, an attention and an ``mlp`` submodule."""
    norm = block_norm(module)
    if norm is None or getattr(module, "mlp", None) is None or not any(hasattr(module, a) for a in ATTENTIONS):
        return None
    d = norm.weight.shape[0]
    return LayerInfo("block", d, d, False)


register_layer_kind(describe_block)


@dataclass
class GammaModConfig(AdapterConfig):
    """γ-MoD over LoRA.

    - ``target_modules``: the LoRA targets (PEFT's forms; None: the architecture's default). They are resolved
      to module paths and the decoder blocks are added when the adapter is added.
    - ``r``, ``lora_alpha``, ``lora_dropout``: the LoRA on those modules.
    - ``mod_layers``: indices of the blocks that become MoD blocks (None: chosen by ARank at init).
    - ``num_mod_layers``: how many blocks ARank converts (None: half of them, at least one).
    - ``capacity_factor``: share of a sequence's routable tokens a MoD block processes, in (0, 1].
    - ``router_aux_loss_coef``: weight of the router's cross-entropy loss.
    """

    target_modules: list[str] | str | None = None
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    mod_layers: list[int] | None = None
    num_mod_layers: int | None = None
    capacity_factor: float = 0.5
    router_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ConfigError(f"GammaModConfig.r must be a positive integer, got {self.r}.")
        if not 0.0 < self.capacity_factor <= 1.0:
            raise ConfigError(f"GammaModConfig.capacity_factor must be in (0, 1], got {self.capacity_factor}.")
        if self.num_mod_layers is not None and self.num_mod_layers <= 0:
            raise ConfigError(f"GammaModConfig.num_mod_layers must be positive or None, got {self.num_mod_layers}.")
        if self.mod_layers is not None and any(i < 0 for i in self.mod_layers):
            raise ConfigError(f"GammaModConfig.mod_layers must be non-negative block indices, got {self.mod_layers}.")
        if self.router_aux_loss_coef < 0:
            raise ConfigError("GammaModConfig.router_aux_loss_coef must be >= 0.")


# -- the MoD block --------------------------------------------------------------------------------------------
class GammaModBlock(MixtureDelta):
    """One decoder block's γ-MoD wrapper. Routes (``enabled``) or passes through to the host block.

    The shared router is a submodule of block 0's wrapper (so it is saved once, as ``<block 0>.router.weight``);
    the other wrappers hold a plain reference to it.
    """

    layer_kinds = ("block",)
    replaces_base = True

    def __init__(self, info: LayerInfo, base_layer: nn.Module, index: int, config: GammaModConfig,
                 router: nn.Linear | None):
        super().__init__(info, 2)  # two "experts": skip (0) and keep (1)
        self.index = index
        self.enabled = config.mod_layers is not None and index in config.mod_layers
        self.capacity_factor = config.capacity_factor
        if router is None:
            self.router = nn.Linear(info.in_features, 2, bias=False)
            router = self.router
        object.__setattr__(self, "shared_router", router)  # not a submodule: saved with its owner only
        self._params = list(inspect.signature(base_layer.forward).parameters)

    def route(self, x: torch.Tensor, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, RouterOutput]:
        """(kept indices (B, K) ascending, keep probabilities (B, K), router output over all B·T tokens)."""
        batch, seq = x.shape[:2]
        router = self.shared_router
        logits = F.linear(block_norm(base_layer)(x).float(), router.weight.float()).reshape(batch * seq, 2)
        probs = torch.softmax(logits, -1)
        score = probs[:, 1].detach().view(batch, seq)
        real = token_mask_for(batch * seq)
        real = torch.ones(batch, seq, dtype=torch.bool, device=x.device) if real is None else real.view(batch, seq)
        ctx = current_routing()
        keep = None if ctx is None else ctx.extras.get(KEEP_KEY)
        keep = torch.zeros_like(real) if keep is None else keep.to(device=x.device, dtype=torch.bool).view(batch, seq) & real
        score = (score + keep.float()).masked_fill(~real, -1.0)  # official: topk(r + mask); padding goes last
        routable = real.sum(1) - keep.sum(1)
        k = int((keep.sum(1) + torch.ceil(self.capacity_factor * routable.float()).long()).max().clamp_min(1))
        index = score.topk(k, dim=1).indices.sort(dim=1).values  # (B, K), in sequence order
        chosen = torch.zeros(batch, seq, dtype=torch.bool, device=x.device).scatter(1, index, True).view(-1)
        selected = torch.stack([~chosen, chosen], -1)
        out = RouterOutput(logits=logits, probs=probs, weights=probs * selected, selected=selected)
        return index, probs[:, 1].view(batch, seq).gather(1, index), out

    def _gather_args(self, bound: dict[str, Any], index: torch.Tensor, seq: int) -> dict[str, Any]:
        """The block's arguments for the kept tokens only: masks, positions and rotary embeddings gathered."""
        batch, k = index.shape

        def along(t: torch.Tensor, dim: int) -> torch.Tensor:
            t = t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t
            shape = [1] * t.dim()
            shape[0], shape[dim] = batch, k
            idx = index.view(*shape).expand(*[s if i != dim else k for i, s in enumerate(t.shape)])
            return t.gather(dim, idx)

        out = dict(bound)
        for name, value in bound.items():
            if name in ("cache", "past_key_values", "past_key_value", "layer_past"):
                # A cache made for a plain forward is left alone (the kept tokens are not written to it); one that
                # already holds tokens means incremental decoding, which per-sequence routing cannot follow.
                positions = bound.get("position_ids")
                decoding = getattr(value, "get_seq_length", lambda i: 0)(self.index) > 0 or (
                    isinstance(positions, torch.Tensor) and positions.numel() and int(positions.min()) > 0)
                if value is not None and decoding:
                    raise AdapterError("γ-MoD routes every sequence anew and cannot decode from a KV cache: call "
                                       "model.generate(..., use_cache=False) (lorakit's generate does).")
                out[name] = None
            elif name == "attention_mask" and isinstance(value, torch.Tensor) and value.dim() == 4:
                out[name] = along(along(value, 2), 3)
            elif name == "position_ids" and isinstance(value, torch.Tensor) and value.shape[-1] == seq:
                out[name] = along(value, value.dim() - 1)
            elif name == "position_embeddings" and isinstance(value, tuple):
                out[name] = tuple(along(v, 1) for v in value)
            elif name == "cache_position":
                out[name] = None
        return out

    def full_forward(self, x: torch.Tensor, base_layer: nn.Module, *args, **kwargs):
        if not self.enabled:
            return base_layer(x, *args, **kwargs)
        batch, seq, d = x.shape
        index, weight, routed = self.route(x, base_layer)
        self.observe(routed, x.shape)
        bound = dict(zip(self._params[1:], args))
        bound.update(kwargs)
        idx = index.unsqueeze(-1).expand(batch, index.shape[1], d)
        kept = x.gather(1, idx)  # (B, K, d)
        # Official line 173: r weights the MLP branch only, h1 = h + Attn(h), h' = h1 + r·MLP(h1); a hook on the
        # host's mlp applies it, so the block still runs through its own forward.
        scale = weight.unsqueeze(-1)  # (B, K, 1)
        handle = base_layer.mlp.register_forward_hook(lambda module, args, output: _scaled(output, scale))
        try:
            out = base_layer(kept, **self._gather_args(bound, index, seq))
        finally:
            handle.remove()
        new = out[0] if isinstance(out, tuple) else out
        hidden = x.scatter(1, idx, new)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.full_forward(x, base_layer) - base_out


def _scaled(output, scale: torch.Tensor):
    """An mlp's output (a tensor, or a tuple whose first item is the hidden states) times the keep weights."""
    if isinstance(output, tuple):
        return (output[0] * scale.to(output[0].dtype), *output[1:])
    return output * scale.to(output.dtype)


# -- building ---------------------------------------------------------------------------------------------
def decoder_block_paths(model: nn.Module) -> list[str]:
    """Host paths of the decoder blocks, in order (``model.layers.0`` …, GPT-2 ``transformer.h.0`` …)."""
    from ..core.targeting import iter_host_modules
    from ..quantize.model import decoder_blocks

    blocks = decoder_blocks(model)
    path = next(name for name, module in model.named_modules() if module is blocks)
    host = dict(iter_host_modules(model))
    return [f"{path}.{i}" for i in range(len(blocks)) if f"{path}.{i}" in host]


def prepare_gamma_mod(model: nn.Module, config: GammaModConfig) -> GammaModConfig:
    """The config with ``target_modules`` resolved to the LoRA targets' paths plus every decoder block."""
    from ..core.targeting import select_targets

    blocks = decoder_block_paths(model)
    if config.mod_layers is not None and any(i >= len(blocks) for i in config.mod_layers):
        raise ConfigError(f"GammaModConfig.mod_layers={config.mod_layers} names blocks this model lacks "
                          f"(it has {len(blocks)}, indices 0..{len(blocks) - 1}).")
    lora_only = dataclasses.replace(config, target_modules=config.target_modules if not isinstance(
        config.target_modules, list) else [t for t in config.target_modules if t not in blocks])
    targets = [p for p in select_targets(model, lora_only) if p not in blocks] if lora_only.target_modules != [] else []
    return dataclasses.replace(config, target_modules=targets + blocks)  # a fresh copy per adapter: its own router


def build_gamma_mod(base_layer: nn.Module, info: LayerInfo, config: GammaModConfig, path: str = ""):
    if info.kind != "block":
        return SharedLora(info, LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout))
    # Blocks are built in model order; the first one creates the router, the others share it. The prepared
    # config is this plan's own copy, so the router is never shared across adapters.
    shared = config.__dict__.get("_router")
    block = GammaModBlock(info, base_layer, int(path.rsplit(".", 1)[-1]), config, shared)
    if shared is None:
        config.__dict__["_router"] = block.router
    return block


def gamma_mod_blocks(model: nn.Module, name: str) -> list[GammaModBlock]:
    from ..mixtures.base import mixture_deltas

    return sorted((d for _, _, d in mixture_deltas(model, name) if isinstance(d, GammaModBlock)), key=lambda d: d.index)


def gamma_mod_extra_loss(model: nn.Module, name: str) -> torch.Tensor:
    """Σ over MoD blocks of CE(router logits, kept) × router_aux_loss_coef (official ``aux_loss``, one per block)."""
    from ..core.model import adapter_state

    def cross_entropy(probs, selected, mask):
        nll = -(torch.log(probs.clamp_min(1e-9)) * selected).sum(-1)  # -log p[target], target = kept
        return nll.mean() if mask is None else (nll * mask).sum() / mask.sum().clamp_min(1)

    coef = adapter_state(model).configs[name].router_aux_loss_coef
    return router_loss(model, name, cross_entropy, coef, group=lambda path: path)


# -- ARank ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_ranks(model: nn.Module, batches: list[dict]) -> list[float]:
    """ARank per decoder block: mean over heads, rows and batches of ``rank(tril(A) with a zero diagonal)`` of the
    attention map A over each row's real tokens (official ``compute_attention_rank``). Runs eager attention."""
    before = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    sums: list[float] = []
    count = 0
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            out = model(input_ids=batch["input_ids"], attention_mask=mask, output_attentions=True, use_cache=False)
            for row in range(batch["input_ids"].shape[0]):
                real = torch.arange(batch["input_ids"].shape[1], device=batch["input_ids"].device)
                real = real if mask is None else real[mask[row].bool()]
                n = real.numel()
                keep = torch.tril(torch.ones(n, n, device=real.device), diagonal=-1)  # causal part, diagonal removed
                for layer, att in enumerate(out.attentions):
                    a = att[row][:, real][:, :, real].float() * keep  # (heads, n, n)
                    rank = torch.linalg.matrix_rank(a).float().mean().item()
                    if layer == len(sums):
                        sums.append(0.0)
                    sums[layer] += rank
                count += 1
    finally:
        if before is not None:
            model.set_attn_implementation(before)
    return [s / max(count, 1) for s in sums]


def gamma_mod_init(model: nn.Module, name: str, batches: list[dict]) -> None:
    """Pick the MoD blocks by ARank (lowest first) when the config names none; records them in the config."""
    from ..core.model import adapter_state

    config = adapter_state(model).configs[name]
    if config.mod_layers is not None:
        return
    if not batches:
        raise AdapterError("γ-MoD needs batches to compute ARank (or set GammaModConfig.mod_layers).")
    ranks = attention_ranks(model, batches)
    n = config.num_mod_layers or max(len(ranks) // 2, 1)
    chosen = sorted(sorted(range(len(ranks)), key=lambda i: (ranks[i], -i))[:n])
    config.mod_layers = chosen
    config.__dict__["aranks"] = ranks
    for block in gamma_mod_blocks(model, name):
        block.enabled = block.index in chosen


# -- compute accounting --------------------------------------------------------------------------------------
def flops_per_token(model: nn.Module, seq_len: int, keep: dict[int, float] | None = None) -> float:
    """Forward FLOPs per token of the decoder blocks (+ the output head) for sequences of ``seq_len`` tokens.

    Per block: 2·(weights of its linear layers) + 2·seq_len·hidden for the attention scores and values (causal,
    on average half the sequence, twice). A MoD block keeping a share f of the tokens costs f of the linear part,
    f² of the attention part (f·seq_len tokens attend among themselves) and 2·2·hidden for the router on all
    tokens (official ``cal_flops.py`` counts the same terms for LLaVA). ``keep`` maps block index -> f."""
    from ..core.delta import Conv1D
    from ..quantize.model import decoder_blocks

    keep = keep or {}
    linear = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)
    hidden = model.config.hidden_size
    total = 0.0
    for i, block in enumerate(decoder_blocks(model)):
        dense = 2.0 * sum(m.weight.numel() for m in block.modules() if isinstance(m, linear))
        attention = 2.0 * seq_len * hidden
        f = keep.get(i)
        total += dense + attention if f is None else f * dense + f * f * attention + 4.0 * hidden
    head = model.get_output_embeddings()
    return total + 2.0 * head.weight.numel()


def keep_fractions(model: nn.Module, name: str) -> dict[int, float]:
    """Share of the real tokens each routing MoD block kept since the last ``reset_router_stats``."""
    return {b.index: float(b.stat_load[1] / b.stat_tokens) for b in gamma_mod_blocks(model, name)
            if b.enabled and float(b.stat_tokens) > 0}


register_method(
    "gamma_mod", config=GammaModConfig, build=build_gamma_mod, layer_kinds=("linear", "block"),
    prepare=prepare_gamma_mod, init=gamma_mod_init, extra_loss=gamma_mod_extra_loss, mergeable=False,
    zero_init=False, generate_kwargs={"use_cache": False},
    description="γ-MoD: LoRA plus mixture-of-depth blocks chosen by attention-map rank; a shared router skips tokens.",
    paper="Luo et al. 2024, arXiv:2410.13859",
    variants={"gamma_mod": {"r": 4, "mod_layers": [1]}},
)
