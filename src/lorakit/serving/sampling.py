"""Per-request sampling: greedy, temperature, top-k, top-p (nucleus), a seed per request, stop strings.

Definitions follow Hugging Face ``generate``'s logits warpers (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``): temperature divides the logits; top-k keeps the k largest; top-p keeps the smallest set of
most likely tokens whose probability reaches ``top_p`` (the token crossing the threshold included).
``temperature == 0`` means greedy (argmax), as in the OpenAI API.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.errors import FIELD, ConfigError


@dataclass
class SamplingParams:
    """How one request decodes.

    max_tokens: new tokens at most. temperature: 0 = greedy. top_p in (0, 1]; top_k: 0 = off.
    seed: per-request generator seed, an integer torch.Generator.manual_seed takes (None: nondeterministic).
    stop: strings that end the output (not
    included in it); an empty one is a ConfigError (field ``stop``), as no text ends at it. ignore_eos: keep going past the end-of-sequence token.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if "" in self.stop:  # no text ends at "": it never matched (was: dropped silently)
            raise ConfigError(f"{FIELD} holds an empty string, which no text ends at; give stop sequences of at least "
                              f"one character, got {self.stop!r}", field="stop")
        # field: the request's key (these messages answer an HTTP request as they read)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"{FIELD} must be a positive integer, got {self.max_tokens!r}", field="max_tokens")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise ConfigError(f"{FIELD} must be in [0, 100], got {self.temperature!r}", field="temperature")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ConfigError(f"{FIELD} must be in (0, 1], got {self.top_p!r}", field="top_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"{FIELD} must be a non-negative integer (0 = off), got {self.top_k!r}", field="top_k")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(1 << 63) <= self.seed < 1 << 64):  # manual_seed's range
            raise ConfigError(f"{FIELD} must be an integer in [-2**63, 2**64) or null, got {self.seed!r}",
                              field="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(int(self.seed))
        return g


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from ``logits`` (vocab,) under ``params``."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, -1) >= params.top_p  # mass before this token already reached
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1
