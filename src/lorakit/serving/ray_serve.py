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

or over HTTP: ``curl -H 'serve_multiplexed_model_id: math' -d '{"prompt": "12+30="}' localhost:8000/``.
An empty model id means the base model. The JSON body takes ``prompt`` (text or token ids) and the sampling
fields of :class:`~lorakit.serving.sampling.SamplingParams` (``max_tokens``, ``temperature``, ``top_p``,
``top_k``, ``seed``, ``stop``); the reply is ``{"text", "token_ids", "finish_reason", "adapter", "replica"}``.
Bad requests get ``{"error": ...}`` with a 4xx status over HTTP; the replica keeps serving.

Adapter folders are registered when a replica starts, as ``lorakit serve`` does: a folder that fails to register
(invalid config, unknown method, no weights file) is skipped with a warning in the replica's log and the others
are served; a request naming it, or an adapter whose weights failed to load, gets a 400 with the reason (an unknown
name: 404). As with ``lorakit serve``, a name belongs to the first root that has it (a later root's folder of that
name is skipped, even when the first one is broken). A replica registers folders
only when it starts: to serve a fixed or new folder, deploy again (``serve.run``). A missing or unreadable root
fails :func:`deployment` itself, before any replica starts.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from ray import serve

from ..core.errors import LorakitError, UnknownAdapterError
from .sampling import SamplingParams

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


class _Resident:
    """What Ray's multiplex cache holds per adapter: a token. The replica's own AdapterStore decides what stays in
    its banks (LRU under the same cap, never evicting an adapter that running requests use), so Ray dropping the
    token only stops routing preference; it does not pull weights from under running requests."""

    def __init__(self, name: str):
        self.name = name


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
        store = AdapterStore(base, list(adapter_roots), max_loras=max_loras, max_cpu_loras=max_cpu_loras)
        store.register_roots(adapter_roots)  # a folder that fails is skipped (logged); requests for it get a 400
        self.engine = Engine(base, tokenizer, store=store, kv_cache_bytes=kv_cache_mb << 20,
                             max_batch=max_batch).start()
        context = serve.get_replica_context()
        self.replica_id = getattr(context.replica_id, "unique_id", str(context.replica_id))

        # Ray's multiplex cache, sized like the resident banks (built here: the size is a constructor option)
        async def load(name: str) -> _Resident:  # a plain function: Ray keeps its cache as an attribute on it
            return await self._load_adapter(name)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max_loras)(load)

    async def _load_adapter(self, name: str) -> _Resident:
        """Make ``name`` resident in this replica's banks (Ray calls this once per adapter while it is cached)."""
        store = self.engine.store
        await asyncio.to_thread(self.engine.call, lambda: store.ensure_resident(name))
        return _Resident(name)

    async def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Serve one request dict (see the module docstring); raises LorakitError / ValueError on bad input."""
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        name = serve.get_multiplexed_model_id() or None
        unknown = sorted(set(body) - set(_SAMPLING_FIELDS) - {"prompt"})
        if unknown:
            raise ValueError(f"unknown request fields {unknown}; known: prompt, {', '.join(_SAMPLING_FIELDS)}")
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            raise ValueError("'prompt' must be a non-empty string or list of token ids")
        params = SamplingParams(**{k: body[k] for k in _SAMPLING_FIELDS if k in body})
        if name is not None:
            await self.get_adapter(name)
        req = (await asyncio.to_thread(self.engine.generate, [prompt], [name], params))[0]
        if req.error:  # lorakit's error as the engine met it (its type says what it is: unknown, failed to load ...)
            raise req.exception if isinstance(req.exception, LorakitError) else LorakitError(req.error)
        return {"text": req.text, "token_ids": list(req.output_ids), "finish_reason": req.finish_reason,
                "adapter": name, "replica": self.replica_id}

    async def __call__(self, request) -> Any:
        """HTTP entry (a Starlette request) or a dict from a deployment handle."""
        if isinstance(request, dict):
            return await self.generate(request)
        from starlette.responses import JSONResponse

        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "malformed JSON body"}, status_code=400)
        try:
            return JSONResponse(await self.generate(body))
        except UnknownAdapterError as e:  # by type: other AdapterErrors (a bad mix, a conflict) are not a 404
            return JSONResponse({"error": str(e)}, status_code=404)
        except (LorakitError, ValueError, TypeError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)


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
