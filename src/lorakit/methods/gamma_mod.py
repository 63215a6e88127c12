"""γ-MoD — "γ-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language Models", Luo et al.,
arXiv:2410.13859; official code github.com/Yaxin9Luo/Gamma-MOD (``gamma_mod/model/language_model/llava_llama_mod.py``,
cited below as ``mod.py``; ARank in ``llava_llama.py``).

Dense transformer blocks become mixture-of-depth (MoD) blocks that only a share of the tokens go through; the others
skip the block (their hidden state passes unchanged), and the model is fine-tuned with LoRA:

- **ARank** chooses the blocks: the rank of each head's attention map, causal part with the diagonal removed,
  averaged over heads (``llava_llama.py`` ``compute_attention_rank``, l. 48-73); the paper uses it to "identify
  which layer is redundant and should be replaced with the MoD layer" (abstract; its method section was not
  available when this was written, so the rule below is the code's). The official code fixes the outcome as
  ``mod_mode="arank_mod"`` (``mod.py`` l. 554-558, the mode of the released fine-tuning scripts
  ``scripts/v1_5/fine_tune_mod.sh``): every block but the first three and the last becomes a MoD block.
  Here: blocks ``dense_first_layers`` (3) .. ``n − dense_last_layers`` (n − 1) are eligible, and ARank (on the
  training loop's first batches) picks the ``num_mod_layers`` of lowest ARank among them; ``num_mod_layers=None``
  takes every eligible block, i.e. exactly the official rule. Choice between paper and code: the paper ranks blocks
  by ARank; the code hard-codes where that ranking put the dense blocks on LLaVA. An unrestricted lowest-ARank
  choice picks the first blocks on small text models (the bundled base: blocks 0-2), which the official rule
  never converts and which breaks the model (benchmarks/gamma_mod.md), so the code's positions bound the choice.
- **Shared router**: ONE ``Linear(d, 2, bias=False)`` for every MoD block, applied to each block's input norm
  (``router(input_layernorm(h))``); a token's keep probability is ``r = softmax(logits)[1]`` (``mod.py`` l. 141-142,
  one router for all blocks l. 564-568).
- **Routing in training**: per sequence the ``k`` tokens of highest r are kept; the block runs on them alone, its
  MLP branch weighted by r (l. 160-175: ``h1 = h + Attn(LN1(h))``, ``h' = h1 + r·MLP(LN2(h1))`` on kept tokens,
  ``h' = h`` on the others), so the task loss trains the router.
- **Masked routing learning**: tokens named by a mask are always kept (``topk(r + mask)``, l. 143-153), and
  ``capacity_factor`` of the others (``top_k = ceil(T·(1 − 0.5·n_routable/T))``: half the routable tokens).
  Officially the mask is every token after the 1024 image + 35 system-instruction tokens, i.e. the question and
  the answer; only the image/instruction prefix is routed. Text examples have no such split: a prompt is
  instruction and question in one. Here the always-kept tokens are the answer (completion) tokens, which
  lorakit's training loop offers every method as the ``SUPERVISED_KEY`` routing extra (``keep_supervised=True``),
  plus the token before each of them (the last prompt token's output predicts the first answer token; under the
  official mask, which covers the whole question, that token is always processed), and any ``routing(extras={"gamma_mod_keep": (batch, seq) bool})`` a caller gives (e.g. a question span); the
  prompt is routed. Keeping the whole prompt as well would leave nothing to route.
- **Routing at inference** (module not training; ``MoDLlamaDecoderLayer_forward_inference``, l. 188-280, the
  forward of ``EvalMoDLLaVALlamaForCausalLM`` that ``model/builder.py`` loads for evaluation): a forward of several
  tokens (prefill) keeps every token with ``r > inference_threshold`` (0.005, l. 224-233), no top-k, no mask; a
  single decoded token skips the block when ``r < decode_threshold`` (0.5, l. 216-222) and is processed otherwise
  (the Mini-Gemini variant, ``MGM/.../mod_mgm_llama.py`` l. 253-262, comments that skip out: ``decode_threshold=0``).
  ``inference_threshold=None`` uses the training top-k at inference too.
- **Router loss**: per MoD block the cross-entropy of the 2-way router logits against "kept" targets (l. 181-184),
  summed over blocks, × ``router_aux_loss_coef`` (0.01, l. 488).

Choices where this differs from the official code (which edits LLaVA's Llama classes):
- Host blocks are called whole, through the block's own forward (hooks/wrappers only); r reaches the MLP branch
  through a forward hook on the block's ``mlp`` (for GPT-2 blocks after the MLP's own dropout);
- kept tokens keep their own positions (rotary embeddings, mask entries are gathered), where the official code
  renumbers them 0..k−1;
- batches: the official inference handles one sequence; here each row keeps its own tokens (rows are gathered to
  the largest count; the extra "filler" tokens are masked out as keys and left unchanged). Padding (the routing
  context's ``token_mask``, else read from the host's attention mask) is never kept nor counted as routable, in
  training and at inference alike, so a padded row routes as the row alone;
- KV cache: officially a MoD layer's cache holds only the tokens it processed. Here every layer's cache keeps the
  model's length (the model reads its length from layer 0): a skipped token leaves a zero key/value slot that this
  block masks out, so decoding reads the same keys and values as the official cache, but the memory is not
  saved. Which slots are empty is read from the cache (all-zero keys), so beam search's reordering carries it;
- ARank is computed on every row of the init batches over their real tokens (official: row 0 of one sample).

The LoRA part is plain LoRA on ``target_modules``; every decoder block gets a wrapper (so ARank can pick any) that
only routes when its index is in ``mod_layers``. The chosen blocks are recorded in the config, so the saved adapter
reloads with the same blocks.
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

from ..core.config import AdapterConfig, check_non_negative, check_positive_ints, check_range, field_error
from ..core.delta import LayerInfo, register_layer_kind
from ..core.errors import AdapterError, AdapterLoadError, ConfigError
from ..core.registry import register_method
from ..core.routing import SUPERVISED_KEY, current_routing
from ..mixtures.base import MixtureDelta, router_loss, token_mask_for
from ..mixtures.router import RouterOutput
from ._gamma_mod_kv import CACHES, gather_args, real_tokens, slot_history, write_empty_slots
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
    - ``mod_layers``: indices of the blocks that become MoD blocks (None: chosen by ARank at init, below).
    - ``dense_first_layers``: how many first blocks ARank never converts (official ``arank_mod``: 3).
    - ``dense_last_layers``: how many last blocks ARank never converts (official ``arank_mod``: 1).
    - ``num_mod_layers``: how many of the other blocks ARank converts, lowest ARank first (None: all of them).
    - ``capacity_factor``: share of a sequence's routable tokens a MoD block processes in training, in (0, 1].
    - ``keep_supervised``: always keep, in training, the tokens of the training loop's supervised mask (the answer
      tokens) and the token before each of them (whose output is scored for it).
    - ``inference_threshold``: out of training, a multi-token forward keeps the tokens with r above it (official
      0.005); None: the training top-k.
    - ``decode_threshold``: out of training, a single decoded token is processed when r >= it (official 0.5; 0:
      every decoded token is processed). Used with ``inference_threshold`` only.
    - ``router_aux_loss_coef``: weight of the router's cross-entropy loss.

    Raises ConfigError for values out of range, an empty ``mod_layers`` and a block named twice in it.
    """

    target_modules: list[str] | str | None = None
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    mod_layers: list[int] | None = None
    dense_first_layers: int = 3
    dense_last_layers: int = 1
    num_mod_layers: int | None = None
    capacity_factor: float = 0.5
    keep_supervised: bool = True
    inference_threshold: float | None = 0.005
    decode_threshold: float = 0.5
    router_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "r")
        check_range(self, "capacity_factor", 0, 1, low_open=True)
        check_positive_ints(self, "num_mod_layers", optional=True)
        if self.mod_layers is not None and not len(self.mod_layers):  # no MoD block: a plain LoRA with an idle router
            raise field_error(self, "mod_layers", "=[] converts no block; name at least one block, or leave it None "
                                                  "for ARank's choice.")
        if self.mod_layers is not None and any(i < 0 for i in self.mod_layers):
            raise field_error(self, "mod_layers", f" must be non-negative block indices, got {self.mod_layers}.")
        if self.mod_layers is not None and len(set(self.mod_layers)) != len(self.mod_layers):
            repeated = sorted({i for i in self.mod_layers if list(self.mod_layers).count(i) > 1})
            raise field_error(self, "mod_layers", f"={list(self.mod_layers)} names block(s) {repeated} more than "
                                                  "once; list each MoD block once.")
        if self.mod_layers is not None and self.num_mod_layers is not None and \
                len(self.mod_layers) != self.num_mod_layers:  # (ARank's saved choice has exactly num_mod_layers)
            raise field_error(self, "num_mod_layers", f"={self.num_mod_layers} with mod_layers={list(self.mod_layers)}: "
                                                      "mod_layers sets the blocks by hand and ARank does not run, so "
                                                      "num_mod_layers would be ignored; give one of them.")
        check_non_negative(self, "dense_first_layers", "dense_last_layers")
        check_range(self, "inference_threshold", 0, 1, high_open=True, note=" or None (training top-k)")
        check_range(self, "decode_threshold", 0, 1)
        check_non_negative(self, "router_aux_loss_coef", finite=True)


def eligible_blocks(num_blocks: int, config: GammaModConfig) -> list[int]:
    """Blocks ARank may convert: all but the first ``dense_first_layers`` and the last ``dense_last_layers``
    (official ``arank_mod``, ``mod.py`` l. 554-558, with 3 and 1)."""
    return list(range(config.dense_first_layers, num_blocks - config.dense_last_layers))


def _check_num_mod_layers(config: GammaModConfig, num_blocks: int) -> int:
    """How many blocks ARank converts; ConfigError when ``num_mod_layers`` asks for more than are eligible."""
    eligible = eligible_blocks(num_blocks, config)
    n = len(eligible) if config.num_mod_layers is None else config.num_mod_layers
    if n > len(eligible):
        raise ConfigError(f"GammaModConfig.num_mod_layers={n}, but only blocks {eligible} of this {num_blocks}-block "
                          f"model may be converted (dense_first_layers={config.dense_first_layers}, dense_last_layers="
                          f"{config.dense_last_layers}); lower num_mod_layers or those, or set mod_layers.")
    return n


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
        # saved with the adapter: the record of the blocks the router was trained to route, which load checks a
        # hand-edited mod_layers against (gamma_mod_check_file)
        self.register_buffer("mod_block", torch.zeros((), dtype=torch.uint8))
        self.enabled = config.mod_layers is not None and index in config.mod_layers
        self.capacity_factor = config.capacity_factor
        self.keep_supervised = config.keep_supervised
        self.inference_threshold = config.inference_threshold
        self.decode_threshold = config.decode_threshold
        if router is None:
            self.router = nn.Linear(info.in_features, 2, bias=False)
            router = self.router
        object.__setattr__(self, "shared_router", router)  # not a submodule: saved with its owner only
        self._params = list(inspect.signature(base_layer.forward).parameters)

    @property
    def enabled(self) -> bool:
        """Whether this block routes (its index is in ``mod_layers``); a Python bool, read without a device sync."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self.mod_block.fill_(int(value))

    def _always_kept(self, batch: int, seq: int, device: torch.device, decoding: bool) -> torch.Tensor:
        """(B, T) bool: the caller's ``gamma_mod_keep`` mask, | when ``keep_supervised`` and training the supervised
        tokens and the token before each of them, whose output is scored for it (the official mask, mod.py l. 147-150,
        is 1 on the whole question + answer, so the last question token, which predicts the first answer token, is
        always processed; here the prompt is routed, so that predicting position is added explicitly). The official
        inference forward has no mask: an evaluation forward with labels, such as Trainer's eval loss, routes as
        generation does."""
        ctx = current_routing()
        keep = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        for key in (KEEP_KEY, SUPERVISED_KEY if self.keep_supervised and self.training else None):
            mask = None if ctx is None or key is None else ctx.extras.get(key)
            if not isinstance(mask, torch.Tensor):
                continue
            if mask.shape != (batch, seq):
                if decoding:  # a prompt-shaped mask while generating: the decoded tokens have none
                    continue
                raise AdapterError(f"routing extras {key!r} has shape {tuple(mask.shape)}; γ-MoD needs (batch, seq) "
                                   f"= {(batch, seq)}, one bool per token.")
            mask = mask.to(device=device, dtype=torch.bool)
            if key == SUPERVISED_KEY:  # labels are unshifted: position t - 1's logits are scored for token t
                mask = mask | F.pad(mask[:, 1:], (0, 1), value=False)
            keep |= mask
        return keep

    def route(self, x: torch.Tensor, base_layer: nn.Module, decoding: bool, real: torch.Tensor | None = None):
        """(kept indices (B, K) ascending, their keep probabilities (B, K), which of them are really kept (B, K)
        bool — the others are fillers of rows that keep fewer than K —, router output over all B·T tokens).
        ``real`` ((B, T) bool): the non-padding tokens when the routing context has no token mask (read from the
        host's attention mask by ``full_forward``); padding is never kept nor counted as routable."""
        batch, seq = x.shape[:2]
        logits = F.linear(block_norm(base_layer)(x).float(), self.shared_router.weight.float()).reshape(batch * seq, 2)
        probs = torch.softmax(logits, -1)
        r = probs[:, 1].detach().view(batch, seq)
        given = token_mask_for(batch * seq)
        if given is not None:
            real = given.view(batch, seq)
        elif real is None:
            real = torch.ones(batch, seq, dtype=torch.bool, device=x.device)
        keep = self._always_kept(batch, seq, x.device, decoding) & real
        if self.training or self.inference_threshold is None:
            # Training (mod.py l. 143-154): top-k of r + mask, k = kept-mask count + capacity · routable tokens
            # (padding is neither: it scores last).
            score = (r + keep.float()).masked_fill(~real, -1.0)
            routable = real.sum(1) - keep.sum(1)
            k_rows = keep.sum(1) + torch.ceil(self.capacity_factor * routable.float()).long()  # (B,)
            if self.training:
                # One k for the batch, as the official training's one top_k (l. 149): a short row's extra picks keep
                # more of its tokens, then padding (gathered only to fill, and masked as a key by the host's mask).
                k = int(k_rows.max().clamp_min(1))
                index = score.topk(k, dim=1).indices.sort(dim=1).values  # (B, K), in sequence order
                chosen = torch.zeros_like(real).scatter(1, index, True)
            else:
                # The training top-k at inference: the official inference runs one sequence, so each row keeps its
                # own k of its real tokens (a left-padded row routes as the row alone); fillers as below.
                rank = score.argsort(dim=1, descending=True).argsort(dim=1)  # (B, T): 0 = highest score
                chosen = (rank < k_rows[:, None]) & real
                k = max(int(chosen.sum(1).max()), 1)
                index = (chosen.float() * 2 + r).topk(k, dim=1).indices.sort(dim=1).values
        else:
            # Inference (mod.py l. 216, 225): a decoded token is kept when r >= 0.5, prefill tokens when r > 0.005.
            above = r >= self.decode_threshold if decoding else r > self.inference_threshold
            chosen = (above | keep) & real
            k = max(int(chosen.sum(1).max()), 1)
            index = (chosen.float() * 2 + r).topk(k, dim=1).indices.sort(dim=1).values  # chosen first, then fillers
        selected = torch.stack([~chosen & real, chosen], -1).view(-1, 2)  # padding: neither (not counted)
        out = RouterOutput(logits=logits, probs=probs, weights=probs * selected, selected=selected)
        return index, probs[:, 1].view(batch, seq).gather(1, index), chosen.gather(1, index), out

    def full_forward(self, x: torch.Tensor, base_layer: nn.Module, *args, **kwargs):
        if not self.enabled:
            return base_layer(x, *args, **kwargs)
        batch, seq, d = x.shape
        bound = dict(zip(self._params[1:], args))
        bound.update(kwargs)
        cache_name = next((n for n in CACHES if bound.get(n) is not None), None)
        cache = bound.get(cache_name) if cache_name else None
        attention = next(getattr(base_layer, a) for a in ATTENTIONS if hasattr(base_layer, a))
        layer_idx = getattr(attention, "layer_idx", None)
        layer_idx = self.index if layer_idx is None else layer_idx
        past = int(cache.get_seq_length(layer_idx)) if cache is not None else 0
        positions = bound.get("position_ids")
        if self.training and cache is not None and (past > 0 or (
                isinstance(positions, torch.Tensor) and positions.numel() and int(positions.min()) > 0)):
            raise AdapterError("γ-MoD routes by top-k in training and cannot decode from a KV cache there: call "
                               "model.eval() before generating.")
        decoding = not self.training and seq == 1
        index, weight, kept, routed = self.route(x, base_layer, decoding, real_tokens(bound.get("attention_mask"),
                                                                                      batch, seq, past))
        self.observe(routed, x.shape)
        if self.training:
            cache = None  # the kept tokens are not written to a cache made for a training forward
        slots = None
        if cache is not None:
            chosen = torch.zeros(batch, seq, dtype=torch.bool, device=x.device).scatter(1, index, kept)
            slots = torch.cat([slot_history(cache, layer_idx, batch, past, x.device), chosen], 1)  # (B, past + T)
            if not bool(kept.any()) and past > 0:  # every row skips this token (mod.py l. 216-222)
                write_empty_slots(cache, layer_idx, seq)
                return x
        elif not bool(kept.any()):
            return x
        idx = index.unsqueeze(-1).expand(batch, index.shape[1], d)
        gathered = x.gather(1, idx)  # (B, K, d)
        # Official line 173: r weights the MLP branch only, h1 = h + Attn(h), h' = h1 + r·MLP(h1); a hook on the
        # host's mlp applies it, so the block still runs through its own forward.
        out = _run_scaled(base_layer, gathered, weight.unsqueeze(-1),  # scale (B, K, 1)
                          gather_args(self._params, bound, index, kept, seq, cache_name, cache, past, slots, x.dtype))
        new = out[0] if isinstance(out, tuple) else out
        new = torch.where(kept.unsqueeze(-1), new, gathered)  # fillers stay as they were
        hidden = x.scatter(1, idx, new)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.full_forward(x, base_layer) - base_out


def _run_scaled(base_layer: nn.Module, hidden: torch.Tensor, scale: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    """``base_layer(hidden, **kwargs)`` with its MLP's output multiplied by ``scale`` (a forward hook on
    ``base_layer.mlp``, registered for this call only).

    Under activation checkpointing (the block's transformers / diffusers ``gradient_checkpointing`` flag, training,
    grad enabled) the checkpoint is taken here, around the hooked call, with the block's own checkpoint function:
    the recompute in backward then runs with the hook too. Left to the block, its checkpoint would wrap the block's
    forward alone and recompute it after the hook was gone (torch's CheckpointError, or unscaled activations)."""

    def run(h: torch.Tensor) -> Any:
        handle = base_layer.mlp.register_forward_hook(lambda module, args, output: _scaled(output, scale))
        try:
            return base_layer(h, **kwargs)
        finally:
            handle.remove()

    checkpoint = base_layer.__dict__.get("_gradient_checkpointing_func")
    if not (checkpoint is not None and base_layer.__dict__.get("gradient_checkpointing") is True
            and base_layer.training and torch.is_grad_enabled()):
        return run(hidden)

    def run_unchecked(h: torch.Tensor) -> Any:  # the block must not checkpoint itself again inside
        base_layer.gradient_checkpointing = False
        try:
            return run(h)
        finally:
            base_layer.gradient_checkpointing = True

    return checkpoint(run_unchecked, hidden)


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
    if config.mod_layers is None and not eligible_blocks(len(blocks), config):
        raise ConfigError(f"γ-MoD converts no block of this {len(blocks)}-block model: dense_first_layers="
                          f"{config.dense_first_layers} and dense_last_layers={config.dense_last_layers} keep them all "
                          "dense (the official arank_mod rule); lower those or set mod_layers.")
    if config.mod_layers is None:
        _check_num_mod_layers(config, len(blocks))
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


def gamma_mod_check_file(config: GammaModConfig, tensors: dict[str, torch.Tensor]) -> None:
    """``Method.check_file``: the config's ``mod_layers`` must be the blocks the saved adapter routed (its blocks'
    ``mod_block`` flags), so a hand-edited list does not silently route blocks the router and LoRA were not trained
    on, or stop routing ones they were. A file without the flags (written before them) is not checked."""
    flags = {int(k.rsplit(".", 2)[-2]): int(v) for k, v in tensors.items() if k.endswith(".mod_block")}
    if not flags:
        return
    saved = sorted(i for i, f in flags.items() if f)
    wanted = sorted(config.mod_layers or [])
    if saved != wanted:
        raise AdapterLoadError(f"adapter_config.json has mod_layers={config.mod_layers}, but the saved adapter routed "
                               f"blocks {saved} (its tensors *.mod_block): the router and LoRA were trained with those. "
                               f"Set mod_layers={saved}, or train an adapter for the blocks you want.")


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
    """When the config names no blocks: ARank on ``batches``, then the ``num_mod_layers`` eligible blocks of lowest
    ARank (all eligible ones by default: the official ``arank_mod`` rule) become MoD blocks; the choice and the
    ranks are recorded in the config. Raises AdapterError without batches, ConfigError when fewer blocks are
    eligible than ``num_mod_layers`` asks for."""
    from ..core.model import adapter_state

    config = adapter_state(model).configs[name]
    if config.mod_layers is not None:
        return
    if not batches:
        raise AdapterError("γ-MoD needs batches to compute ARank (or set GammaModConfig.mod_layers).")
    ranks = attention_ranks(model, batches)
    eligible = eligible_blocks(len(ranks), config)
    n = _check_num_mod_layers(config, len(ranks))
    chosen = sorted(sorted(eligible, key=lambda i: (ranks[i], -i))[:n])
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
    check_file=gamma_mod_check_file, optional_keys=("mod_block",),
    zero_init=False,
    description="γ-MoD: LoRA plus mixture-of-depth blocks chosen by attention-map rank; a shared router skips tokens.",
    paper="Luo et al. 2024, arXiv:2410.13859",
    # Block 1 routes on the 2-block contract models; on a full model the defaults apply (ARank among the blocks of
    # the official arank_mod rule), at the benchmark's r like every other method.
    variants={"gamma_mod": {"r": 4, "mod_layers": [1]}},
    bench_variants={"gamma_mod": {}},
)
