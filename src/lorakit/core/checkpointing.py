"""Activation (gradient) checkpointing that replays a block under the routing it ran with.

Checkpointing (``torch.utils.checkpoint``; transformers' ``activation_checkpointing_enable``, formerly
``gradient_checkpointing_enable``; diffusers' ``enable_gradient_checkpointing``) drops a block's activations in the
forward and runs the block again during backward to get them back. That second run happens in ``backward()``, after
the ``routing(...)`` block of the forward has closed (and, on CUDA, on autograd's own thread), so every adapter that
reads the routing context (task keys, per-row adapters, the supervised mask, X-LoRA's scalings, routing vectors)
recomputed something else: a different gradient without a word (routed LoRA, MM-LoRA), or torch's
``CheckpointError`` (γ-MoD, MixDA). :func:`replay_routing_in_checkpoints` wraps the checkpoint function each block
of a model calls (the ``_gradient_checkpointing_func`` transformers and diffusers set on it) so the block's function
runs, in the forward and in the recompute, under the routing read when the forward called it. Gradients are then the
same as without checkpointing, which is checkpointing's contract.

During the recompute :func:`recomputing` is true: a layer that keeps state from its training forwards (a mixture's
aux-loss records and router statistics, SMoRA's balancing bias) leaves it as the forward left it.

lorakit's training entry points (``lorakit.train``, ``train_concurrent``, the ``transformers.Trainer`` callback) call
it; a loop of your own that enables checkpointing and runs forwards inside ``lorakit.routing`` calls it once after
enabling.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable

import torch
from torch import nn

from .routing import current_routing, routing_as

_ATTR = "_gradient_checkpointing_func"  # set on each checkpointed block by transformers / diffusers
_MARK = "_lorakit_replays_routing"
_RECOMPUTING: ContextVar[bool] = ContextVar("lorakit_recomputing", default=False)
_NO_GRAD_FORWARD: ContextVar[bool] = ContextVar("lorakit_no_grad_forward", default=False)


def recomputing() -> bool:
    """True while a checkpointed block recomputes its forward in backward (under :func:`replay_routing_in_checkpoints`).

    A layer that keeps state from its training forwards (a mixture's aux-loss records and router statistics, SMoRA's
    balancing bias) leaves it alone then: the recompute must compute what the forward did, and once."""
    return _RECOMPUTING.get()


def reentrant_forward() -> bool:
    """True while a checkpointed block runs its forward under ``no_grad`` although gradients were on at the call:
    reentrant checkpointing (``use_reentrant=True``), whose graph exists only from the recompute in backward, after
    the loss. What a layer hands the loss on the side (a mixture's aux-loss records) cannot reach it from there."""
    return _NO_GRAD_FORWARD.get()


def _replaying_routing(checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``checkpoint`` (called as ``checkpoint(function, *args, **kwargs)``) whose ``function`` always runs under the
    routing current at the call: in the forward and again in the recompute."""

    def checkpoint_under_routing(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        captured = current_routing()
        streams = dict(captured.rng_streams or {}) if captured is not None else {}
        at_forward = {name: stream.state() for name, stream in streams.items()}
        grad_at_call = torch.is_grad_enabled()
        runs = 0

        def under_routing(*fargs: Any, **fkwargs: Any) -> Any:
            nonlocal runs
            runs += 1
            if runs == 1:
                token = _NO_GRAD_FORWARD.set(grad_at_call and not torch.is_grad_enabled())
                try:
                    with routing_as(captured):
                        return function(*fargs, **fkwargs)
                finally:
                    _NO_GRAD_FORWARD.reset(token)
            # The recompute: each job's stream draws again from where the forward's draws began (torch restores
            # only its default generators), then goes on from where the forward left it.
            after = {name: stream.state() for name, stream in streams.items()}
            for name, state in at_forward.items():
                streams[name].load_state(state)
            token = _RECOMPUTING.set(True)
            try:
                with routing_as(captured):
                    return function(*fargs, **fkwargs)
            finally:
                _RECOMPUTING.reset(token)
                for name, state in after.items():
                    streams[name].load_state(state)

        return checkpoint(under_routing, *args, **kwargs)

    setattr(checkpoint_under_routing, _MARK, True)
    checkpoint_under_routing.__wrapped__ = checkpoint  # type: ignore[attr-defined]
    return checkpoint_under_routing


def replay_routing_in_checkpoints(model: nn.Module) -> int:
    """Make every checkpointed block of ``model`` recompute under the routing its forward ran with (module
    docstring). Idempotent; returns the number of blocks wrapped now (0 when checkpointing is off or already
    wrapped). Enabling checkpointing again replaces the wrapped functions: call this again after it."""
    wrapped = 0
    for module in model.modules():
        func = module.__dict__.get(_ATTR)
        if func is None or getattr(func, _MARK, False):
            continue
        setattr(module, _ATTR, _replaying_routing(func))
        wrapped += 1
    return wrapped


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether any block of ``model`` checkpoints its activations (transformers / diffusers flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
