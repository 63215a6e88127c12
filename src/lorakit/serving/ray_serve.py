"""Scale-out on Ray Serve: replicas of the lorakit engine, adapters routed by Ray Serve model multiplexing.

Each replica runs one :class:`~lorakit.serving.engine.Engine` over its own copy of the base model with an
:class:`~lorakit.serving.store.AdapterStore` on the shared adapter folders. A request names its adapter as Ray
Serve's multiplexed model id (HTTP header ``serve_multiplexed_model_id``, or
``handle.options(multiplexed_model_id=NAME)``); Ray Serve's router sends it to a replica that already holds that
adapter when one does, so each replica keeps a working set of adapters resident instead of every replica loading
all of them (Ray Serve "Model Multiplexing"; S-LoRA's per-server adapter tiers stay as they are inside a replica).
Ray's per-replica multiplex cache and the replica's resident banks have the same cap.

Requires the extra ``lorakit[ray]`` (``ray[serve]``). Usage::

    from ray import serve
    from lorakit.serving.ray_serve import deployment

    app = deployment(model="bundled", adapter_roots=["adapters/"], num_replicas=2)
    handle = serve.run(app)
    handle.options(multiplexed_model_id="math").remote({"prompt": "12+30=", "max_tokens": 8}).result()

Each replica answers with the OpenAI-compatible app of ``lorakit serve`` itself
(:func:`~lorakit.serving.server.create_app` over the replica's engine), so a reply, an error and a stream have one
shape and one code path whether they come from ``lorakit serve`` or a replica: ``POST /v1/completions``,
``/v1/chat/completions`` (``stream: true`` streams), ``GET /v1/models``, ``/health``, ``/metrics`` (not
``/v1/load_lora_adapter`` / ``unload``: a 400, as one replica would load the adapter and the others not). Over HTTP,
name the adapter in ``model`` as for ``lorakit serve`` and in the ``serve_multiplexed_model_id`` header (what Ray
routes by; the body's ``model`` is what is served)::

    curl -H 'serve_multiplexed_model_id: math' -d '{"model": "math", "prompt": "12+30="}' \\
        localhost:8000/v1/completions

The response carries the app's headers as it sent them (a repeated header stays repeated) and the replica's id in
the ``x-lorakit-replica`` header. A handle call sends the body of a
``/v1/completions`` request (``model`` defaults to the multiplexed id, or the base model when that is empty) and
returns OpenAI's completion object with one more key, ``"replica"``; an error is raised as the
:class:`~lorakit.serving.server.HTTPError` the HTTP request would get (its ``status``, ``message``, ``kind``).

Adapter folders are registered when a replica starts, as ``lorakit serve`` does: a folder that fails to register
(invalid config, unknown method, no weights file) is skipped with a warning in the replica's log and the others
are served; a request naming it, or an adapter whose weights failed to load, gets a 400 with the reason (an unknown
name: 404), as from ``lorakit serve``, ending with how to serve it again here: deploy again, not POST
/v1/load_lora_adapter. As with ``lorakit serve``, a name belongs to the first root that has it (a later root's
folder of that name is skipped, even when the first one is broken). A replica registers folders only
when it starts: to serve a fixed or new folder, deploy again (``serve.run``). A missing or unreadable root
fails :func:`deployment` itself, before any replica starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, Sequence

from ray import serve

from ..core.errors import LorakitError
from .engine import EngineThreadError
from .server import HTTPError, create_app, error_response, served_name

_log = logging.getLogger("lorakit.serving")
REPLICA_HEADER = "x-lorakit-replica"
RUNTIME_LOADS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
RELOAD = "deploy again (serve.run): replicas register their adapter folders when they start"


class _Resident:
    """What Ray's multiplex cache holds per adapter: a token. The replica's own AdapterStore decides what stays in
    its banks (LRU under the same cap, never evicting an adapter that running requests use), so Ray dropping the
    token only stops routing preference; it does not pull weights from under running requests."""

    def __init__(self, name: str):
        self.name = name


def _shutdown_quietly(engine) -> None:
    """``engine.shutdown()`` from a helper thread; its EngineStopError (a step still running) is logged."""
    try:
        engine.shutdown()
    except Exception as e:  # noqa: BLE001 (a daemon thread's exception is only printed)
        _log.warning("stopping the replica's engine: %s", e)


class LorakitReplica:
    """One Ray Serve replica: base model + engine + adapter store (see the module docstring)."""

    def __init__(self, model: str | None = None, adapter_roots: Sequence[str] = (), *, max_loras: int = 8,
                 max_cpu_loras: int = 32, kv_cache_mb: int = 64, max_batch: int = 32, dtype: str = "float32",
                 device: str = "cpu"):
        import torch

        from ..hub import load_model_and_tokenizer
        from .engine import Engine
        from .store import AdapterStore

        base, tokenizer = load_model_and_tokenizer(model, dtype=getattr(torch, dtype), device=device)
        self.model_name = served_name(model)
        store = AdapterStore(base, list(adapter_roots), max_loras=max_loras, max_cpu_loras=max_cpu_loras,
                             base_name=self.model_name)
        store.register_roots(adapter_roots)  # a folder that fails is skipped (logged); requests for it get a 400
        self.engine = Engine(base, tokenizer, store=store, kv_cache_bytes=kv_cache_mb << 20,
                             max_batch=max_batch).start()
        # lorakit serve's app over this engine: every reply is built by the server's code (its lifespan, which
        # would start the engine, does not run: requests are handed to it one by one below)
        # an adapter whose folder failed: the 400 says how it is served again here (the load endpoint is refused)
        self.app = create_app(self.engine, model_name=self.model_name, reload=RELOAD)
        context = serve.get_replica_context()
        self.replica_id = getattr(context.replica_id, "unique_id", str(context.replica_id))

        # Ray's multiplex cache, sized like the resident banks (built here: the size is a constructor option)
        async def load(name: str) -> _Resident:  # a plain function: Ray keeps its cache as an attribute on it
            return await self._load_adapter(name)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max_loras)(load)

    def __del__(self):
        """Stop this replica's engine loop and close its adapter store (the prefetch thread) when Ray Serve shuts the
        replica down: Ray Serve calls the deployment's ``__del__`` then (ray/serve/_private/replica.py,
        ``call_destructor``, ray 2.55). Was: no ``__del__``, so the engine thread went on stepping until the process
        was killed. Safe on a replica whose constructor did not finish, and a second time. Never raises (a
        destructor's exception is only printed): collected on the engine's own thread (the last reference held by a
        call it runs), where a shutdown cannot wait for the loop, it asks a helper thread to stop it; whatever else
        goes wrong is logged."""
        engine = self.__dict__.get("engine")
        if engine is None:
            return
        try:
            try:
                engine.shutdown()
            except EngineThreadError:  # the loop ends after the step this runs in
                threading.Thread(target=_shutdown_quietly, args=(engine,), name="lorakit-replica-stop",
                                 daemon=True).start()
            if engine.store is not None:
                engine.store.close()
        except Exception as e:  # noqa: BLE001 (a destructor: report, never raise)
            _log.warning("stopping the replica's engine: %s", e)

    async def _load_adapter(self, name: str) -> _Resident:
        """Make ``name`` resident in this replica's banks (Ray calls this once per adapter while it is cached).
        Waits for the engine thread however busy it is (no start timeout): the request behind it queues on the same
        engine anyway, and a give-up here would fail a request that is then served (was: ``Engine.call``'s 120 s
        timeout raised TimeoutError, a 500, while the load still ran)."""
        store = self.engine.store
        await asyncio.to_thread(self.engine.call, lambda: store.ensure_resident(name), start_timeout=None)
        return _Resident(name)

    async def _route(self) -> None:
        """Tell Ray's multiplex cache that this replica holds the request's adapter (its routing preference). A name
        that cannot be loaded is left to the app, which answers it as ``lorakit serve`` does (404 unknown, 400 with
        the recorded reason)."""
        name = serve.get_multiplexed_model_id()
        if name and name != self.model_name:
            try:
                await self.get_adapter(name)
            except LorakitError:
                pass

    async def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """A handle call: ``body`` as a ``/v1/completions`` request, answered by the server's app; returns its
        completion object plus ``"replica"``; raises :class:`~lorakit.serving.server.HTTPError` for an error
        reply (see the module docstring)."""
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object (a /v1/completions request)")
        if body.get("stream"):
            raise HTTPError(400, "a handle call returns the whole completion; stream over HTTP instead")
        await self._route()
        body = {"model": serve.get_multiplexed_model_id() or self.model_name, **body}
        status, _, chunks = await _asgi(self.app, _post_scope("/v1/completions"), _body_receiver(json.dumps(body)))
        reply = json.loads(b"".join([c async for c in chunks]))
        if status != 200:
            error = reply["error"]
            raise HTTPError(status, error["message"], error["type"])
        return {**reply, "replica": self.replica_id}

    async def __call__(self, request) -> Any:
        """HTTP entry (a Starlette request, handed to the server's app as it came; streams stream) or a dict from
        a deployment handle (:meth:`generate`)."""
        if isinstance(request, dict):
            return await self.generate(request)
        if request.url.path.rstrip("/").endswith(RUNTIME_LOADS):
            # one replica would load it and the others not (Ray routes each request to any of them)
            return error_response(400, f"{request.url.path} is not served by Ray Serve replicas: they register the "
                                       f"adapter folders under their roots when they start; to serve a new or fixed "
                                       f"folder, deploy again (serve.run)")
        await self._route()
        return relay(*await _asgi(self.app, request.scope, request.receive), replica=self.replica_id)


def _post_scope(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json")], "client": None, "server": None}


def _body_receiver(text: str):
    """An ASGI ``receive`` that hands over ``text`` as the request body, then waits (the caller never leaves)."""
    sent = asyncio.Event()

    async def receive():
        if not sent.is_set():
            sent.set()
            return {"type": "http.request", "body": text.encode(), "more_body": False}
        await asyncio.Event().wait()  # no disconnect: cancelled by whoever polls for one
    return receive


def relay(status: int, headers: list[tuple[bytes, bytes]], chunks, *, replica: str):
    """The Starlette response that re-sends an app's reply (:func:`_asgi`'s status, raw headers, body chunks) as it
    came, streaming, every header kept as sent (a header the app repeats, such as ``set-cookie``, stays repeated:
    a dict would keep its last value only), plus the replica's id in :data:`REPLICA_HEADER`."""
    from starlette.responses import StreamingResponse

    response = StreamingResponse(chunks, status_code=status)
    response.raw_headers = [*headers, (REPLICA_HEADER.encode("latin-1"), replica.encode("latin-1"))]
    return response


async def _asgi(app, scope: dict, receive):
    """Run ASGI ``app`` on one request: (status, headers as the raw ``(name, value)`` byte pairs it sent, repeated
    ones included, body chunks as an async iterator, streaming as the app sends them)."""
    messages: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(app(scope, receive, messages.put))
    task.add_done_callback(lambda _: messages.put_nowait(None))  # the app ended (an unanswered failure: a 500)
    start = await messages.get()
    if start is None:
        error = task.exception() if not task.cancelled() else None
        body = json.dumps({"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error",
                                     "code": 500}}).encode()

        async def failed():
            yield body
        return 500, [(b"content-type", b"application/json")], failed()
    # the response is re-sent by Ray's proxy, chunk by chunk: its length is not known up front
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]

    async def chunks():
        try:
            while (message := await messages.get()) is not None:
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    break
        finally:
            if not task.done():  # the client went away: the app's own cleanup (aborting the request) runs
                task.cancel()
    return start["status"], headers, chunks()


def deployment(model: str | None = None, adapter_roots: Sequence[str] = (), *, num_replicas: int = 2,
               max_loras_per_replica: int = 8, ray_actor_options: dict | None = None, **replica_options):
    """A bound Ray Serve application of ``num_replicas`` lorakit replicas (pass it to ``serve.run``).

    ``max_loras_per_replica`` caps both Ray's multiplex cache and each replica's resident banks;
    ``replica_options`` go to :class:`LorakitReplica` (``max_cpu_loras``, ``kv_cache_mb``, ``max_batch``,
    ``dtype``, ``device``). ``ray_actor_options`` defaults to one CPU per replica (add ``{"num_gpus": 1}`` for
    GPU replicas). Raises AdapterError naming a missing, unreadable or misplaced root (``check_adapter_roots``).
    """
    from .store import check_adapter_roots

    check_adapter_roots(adapter_roots)  # here, not in each replica: a typo fails once, not as replicas crash-looping
    cls = serve.deployment(LorakitReplica, name="lorakit", num_replicas=num_replicas,
                           ray_actor_options=ray_actor_options or {"num_cpus": 1})
    replica_options.setdefault("max_loras", max_loras_per_replica)
    return cls.bind(model, list(adapter_roots), **replica_options)
