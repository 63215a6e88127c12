"""``federate(config)``: one federated run on this machine with Flower's simulation engine (Ray backend).

Each client is a virtual SuperNode (``partition-id`` 0..N-1) running ``apps.client_app``; the ServerApp runs in
this process. ``backend_cpus`` caps how many clients train at once (one CPU each).

Flower (1.42) marks ``run_simulation`` deprecated and points to ``flwr run``. That is not a drop-in: ``flwr run``
packages a Flower App project (a FAB with ``[tool.flwr.app]`` components), starts a detached local SuperLink that
outlives the call, and runs the ServerApp in another process, so the result this function returns (filled in this
process by the ServerApp, ``sink``) and the ``FederatedConfig`` object it hands the apps would have to travel
through files and flat ``run_config`` values. The apps themselves already run under ``flwr run`` (deployment,
docs/federated.md); this in-process simulation stays on ``run_simulation`` until Flower removes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Iterator

from .base import FederatedConfig


def federate(config: FederatedConfig, backend_cpus: int | None = None, quiet: bool = True,
             output: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run ``config`` in Flower's simulation; returns ``{"config", "rounds", "evaluation"}`` (see ``apps.run_server``);
    with ``output`` the server checkpoints every round to ``<output>/checkpoint`` and writes the final global adapter
    to ``<output>/adapter`` (a PEFT LoRA; ``"adapter"`` in the result). ``resume_from`` (a run's output or its
    checkpoint folder) continues that run after its last completed round; LorakitError, before Flower starts, when
    it holds no checkpoint, a damaged one, one of a run with other settings (naming them) or one whose tensors do not
    fit this run's model (naming the tensor).

    Ctrl-C (KeyboardInterrupt) stops the ServerApp too, before it re-raises: the round in progress is dropped, the
    checkpoint stays that of the last completed round and no adapter is written (``apps.RunControl``)."""
    try:
        from flwr.simulation import run_simulation
    except ImportError as error:
        from ..core.errors import LorakitError

        raise LorakitError(f"federated runs need Flower and Opacus: pip install 'lorakit[federated]' ({error})") from None

    from .apps import RunControl, client_app, make_server_app

    start = None
    if resume_from is not None:
        from .checkpoint import start_run

        # its errors here, not inside the ServerApp's thread after Ray's start-up (Flower logs them): no checkpoint,
        # a damaged one, other settings, and tensors that do not fit this run's model (needs the server's model)
        start = start_run(config, resume_from)

    cpus = backend_cpus or max(1, min(config.clients, (os.cpu_count() or 2) // 2))
    gpus = 0.0 if config.device == "cpu" else 1.0 / cpus  # clients training at once share the GPU
    sink: dict[str, Any] = {}
    control = RunControl()
    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    with _stop_on_interrupt(control.stop):
        try:
            run_simulation(server_app=make_server_app(config, sink, output, resume_from, control, start),
                           client_app=client_app, num_supernodes=config.clients,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": gpus},
                                           "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                         "logging_level": "error", "log_to_driver": not quiet}})
        except KeyboardInterrupt:
            control.stop.set()
            if control.started.is_set():
                control.finished.wait()  # the ServerApp leaves at its next wait; a second Ctrl-C stops waiting
            raise
    if not sink:
        raise RuntimeError("the Flower simulation ended without a result (see the log above for the ServerApp error)")
    return sink


@contextlib.contextmanager
def _stop_on_interrupt(stop: threading.Event) -> Iterator[None]:
    """While active, SIGINT sets ``stop`` the moment it arrives (the ServerApp thread then records no further
    round), then raises KeyboardInterrupt as Python's default handler does (only in the main thread, over that
    default handler: a caller's own handler stays). Once ``stop`` is set, Flower's log records are dropped: a
    Ctrl-C reaches the Ray workers too, and Flower logged each dying client's traceback."""
    flwr_log = logging.getLogger("flwr")
    quiet_when_stopped = lambda record: not stop.is_set()  # noqa: E731
    flwr_log.addFilter(quiet_when_stopped)
    handle_sigint = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def handle(signum: int, frame: Any) -> None:
        stop.set()
        signal.default_int_handler(signum, frame)

    if handle_sigint:
        signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        if handle_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        flwr_log.removeFilter(quiet_when_stopped)


def federate_in_process(config: FederatedConfig, keep_updates: bool = False,
                        adapter_dir: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
                        resume_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """The same client and server code as :func:`federate`, called directly in this process (no Flower transport,
    no Ray): clients run one after another. For benchmarks (``lorakit bench federated``) and tests on a small CPU
    budget; ``lorakit federate`` runs Flower. Sampling is Flower's runs' (``base.sample_clients``), stragglers are
    not simulated. With ``keep_updates`` the result also holds round 1's client updates (``"first_updates"``); with
    ``adapter_dir`` the final global adapter is written there (``ServerCore.save_adapter``). ``output`` and
    ``resume_from`` as for :func:`federate`, through the same code (``checkpoint.start_run`` / ``end_round``): a
    checkpoint after every round in ``<output>/checkpoint`` (the adapter in ``<output>/adapter`` unless
    ``adapter_dir`` says otherwise), and a resumed run ends as the uninterrupted one, bit for bit."""
    from pathlib import Path

    from .base import pack, sample_clients, unpack
    from .checkpoint import CHECKPOINT, end_round, start_run
    from .client import client_round

    core, evaluation, done = start_run(config, resume_from)
    checkpoint = Path(output) / CHECKPOINT if output is not None else None
    if output is not None and adapter_dir is None:
        adapter_dir = Path(output) / "adapter"
    if not done:
        end_round(core, 0, evaluation)
    first: list = []
    for server_round in range(done + 1, config.rounds + 1):
        sampled = sample_clients(config, server_round)
        down = unpack(core.downlink_bytes())
        replies = []
        for client in sampled:
            update, metrics = client_round(config, client, server_round, down, core.a_checksum)
            replies.append((client, pack(update), metrics))
            if keep_updates and server_round == 1:
                first.append((client, update, metrics))
        core.receive(server_round, replies, sent=len(sampled))
        end_round(core, server_round, evaluation, checkpoint)
    result = core.run_result(evaluation, adapter_dir)
    if keep_updates:
        result["first_updates"] = first
    return result
