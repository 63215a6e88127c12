"""Model plumbing shared by the quantizers: the decoder blocks, their linear layers, block inputs, token data and
perplexity. Host classes are never edited: blocks are called as they are, with the inputs the model gave them."""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..core.delta import Conv1D, is_quantized
from ..core.errors import LorakitError
from .uniform import QuantSpec, rtn


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the first ModuleList with ``config.num_hidden_layers`` entries
    (Llama/Mistral/Qwen ``model.layers``, GPT-2 ``transformer.h``). Raises LorakitError if none is found."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (n is None or len(module) == n):
            return module
    raise LorakitError(f"{type(model).__name__} has no ModuleList of {n} transformer blocks; quantization works "
                       f"block by block and needs one.")


def block_linears(block: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(name inside the block, layer, fan_in_fan_out) of every nn.Linear / GPT-2 Conv1D of a block."""
    out = []
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):
            out.append((name, m, False))
        elif Conv1D and isinstance(m, Conv1D):
            out.append((name, m, True))
    return out


def check_quantizable(model: nn.Module) -> int:
    """The number of block linears RTN / CBQ would quantize in ``model``, checked before anything changes.
    Raises LorakitError when the blocks hold none, or when one is quantized already (integer codes: a bitsandbytes
    4-bit layer of ``quantize_model`` or a 4-bit checkpoint), whose packed codes these quantizers would rewrite as
    if they were weights (was: silently, the model's outputs changed and the summary counted the layers as
    quantized). The message names the first such layer (``block i name``)."""
    count = 0
    for i, block in enumerate(decoder_blocks(model)):
        for name, layer, _ in block_linears(block):
            if is_quantized(layer):
                raise LorakitError(f"block {i} {name} is a {type(layer).__name__} holding {layer.weight.dtype} codes: "
                                   "the model is quantized already. RTN and CBQ quantize full-precision weights: "
                                   "load the full-precision model (or lorakit.quantize.dequantize_model(model)) first.")
            count += 1
    if not count:
        raise LorakitError(f"{type(model).__name__}'s transformer blocks hold no nn.Linear or Conv1D layer: there is "
                           "nothing for RTN / CBQ to quantize.")
    return count


def oriented(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight as (out, in)."""
    return weight.T if fan_in_fan_out else weight


class _Captured(Exception):
    pass


@torch.no_grad()
def block_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """(hidden states entering block 0 (N, T, d), the keyword arguments the model passes every block).

    The model runs until its first block is called (a forward pre-hook records the call, then stops it), so
    masks and rotary embeddings are exactly the host's. ``input_ids`` (N, T) holds full, unpadded sequences.
    """
    blocks = decoder_blocks(model)
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value", "layer_past")}
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise LorakitError(f"{type(model).__name__}'s forward never called its first block")
    return seen["hidden"], seen["kwargs"]


def block_output(out: Any) -> torch.Tensor:
    """A block's hidden-state output, whether it returns a tensor or a tuple (older transformers, GPT-2)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def slice_kwargs(kwargs: dict[str, Any], rows: torch.Tensor | slice, n: int) -> dict[str, Any]:
    """Block kwargs for a subset of the N calibration rows (tensors and tuples of tensors with N rows are cut)."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n:
            return v[rows]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v
    return {k: cut(v) for k, v in kwargs.items()}


def check_group_size(model: nn.Module, spec: QuantSpec) -> None:
    """ConfigError naming the first block linear (``block i name``) whose input columns ``spec.group_size`` does
    not divide, with its in_features: from the shapes alone (meta tensors), before any data or perplexity work."""
    check_quantizable(model)
    if spec.group_size is None:
        return
    for i, block in enumerate(decoder_blocks(model)):
        for name, layer, fan_in_fan_out in block_linears(block):
            shape = oriented(layer.weight, fan_in_fan_out).shape
            spec.grouped(torch.empty(shape, device="meta"), f"block {i} {name}")


def quantize_rtn(model: nn.Module, spec: QuantSpec) -> dict[str, Any]:
    """Round every linear weight of every block to nearest, in place. Returns a summary. Raises LorakitError
    before any change for blocks without linears or already quantized (:func:`check_quantizable`)."""
    check_quantizable(model)
    count = 0
    with torch.no_grad():
        for i, block in enumerate(decoder_blocks(model)):
            for name, layer, fan_in_fan_out in block_linears(block):
                w = oriented(layer.weight, fan_in_fan_out)
                layer.weight.copy_(oriented(rtn(w, spec, f"block {i} {name}"), fan_in_fan_out))
                count += 1
    return {"method": "rtn", "bits": spec.bits, "group_size": spec.group_size, "layers": count}


def check_token_rows(rows: torch.Tensor, what: str, min_len: int = 1) -> None:
    """LorakitError unless ``rows`` is an (N, T) integer tensor with N >= 1 and T >= ``min_len`` (a next-token
    score needs T >= 2: the first token of a row has nothing before it)."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.dtype.is_floating_point:
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise LorakitError(f"{what} must be an (N, T) tensor of token ids, got {shape}.")
    if rows.shape[0] < 1 or rows.shape[1] < min_len:
        raise LorakitError(f"{what} has shape {tuple(rows.shape)}: give at least 1 row of at least {min_len} "
                           f"token{'s' if min_len > 1 else ''}.")


def task_token_rows(tokenizer, split: str, n_rows: int, seq_len: int, seed: int = 0,
                    tasks: Sequence[str] | None = None) -> torch.Tensor:
    """(n_rows, seq_len) token ids of the bundled tasks' ``prompt + completion`` texts of ``split``, joined
    with the EOS token and cut into rows (the usual WikiText-style perplexity layout). LorakitError unless both
    are >= 1."""
    from ..data.tasks import get_task, list_tasks

    if n_rows < 1 or seq_len < 1:
        raise LorakitError(f"task_token_rows needs n_rows >= 1 and seq_len >= 1, got {n_rows} and {seq_len}.")

    names = list(tasks) if tasks else list_tasks()
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    per_task = max(8, math.ceil(n_rows * seq_len / max(len(names), 1) / 8))
    while len(stream) < n_rows * seq_len:
        for name in names:
            for ex in get_task(name).generate(split, per_task, seed):
                stream.extend(tokenizer(ex.prompt + ex.completion, add_special_tokens=False)["input_ids"])
                if eos is not None:
                    stream.append(eos)
        seed += 1
    return torch.tensor(stream[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, rows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``rows`` (N, T), T >= 2
    (LorakitError otherwise: with one token per row nothing is predicted)."""
    check_token_rows(rows, "perplexity rows", min_len=2)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in _chunks(rows, batch_size):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                chunk[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += chunk[:, 1:].numel()
    return math.exp(total / max(count, 1))


@torch.no_grad()
def next_token_kl(reference: nn.Module, model: nn.Module, rows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean over positions of D_KL(p_reference ‖ p_model) of the next-token distributions on ``rows`` (N, T), in
    nats: how far a quantized model's predictions moved from the original's (0 = unchanged). Unlike perplexity it
    is not dominated by tokens neither model can predict. LorakitError for rows that are not (N >= 1, T >= 1)."""
    check_token_rows(rows, "next_token_kl rows")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in _chunks(rows, batch_size):
        chunk = chunk.to(device)
        log_p = torch.log_softmax(reference(input_ids=chunk, use_cache=False).logits.float(), -1)
        log_q = torch.log_softmax(model(input_ids=chunk, use_cache=False).logits.float(), -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        count += chunk.numel()
    return total / max(count, 1)


def _chunks(rows: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, rows.shape[0], size):
        yield rows[i:i + size]
