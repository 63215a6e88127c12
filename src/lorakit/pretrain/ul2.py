"""UL2's mixture of denoisers as a pretraining objective for the decoder-only base (prefix-LM).

Tay et al., "UL2: Unifying Language Learning Paradigms", arXiv 2205.05131. Official pieces followed:
google-research/text-to-text-transfer-transformer ``t5/data/preprocessors.py``: ``random_spans_noise_mask``
(span lengths: ``num_noise = round(L·r)`` clipped to [1, L-1], ``num_spans = max(1, round(num_noise / μ))``,
noise and non-noise lengths each a uniformly random composition, spans alternating non-noise first),
``noise_span_to_unique_sentinel`` (each noise span -> one sentinel in the inputs; the targets are each
sentinel followed by its span, then EOS) and ``random_prefix_noise_mask`` (the S-denoiser's split: input
length uniform in [max(1, round((1 - 2·density)·(L-1))), L-1]).

The mixture is the paper's 7-denoiser configuration (§3.1.2; the same numbers as the UL2 task definitions
published with the checkpoints): R = (μ=3, r=0.15), (μ=8, r=0.15); X = (μ=3, r=0.5), (μ=8, r=0.5),
(μ=64, r=0.15), (μ=64, r=0.5); S = prefix-LM (density 0.5, the t5 ``prefix_lm`` default). Each row draws
one denoiser, uniformly over the seven (the t5 UL2 objective's default when no rates are given). Mode tokens
are the paper's ``[R]``, ``[S]``, ``[X]`` (the released 20B model names them ``[NLU]``, ``[S2S]``, ``[NLG]``);
they and the sentinels ``<extra_id_k>`` are added to the tokenizer as special tokens.

Decoder-only layout of one row (length T = the block length):

    [mode] inputs... | targets... [pad ...]
    attention: position i sees j when j <= i or j < P   (P = 1 + len(inputs): the prefix is bidirectional)
    labels: -100 on the prefix and the padding, the target tokens elsewhere (the model shifts them)

The mask is a 4D additive float mask (B, 1, T, T): 0 where attended, the dtype's minimum elsewhere, which
transformers' Llama uses as given (sdpa and eager). Raw text per row is the longest block prefix whose
corrupted form fits in T: span denoisers add one sentinel per span to each side plus EOS, so they read
slightly fewer raw tokens than the causal objective at the same T; the S-denoiser reads T-1 (no EOS: its
target is a block cut, not an end of text).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from lorakit.core.errors import FIELD, ConfigError, did_you_mean

MODE_TOKENS = {"R": "[R]", "S": "[S]", "X": "[X]"}


def sentinel_token(k: int) -> str:
    return f"<extra_id_{k}>"


@dataclass(frozen=True)
class Denoiser:
    """One denoiser: ``mode`` R/S/X; span denoisers have ``mean_span`` μ and corruption ``rate`` r; the S-denoiser
    (``mean_span=None``) uses ``rate`` as t5's prefix-LM noise density (at most 0.5)."""

    mode: str
    rate: float
    mean_span: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODE_TOKENS:
            raise ConfigError(f"Denoiser {FIELD} must be one of {sorted(MODE_TOKENS)}, got {self.mode!r}."
                              f"{did_you_mean(self.mode, MODE_TOKENS)}", field="mode")
        limit = 0.5 if self.mean_span is None else 1.0
        if not 0.0 < self.rate <= limit:
            raise ConfigError(f"Denoiser {FIELD} must be in (0, {limit}] for mode {self.mode}, got {self.rate}.",
                              field="rate")
        if self.mean_span is not None and self.mean_span < 1:
            raise ConfigError(f"Denoiser {FIELD} must be >= 1, got {self.mean_span}.", field="mean_span")

    @property
    def mode_token(self) -> str:
        return MODE_TOKENS[self.mode]


PAPER_DENOISERS: tuple[Denoiser, ...] = (
    Denoiser("R", 0.15, 3.0), Denoiser("R", 0.15, 8.0),
    Denoiser("X", 0.5, 3.0), Denoiser("X", 0.5, 8.0), Denoiser("X", 0.15, 64.0), Denoiser("X", 0.5, 64.0),
    Denoiser("S", 0.5),
)


@dataclass
class UL2Config:
    """The denoisers and their sampling weights (uniform when ``weights`` is None)."""

    denoisers: tuple[Denoiser, ...] = PAPER_DENOISERS
    weights: tuple[float, ...] | None = None
    mode_tokens: dict = field(default_factory=lambda: dict(MODE_TOKENS))

    def __post_init__(self) -> None:
        if not self.denoisers:
            raise ConfigError(f"{FIELD} is empty; give at least one Denoiser.", field="UL2Config.denoisers")
        if self.weights is not None and (len(self.weights) != len(self.denoisers) or min(self.weights) < 0
                                         or sum(self.weights) <= 0):
            raise ConfigError(f"{FIELD} needs {len(self.denoisers)} non-negative numbers with a positive sum, got "
                              f"{self.weights}.", field="UL2Config.weights")


def span_counts(length: int, rate: float, mean_span: float) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) for a sequence of ``length`` (t5 ``random_spans_noise_mask``)."""
    length = max(length, 2)
    num_noise = min(max(round(length * rate), 1), length - 1)
    return num_noise, max(round(num_noise / mean_span), 1)


def _random_segmentation(num_items: int, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """``num_segments`` positive lengths summing to ``num_items``, every composition equally likely."""
    first = torch.zeros(num_items, dtype=torch.long)
    cuts = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1] + 1  # segment starts after 0
    first[cuts] = 1
    return torch.bincount(torch.cumsum(first, 0), minlength=num_segments)


def random_spans_noise_mask(length: int, rate: float, mean_span: float, generator: torch.Generator) -> torch.Tensor:
    """Bool (length,) mask of noise spans, non-noise first, as t5's ``random_spans_noise_mask`` (no roll)."""
    num_noise, num_spans = span_counts(length, rate, mean_span)
    noise = _random_segmentation(num_noise, num_spans, generator)
    keep = _random_segmentation(max(length, 2) - num_noise, num_spans, generator)
    lengths = torch.stack([keep, noise], 1).reshape(-1)  # (2·spans,) alternating keep, noise
    is_noise = torch.arange(2 * num_spans) % 2 == 1
    return torch.repeat_interleave(is_noise, lengths)[:length]


def random_prefix_length(length: int, density: float, generator: torch.Generator) -> int:
    """Input length of a prefix-LM split, uniform in t5 ``random_prefix_noise_mask``'s range."""
    max_inputs = length - 1
    min_inputs = min(max_inputs, max(1, round((1 - 2 * density) * max_inputs)))
    return int(torch.randint(min_inputs, max_inputs + 1, (1,), generator=generator))


def fitting_length(seq_len: int, denoiser: Denoiser) -> int:
    """Longest raw length L whose corrupted row, ``1 + (L - n + s) + (n + s) + 1``, fits in ``seq_len``."""
    if denoiser.mean_span is None:
        return seq_len - 1
    length = seq_len - 2
    while length > 2 and length + 2 * span_counts(length, denoiser.rate, denoiser.mean_span)[1] + 2 > seq_len:
        length -= 1
    return length


def prefix_lm_mask(prefix_lengths: torch.Tensor, seq_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, T, T) additive mask: row i attends to column j when j <= i or j < prefix_lengths[b]."""
    i = torch.arange(seq_len)
    allowed = (i[None, :] <= i[:, None])[None] | (i[None, None, :] < prefix_lengths[:, None, None])  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, T, T)


class UL2Objective:
    """Registered as the ``"ul2"`` pretraining objective; ``prepare`` adds its tokens and returns the batch function."""

    def __init__(self, config: UL2Config | None = None):
        self.config = config or UL2Config()

    def min_seq_len(self) -> int:
        """The shortest block every denoiser's row fits in: a span row of raw length L takes
        ``1 + (L - n + s) + (n + s) + 1`` tokens (``fitting_length``) and L is at least 2; an S row needs 3."""
        seq_len = 3
        while any(d.mean_span is not None and fitting_length(seq_len, d) + 2 * span_counts(
                fitting_length(seq_len, d), d.rate, d.mean_span)[1] + 2 > seq_len for d in self.config.denoisers):
            seq_len += 1
        return seq_len

    def check_seq_len(self, seq_len: int) -> None:
        """ConfigError (field ``seq_len``) when a block of ``seq_len`` tokens cannot hold some denoiser's row."""
        if seq_len < self.min_seq_len():
            raise ConfigError(f"{FIELD}={seq_len} is too short for the ul2 objective: its span denoisers need rows "
                              f"of at least {self.min_seq_len()} tokens (mode token, kept tokens, a sentinel on each "
                              "side of a span, EOS); raise it.", field="seq_len")

    def num_sentinels(self, seq_len: int) -> int:
        spans = [span_counts(fitting_length(seq_len, d), d.rate, d.mean_span)[1]
                 for d in self.config.denoisers if d.mean_span is not None]
        return max(spans, default=0)

    def special_tokens(self, seq_len: int) -> list[str]:
        modes = sorted({self.config.mode_tokens[d.mode] for d in self.config.denoisers})
        return modes + [sentinel_token(k) for k in range(self.num_sentinels(seq_len))]

    def prepare(self, tokenizer, seq_len: int) -> Callable[[torch.Tensor, torch.Generator], dict]:
        """Add the mode tokens and sentinels to ``tokenizer`` (grow the model's embeddings after) and bind ids."""
        tokenizer.add_special_tokens({"additional_special_tokens": self.special_tokens(seq_len)},
                                     replace_extra_special_tokens=False)
        ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in self.special_tokens(seq_len)}
        mode_ids = {mode: ids[tok] for mode, tok in self.config.mode_tokens.items() if tok in ids}
        sentinels = [ids[sentinel_token(k)] for k in range(self.num_sentinels(seq_len))]
        weights = torch.tensor(self.config.weights or [1.0] * len(self.config.denoisers), dtype=torch.float)
        return UL2Batcher(self.config.denoisers, weights, mode_ids, sentinels, tokenizer.eos_token_id,
                          tokenizer.pad_token_id)

    def __call__(self, blocks: torch.Tensor, generator: torch.Generator) -> dict:
        raise ConfigError("The ul2 objective needs its tokens: call UL2Objective.prepare(tokenizer, seq_len) and use "
                          "the function it returns.")


@dataclass
class UL2Batcher:
    """(B, T) token blocks -> ``input_ids``, ``labels`` (B, T) and the prefix-LM ``attention_mask`` (B, 1, T, T)."""

    denoisers: tuple[Denoiser, ...]
    weights: torch.Tensor
    mode_ids: dict
    sentinels: list[int]
    eos_id: int
    pad_id: int
    mask_dtype: torch.dtype = torch.float32

    def row(self, block: torch.Tensor, denoiser: Denoiser, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """(inputs, targets) token lists for one block; inputs start with the mode token."""
        raw = block[: fitting_length(len(block), denoiser)]
        mode = [self.mode_ids[denoiser.mode]]
        if denoiser.mean_span is None:
            cut = random_prefix_length(len(raw), denoiser.rate, generator)
            return mode + raw[:cut].tolist(), raw[cut:].tolist()
        noise = random_spans_noise_mask(len(raw), denoiser.rate, denoiser.mean_span, generator)
        starts = noise & ~torch.cat([torch.zeros(1, dtype=torch.bool), noise[:-1]])
        span_id = torch.cumsum(starts.long(), 0) - 1  # (L,) index of the span a noise token belongs to
        inputs, targets = list(mode), []
        for token, is_noise, is_start, k in zip(raw.tolist(), noise.tolist(), starts.tolist(), span_id.tolist()):
            if not is_noise:
                inputs.append(token)
                continue
            if is_start:
                inputs.append(self.sentinels[k])
                targets.append(self.sentinels[k])
            targets.append(token)
        return inputs, targets + [self.eos_id]

    def __call__(self, blocks: torch.Tensor, generator: torch.Generator) -> dict:
        batch, seq_len = blocks.shape
        choice = torch.multinomial(self.weights, batch, replacement=True, generator=generator)
        input_ids = torch.full((batch, seq_len), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, seq_len), -100, dtype=torch.long)
        prefix = torch.zeros(batch, dtype=torch.long)
        for b in range(batch):
            inputs, targets = self.row(blocks[b], self.denoisers[int(choice[b])], generator)
            n_in, n = len(inputs), len(inputs) + len(targets)
            input_ids[b, :n] = torch.tensor(inputs + targets)
            labels[b, n_in:n] = torch.tensor(targets)
            prefix[b] = n_in
        return {"input_ids": input_ids, "labels": labels,
                "attention_mask": prefix_lm_mask(prefix, seq_len, self.mask_dtype)}


def with_mode_token(examples: list, mode_token: str, tokenizer) -> list:
    """UL2 mode switching at fine-tuning time: ``mode_token`` prepended to every example's prompt.

    The token must be one token of ``tokenizer`` (a base pretrained with ``--objective ul2`` has ``[R]``,
    ``[S]``, ``[X]``); otherwise ``ConfigError`` naming the tokenizer's special tokens that come close.
    """
    specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    if mode_token not in specials:
        modes = sorted(t for t in specials if t in MODE_TOKENS.values())
        raise ConfigError(f"--mode-token {mode_token!r} is not a special token of this tokenizer"
                          + (f" (its mode tokens: {modes})." if modes else "; pretrain the base with "
                             "`lorakit pretrain-base --objective ul2` to get UL2's [R], [S], [X].")
                          + did_you_mean(mode_token, specials))
    return [replace(ex, prompt=mode_token + ex.prompt) for ex in examples]


def _register() -> None:
    from lorakit.pretrain.train import register_objective

    register_objective("ul2")(UL2Objective())


_register()
