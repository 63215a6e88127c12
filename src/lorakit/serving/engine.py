"""A continuous-batching engine for one base model and thousands of LoRA adapters.

Orca (Yu et al., OSDI'22) iteration-level scheduling + S-LoRA (Sheng et al., arXiv:2311.03285) heterogeneous
batches: every engine step admits waiting requests (first come, first served) while the KV cache has blocks for
them, runs one forward over the newly admitted prompts (prefill) and one over every running request's last
token (decode), samples a token per row and retires finished rows, so requests for different adapters — and
the base — join and leave one running batch at token granularity. Each row's adapter (a name, ``None`` for the
base, or a weighted mix ``{"a": 0.7, "b": 0.3}``) is applied by the adapter banks (``serving/bank.py``).
One exception to first come, first served: while the first waiting request needs a resident adapter slot that
running requests all hold (``AdapterStore.max_loras``), requests behind it that need no slot start: base-model
requests, requests for adapters banked directly (never evicted) and requests pinned already (they cannot delay it;
vLLM's scheduler likewise lets requests past one over its ``max_loras``); requests for other folder adapters do not
(they would take the slot it waits for, or keep theirs longer).

Memory: keys and values live in a :class:`~lorakit.serving.kv_cache.PagedKVCache` preallocated from a byte
budget. A request is admitted only when blocks for its whole context are free; when a decode step finds no free
block, the most recently admitted request is preempted (its blocks freed; it is recomputed later, vLLM's
"recompute" preemption), so the engine never allocates beyond the budget. A request that cannot fit even alone
is refused at submission.

Why not transformers' own continuous batching (``transformers.generation.continuous_batching``, checked in
transformers 5.x): it packs all requests into one flattened row (batch size 1, ``cu_seq_lens``) inside its own
manager thread, while the banks route by batch row and read the routing from a ContextVar set around the
forward; carrying per-row adapters through it would need per-token routing in every bank and hooks into its
private model runner. The paged cache here is small and plugs into the model through transformers'
``AttentionInterface`` (``kv_cache.py``) instead.

    engine = Engine(model, tokenizer, store=AdapterStore(model, ["adapters/"]))
    outs = engine.generate(["Hello", "Hi"], adapters=["math", None], params=SamplingParams(max_tokens=8))

Several choices of one prompt (OpenAI's ``n``; :meth:`Engine.submit_choices`) share its prefill, as vLLM's parallel
sampling does (PagedAttention, arXiv:2309.06180, §4.4): the first choice is admitted with the others attached; its
prefill forward runs the prompt once, then the others fork its KV blocks (``PagedKVCache.fork``: full blocks shared,
the partly filled last one copied) and sample their first token from the same last-position logits with their own
generators, so every choice decodes as if it had prefilled the prompt itself.

Admission of n choices is first come, first served per choice, as vLLM v1 schedules them (n > 1 fans out into one
request per choice, ``vllm/v1/engine/parallel_sampling.py``): the first choice is admitted as soon as one row and its
prompt's blocks are free, with as many of the others as the batch has rows and (for copies of a partly filled last
block) free blocks for now; the rest wait first in the queue, still together, and take the next rows that free up,
forking the prompt's blocks from a choice still running (its saved last-position logits give their first token: no
second prefill), or, when none runs any more, the next of them prefills the prompt again and the others fork from
it. So a request with n choices never keeps rows idle waiting for n of them at once (vLLM v0's sequence groups did:
the group blocked the queue until the batch drained), and later requests never pass its choices (which would starve
it under steady traffic). An adapter that recomputes the whole sequence every step (X-LoRA) shares nothing: each
choice prefills alone.

Threading: :meth:`start` runs :meth:`step` in a background thread; :meth:`submit`, :meth:`submit_choices`,
:meth:`abort` and :meth:`call` (run a function on the engine thread, e.g. to load an adapter) are safe from any
thread. Without the background thread, :meth:`generate` steps on its caller's thread; steps (and calls run without the
loop) of different threads take turns. What one thread posts (a request, then its abort) is handled in that order,
also across a :meth:`shutdown` and a restart.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError, LorakitError, UnknownAdapterError
from .graphs import DecodeGraphs
from .kv_cache import PagedBatch, PagedKVCache, paged_batch, use_paged_attention
from .multi import REGISTRY_ATTR, RowSpec
from .sampling import SamplingParams, find_stop, sample_token
from .store import AdapterStore, names_in


FLOAT32_MAX = torch.finfo(torch.float32).max


class RequestError(LorakitError, ValueError):
    """A request the engine cannot take (too long for the model or the cache, empty prompt, bad adapter)."""


class EngineStopError(LorakitError, RuntimeError):
    """The engine's loop did not stop within :meth:`Engine.shutdown`'s timeout (a step or an ``Engine.call`` still
    running on its thread). The loop stops once that ends; until then :meth:`Engine.start` refuses with this error
    (two loops would step the same batch, KV cache and banks at once) and :meth:`Engine.shutdown` may be called again
    to wait longer."""


class EngineThreadError(LorakitError, RuntimeError):
    """A blocking engine method called from inside one of the engine's own steps (an ``on_event`` listener, a
    function run by :meth:`Engine.call`, the loop thread itself): :meth:`Engine.generate` /
    :meth:`Engine.generate_choices` would wait for steps that only this thread can run, and :meth:`Engine.shutdown`
    would wait for the loop to end while the loop waits for this call. Raised at once, before anything is queued or
    stopped; submit with :meth:`Engine.submit` (and an ``on_event`` listener) there, or call these from another
    thread."""


class EngineBusyError(LorakitError):
    """A call queued for the engine thread (:meth:`Engine.call`) that was cancelled before it started: the engine did
    not get to it within its ``start_timeout``, or shut down first. It did not run; retrying it is safe. A server
    answers it with a 503 and Retry-After (``serving/server.py``)."""


@dataclass
class Event:
    """What a request produced in one step: new text and token ids; ``finished`` with a reason at the end
    ("stop", "length", "abort" or "error" with ``error`` set)."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class SharedPrompt:
    """The prompt the choices of one :meth:`Engine.submit_choices` share: its length and, once one of them has
    prefilled it, the last position's logits (vocab,), float32, host (kept while a choice may still fork them)."""

    length: int
    logits: torch.Tensor | None = None


@dataclass(eq=False)  # identity: queues find, index and remove a request by itself, not by ~30 field compares
class Request:
    request_id: str
    prompt_ids: list[int]
    adapter: RowSpec
    params: SamplingParams
    on_event: Callable[[Event], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # context tokens whose keys/values are in the cache
    status: str = "waiting"
    finish_reason: str | None = None
    error: str | None = None
    exception: BaseException | None = None  # what failed it (``error`` is its message): callers map it by type
    text: str = ""
    sent: int = 0  # characters of ``text`` already sent as events
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    generator: torch.Generator | None = None
    attached: str | None = None  # an attached (not banked) adapter: runs in its group's own forward
    task: str | None = None  # the request's task name (routed adapters); ``key`` its routing key id
    key: int | None = None
    recompute: bool = False  # the adapter needs the whole sequence each step (X-LoRA): no KV reuse
    # holds a pin on its adapters in the store (AdapterStore.pin) from admission (a choice: its first choice's, also
    # while it waits for a row) to its end, also while preempted: an adapter unloaded meanwhile stays resident until
    # it finishes, as for the requests still running
    pinned: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    # choices of one prompt (Engine.submit_choices): the first carries the others, which wait for its prefill and
    # then fork its blocks; ``parent`` is set on each of them until then
    children: list["Request"] = field(default_factory=list)
    parent: "Request | None" = None
    # what the choices of one prompt share: its last-position logits once a choice has prefilled it, so that a choice
    # admitted later forks the prompt's blocks from a running one instead of prefilling it again
    prompt: "SharedPrompt | None" = None

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.output_ids


class Engine:
    """Continuous batching over a paged KV cache, with per-row adapters.

    Args:
        model: a transformers decoder (Llama-family attention: ``module.layer_idx``, rotary in the layer).
        tokenizer: for text prompts, stop strings and streamed text (token ids work without one).
        store: the adapter tiers (:class:`AdapterStore`); None = the model's banks as loaded, no tiering.
        kv_cache_bytes: the KV cache budget, preallocated now: ``cache.nbytes`` (blocks and the scratch token slot)
            is at most this. block_size: tokens per cache block.
        max_batch: running requests at most. max_prefill_tokens: prompt tokens per prefill forward.
        cuda_graphs: run decode steps of banked rows (named adapters and the base) as static-shape steps
            (``serving/graphs.py``), captured in CUDA graphs per batch and context bucket when the model is on a
            CUDA device and run eagerly elsewhere (same tokens as without). Prefill, weighted mixes and attached
            adapters run eagerly, in forwards of their own beside it. Bank storage is reserved up front for ``store.max_loras`` adapters.
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, store: AdapterStore | None = None,
                 kv_cache_bytes: int = 64 << 20, block_size: int = 16, max_batch: int = 32,
                 max_prefill_tokens: int = 2048, cuda_graphs: bool = False):
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            # (its paged KV cache and prefill feed ``input_ids`` to one decoder stack: an encoder-decoder failed on
            # its first request, a ValueError from the model, "You must specify exactly one of input_ids ...")
            raise ConfigError(f"the serving engine runs decoder-only models; {type(model).__name__} is an "
                              f"encoder-decoder (config.is_encoder_decoder). Generate with its own model.generate, "
                              f"or lorakit.data.generate_completions (lorakit eval), instead.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        param = next(model.parameters())
        self.cache = PagedKVCache.from_budget(model.config, kv_cache_bytes, block_size=block_size,
                                              dtype=param.dtype, device=param.device)
        use_paged_attention(model)
        self.device = param.device
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else getattr(model.config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # ("submit", req) | ("abort", id) | ("call", fn, fut), in the order posted; only the stepping thread takes
        # items out (a shutdown cancels calls through ``_calls`` and leaves the inbox as it is)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._calls: set[Future] = set()  # futures of the Engine.call items posted and not yet answered
        self._calls_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # the stop signal of the loop in ``_thread``: each loop gets its own (start)
        # start's look for a running loop and its start of one; shutdown's pick of the loop it stops, and forgets
        self._lifecycle = threading.Lock()
        # held through each step, by the loop or by a thread stepping without one (generate, an inline Engine.call):
        # one thread at a time runs forwards over the batch, cache and banks (reentrant: a step's own callbacks)
        self._stepping = threading.RLock()
        self._stepper: int | None = None  # the thread ident holding ``_stepping`` (``_turn``), else None
        self._ids = itertools.count()
        # forked: choices that took their prompt's prefill from its first choice (no prefill tokens of their own)
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "finished": 0,
                      "forked": 0}
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs:
            self.graphs = DecodeGraphs(model, self.cache, max_batch=max_batch,
                                       max_context=min(self.max_model_len, self.cache.capacity_tokens),
                                       max_adapters=store.max_loras if store is not None else None, store=store)

    # -- public API (any thread) ---------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], adapter: RowSpec = None, params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None, request_id: str | None = None,
               task: str | None = None) -> Request:
        """Queue a request; raises RequestError / AdapterError at once for what can never run.

        ``task``: the task key of a request on an adapter trained with task keys (``routed_lora``: which expert
        runs), looked up in the adapter's saved task index (``AdapterTaskError`` for an unknown task, listing the
        known ones; also for a routed adapter requested without one)."""
        req = self._request(prompt, adapter, params, on_event, request_id, task)
        self._inbox.put(("submit", req))
        self._wake.set()
        return req

    def submit_choices(self, prompt: str | Sequence[int], adapter: RowSpec, params: Sequence[SamplingParams],
                       on_event: Callable[[Event], None] | None = None, request_ids: Sequence[str] | None = None,
                       task: str | None = None) -> list[Request]:
        """Queue ``len(params)`` choices of one prompt on one adapter (OpenAI's ``n``; choice i samples with
        ``params[i]``) that share the prompt's prefill: it runs once, in the first choice's forward, and the others
        fork its KV blocks (see the module docstring). Each choice's tokens are those of a request submitted on its
        own with the same parameters. ``request_ids``: one per choice (default: fresh ids).

        All or nothing: raises as :meth:`submit` does (RequestError also for no choices, a wrong number of ids or
        an id given to two choices), before any choice is queued."""
        if not params:
            raise RequestError("submit_choices needs at least one choice (one SamplingParams per choice)")
        ids = list(request_ids) if request_ids is not None else [None] * len(params)
        if len(ids) != len(params):
            raise RequestError(f"{len(ids)} request ids for {len(params)} choices; give one per choice")
        given = [i for i in ids if i is not None]
        if len(set(given)) != len(given):  # one id would name two choices: an abort would reach only one of them
            raise RequestError(f"request ids must differ between choices, got {given}")
        first = self._request(prompt, adapter, params[0], on_event, ids[0], task)
        first.children = [self._request(first.prompt_ids, adapter, p, on_event, rid, task)
                          for p, rid in zip(params[1:], ids[1:])]
        shared = SharedPrompt(len(first.prompt_ids))
        for r in (first, *first.children):
            r.prompt = shared
        for child in first.children:
            child.parent = first
        self._inbox.put(("submit", first))
        self._wake.set()
        return [first, *first.children]

    def _request(self, prompt, adapter: RowSpec, params: SamplingParams | None, on_event, request_id: str | None,
                 task: str | None) -> Request:
        """A checked request, not queued yet (:meth:`submit`'s errors)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; pass token ids or give the engine a tokenizer")
            prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if isinstance(adapter, Mapping):  # checked here: a weight the bank cannot hold fails the whole batch's forward
            bad = {n: w for n, w in adapter.items() if isinstance(w, bool) or not isinstance(w, (int, float))
                   or not abs(w) <= FLOAT32_MAX}
            if bad:
                raise RequestError(f"weights of a weighted mix must be finite numbers within float32's range "
                                   f"(|w| <= {FLOAT32_MAX:.4g}), got {bad}")
        key = None
        self.check_adapter(adapter)
        if self.store is not None:
            reason = self.store.never_fits(adapter)
            if reason is not None:
                raise RequestError(reason)
            key = self.store.task_key(adapter, task)
        elif task is not None:
            raise RequestError("a task key needs an engine with an AdapterStore (it reads the adapter's task index)")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                               f"exceeds the model's context length {self.max_model_len}; shorten the prompt or "
                               f"lower max_tokens")
        if self.cache.blocks_for(total) > self.cache.num_blocks:
            raise RequestError(f"prompt + max_tokens = {total} tokens exceeds the whole KV cache "
                               f"({self.cache.capacity_tokens} tokens); raise the cache budget or lower max_tokens")
        rid = request_id or f"req-{next(self._ids)}"
        return Request(rid, prompt_ids, adapter, params, on_event, generator=params.generator(), task=task, key=key)

    def check_adapter(self, spec: RowSpec) -> None:
        """Raise for an adapter row spec (a name, a weighted mix; None: the base) this engine cannot serve: with a
        store, :meth:`AdapterStore.check` (UnknownAdapterError, AdapterLoadError, AdapterConflictError, AdapterError);
        without one, UnknownAdapterError for a name the model's banks do not hold (with near matches), also when the
        model has no banks at all."""
        if self.store is not None:
            self.store.check(spec)
            return
        names = names_in(spec)
        if not names:
            return
        registry = getattr(self.model, REGISTRY_ATTR, None)
        if registry is None:
            raise UnknownAdapterError(f"unknown adapter {names[0]!r}: no adapter is banked in this engine's model "
                                      f"(bank adapters with load_adapters / bank_adapters, or give the engine an "
                                      f"AdapterStore)")
        registry.route([spec])

    def adapter_names(self) -> list[str]:
        """The adapters a request may name: the store's registered ones, else those banked in the model."""
        if self.store is not None:
            return self.store.names()
        registry = getattr(self.model, REGISTRY_ATTR, None)
        return registry.names if registry is not None else []

    def abort(self, request_id: str) -> None:
        """Stop a request (e.g. its client disconnected) and free its KV blocks at the next step."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def call(self, fn: Callable, *, start_timeout: float | None = None):
        """Run ``fn()`` on the engine thread between steps (adapter loads mutate the banks) and return its result
        (or raise its exception), however long it runs.

        ``start_timeout``: seconds ``fn`` may wait in the queue for the engine thread (None: no limit). When the engine
        thread has not taken it by then, it is cancelled and EngineBusyError raised: ``fn`` never runs. Whether it
        had started is decided atomically (the future's state: the engine thread marks it running before calling
        it), so a caller is never told "not run" for a call that then runs, nor left without the result of one that
        started (was: ``timeout``, after which the call raised TimeoutError and still ran later). Calls queued when
        the engine shuts down are cancelled the same way (EngineBusyError)."""
        if not self._looping() or threading.current_thread() is self._thread or self._stepper == threading.get_ident():
            # (between steps of a thread stepping without a loop, as between the loop's; and at once from inside a
            # step of this thread, e.g. an on_event listener's call: a loop a start ran meanwhile waits for this
            # step's turn, so posting it there would wait forever)
            with self._turn():
                return fn()
        fut: Future = Future()
        with self._calls_lock:  # known before it is posted: a shutdown from now on cancels it
            self._calls.add(fut)
        self._inbox.put(("call", fn, fut))
        self._wake.set()
        deadline = None if start_timeout is None else time.monotonic() + start_timeout
        try:
            while True:
                # in slices, because the loop may have ended between the check above and the put (its last cancel
                # came first): then no thread will ever take the call, and waiting on it would never return
                left = 0.1 if deadline is None else min(0.1, max(0.0, deadline - time.monotonic()))
                try:
                    return fut.result(left)
                except FutureTimeout:
                    if fut.done():  # fn's own TimeoutError, not the wait's
                        return fut.result()
                    if not self._looping() and fut.cancel():
                        raise CancelledError from None
                    if deadline is not None and time.monotonic() >= deadline:
                        break
            if fut.cancel():  # still queued: the engine thread will skip it
                raise EngineBusyError(f"the engine did not get to this call within {start_timeout:g} s (busy with "
                                      f"earlier work); it was cancelled and did not run: retry it") from None
            return fut.result()  # started meanwhile: its outcome, however long it takes
        except CancelledError:
            raise EngineBusyError("the engine shut down before running this call; it did not run") from None
        finally:
            with self._calls_lock:
                self._calls.discard(fut)

    def generate(self, prompts: Sequence[str | Sequence[int]], adapters: Sequence[RowSpec] | None = None,
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 tasks: Sequence[str | None] | None = None, cancel: threading.Event | None = None) -> list[Request]:
        """Submit every prompt (with its adapter and task key) and wait for all (steps here unless the background
        thread runs). ``cancel``: once set, the requests not finished are aborted (finish_reason "abort").

        All or nothing at submission: a prompt that ``submit`` refuses (unknown adapter, bad sampling parameters …)
        aborts the ones already queued before its error propagates, so none of them runs on without a caller.
        EngineThreadError, before anything is queued, when called from inside an engine step (an ``on_event``
        listener, an :meth:`call` function, the loop thread): its wait would be for steps only this thread runs."""
        self._refuse_inside_step("generate")
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        tasks = list(tasks) if tasks is not None else [None] * len(prompts)
        reqs: list[Request] = []
        try:
            for p, a, sp, t in zip(prompts, adapters, plist, tasks):
                reqs.append(self.submit(p, a, sp, task=t))
        except BaseException:
            for r in reqs:
                self.abort(r.request_id)
            raise
        return self._wait(reqs, cancel)

    def generate_choices(self, prompt: str | Sequence[int], adapter: RowSpec, params: Sequence[SamplingParams],
                         task: str | None = None, cancel: threading.Event | None = None) -> list[Request]:
        """:meth:`submit_choices` (one shared prefill for ``len(params)`` choices of ``prompt``), then wait for all
        as :meth:`generate` does."""
        self._refuse_inside_step("generate_choices")
        return self._wait(self.submit_choices(prompt, adapter, params, task=task), cancel)

    def _refuse_inside_step(self, what: str) -> None:
        """EngineThreadError when this thread is inside one of the engine's steps (the loop thread, or a thread
        stepping without the loop: a listener or an :meth:`call` function runs there)."""
        if threading.current_thread() is self._thread or self._stepper == threading.get_ident():
            raise EngineThreadError(f"Engine.{what}() was called from inside an engine step (an on_event listener, an "
                                    f"Engine.call function or the engine thread): it would wait for steps only this "
                                    f"thread runs, a deadlock; submit with Engine.submit there, or call {what}() "
                                    f"from another thread")

    def _wait(self, reqs: list[Request], cancel: threading.Event | None) -> list[Request]:
        """Until every request is done (stepping here unless the background thread runs); ``cancel`` aborts them."""
        aborted = False
        while not all(r.done.is_set() for r in reqs):
            if cancel is not None and cancel.is_set() and not aborted:
                for r in reqs:
                    self.abort(r.request_id)
                aborted = True
            if not self._looping():
                self.step()
            else:
                reqs[0].done.wait(0.05)
        return reqs

    def start(self) -> "Engine":
        """Run the engine loop on a background thread (``lorakit-engine``); returns the engine. A no-op while the loop
        runs. Raises EngineStopError while a loop that :meth:`shutdown` told to stop is still running (its step or
        call has not ended): a second loop would run over the same requests, KV cache and banks at once (two starts
        at once: one starts the loop, the other finds it running)."""
        with self._lifecycle:
            thread = self._thread
            if thread is not None and thread.is_alive():
                if not self._stop.is_set():
                    return self
                raise EngineStopError("the engine's previous loop was told to stop but is still running (a step or "
                                      "an Engine.call has not ended); call shutdown() again to wait for it, then "
                                      "start()")
            # its own stop signal: a shutdown that picked the previous loop (or none) can neither stop this one by
            # mistake nor have its stop undone by this start (was: one flag for every loop, cleared here)
            stop = threading.Event()
            thread = threading.Thread(target=self._loop, args=(stop,), name="lorakit-engine", daemon=True)
            self._thread, self._stop = thread, stop
            thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine loop and wait up to ``timeout`` seconds for it to end. Calls still queued are cancelled
        (their callers get EngineBusyError); requests and aborts stay queued for a later :meth:`start`.

        Raises EngineStopError when the loop is still running after ``timeout`` (a step or a call that has not ended):
        it stops once that ends, and the engine keeps the thread (was: forgot it, so a later ``start()`` ran a second
        loop beside it); :meth:`start` refuses until it has ended, and ``shutdown`` again waits again.

        It stops the loop running when it is called; a :meth:`start` that lands while it runs starts a loop of its own,
        which runs on with the calls posted to it (was: the shutdown forgot it, or waited its whole timeout for it,
        raised EngineStopError and cancelled its calls).

        EngineThreadError, at once and with nothing stopped, when called from inside an engine step (the loop
        thread, an ``on_event`` listener, an :meth:`call` function): the loop would wait for this call to return
        while this call waited for the loop to end (was: the loop's own thread failed on joining itself, a listener
        of a thread stepping without the loop waited out the whole timeout)."""
        self._refuse_inside_step("shutdown")
        with self._lifecycle:
            thread, stop = self._thread, self._stop
            stop.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout=timeout)
        if thread is not None and thread.is_alive():
            # the calls queued behind its step: now (a loop that ended cancelled them itself; here, with none to
            # stop, they would be a loop's that a start ran meanwhile)
            self._cancel_calls()
            raise EngineStopError(f"the engine loop did not stop within {timeout:g} s (a step or an Engine.call on "
                                  f"its thread has not ended); it stops when that ends: call shutdown() again to "
                                  f"wait for it")
        with self._lifecycle:
            if self._thread is thread:  # (not one a start ran meanwhile: that loop is the engine's now)
                self._thread = None

    def _looping(self) -> bool:
        """Whether a loop thread runs (one a timed-out shutdown left behind counts until it has ended)."""
        return self._thread is not None and self._thread.is_alive()

    def _cancel_calls(self) -> None:
        """Cancel the calls posted that the engine thread has not started (their callers get EngineBusyError; the
        thread skips their inbox items, :meth:`_drain_inbox`); a call running goes on. The inbox itself is left as it
        is, so requests and aborts stay, in the order posted, for the loop still running or a restarted one (was: it
        was emptied and its requests and aborts put back; an abort posted meanwhile landed before its request, found
        nothing to abort, and the request then ran to its end)."""
        with self._calls_lock:
            calls = list(self._calls)
        for fut in calls:
            fut.cancel()  # (False for a call started or answered: its caller gets its outcome)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Queued requests, choices waiting for their prompt's prefill included."""
        return len(self.waiting) + sum(len(r.children) for r in list(self.waiting))

    # -- the loop ----------------------------------------------------------------------------------------------
    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._turn():
                try:
                    busy = self._step()
                except Exception as e:  # noqa: BLE001  (a failing forward fails its rows, never the engine)
                    for r in list(self.running):
                        self._finish(r, "error", error=e)
                    busy = False
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
        self._cancel_calls()  # queued while a shutdown that timed out waited: their callers would wait for no one

    def step(self) -> bool:
        """One iteration: handle the inbox, admit, prefill, decode. Returns whether any work was done.

        Any thread may step; steps of different threads (the loop's, :meth:`generate`'s without a loop) take turns
        (was: two callers of ``generate`` stepped the same batch at once)."""
        with self._turn():
            return self._step()

    @contextlib.contextmanager
    def _turn(self):
        """Hold the step lock, noting this thread as the one stepping (reentrant: a step's own listeners)."""
        with self._stepping:
            outer, self._stepper = self._stepper, threading.get_ident()
            try:
                yield
            finally:
                self._stepper = outer

    def _step(self) -> bool:
        had_inbox = self._drain_inbox()
        self._admit()
        if self.store is not None and self.waiting:
            self.store.prefetch(n for r in itertools.islice(self.waiting, 0, 2 * self.max_batch)
                                for n in names_in(r.adapter))
        if not self.running:
            return had_inbox
        self._reserve_decode_blocks()
        # One forward per phase (prefill / decode) and per kind of row: every banked adapter, mix and the base
        # share one forward; an attached adapter (DoRA, a router-driven mixture) is a different computation and
        # gets its own, with that adapter active.
        # With cuda_graphs, decode rows the static step takes form a group of their own (the others, e.g. weighted
        # mixes, run eagerly beside them instead of sending the whole batch down the eager path).
        groups: dict[tuple[bool, str | None, bool], list[Request]] = {}
        for r in self.running:
            decode = len(r.context) - r.num_cached == 1
            groups.setdefault((not decode, r.attached, decode and self._static(r)), []).append(r)
        for (_, attached, static), group in groups.items():
            self._forward_rows(group, attached, static)
        self.stats["steps"] += 1
        return True

    def _forward_rows(self, group: list[Request], attached: str | None, static: bool) -> None:
        """:meth:`_forward`, except that rows whose adapter left the model's banks while they ran fail alone.

        With a store that cannot happen (:meth:`AdapterStore.unregister` waits for the requests holding an adapter,
        and evicting or re-banking one they hold is refused). Without one, the caller owns the banks: an adapter removed
        from them (``registry.remove``) fails its own rows, with UnknownAdapterError, and the others run (was: the
        routing raised for the whole batch and every row failed). Routing is built before the forward writes anything
        (KV blocks, tokens), so the rest of the group simply runs again."""
        try:
            self._forward(group, attached, static)
        except UnknownAdapterError:
            registry = getattr(self.model, REGISTRY_ATTR, None)
            gone = [r for r in group if any(registry is None or n not in registry for n in names_in(r.adapter))]
            if not gone:
                raise
            for r in gone:
                missing = [n for n in names_in(r.adapter) if registry is None or n not in registry]
                self._finish(r, "error", error=UnknownAdapterError(
                    f"adapter {missing[0]!r} was removed from the model's banks while this request ran"))
            rest = [r for r in group if r.status == "running"]
            if rest:
                self._forward(rest, attached, static)

    def _drain_inbox(self) -> bool:
        got = False
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return got
            got = True
            if item[0] == "submit":
                for r in (item[1], *item[1].children):
                    self.requests[r.request_id] = r
                self.waiting.append(item[1])
            elif item[0] == "abort":
                req = self.requests.get(item[1])
                if req is not None and req.status != "finished":
                    self._finish(req, "abort")
            else:
                _, fn, fut = item
                if not fut.set_running_or_notify_cancel():  # its caller gave up waiting (Engine.call): never run
                    continue
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001  (handed to the caller)
                    fut.set_exception(e)

    def _admit(self) -> None:
        if not self.waiting:
            return
        budget = self.max_prefill_tokens
        bs = self.cache.block_size
        # choices of admitted prompts that fork after this step's prefill hold rows and blocks already: counted here,
        # so that the prompts admitted after them leave that room (else those choices would go alone)
        rows = len(self.running) + sum(len(r.children) for r in self.running)
        held = sum(len(r.children) for r in self.running if len(r.context) % bs)
        # first come, first served; the one exception: while the first waiting request needs an adapter slot that
        # running requests all hold, requests behind it that cannot delay it start (``_may_hold_a_slot``)
        i, slot_blocked = 0, False
        while i < len(self.waiting) and rows < self.max_batch:
            req = self.waiting[i]
            if slot_blocked and self._may_hold_a_slot(req):
                i += 1
                continue
            source = self._prompt_source(req)
            if source is not None:  # a running choice holds the prompt's blocks: fork them, no prefill
                copy = 1 if req.prompt.length % bs else 0
                if copy + held > self.cache.free_blocks:
                    return
                fits = min(len(req.children), self.max_batch - rows - 1)
                if copy:
                    fits = min(fits, self.cache.free_blocks - held - 1)
                self._release_children(req, fits)  # queued where req stands
                self.waiting.remove(req)
                choices, req.children = [req, *req.children], []
                self._start_forked(source, req.prompt.length, req.prompt.logits, choices, time.perf_counter())
                rows += len(choices)
                continue
            n = len(req.context)
            need = self.cache.blocks_for(n)
            if need + held > self.cache.free_blocks or (n > budget and budget < self.max_prefill_tokens):
                return
            # its own choices: those the batch has rows for now, and (a partly filled last block) free blocks for
            # their copies of it, will fork; the others wait first in the queue (see the module docstring)
            fits = min(len(req.children), self.max_batch - rows - 1)
            if n % bs:
                fits = min(fits, self.cache.free_blocks - need - held)
            if self.store is not None and not req.pinned:  # (a preempted request, a queued choice: held already)
                try:
                    ready = self.store.ensure_resident(req.adapter)
                except Exception as e:  # noqa: BLE001  (a bad adapter fails its request, never the engine)
                    self._finish(req, "error", error=e)  # (leaves the queue; its waiting choices take its place)
                    continue
                if not ready:  # every resident slot is held by running requests: wait for one to finish
                    slot_blocked = True
                    i += 1
                    continue
                req.attached = self.store.attached_name(req.adapter)
                req.recompute = req.attached is not None and self.store.recomputes(req.attached)
                # its choices hold the adapter from now too, also those that wait for rows (an unload waits for
                # them: they are one request), and start on it as it does
                for r in (req, *req.children):
                    self.store.pin(r.adapter)
                    r.pinned, r.attached, r.recompute = True, req.attached, req.recompute
            # an adapter that rewrites its whole context every step has no prefill to share
            self._release_children(req, 0 if req.recompute else fits)  # queued where req stands
            self.waiting.remove(req)
            req.blocks = self.cache.allocate(self.cache.blocks_for(n))
            req.num_cached = 0
            req.status = "running"
            self.running.append(req)
            budget -= n
            rows += 1 + len(req.children)
            held += len(req.children) if n % bs else 0

    def _may_hold_a_slot(self, req: Request) -> bool:
        """Whether starting ``req`` could keep a request that waits for an adapter slot waiting longer: it names a
        folder adapter it holds no pin on yet (a pin keeps that adapter's slot). The base model, adapters banked
        directly (never evicted: ``AdapterStore.banked``) and a request pinned already (a preempted one, a queued
        choice of a running request) need no slot and hold none longer by starting."""
        return not req.pinned and any(n not in self.store.banked for n in names_in(req.adapter))

    def _reserve_decode_blocks(self) -> None:
        """Give every running row room for its next token, preempting the newest rows when blocks run out."""
        i = 0
        while i < len(self.running):
            req = self.running[i]
            extra = self.cache.blocks_for(len(req.context)) - len(req.blocks)
            while extra > self.cache.free_blocks:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            else:
                if extra > 0:
                    req.blocks += self.cache.allocate(extra)
                i += 1

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.cache.release(req.blocks)
        req.blocks, req.num_cached, req.status = [], 0, "waiting"  # (its pin stays: it runs again, on its adapter)
        self.waiting.appendleft(req)
        self.stats["preemptions"] += 1

    def _routing(self, specs: list[RowSpec]):
        registry = getattr(self.model, REGISTRY_ATTR, None)
        if registry is None or not any(names_in(s) for s in specs):
            return contextlib.nullcontext()
        return registry.routing(specs)

    @contextlib.contextmanager
    def _active(self, name: str, group: list[Request]):
        from ..core.model import set_adapter
        from ..core.routing import routing

        keys = None
        if any(r.key is not None for r in group):  # a routed adapter: each row's task key (-1: none)
            keys = torch.tensor([-1 if r.key is None else r.key for r in group], dtype=torch.long, device=self.device)
        set_adapter(self.model, name)
        try:
            with routing(keys=keys) if keys is not None else contextlib.nullcontext():
                yield
        finally:
            set_adapter(self.model, [])

    def _static(self, req: Request) -> bool:
        """Whether the static decode step (``cuda_graphs``) takes this decoding row."""
        return (self.graphs is not None and req.attached is None and not req.recompute
                and self.graphs.takes([req.adapter]))

    def _forward(self, group: list[Request], attached: str | None = None, static: bool = False) -> None:
        starts = [r.num_cached for r in group]
        lengths = [len(r.context) - r.num_cached for r in group]
        q = max(lengths)
        if static:  # decode rows (q == 1) of banked adapters / the base
            last = self.graphs.run([r.context[-1] for r in group], starts, [r.blocks for r in group],
                                   [r.adapter for r in group])
        else:
            last = self._eager_forward(group, attached, starts, lengths, q)
        # a row's first forward (from position 0: a prompt, a recomputed context) is prefill, also for a prompt of one
        # token (was: counted by the group's widest row, so a 1-token prompt's prefill counted as a decode token)
        prefill = sum(n for s, n in zip(starts, lengths) if s == 0 or n > 1)
        self.stats["prefill_tokens"] += prefill
        self.stats["decode_tokens"] += sum(lengths) - prefill
        now = time.perf_counter()
        # a row whose logits overflowed (a weighted mix with extreme weights) fails alone, never the batch
        broken = (torch.isnan(last) | torch.isposinf(last)).any(-1).tolist()
        for i, r in enumerate(group):
            r.num_cached = 0 if r.recompute else r.num_cached + lengths[i]
            if broken[i]:
                self._finish(r, "error", error=RequestError(
                    "the model's output for this request is not finite (nan or inf logits); with a weighted mix, "
                    "use smaller adapter weights"))
                continue
            if r.prompt is not None and r.prompt.logits is None and not r.output_ids and not r.recompute:
                r.prompt.logits = last[i].clone()  # the prompt's prefill: choices admitted later fork from here
            if r.children:  # the prompt's prefill: its other choices take it from here (before r may finish)
                self._fork(r, last[i], now)
            self._take_token(r, sample_token(last[i], r.params, r.generator), now)

    def _take_token(self, r: Request, token: int, now: float) -> None:
        r.output_ids.append(token)
        if r.first_token_at is None:
            r.first_token_at = now
        self._after_token(r, token)

    def _fork(self, parent: Request, logits: torch.Tensor, now: float) -> None:
        """``parent`` has just prefilled its prompt: its waiting choices fork its blocks and sample their first token
        from its last-position ``logits`` (vocab,), each with its own generator. Those the running batch or the free
        blocks have no room for go on alone (:meth:`_release_children`)."""
        room = self.max_batch - len(self.running)
        if parent.num_cached % self.cache.block_size:  # each fork copies the partly filled last block
            room = min(room, self.cache.free_blocks)
        forked = parent.children[: max(room, 0)]
        self._release_children(parent, len(forked))
        parent.children = []
        self._start_forked(parent, parent.num_cached, logits, forked, now)

    def _prompt_source(self, req: Request) -> Request | None:
        """A running choice of ``req``'s prompt whose blocks hold the prompt, when ``req`` is a choice that has not
        started (no tokens: a preempted one recomputes its own) and a choice has prefilled the prompt; else None."""
        shared = req.prompt
        if shared is None or shared.logits is None or req.output_ids or req.recompute:
            return None
        return next((r for r in self.running if r.prompt is shared and r.num_cached >= shared.length
                     and not r.recompute), None)

    def _start_forked(self, source: Request, length: int, logits: torch.Tensor, choices: list[Request],
                      now: float) -> None:
        """``choices`` of ``source``'s prompt (its first ``length`` tokens, in its blocks) join the running batch on
        forks of those blocks and sample their first token from the prompt's last-position ``logits`` (vocab,), each
        with its own generator."""
        tables = self.cache.fork(source.blocks, length, len(choices)) if choices else []
        for child, table in zip(choices, tables):
            child.parent, child.blocks, child.num_cached, child.status = None, table, length, "running"
            child.attached, child.recompute = source.attached, source.recompute
            if self.store is not None and not child.pinned:  # (pinned with the first choice, as a rule)
                self.store.pin(child.adapter)  # resident already: the source's pin holds it
                child.pinned = True
            self.running.append(child)
        self.stats["forked"] += len(choices)
        for child in choices:
            self._take_token(child, sample_token(logits, child.params, child.generator), now)

    def _release_children(self, req: Request, keep: int) -> None:
        """``req``'s waiting choices after the first ``keep`` go on without it, queued where ``req`` stands (at the
        front when it is not queued), still together: the first of them carries the others; when admitted it forks
        the prompt's blocks from a choice still running, or prefills the prompt itself, and the others it has room
        for then fork with it (the rest are released again, the same way)."""
        rest, req.children = req.children[keep:], req.children[:keep]
        if not rest:
            return
        head, head.parent = rest[0], None
        head.children = rest[1:]
        for child in head.children:
            child.parent = head
        at = self.waiting.index(req) if req.status == "waiting" and req in self.waiting else 0
        self.waiting.insert(at, head)

    def _eager_forward(self, group: list[Request], attached: str | None, starts: list[int], lengths: list[int],
                       q: int) -> torch.Tensor:
        """The group's forward with shapes of its own -> each row's last logits (batch, vocab), float32, host."""
        ids = torch.zeros(len(group), q, dtype=torch.long)
        for i, r in enumerate(group):
            ids[i, : lengths[i]] = torch.as_tensor(r.context[r.num_cached:], dtype=torch.long)
        positions = torch.as_tensor(starts)[:, None] + torch.arange(q)[None]  # (batch, q); padding past the end
        batch = PagedBatch.build(self.cache, [r.blocks for r in group], starts, lengths)
        route = self._active(attached, group) if attached is not None else self._routing([r.adapter for r in group])
        # routing first: its id tensors are then ordinary tensors, whose version counter the banks' plan cache reads.
        # The paged mask goes in as a prepared 4-D mask, which transformers passes through untouched (without one,
        # its packed-sequence check reads position_ids back to the host: a device synchronisation per forward).
        with route, torch.inference_mode(), paged_batch(batch):
            logits = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                                attention_mask=batch.mask, use_cache=False).logits
        return logits[torch.arange(len(group)), torch.as_tensor(lengths) - 1].float().cpu()  # (batch, vocab)

    def _after_token(self, req: Request, token: int) -> None:
        p = req.params
        reason = None
        if token in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        elif len(req.output_ids) >= p.max_tokens or len(req.context) >= self.max_model_len:
            reason = "length"
        text = req.text
        if self.tokenizer is not None:
            ids = req.output_ids[:-1] if reason == "stop" else req.output_ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = find_stop(text, p.stop) if p.stop else -1
            if cut >= 0:
                text, reason = text[:cut], "stop"
        req.text = text
        if reason is not None:
            self._finish(req, reason, new_tokens=[token])
            return
        hold = max((len(s) for s in p.stop), default=1) - 1  # text that may still become a stop string
        end = len(text) - hold
        while end > req.sent and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
            end -= 1
        delta = text[req.sent: max(end, req.sent)]
        req.sent += len(delta)
        self._emit(req, Event(req.request_id, delta, [token]))

    def _finish(self, req: Request, reason: str, *, error: BaseException | None = None,
                new_tokens: list[int] | None = None):
        if req.status == "running":
            self.running.remove(req)
            self.cache.release(req.blocks)
            req.blocks = []
        elif req.status == "waiting" and req.parent is not None:  # a choice still waiting for its prompt's prefill
            req.parent.children.remove(req)
            req.parent = None
        if req.pinned:
            self.store.unpin(req.adapter)
            req.pinned = False
        if req.children:  # choices waiting for this request's prefill: they go on alone
            self._release_children(req, 0)
        if req.status == "waiting" and req in self.waiting:
            self.waiting.remove(req)
        req.status, req.finish_reason, req.exception = "finished", reason, error
        # lorakit's messages as they are (an adapter's recorded failure reads the same for every request), others
        # with their type
        req.error = None if error is None else str(error) if isinstance(error, LorakitError) else \
            f"{type(error).__name__}: {error}"
        req.finished_at = time.perf_counter()
        self.requests.pop(req.request_id, None)
        self.stats["finished"] += 1
        delta = req.text[req.sent:]
        req.sent = len(req.text)
        self._emit(req, Event(req.request_id, delta, new_tokens or [], True, reason, req.error))
        req.done.set()

    @staticmethod
    def _emit(req: Request, event: Event) -> None:
        if req.on_event is not None:
            try:
                req.on_event(event)
            except Exception:  # noqa: BLE001  (a broken listener must not stop the engine)
                req.on_event = None
