"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn), with vLLM's adapter endpoints.

Endpoints (bodies as OpenAI's / vLLM's):

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (chat template from the tokenizer): ``model`` names an
  adapter or the base model; ``stream: true`` answers with server-sent events ending ``data: [DONE]``.
  Sampling: ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``seed``, ``stop``, ``ignore_eos``.
  lorakit extras: ``adapters: {"math": 0.7, "sql": 0.3}`` (a weighted mix instead of ``model``);
  ``task: "rotate"`` for an adapter trained with task keys (``routed_lora``: selects the expert through the
  adapter's saved task index; an unknown task, or none for a routed adapter, is a 400 listing its tasks);
  ``self_moa: {"n": 4, "window": null}`` on /v1/completions and /v1/chat/completions (Self-MoA: n samples + a
  synthesis pass; the synthesis pass streams with ``stream: true``).
  ``n``: n choices for the one prompt, each its own engine request on the same adapter or mix (ids ``{id}-{i}``),
  indexed 0..n-1, sharing the prompt's prefill (computed once, the others fork its KV blocks:
  ``Engine.submit_choices``; choices start first come, first served as rows free up, not all at once); with
  ``seed``, choice i samples with seed + i (as vLLM), so it is reproducible and choice 0 is the n=1 answer; greedy
  (``temperature: 0``) gives n identical choices. ``usage`` counts the prompt once and sums the completion tokens of
  every choice; stream chunks carry their choice's ``index``. n may exceed the engine's ``max_batch`` (the choices
  run in waves as rows free up, as vLLM serves n beyond its ``max_num_seqs``); it is at most ``ServerLimits.max_n``
  (``--max-n``, default 128 as OpenAI's bound; a 400 beyond); a disconnect aborts every choice; ``self_moa`` with
  n > 1 is a 400 (it answers with one synthesis; its proposals are ``self_moa.n``). Ids: ``chatcmpl-...`` on chat,
  ``cmpl-...`` on completions.
  A null field means its default (``temperature: null`` = 1, ``n: null`` = 1). Fields OpenAI defines that this
  server does not implement (``echo``, ``logprobs``, ``best_of``, ``suffix``, ``logit_bias``, penalties, ``tools``,
  ``response_format``) are a 400 unless at their defaults; unknown fields are ignored. Chat ``content``
  is a string or a list of ``{"type": "text"}`` parts. ``stream_options.include_usage`` adds a last chunk with
  ``"choices": []`` and the usage.
- ``GET /v1/models``: the base and every servable adapter (``parent`` = the base), as vLLM lists them; an adapter
  folder that failed to register or load is not listed, and a request naming it gets a 400 saying why.
- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``; ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``.
  Unloading an unknown name is a 404. A load or unload that conflicts with the name's state is a 409
  (``conflict_error``; retrying after the other operation can succeed): loading a name that is loaded, whose load is
  in flight, or that is being unloaded (running requests still hold it); unloading a name whose load is in flight
  or that is already being unloaded. The conflict is judged as the request arrives (under the store's lock, not
  once the engine thread gets to it), so it is answered at once while the operation in progress finishes. A
  completion request naming an adapter whose load is in flight is a 409 too
  (retry after the load; OpenAI's Python client retries a 409 by itself), not vLLM's 404, which reads as "no such
  adapter" although the name will be served in a moment.
  A load or unload runs on the engine thread between steps (it changes the banks), queued behind the steps and
  loads before it; the reply never contradicts what happens to it. If the engine has not started it within
  ``ServerLimits.adapter_queue_timeout_s`` (``lorakit serve --adapter-queue-timeout``, default 120 s: it is busy
  with long steps or earlier loads), it is cancelled, atomically (``Engine.call``'s start_timeout: either the
  engine thread has taken it or it never will), and answered 503 ``server_error`` (OpenAI's status for "the engine
  is currently overloaded") with ``Retry-After: 1`` (OpenAI's client retries a 503 by itself, after that pause):
  nothing changed, the name is free, a retry can succeed. Once started it is waited for, however long it takes, and the reply is its outcome (200, or
  its error). Chosen over waiting without bound, so that a swamped engine answers within the limit rather than
  holding the client on an operation that has not begun; and over a timeout that gives up on a started operation
  (was: a 500 after 120 s while the load or unload still ran and succeeded, so the client's retry got a 409, or
  the name was unloaded after the client was told it was not).
- ``GET /health``; ``GET /metrics`` (Prometheus text format).

Security: an optional API key (``Authorization: Bearer KEY``) on ``/v1/*``; adapter paths confined to the
configured roots (``store.confine``); safetensors only; body size and ``max_tokens`` limits. Every bad request
gets a 4xx JSON error ``{"error": {"message", "type", "code"}}`` (a server fault a 500 in the same shape); a client
that disconnects has its request aborted, which frees its KV blocks, also before its response started (queued, or a
non-streamed request).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..core.errors import (FIELD, AdapterConflictError, AdapterError, AdapterLoadError, ConfigError, LorakitError,
                           UnknownAdapterError)

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover
    raise ImportError("lorakit's server needs the 'serve' extra: pip install 'lorakit[serve]'") from e
from ..core.layer import BASE_NAME
from .engine import Engine, EngineBusyError, EngineStopError, Event, Request
from .multi import REGISTRY_ATTR
from .sampling import SamplingParams


@dataclass
class ServerLimits:
    """Per-request limits: body bytes, ``max_tokens`` at most, default ``max_tokens``, choices (``n``) at most,
    seconds a load or unload waits in the engine thread's queue.
    ``max_n`` defaults to OpenAI's bound on ``n`` (1..128 in its API reference); it does not depend on the engine's
    ``max_batch``: n choices beyond the free rows start in waves as rows free up (``Engine.submit_choices``).
    ``adapter_queue_timeout_s``: a load or unload the engine thread has not started by then (it is busy with long
    steps or earlier loads) is cancelled, so it never runs, and answered 503 with ``Retry-After``; one that has
    started is waited for and answered with its outcome, however long it takes (``Engine.call``'s start_timeout)."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024
    default_max_tokens: int = 16
    max_n: int = 128
    adapter_queue_timeout_s: float = 120.0

    def __post_init__(self):
        for name in ("max_body_bytes", "max_tokens", "default_max_tokens", "max_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server limit {FIELD} must be positive, got {getattr(self, name)} ({self})",
                                  field=f"ServerLimits.{name}")
        if not 0 < self.adapter_queue_timeout_s < math.inf:
            raise ConfigError(f"server limit {FIELD} must be a positive, finite number of seconds, got "
                              f"{self.adapter_queue_timeout_s}", field="ServerLimits.adapter_queue_timeout_s")


class HTTPError(Exception):
    """A request's error as the HTTP status, message and OpenAI error type the server answers with."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers

    def __reduce__(self):  # pickled with its status and type (a Ray Serve replica's error crosses processes)
        return type(self), (self.status, self.message, self.kind, self.headers)


class _Metrics:
    """Prometheus metrics of one server (own registry, so several servers can live in one process)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.engine = engine
        self.registry = r = CollectorRegistry()
        store = engine.store
        Gauge("lorakit_num_requests_running", "Requests in the running batch", registry=r).set_function(
            lambda: engine.num_running)
        Gauge("lorakit_num_requests_waiting", "Requests queued", registry=r).set_function(lambda: engine.num_waiting)
        Gauge("lorakit_kv_cache_usage_perc", "Fraction of KV cache blocks in use", registry=r).set_function(
            lambda: engine.cache.used_blocks / engine.cache.num_blocks)
        Gauge("lorakit_kv_cache_bytes", "Bytes preallocated for the KV cache (within --kv-cache-mb)",
              registry=r).set(engine.cache.nbytes)
        # an engine without a store: every adapter banked in its model is resident (what its banks hold)
        def banked_bytes() -> int:
            banks = getattr(engine.model, REGISTRY_ATTR, None)  # none before the first adapter is banked
            return banks.memory_bytes() if banks is not None else 0
        Gauge("lorakit_resident_adapters", "Adapters resident in the banks", registry=r).set_function(
            lambda: len(store.resident) if store is not None else len(engine.adapter_names()))
        Gauge("lorakit_adapter_resident_bytes", "Bytes of adapter weights resident in the banks",
              registry=r).set_function(lambda: store.resident_bytes if store is not None else banked_bytes())
        Gauge("lorakit_adapter_host_cache_bytes", "Bytes of adapter weights in the host-memory cache",
              registry=r).set_function(lambda: store.host_bytes if store is not None else 0)
        Gauge("lorakit_generation_tokens_per_second", "Generated tokens per second over the last 10 s",
              registry=r).set_function(self.tokens_per_second)
        self.lora_info = Gauge("lorakit_lora_requests_info", "Running/waiting adapters (vLLM's lora_requests_info)",
                               ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)
        self.requests = Counter("lorakit_requests", "Finished requests", ["adapter", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens of requests whose prompt was processed, "
                                     "each request's prompt once as usage.prompt_tokens counts it (n choices too)",
                                     registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "Time to first token", buckets=buckets,
                              registry=r)
        self.itl = Histogram("lorakit_inter_token_latency_seconds", "Time between tokens", buckets=buckets,
                             registry=r)
        self.e2e = Histogram("lorakit_e2e_request_latency_seconds", "Request latency", buckets=buckets, registry=r)
        self._recent: deque[tuple[float, int]] = deque()

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / 10.0

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        running = sorted({n for r in list(self.engine.running) for n in _names(r.adapter)})
        waiting = sorted({n for r in list(self.engine.waiting) for n in _names(r.adapter)})
        self.lora_info.clear()
        store = self.engine.store
        self.lora_info.labels(str(store.max_loras if store is not None else 0), ",".join(running),
                              ",".join(waiting)).set(time.time())
        return generate_latest(self.registry)


def _names(spec) -> list[str]:
    from .store import names_in
    return names_in(spec)


LOAD_AGAIN = "load it again with POST /v1/load_lora_adapter"  # how ``lorakit serve`` serves a fixed folder again
# a cancelled load or unload's Retry-After: at once, nearly (the retry waits in the engine's queue again, up to
# ServerLimits.adapter_queue_timeout_s; a longer pause would only add idle time)
RETRY_AFTER_S = 1


def refusal(error: BaseException, model: str | None = None, *, reload: str = LOAD_AGAIN) -> HTTPError:
    """The HTTP error a request gets for ``error``, the same whether it was raised before the request was queued or
    met by the engine (an adapter whose weights fail on this request's first load, one unloaded while the request
    waited), mapped by the error's type, never its message: an unknown adapter (UnknownAdapterError) is a 404
    (``model``: the request's ``model`` when that names it, OpenAI's wording); a load or unload that conflicts with
    the adapter's state (AdapterConflictError: loaded, being loaded or being unloaded) a 409; any other request fault
    (lorakit's errors that are ValueErrors: a bad adapter, task or request) a 400; anything else a 500. An adapter
    that failed to register or to load says why and how to serve it again (``reload``: how this deployment does
    that; a Ray Serve replica, which refuses the load endpoint, says to deploy again), not that it is unknown.
    A load or unload the busy engine never started (EngineBusyError: cancelled, nothing changed) is a 503 with
    ``Retry-After`` (:data:`RETRY_AFTER_S`), OpenAI's status for an overloaded engine; OpenAI's client retries it."""
    if isinstance(error, EngineBusyError):
        return HTTPError(503, str(error), "server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, AdapterLoadError):
        return HTTPError(400, f"{error}; fix its folder, then {reload}")
    if isinstance(error, UnknownAdapterError):
        # a weighted mix names its adapters apart from 'model': say which one is unknown, not that 'model' is
        what = f"The model `{model}` does not exist: " if model is not None else ""
        return HTTPError(404, f"{what}{error}; see /v1/models", "not_found_error")
    if isinstance(error, AdapterConflictError):
        return HTTPError(409, str(error), "conflict_error")
    if isinstance(error, LorakitError) and isinstance(error, ValueError):
        return HTTPError(400, str(error))
    message = str(error) if isinstance(error, LorakitError) else f"{type(error).__name__}: {error}"
    return HTTPError(500, message, "server_error")


def _model(spec) -> str | None:
    """The adapter a request's ``model`` names (None for the base or a weighted mix)."""
    return spec if isinstance(spec, str) else None


# OpenAI request fields that change what is generated or returned, which this server does not implement: a value
# other than their defaults (or null) is refused rather than ignored (a 200 without the asked-for logprobs, echo,
# penalties, tool calls or JSON mode would look like a correct answer)
DISCONNECT_POLL_S = 0.25  # how often a request whose response has not started checks that its client is there

UNSUPPORTED: dict[str, tuple] = {
    "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,), "best_of": (1,), "suffix": ("",),
    "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "tools": ([],),
    "functions": ([],), "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
}


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   headers: dict[str, str] | None = None):
    """OpenAI's error body ``{"error": {"message", "type", "code"}}`` with that HTTP status (every error reply)."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON number (RFC 8259); send a finite number")


class _Guard:
    """API key on ``/v1/*`` (compared in constant time, as bytes) and the body size limit (from content-length), as
    plain ASGI middleware: Starlette's BaseHTTPMiddleware (``@app.middleware``) hides a client's disconnect from
    ``Request.is_disconnected``, so a request whose client hung up before its response started ran to the end."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        # the header as sent (bytes): compared in constant time, and a non-ASCII key matches its UTF-8 bytes
        self._expected = None if api_key is None else b"Bearer " + api_key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            from starlette.datastructures import Headers

            headers = Headers(scope=scope)
            refused = None
            sent = headers.get("authorization", "").encode("latin-1")  # Starlette decodes header bytes as latin-1
            if self._expected is not None and scope["path"].startswith("/v1/") and \
                    not hmac.compare_digest(sent, self._expected):
                refused = error_response(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                         "authentication_error")
            size = headers.get("content-length")
            if refused is None and size is not None and size.isdigit() and int(size) > self.max_body_bytes:
                refused = error_response(413, f"request body of {size} bytes exceeds the limit of "
                                              f"{self.max_body_bytes} bytes")
            if refused is not None:
                return await refused(scope, receive, send)
            return await _answer_when_cancelled(self.app, scope, receive, send)
        await self.app(scope, receive, send)


SHUTTING_DOWN = "the server is shutting down; this request was stopped (retry it once the server is back)"
CANCELLED_ANSWER_SECONDS = 2.0  # how long the answer to a cancelled request may wait on its client (flow control)


async def _answer_when_cancelled(app, scope, receive, send) -> None:
    """Run ``app`` on one HTTP request; if its task is cancelled (the server's forced exit: a second Ctrl-C, or
    uvicorn's graceful-shutdown timeout, cancels the requests still running), answer it as an error instead of
    letting the cancellation reach uvicorn, which logged a traceback per request ("Exception in ASGI application")
    and cut the connection: a 503 in OpenAI's error shape when the response has not started, else, for a stream, a
    last ``data: {"error": ...}`` event, as the server reports a mid-stream error (any other started response is
    just ended). The app's own cleanup (aborting the request's engine work) has run by then. That answer waits at
    most ``CANCELLED_ANSWER_SECONDS`` for the client (one that stopped reading holds a send in flow control), so it
    never holds up the exit. A client's disconnect never gets here: Starlette absorbs it."""
    started, done, stream = False, False, False

    async def watched(message):
        nonlocal started, done, stream
        if message["type"] == "http.response.start":
            started = True
            stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                         for k, v in message.get("headers", ()))
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            done = True
        await send(message)
    try:
        await app(scope, receive, watched)
    except asyncio.CancelledError:
        if done:
            return
        try:
            await asyncio.wait_for(_answer_cancelled(started, stream, scope, receive, send), CANCELLED_ANSWER_SECONDS)
        except (asyncio.TimeoutError, OSError):  # the client is not reading, or gone: the connection closes anyway
            pass


async def _answer_cancelled(started: bool, stream: bool, scope, receive, send) -> None:
    if not started:
        await error_response(503, SHUTTING_DOWN, "server_error")(scope, receive, send)
        return
    if stream:
        event = _sse({"error": {"message": SHUTTING_DOWN, "type": "server_error", "code": 503}})
        await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(engine: Engine, *, model_name: str = "base", api_key: str | None = None,
               limits: ServerLimits | None = None, reload: str = LOAD_AGAIN):
    """The FastAPI app serving ``engine`` (its background thread is started with the app). An engine without an
    AdapterStore serves (and lists in /v1/models) the adapters banked in its model, also those banked after the app
    was made (``engine.call(lambda: load_adapters(model, ...))``); the load endpoints need a store. ``reload``: how a
    user serves an adapter whose folder failed to load once it is fixed, as the 400 for it words it (default: POST
    /v1/load_lora_adapter; a deployment that refuses that endpoint, e.g. Ray Serve replicas, says its own way)."""
    import contextlib

    def refuse(error: BaseException, model: str | None = None) -> HTTPError:
        return refusal(error, model, reload=reload)

    limits = limits or ServerLimits()
    metrics = _Metrics(engine)
    tokenizer = engine.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        try:
            engine.shutdown()
        except EngineStopError as e:  # the app stops anyway; the loop ends with the step or call it is in
            logging.getLogger("lorakit.serving").warning("%s", e)
        if engine.store is not None:
            engine.store.close()

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request, exc: StarletteHTTPException):  # unknown path, wrong method: OpenAI's shape too
        return error_response(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                              else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # a server fault still answers in OpenAI's error shape
        return error_response(500, f"{type(exc).__name__}: {exc}", "server_error")

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    async def body_of(request: HTTPRequest) -> dict:
        # read up to the limit only (a chunked body has no content-length for _Guard to refuse up front)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise HTTPError(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks), parse_constant=_not_json)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise HTTPError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return body

    def adapter_of(body: dict):
        mix = body.get("adapters")
        if mix is not None:
            if not isinstance(mix, dict) or not mix or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    for k, v in mix.items()):
                raise HTTPError(400, "'adapters' must be an object {adapter name: weight}")
            spec = {k: float(v) for k, v in mix.items()}
        else:
            name = body.get("model")
            if name is None:
                raise HTTPError(400, "'model' is required: the base model's name or an adapter name (see /v1/models)")
            if not isinstance(name, str):
                raise HTTPError(400, "'model' must be a string")
            spec = None if name in (model_name, BASE_NAME) else name
        try:
            engine.check_adapter(spec)  # the store's adapters, or (an engine without one) those banked in the model
        except LorakitError as e:  # failed to register or to load: 400 saying why; unknown: 404
            raise refuse(e, _model(spec)) from None
        return spec

    def params_of(body: dict) -> SamplingParams:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", limits.default_max_tokens))
        if max_tokens is None:
            max_tokens = limits.default_max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise HTTPError(400, f"max_tokens must be a positive integer, got {max_tokens!r}")
        if max_tokens > limits.max_tokens:
            raise HTTPError(400, f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens}")
        for name in ("stream", "ignore_eos"):  # a string "false" would read as true
            if not isinstance(body.get(name, False), (bool, type(None))):
                raise HTTPError(400, f"'{name}' must be true, false or null, got {body[name]!r}")
        options = body.get("stream_options")
        if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False),
                                                                                  (bool, type(None)))):
            raise HTTPError(400, f"'stream_options' must be an object {{\"include_usage\": true|false}}, got "
                                 f"{options!r}")
        for name, default in UNSUPPORTED.items():
            if body.get(name) not in (None, *default):
                raise HTTPError(400, f"'{name}' is not supported by this server (got {body[name]!r}); drop it")
        top_k = body.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
            raise HTTPError(400, f"top_k must be an integer (0 or -1 = off), got {top_k!r}")
        temperature = body.get("temperature")
        for name in ("temperature", "top_p"):  # (a string "0.5" or true would reach float() and read as a number)
            value = body.get(name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise HTTPError(400, f"{name} must be a number or null, got {value!r}")
        stop = body.get("stop")
        stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
            raise HTTPError(400, "'stop' must be a string or a list of at most 16 strings")
        if "" in stop:  # no text ends at an empty string: it never matched, and generation ran on to max_tokens
            raise HTTPError(400, f"'stop' holds an empty string (got {body['stop']!r}); every stop sequence needs at "
                                 "least one character (omit 'stop' or send [] for none)")
        try:
            # null means the default, as an absent field (OpenAI's temperature: 1)
            return SamplingParams(max_tokens=max_tokens,
                                  temperature=1.0 if temperature is None else float(temperature),
                                  top_p=float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0),
                                  top_k=0 if top_k in (None, -1) else top_k,
                                  seed=body.get("seed"), stop=tuple(stop), ignore_eos=bool(body.get("ignore_eos")))
        except (LorakitError, TypeError, ValueError) as e:
            raise HTTPError(400, str(e)) from None

    def n_of(body: dict) -> int:
        """The request's ``n`` (choices): 1 when absent or null, at most ``limits.max_n`` (a 400 beyond). n may exceed
        the engine's ``max_batch``: the choices without a free row wait and start as rows free up, forking the
        prompt's blocks from a running sibling (or prefilling it again when none runs any more)."""
        n = body.get("n")
        if n is None:
            return 1
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise HTTPError(400, f"n must be a positive integer, got {n!r}")
        if n > limits.max_n:
            raise HTTPError(400, f"n={n} exceeds this server's limit of {limits.max_n} choices per request "
                                 f"(ServerLimits.max_n, --max-n); ask for fewer choices or send several requests")
        return n

    def submit_all(prompt, spec, params: list[SamplingParams], loop, q, task, rid: str) -> list[Request]:
        """One engine request per choice (ids ``{rid}-{i}``), all posting their events to ``q``, sharing the prompt's
        prefill (``Engine.submit_choices``); a refusal queues none of them."""
        def on_event(ev: Event):
            loop.call_soon_threadsafe(q.put_nowait, ev)
        try:
            return engine.submit_choices(prompt, spec, params, on_event=on_event,
                                         request_ids=[f"{rid}-{i}" for i in range(len(params))], task=task)
        except LorakitError as e:
            raise refuse(e, _model(spec)) from None

    async def events(request: HTTPRequest, reqs: list[Request], q: asyncio.Queue, label: str, stream: bool):
        """``(choice index, event)`` of the requests' events as they come, until every one has finished; aborts
        those not finished when the client goes away (watched for here, every ``DISCONNECT_POLL_S`` also while tokens
        flow, until the response starts: a streaming response starts after the first event, and Starlette cancels
        it from then) or when the consumer closes this generator early."""
        index = {r.request_id: i for i, r in enumerate(reqs)}
        last: dict[int, float] = {}
        pending = set(range(len(reqs)))
        started = False
        check_at = time.perf_counter() + DISCONNECT_POLL_S
        try:
            while pending:
                try:
                    ev = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    ev = None
                now = time.perf_counter()
                if now >= check_at and not (stream and started) and not (ev is not None and ev.finished):
                    check_at = now + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return
                if ev is None:
                    continue
                started = True
                i = index[ev.request_id]
                if ev.token_ids and not last:
                    # the prompt was processed (a choice has its first token): counted once, as usage.prompt_tokens
                    # counts it, whether the choices shared its prefill or some prefilled it again on their own; a
                    # request refused or gone before that (no usage reported) adds nothing
                    metrics.prompt_tokens.inc(len(reqs[0].prompt_ids))
                if ev.token_ids:
                    if i not in last:
                        metrics.ttft.observe(now - reqs[i].arrival)
                    else:
                        metrics.itl.observe(now - last[i])
                    last[i] = now
                    metrics.generation_tokens.inc(len(ev.token_ids))
                    metrics._recent.append((now, len(ev.token_ids)))
                if ev.finished:
                    pending.discard(i)
                    metrics.requests.labels(label, ev.finish_reason).inc()
                    metrics.e2e.observe(now - reqs[i].arrival)
                yield i, ev
        finally:
            for i in sorted(pending):
                engine.abort(reqs[i].request_id)
                metrics.requests.labels(label, "abort").inc()

    def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
        """Choice i's sampling parameters: with a ``seed``, seed + i (vLLM's parallel sampling,
        vllm/v1/engine/parallel_sampling.py ``ParentRequest._get_child_sampling_params``), so choice i of a seeded
        request is reproducible and choice 0 is the n=1 answer; without one, each its own random generator."""
        if params.seed is None or n == 1:
            return [params] * n
        try:
            return [replace(params, seed=params.seed + i) for i in range(n)]
        except LorakitError as e:  # seed + n - 1 beyond manual_seed's range
            raise HTTPError(400, f"{e} (choice i samples with seed + i; lower seed or n)") from None

    async def run(request: HTTPRequest, body: dict, prompt, kind: str):
        spec = adapter_of(body)
        params = params_of(body)
        n = n_of(body)
        chat = kind == "chat"
        # OpenAI's id prefixes: chatcmpl- for chat completions, cmpl- for completions
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        reqs = submit_all(prompt, spec, choice_params(params, n), loop, q, body.get("task"), rid)
        label = body.get("model") if spec is not None and not isinstance(spec, dict) else (
            "mixture" if isinstance(spec, dict) else model_name)
        created, model = int(time.time()), body.get("model") or model_name

        def usage() -> dict:  # OpenAI's: the prompt counted once, completion tokens summed over the choices
            prompt_tokens, completion_tokens = len(reqs[0].prompt_ids), sum(len(r.output_ids) for r in reqs)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}
        obj = "chat.completion" if chat else "text_completion"

        if body.get("stream"):
            # the response starts with the first event: a request the engine refuses before its first token (an
            # adapter whose weights fail on this first load) gets the same HTTP error as a non-streaming request and
            # as every later request for that adapter, not a 200 whose stream carries the error
            stream = events(request, reqs, q, label, stream=True)
            first = await anext(stream, None)
            if first is None:  # client went away
                return Response(status_code=499)
            if first[1].error:
                await stream.aclose()
                raise refuse(reqs[first[0]].exception, _model(spec)) from None

            async def after(first):
                yield first
                async for item in stream:
                    yield item

            def chunk_of(choices: list) -> dict:
                chunk = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": model,
                         "choices": choices}
                if (body.get("stream_options") or {}).get("include_usage"):
                    chunk["usage"] = None
                return chunk

            async def sse():
                if chat:  # each choice opens with its role, as OpenAI's and vLLM's streams do
                    for i in range(n):
                        yield _sse(chunk_of([{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]))
                try:
                    async for i, ev in after(first):
                        if ev.error:  # met mid-stream (after tokens were sent): the same status, type and message
                            e = refuse(reqs[i].exception, _model(spec))
                            yield _sse({"error": {"message": e.message, "type": e.kind, "code": e.status}})
                            break
                        if not ev.text and not ev.finished:
                            continue
                        choice = {"index": i, "finish_reason": ev.finish_reason if ev.finished else None}
                        if chat:
                            choice["delta"] = {"content": ev.text} if ev.text else {}
                        else:
                            choice["text"], choice["logprobs"] = ev.text, None
                        yield _sse(chunk_of([choice]))
                    else:
                        if (body.get("stream_options") or {}).get("include_usage"):
                            # OpenAI's stream_options.include_usage: one more chunk before [DONE], "choices": [],
                            # the whole request's usage (other chunks carry "usage": null)
                            yield _sse({**chunk_of([]), "usage": usage()})
                    yield "data: [DONE]\n\n"
                finally:
                    await stream.aclose()  # aborts every choice not finished (a disconnect, an error)
            return StreamingResponse(sse(), media_type="text/event-stream")

        finals: dict[int, Event] = {}
        stream = events(request, reqs, q, label, stream=False)
        try:
            async for i, ev in stream:
                if ev.error:
                    raise refuse(reqs[i].exception, _model(spec))
                if ev.finished:
                    finals[i] = ev
        finally:
            await stream.aclose()  # an error in one choice aborts the others
        if len(finals) < n:  # client went away
            return Response(status_code=499)
        choices = []
        for i, r in enumerate(reqs):
            choice = {"index": i, "finish_reason": finals[i].finish_reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": r.text}
            else:
                choice["text"] = r.text
            choices.append(choice)
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage()}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if tokenizer is None:
                raise HTTPError(400, "this server has no tokenizer; send the prompt as token ids")
        elif not (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in prompt)):
            raise HTTPError(400, "'prompt' must be a string or a list of token ids (one prompt per request)")
        elif max(prompt) >= engine.model.config.vocab_size or min(prompt) < 0:
            raise HTTPError(400, "'prompt' has token ids outside the vocabulary")
        if body.get("self_moa") is not None:
            if not isinstance(prompt, str):
                raise HTTPError(400, "self_moa needs a text prompt (its aggregation prompt is text)")
            return await run_self_moa(request, body, prompt, None, "completion")
        return await run(request, body, prompt, "completion")

    async def run_self_moa(request: HTTPRequest, body: dict, prompt, aggregate, kind: str):
        """Self-MoA: proposals and the earlier rounds here, then the last synthesis pass as an ordinary request
        (so it streams, counts usage and is aborted on disconnect like any other)."""
        from .self_moa import SelfMoAConfig, synthesis_prompt, windows

        opts = body["self_moa"]
        if not isinstance(opts, dict):
            raise HTTPError(400, "self_moa takes an object {n, window, temperature}")
        spec, params = adapter_of(body), params_of(body)
        if n_of(body) != 1:
            raise HTTPError(400, "self_moa answers with one synthesis: n > 1 is not supported with it (the number of "
                                 "proposals is self_moa.n); send n: 1 or drop n")
        try:
            config = SelfMoAConfig(**opts)
        except TypeError as e:
            raise HTTPError(400, f"self_moa: {e}") from None
        except LorakitError as e:
            raise refuse(e) from None
        cancel = threading.Event()  # the client went away: abort the proposals (they hold slots and KV blocks)
        work = asyncio.ensure_future(asyncio.to_thread(synthesis_prompt, engine, prompt, spec, params, config,
                                                       aggregate, cancel))
        while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                cancel.set()
                await asyncio.wait({work})
                work.exception()  # RequestCancelled, retrieved (nobody is left to answer)
                return Response(status_code=499)
        try:
            final, proposals = work.result()
        except Exception as e:  # noqa: BLE001  (a proposal the engine failed: as the request itself would be)
            raise refuse(e, _model(spec)) from None
        out = await run(request, body, final, kind)
        if isinstance(out, dict):  # streamed answers carry the synthesis only
            out["self_moa"] = {"proposals": proposals, "rounds": len(windows(config.n, config.window))}
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise HTTPError(400, "'messages' must be a non-empty list of {role, content} objects")
        messages = [{**m, "content": _text_content(m.get("content"), i)} for i, m in enumerate(messages)]
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise HTTPError(400, "this model's tokenizer has no chat template; use /v1/completions")
        def template(conversation) -> list[int]:
            try:
                ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
            except Exception as e:  # noqa: BLE001  (the template raises for unknown roles)
                raise HTTPError(400, f"chat template failed: {e}") from None
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)

        ids = template(messages)
        if body.get("self_moa") is not None:
            from .self_moa import aggregation_prompt

            if messages[-1]["role"] != "user":
                raise HTTPError(400, "self_moa on chat needs the last message to be the user's request")

            def aggregate(shown: list[str]) -> list[int]:  # the last user turn, wrapped with the candidates
                return template(messages[:-1] + [{"role": "user",
                                                  "content": aggregation_prompt(messages[-1]["content"], shown)}])
            return await run_self_moa(request, body, ids, aggregate, "chat")
        return await run(request, body, ids, "chat")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": model_name, "object": "model", "created": now, "owned_by": "lorakit", "root": model_name,
                 "parent": None}]
        paths = engine.store.paths if engine.store is not None else {}
        data += [{"id": n, "object": "model", "created": now, "owned_by": "lorakit", "root": str(paths.get(n, "")),
                  "parent": model_name} for n in engine.adapter_names()]
        return {"object": "list", "data": data}

    async def on_engine_thread(fn):
        # a load or unload: cancelled if the engine has not started it in time (EngineBusyError, a 503: it never
        # runs), else waited for (the reply is its outcome: never a failure for an operation that then succeeds)
        return await asyncio.to_thread(engine.call, fn, start_timeout=limits.adapter_queue_timeout_s)

    def need_store():
        if engine.store is None:
            raise HTTPError(400, "this server was started without adapter roots (--adapters); it cannot load adapters")
        return engine.store

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: HTTPRequest):
        body = await body_of(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise HTTPError(400, "body must be {\"lora_name\": NAME, \"lora_path\": PATH}")
        if name == model_name:
            raise HTTPError(400, f"adapter name {name!r} is the base model's name (requests for it are answered by "
                                 f"the base model); choose another lora_name")
        store = need_store()

        def load(mark):
            store.register(name, path, load=mark)  # its own register: the mark lets it past
            try:
                store.ensure_resident(name)  # reads and checks every tensor now (a bad file: unregistered, recorded)
            except BaseException:
                # any other failure (an adapter the server's caps can never hold, out of memory): the reply is an
                # error, so nothing stays registered (was: served after a 400, and a retry got a 409)
                if name in store.paths:
                    store._unregister(name)
                raise
        try:
            # the name's state is checked and marked here, under the store's lock: a conflicting load or unload (this
            # one or a later one) is answered at once, not after the engine thread gets to it
            with store.loading(name) as mark:
                await on_engine_thread(lambda: load(mark))
        except AdapterConflictError as e:  # the name's state (loaded, being loaded or unloaded): nothing recorded
            raise refuse(e) from None
        except EngineBusyError as e:  # never started: nothing registered, the name's earlier record (if any) kept
            raise refuse(EngineBusyError(f"adapter {name!r} was not loaded: {e}")) from None
        except LorakitError as e:
            # a name whose failure is recorded (by this load, or an earlier one this load updated) answers with the
            # record, as every request naming it will from now on (was: the raw reason here, the record after)
            recorded = store.failed.get(name)
            raise refuse(AdapterLoadError(recorded) if recorded is not None else e) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: HTTPRequest):
        body = await body_of(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise HTTPError(400, "body must be {\"lora_name\": NAME}")
        store = need_store()
        try:
            with store.unloading(name):  # as a load: a conflict (or an unknown name) is answered here, at once
                await on_engine_thread(lambda: store.unregister(name))
        except AdapterError as e:
            raise refuse(e) from None
        except EngineBusyError as e:  # never started: the adapter is still served
            raise refuse(EngineBusyError(f"adapter {name!r} was not unloaded: {e}")) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _text_content(content, i: int) -> str:
    """A chat message's content as text: a string, or OpenAI's list of content parts of type "text" (joined with
    newlines, as vLLM does); other parts (images, audio, files) are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        kinds = sorted({str(p.get("type")) for p in content} - {"text"})
        if kinds:
            raise HTTPError(400, f"messages[{i}].content has parts of type {kinds}; this server takes text only")
        if all(isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
    raise HTTPError(400, f"messages[{i}].content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} "
                         f"parts, got {content!r:.80}")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def served_name(model_path: str | None) -> str:
    """The name a server answers for the base model of ``model_path`` (``model`` in requests, ``/v1/models``):
    "bundled" for the bundled model, else the path's last component (a Hub id's model name)."""
    return "bundled" if model_path in (None, "", "bundled") else str(model_path).rstrip("/").rsplit("/", 1)[-1]


def serve(model_path: str | None = None, adapters: list[str] | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, max_loras: int = 64, max_cpu_loras: int = 256,
          kv_cache_mb: int = 256, max_batch: int = 32, limits: ServerLimits | None = None,
          log_level: str = "info", rank: int | None = None, device: str = "cpu", cuda_graphs: bool = False,
          quantize=None) -> None:
    """Load the model (default: the bundled one), register every adapter folder under ``adapters``, run uvicorn.
    ``rank``: serve nested-rank adapters (DyLoRA) at this rank (a ConfigError for one above its r skips that
    adapter); other adapters are unaffected. A bad root (missing, a file, unreadable, an adapter folder itself:
    :func:`~lorakit.serving.store.check_adapter_roots`) raises AdapterError before the model loads; an adapter
    folder that fails to register is skipped with a warning (``lorakit.serving`` logger) and requests for it get a
    400 with the reason (:meth:`~lorakit.serving.store.AdapterStore.register_roots`); the rest are served. A name
    belongs to the first root of ``adapters`` that has it: a later root's folder of that name is skipped with a
    warning naming both, even when the first one failed.
    ``device``: where the model, banks and KV cache live ("cpu", "cuda"). ``cuda_graphs``: decode steps of banked
    rows as static-shape steps captured in CUDA graphs (``Engine(cuda_graphs=True)``; eager on the CPU).
    ``quantize`` (``"nf4"``, ``"fp4"`` or a ``lorakit.quantize.QuantizeConfig``): load the base's linear layers in
    bitsandbytes 4 bit, as ``lorakit train --quantize`` trains QLoRA adapters on (:func:`~lorakit.hub.
    load_model_and_tokenizer`); the banks add each row's LoRA delta to the 4-bit layers' output (eager and static
    decode steps both run on the CPU). ConfigError, before the model loads, for ``cuda_graphs`` with ``quantize`` on
    a CUDA ``device``: capturing bitsandbytes' 4-bit matmuls in CUDA graphs is not verified; serve without
    ``cuda_graphs`` there."""
    import uvicorn

    from ..hub import load_model_and_tokenizer
    from .store import AdapterStore, check_adapter_roots, log

    if quantize is not None and cuda_graphs and torch.device(device).type == "cuda":
        raise ConfigError(f"{FIELD} with a 4-bit base (quantize) on CUDA: capturing bitsandbytes' 4-bit matmuls in CUDA "
                          f"graphs is not verified, so a 4-bit base is served without them; drop {FIELD}",
                          field="cuda_graphs")
    check_adapter_roots(adapters)
    if not log.handlers and not logging.getLogger().handlers:  # uvicorn configures only its own loggers
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
    model, tokenizer = load_model_and_tokenizer(model_path, device=device, quantize=quantize)
    name = served_name(model_path)
    store = AdapterStore(model, adapters or [], max_loras=max_loras, max_cpu_loras=max_cpu_loras, rank=rank,
                         base_name=name)
    store.register_roots(adapters or [])
    engine = Engine(model, tokenizer, store=store, kv_cache_bytes=kv_cache_mb << 20, max_batch=max_batch,
                    cuda_graphs=cuda_graphs)
    app = create_app(engine, model_name=name, api_key=api_key, limits=limits)
    try:
        _server_class()(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
    finally:  # (the lifespan did this unless the server never got that far: both are no-ops the second time)
        try:
            engine.shutdown()
        except EngineStopError as e:
            log.warning("%s", e)
        store.close()


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose forced exit (a second Ctrl-C while requests run) still stops the app cleanly: the
        requests still running are cancelled and answered (:func:`_answer_when_cancelled`), then the app's shutdown
        runs (the engine loop stops, the adapter store closes). uvicorn skips the app's shutdown on a forced exit, so
        the engine thread was still stepping when the interpreter exited: "terminate called without an active
        exception", exit status 134, after a traceback per request."""

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets)
            if not self.force_exit:
                return
            tasks = list(self.server_state.tasks)
            for task in tasks:
                task.cancel()
            if tasks:  # each answers within CANCELLED_ANSWER_SECONDS; one that ignores its cancellation is left
                await asyncio.wait(tasks, timeout=2 * CANCELLED_ANSWER_SECONDS)
            lifespan = self.lifespan
            if getattr(lifespan, "shutdown_event", None) is not None and not lifespan.shutdown_event.is_set():
                await lifespan.shutdown()
    return Server
