"""Self-MoA: aggregate several samples of one model (here: one adapter) with a synthesis pass of the same model.

"Rethinking Mixture-of-Agents: Is Mixing Different Large Language Models Beneficial?" (Li, Lin, Xia, Jin;
arXiv:2502.00674). Mixture-of-Agents (Wang et al., arXiv:2406.04692) lets several *different* models propose
answers and one aggregator synthesise them; Self-MoA takes all proposals from the single best model, sampled
repeatedly, and aggregates them with that model:

    proposals  y_1 .. y_n ~ p(y | x)                      (temperature sampling, seeds seed .. seed + n - 1)
    answer     y* = Aggregate(x, y_1 .. y_n)              (one synthesis pass, the request's own decoding)

Self-MoA-Seq (same paper, §6) aggregates many samples over rounds with a sliding window of size ``w`` so the
aggregation prompt stays short: ``s_1 = Aggregate(x, y_1..y_w)``, then ``s_k = Aggregate(x, s_{k-1}, next w-1
samples)`` until the samples are used up; the synthesized answer is carried into every later round.

The official repository (wenzhe-li/Self-MoA) holds only a README; the aggregation instruction follows MoA's
"aggregate-and-synthesize" prompt in spirit (reworded here), placed before the query. Proposals run as
ordinary requests of the engine, so they are batched with everything else.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from ..core.errors import FIELD, ConfigError
from .engine import Engine, Request
from .multi import RowSpec
from .sampling import SamplingParams

INSTRUCTION = ("Below are several candidate responses to the request that follows. Some may be wrong or "
               "incomplete. Weigh them critically and write one response that is accurate and complete; do not "
               "just copy one of them.")


@dataclass
class SelfMoAConfig:
    """n: proposals sampled; window: None = aggregate all at once, else Self-MoA-Seq with this window (>= 2);
    temperature: proposal sampling temperature (> 0, proposals must differ)."""

    n: int = 4
    window: int | None = None
    temperature: float = 0.7

    def __post_init__(self):
        # field: the key of the request's "self_moa" object (these messages answer an HTTP request as they read)
        if not isinstance(self.n, int) or not 1 <= self.n <= 16:
            raise ConfigError(f"self_moa {FIELD} must be an integer in [1, 16], got {self.n!r}", field="n")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 2):
            raise ConfigError(f"self_moa {FIELD} must be None (all at once) or an integer >= 2, got {self.window!r}",
                              field="window")
        if not 0.0 < float(self.temperature) <= 2.0:
            raise ConfigError(f"self_moa {FIELD} must be in (0, 2], got {self.temperature!r}", field="temperature")


def aggregation_prompt(prompt: str, responses: Sequence[str]) -> str:
    """The synthesis pass's prompt: instruction, numbered candidate responses, then the original prompt."""
    listed = "\n\n".join(f"Response {i + 1}:\n{r.strip()}" for i, r in enumerate(responses))
    return f"{INSTRUCTION}\n\n{listed}\n\n{prompt}"


def windows(n: int, window: int | None) -> list[tuple[int, int]]:
    """The (start, end) slices of the proposals each aggregation round reads (Self-MoA: one round)."""
    if window is None or window >= n:
        return [(0, n)]
    rounds, start = [(0, window)], window
    while start < n:
        rounds.append((start, min(n, start + window - 1)))
        start += window - 1
    return rounds


def synthesis_prompt(engine: Engine, prompt: str | list[int], adapter: RowSpec, params: SamplingParams,
                     config: SelfMoAConfig,
                     aggregate: Callable[[list[str]], str | list[int]] | None = None,
                     cancel: threading.Event | None = None) -> tuple[str | list[int], list[str]]:
    """Sample the proposals and run every aggregation round but the last; returns (the last round's prompt,
    proposals). Blocking (call it off the event loop).

    ``prompt`` is what the proposals answer (text, or token ids such as a chat-templated conversation);
    ``aggregate(responses)`` builds an aggregation round's prompt from the responses it shows (default:
    :func:`aggregation_prompt` around a text ``prompt``). The caller runs the returned prompt with the request's
    own decoding — as one more request, so a server can stream it. ``cancel`` (a server's client went away): once
    set, the running proposals and rounds are aborted and RequestCancelled is raised.

    Raises:
        ConfigError: token-id ``prompt`` without ``aggregate``.
        The error of a proposal or round the engine failed (an adapter whose weights fail to load:
        AdapterLoadError with its recorded reason), as that request alone would have got it; never an
        aggregation over empty proposals.
    """
    if aggregate is None:
        if not isinstance(prompt, str):
            raise ConfigError("self_moa on token ids needs an aggregate(responses) prompt builder")
        aggregate = lambda shown: aggregation_prompt(prompt, shown)  # noqa: E731
    base_seed = params.seed if params.seed is not None else 0
    sample = [replace(params, temperature=config.temperature, seed=base_seed + i) for i in range(config.n)]
    # the n proposals are n choices of one prompt: one shared prefill (Engine.generate_choices)
    proposals = _texts(engine.generate_choices(prompt, adapter, sample, cancel=cancel), cancel)
    rounds = windows(config.n, config.window)
    answer = None
    for start, end in rounds[:-1]:  # Self-MoA-Seq: the synthesized answer is carried into the next round
        shown = ([answer] if answer is not None else []) + proposals[start:end]
        answer = _texts(engine.generate([aggregate(shown)], [adapter], params, cancel=cancel), cancel)[0]
    start, end = rounds[-1]
    return aggregate(([answer] if answer is not None else []) + proposals[start:end]), proposals


class RequestCancelled(Exception):
    """Self-MoA's proposals or rounds were aborted through ``cancel``."""


def _texts(requests: Sequence[Request], cancel: threading.Event | None = None) -> list[str]:
    """The finished requests' texts; the first failed one's error raised (RequestCancelled once ``cancel`` is set)."""
    if cancel is not None and cancel.is_set():
        raise RequestCancelled("the Self-MoA request was cancelled")
    for r in requests:
        if r.exception is not None:
            raise r.exception
    return [r.text for r in requests]


def self_moa(engine: Engine, prompt: str | list[int], adapter: RowSpec, params: SamplingParams,
             config: SelfMoAConfig,
             aggregate: Callable[[list[str]], str | list[int]] | None = None) -> tuple[str, list[str]]:
    """(synthesized answer, proposals) for ``prompt`` (see :func:`synthesis_prompt`); blocking."""
    final, proposals = synthesis_prompt(engine, prompt, adapter, params, config, aggregate)
    return _texts(engine.generate([final], [adapter], params))[0], proposals
