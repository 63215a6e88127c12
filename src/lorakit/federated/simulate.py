"""``federate(config)``: one federated run on this machine with Flower's simulation engine (Ray backend).

Each client is a virtual SuperNode (``partition-id`` 0..N-1) running ``apps.client_app``; the ServerApp runs in
this process. ``backend_cpus`` caps how many clients train at once (one CPU each).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .base import FederatedConfig


def federate(config: FederatedConfig, backend_cpus: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Run ``config`` in Flower's simulation; returns ``{"config", "rounds", "evaluation"}`` (see ``apps.run_server``)."""
    try:
        from flwr.simulation import run_simulation
    except ImportError as error:
        from ..core.errors import LorakitError

        raise LorakitError(f"federated runs need Flower and Opacus: pip install 'lorakit[federated]' ({error})") from None

    from .apps import client_app, make_server_app

    cpus = backend_cpus or max(1, min(config.clients, (os.cpu_count() or 2) // 2))
    sink: dict[str, Any] = {}
    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app=make_server_app(config, sink), client_app=client_app, num_supernodes=config.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                 "logging_level": "error", "log_to_driver": not quiet}})
    if not sink:
        raise RuntimeError("the Flower simulation ended without a result (see the log above for the ServerApp error)")
    return sink
