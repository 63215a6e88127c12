"""Trainable token rows: train only some rows of an embedding (e.g. newly added special tokens), beside LoRA.

Source: HF PEFT's TrainableTokens (peft/tuners/trainable_tokens/layer.py, PEFT 0.21.2, ``update_layer`` and
``forward_adapters``), used through ``LoraConfig.trainable_token_indices`` (peft/utils/other.py
``set_additional_trainable_modules``). For token indices ``I = (i_1..i_k)`` and trained rows ``V`` (k, dim),
initialised to ``E[I]`` so that an untrained adapter is the base:

    E'[t] = V[j] if t = i_j else E[t]          embedding output for token t: E'[t] (× the layer's embed_scale)

A row *replacement*, not an addition: PEFT writes V into the weight (``index_copy``), so a re-initialised new
token row does not leak into the result. The rows are looked up with the embedding's own options, as PEFT's
``F.embedding(x, W', ...)``: padding_idx, max_norm, scale_grad_by_freq (``sparse`` concerns the frozen weight's
gradient; the rows get a dense one). An output head tied to the embedding (``lm_head.weight is
embed_tokens.weight``) follows the same rows, as PEFT's tied TrainableTokensWrapper: logits for ``i_j`` are
``h · V[j]ᵀ`` (+ the head's bias, which output heads lack; PEFT's unmerged ``F.linear(x, W')`` drops it, its
merge keeps it: lorakit keeps it in both). In lorakit both are deltas on their host layer (``TokenRows``), the head's holding no tensor of its own; merging writes ``V`` into the
weight, and since the tied twins need the same rows the tie is kept. A tied head named without its embedding
changes only its logits, as PEFT ties only to a wrapped input embedding; merging gives it a private weight.

Files (PEFT's keys): ``<embedding path>.token_adapter.trainable_tokens_delta`` (k, dim); the indices are in the
config; a tied head saves nothing.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import (Delta, LayerInfo, MergeTerms, describe_layer, embedding_scaled, is_quantized,
                          oriented_weight)
from ..core.errors import FIELD as MARK
from ..core.errors import ConfigError, TargetError, near_matches
from ..core.layer import AdapterLayer
from ..core.model import tied_parameters
from ..core.targeting import iter_host_modules

FIELD = "LoraConfig.trainable_token_indices"  # (ConfigErrors write MARK there: a command line words it as its flag)


class _TokenValues(nn.Module):
    """Holds the trained rows under PEFT's name, so the file key is ``...token_adapter.trainable_tokens_delta``."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.trainable_tokens_delta = nn.Parameter(values)  # (k, dim)


def token_major_weight(base_layer: nn.Module, info: LayerInfo) -> torch.Tensor:
    """The base weight as (vocab, dim): an nn.Embedding's stored weight, an output head's (out, in) weight."""
    w = oriented_weight(base_layer, info)  # (out, in): (dim, vocab) for an embedding, (vocab, dim) for a head
    return w.T if info.kind == "embedding" else w


class TokenRows(Delta):
    """Rows ``index`` of an embedding (or of a tied output head) replaced by ``values`` (k, dim).

    ``leader``: for a module sharing its weight with the embedding that owns the rows (a tied lm_head), that
    embedding's delta; this one then holds no parameter (it reads the leader's) and saves nothing.
    Shapes: ids (...,) -> (..., dim) for an embedding; hidden (..., dim) -> logits (..., vocab) for a head.
    """

    layer_kinds = ("embedding", "linear")
    merge_replaces = True
    keeps_tied_weights = True
    extra = True  # (beside LoRA's deltas: inits leave the rows as PEFT does, the base's own)

    def __init__(self, info: LayerInfo, indices: list[int], base_layer: nn.Module, leader: "TokenRows | None" = None):
        super().__init__(info)
        self.token_indices = list(indices)
        self._local_row = {t: j for j, t in enumerate(self.token_indices)}  # token -> its row of ``values``
        self._leader = [leader] if leader is not None else []  # a list: not a submodule, so not saved twice
        # on the CPU whatever device context builds this (a loader sizes deltas under torch.device("meta"))
        index = torch.tensor(self.token_indices, dtype=torch.long, device="cpu")
        if leader is None:
            with torch.no_grad():
                weight = token_major_weight(base_layer, info)
                rows = weight[index.to(weight.device)]
            self.token_adapter = _TokenValues(rows.detach().clone())  # init = the base rows: no-op until trained
        # Tokens find their row by binary search in the sorted indices, not in a table sized to the vocabulary, so
        # a vocabulary resized after attaching (its new ids above the table) needs nothing rebuilt here.
        order = index.argsort()
        self.register_buffer("index", index, persistent=False)  # (k,)
        self.register_buffer("sorted_index", index[order], persistent=False)  # (k,)
        self.register_buffer("sorted_row", order, persistent=False)  # (k,): row of ``values`` per sorted index

    @property
    def values(self) -> torch.Tensor:
        """The trained rows (k, dim), this delta's own or its leader's."""
        owner = self._leader[0] if self._leader else self
        return owner.token_adapter.trainable_tokens_delta

    def accumulate(self, acc: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module
                   ) -> torch.Tensor:
        # Replaced entries are the trained value plus what other adapters added there (acc - base_out; nothing when
        # this is the only one), so the result equals PEFT's F.embedding(ids, W') bit for bit.
        alone = acc is base_out
        if self.info.kind == "embedding":
            k = len(self.token_indices)
            pos = torch.searchsorted(self.sorted_index, x).clamp_max(k - 1)  # (...,)
            hit = self.sorted_index[pos] == x  # (...,): the token is one of the trained rows
            local = torch.where(hit, self.sorted_row[pos], k)  # (...,): its row of ``values``; k: no trained row
            values = self.values.to(base_out.dtype)  # (k, dim)
            table = torch.cat([values, values.new_zeros(1, values.shape[1])])  # (k + 1, dim): row k for the rest
            # The embedding's own lookup options on the trained rows, as PEFT's F.embedding(x, W', ...) applies them
            # (forward_adapters): no gradient at the padding row; rows renormed to max_norm (in place on this copy,
            # under no_grad, so the gradient passes unscaled); each row's gradient divided by its token's count in
            # the batch (scale_grad_by_freq: the counts of ``local`` are those of the tokens). ``sparse`` is for
            # the embedding's weight, which is frozen here: the (k, dim) rows get a dense gradient.
            pad = getattr(base_layer, "padding_idx", None)
            rows = F.embedding(local, table, padding_idx=self._local_row.get(pad),
                               max_norm=getattr(base_layer, "max_norm", None),
                               norm_type=getattr(base_layer, "norm_type", 2.0),
                               scale_grad_by_freq=getattr(base_layer, "scale_grad_by_freq", False))  # (..., dim)
            rows = embedding_scaled(rows, getattr(base_layer, "embed_scale", None))  # Gemma's, BioGPT's scale
            return torch.where(hit.unsqueeze(-1), rows if alone else rows + (acc - base_out), acc)
        # A head: only the k columns are computed (PEFT's F.linear(x, W') copies the whole (vocab, dim) weight)
        bias = getattr(base_layer, "bias", None)
        logits = F.linear(x.to(base_out.dtype), self.values.to(base_out.dtype),
                          None if bias is None else bias[self.index].to(base_out.dtype))  # (..., k)
        if not alone:
            logits = logits + (acc - base_out).index_select(-1, self.index)
        return acc.index_copy(acc.dim() - 1, self.index, logits)

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """A head with more input rows than its input size: ``F.linear(x, W')`` with the rows written into a copy of
        the weight (PEFT's way, peft/tuners/trainable_tokens/layer.py ``forward_adapters``) costs vocab·dim for the
        copy instead of rows·vocab for a copy of the logits. Otherwise None (base output, then the k columns)."""
        if self.info.kind != "linear" or is_quantized(base_layer) or x.numel() // x.shape[-1] <= x.shape[-1]:
            return None
        weight = base_layer.weight
        return F.linear(x, weight.index_copy(0, self.index, self.values.to(weight)), base_layer.bias)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The additive form ``E'(x) − E(x)`` (routing weights and per-row batches add deltas)."""
        return self.accumulate(base_out, x, base_out, base_layer) - base_out

    def merge_terms(self, base_weight: torch.Tensor) -> MergeTerms:
        if self._leader:
            return MergeTerms()  # the leader writes the shared weight
        values = self.values.detach().float()  # (k, dim)
        if self.info.kind == "embedding":  # merged weight is (dim, vocab): tokens are its columns
            return MergeTerms(replace=(1, self.index, values.T))
        return MergeTerms(replace=(0, self.index, values))

    def unmerge_terms(self) -> MergeTerms:
        return self.merge_terms(torch.empty(0))

    def conflict(self, other: Delta) -> str | None:
        """PEFT refuses token-row adapters with overlapping indices active together (peft/tuners/trainable_tokens/
        layer.py 0.21.2, ``_check_overlapping_tokens``, called by ``forward_adapters`` and ``merge``): one row
        cannot be replaced by two values, and their sum is no replacement."""
        if not isinstance(other, TokenRows):
            return None
        shared = sorted(set(self.token_indices) & set(other.token_indices))
        if not shared:
            return None
        more = f" (and {len(shared) - 10} more)" if len(shared) > 10 else ""
        return (f"both replace token rows {shared[:10]}{more}: one row cannot take two values (PEFT refuses "
                f"overlapping trainable_token_indices too); use one of them at a time, or give them disjoint "
                f"indices")

    def extra_repr(self) -> str:
        return f"tokens={len(self.token_indices)}{', tied' if self._leader else ''}"


def _embedding_like(model: nn.Module) -> dict[str, nn.Module]:
    """Paths of modules a token index can address: every nn.Embedding and the output head (get_output_embeddings)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    head = head.base_layer if isinstance(head, AdapterLayer) else head
    return {p: m for p, m in iter_host_modules(model)
            if isinstance(m, nn.Embedding) or (head is not None and m is head and isinstance(m, nn.Linear))}


def _input_embedding_paths(model: nn.Module, host: Mapping[str, nn.Module]) -> list[str]:
    """PEFT's choice for the list form: the model's input embedding (``get_input_embeddings``), else
    ``embed_tokens`` (peft/utils/other.py ``_get_input_embeddings_name``)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:
        pass
    emb = emb.base_layer if isinstance(emb, AdapterLayer) else emb
    found = [p for p, m in host.items() if emb is not None and m is emb]
    return found[:1] or [p for p in host if p == "embed_tokens" or p.endswith(".embed_tokens")]


def _resolve(model: nn.Module, spec: list[int] | dict[str, list[int]], host: Mapping[str, nn.Module]
             ) -> dict[str, list[int]]:
    """{module path: indices} for ``spec`` (list form: the input embedding; dict form: each key's name or dotted
    suffix). Raises TargetError naming a key that matches nothing or a module that is not an embedding."""
    embeddings = _embedding_like(model)
    hint = f"Embeddings of this model: {', '.join(embeddings) or 'none'}."
    if not isinstance(spec, Mapping):
        paths = _input_embedding_paths(model, host)
        if not paths:
            raise TargetError(f"{FIELD} as a list trains rows of the input embedding, but this model has none "
                              f"(no get_input_embeddings(), no module named 'embed_tokens'); give "
                              f"{{module name: [indices]}} instead. {hint}")
        return {paths[0]: list(spec)}
    out: dict[str, list[int]] = {}
    for key, indices in spec.items():
        paths = [p for p in host if p == key or p.endswith("." + key)]
        if not paths:
            names = set(embeddings) | {p.rsplit(".", 1)[-1] for p in embeddings}
            found = near_matches(key, names) or near_matches(key, set(host))
            raise TargetError(f"{FIELD} key {key!r} matches no module of this model (a key is a module name or a "
                              f"dotted suffix of it).{' Did you mean: ' + ', '.join(found) + '?' if found else ''} "
                              f"{hint}")
        for p in paths:
            if p not in embeddings:
                raise TargetError(f"{FIELD} key {key!r} names {p!r} ({type(host[p]).__name__}), which is not an "
                                  f"embedding: token rows are rows of an nn.Embedding (or of the output head). "
                                  f"{hint}")
            out[p] = list(indices)
    return out


def plan_token_rows(model: nn.Module, spec: list[int] | dict[str, list[int]], *, lora_targets: list[str],
                    modules_to_save: list[str] | None) -> dict[str, tuple[nn.Module, LayerInfo, Delta]]:
    """The :class:`TokenRows` deltas ``spec`` (``LoraConfig.trainable_token_indices``) asks for on ``model``:
    ``{path: (base layer, LayerInfo, delta)}``, nothing attached. Modules sharing a named embedding's weight (a
    tied lm_head) get a delta following its rows, as PEFT ties them; a tied head named alone, or tied twins given
    different indices, get rows of their own (PEFT without ``ensure_weight_tying``). Raises TargetError (a key that
    names no module or no embedding; a module also in target_modules or modules_to_save) and ConfigError (an index
    outside the vocabulary)."""
    host = dict(iter_host_modules(model))
    wanted = _resolve(model, spec, host)
    for path, indices in wanted.items():
        info = describe_layer(host[path])
        vocab = info.in_features if info.kind == "embedding" else info.out_features
        bad = [i for i in indices if not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"{MARK}: index {bad[0]} is out of range for {path!r} (vocabulary size {vocab}, "
                              f"indices 0..{vocab - 1}). For new tokens resize the embeddings first "
                              f"(model.resize_token_embeddings(len(tokenizer))).", field=FIELD)
    twins = tied_parameters(model)
    followers: dict[str, str] = {}  # twin path -> the path whose rows it follows
    untied_heads: list[str] = []  # tied twins with rows of their own (a head alone; twins given other indices): each
    #                               merges into its own copy of the weight
    # embeddings lead (they hold the rows, as PEFT's input embedding does), whatever order the keys come in
    for path in sorted(wanted, key=lambda p: not isinstance(host[p], nn.Embedding)):
        if path in followers:
            continue
        names = twins.get(id(host[path].weight), [])
        if not isinstance(host[path], nn.Embedding):
            # PEFT ties only to a wrapped input embedding: a head named alone changes its logits, not the input
            # rows of the embedding it shares a weight with (peft/utils/other.py, ``should_apply_tying``)
            if len(names) > 1:
                untied_heads.append(path)
            continue
        for twin in (n.rpartition(".")[0] for n in names):
            if twin == path or describe_layer(host[twin]) is None:
                continue
            if twin in wanted and wanted[twin] != wanted[path]:
                untied_heads.append(path)  # PEFT's default (ensure_weight_tying=False): no tying, each its own rows
                continue
            followers[twin] = path
            wanted.pop(twin, None)
    for path in [*wanted, *followers]:
        if path in lora_targets:
            raise TargetError(f"{path!r} is in target_modules and gets trainable token rows ({FIELD}"
                              f"{', as the tied twin of ' + repr(followers[path]) if path in followers else ''}); a "
                              f"module takes one of them: exclude it from the LoRA targets (exclude_modules).")
        if any(path == m or path.endswith("." + m) for m in modules_to_save or []):
            raise TargetError(f"{path!r} is in modules_to_save (trained in full) and gets trainable token rows "
                              f"({FIELD}); use one of them (as PEFT requires).")
    out: dict[str, tuple[nn.Module, LayerInfo, Delta]] = {}
    for path, indices in wanted.items():
        info = describe_layer(host[path])
        out[path] = (host[path], info, TokenRows(info, indices, host[path]))
        if path in untied_heads:
            out[path][2].keeps_tied_weights = False  # merging writes the rows into a private copy of the weight
    for twin, path in followers.items():
        info = describe_layer(host[twin])
        leader = out[path][2]
        out[twin] = (host[twin], info, TokenRows(info, leader.token_indices, host[twin], leader=leader))
    return out


def check_token_indices(spec: list[int] | dict[str, list[int]] | None) -> None:
    """ConfigError for an empty list, a negative index or a repeated one (what the model is not needed for)."""
    if spec is None:
        return
    if isinstance(spec, Mapping) and not spec:
        raise ConfigError(f"{MARK} is empty, so it trains nothing: give {{module name: [indices]}} or leave it unset.",
                          field=FIELD)
    lists = spec.items() if isinstance(spec, Mapping) else [(None, spec)]
    for key, indices in lists:
        where = MARK if key is None else f"{MARK}[{key!r}]"
        if not indices:
            raise ConfigError(f"{where} is empty, so it trains nothing: give token indices or leave it unset.",
                              field=FIELD)
        negative = [i for i in indices if i < 0]
        if negative:
            raise ConfigError(f"{where}: index {negative[0]} is negative; token indices count from 0.", field=FIELD)
        seen: dict[int, int] = {}
        for pos, i in enumerate(indices):
            if i in seen:
                raise ConfigError(f"{where}: index {i} appears twice (positions {seen[i]} and {pos}); each token row "
                                  f"is trained once, remove the repeat.", field=FIELD)
            seen[i] = pos
