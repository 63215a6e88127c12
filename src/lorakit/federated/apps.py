"""Flower glue: ``client_app`` (a ``flwr.clientapp.ClientApp``), ``server_app`` (a ``flwr.serverapp.ServerApp``) and
:class:`FlowerLoraStrategy` (a ``flwr.serverapp.strategy.FedAvg`` whose sampling it keeps and whose aggregation
it replaces with a lorakit strategy's).

Messages carry safetensors bytes only: the global state travels as one ``Array`` (``stype="safetensors"``) in
the ``"arrays"`` ArrayRecord, the client update the same way back; the run's :class:`FederatedConfig` travels as
JSON in the ConfigRecord, and each client takes its data partition from its node config's ``partition-id``
(set by the simulation engine, and by ``flower-supernode --node-config "partition-id=K"`` in deployment).

The same two apps run under ``flwr.simulation.run_simulation`` (``lorakit federate``) and under Flower's
deployment engine (SuperLink + SuperNodes + ``flwr run``; docs/federated.md): there ``server_app`` reads the
run config (``[tool.flwr.app.config]`` keys, e.g. ``strategy = "flora"``, ``client-ranks = "8,4"``) and
writes ``federated.json`` to its ``output`` key.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..core.errors import comma_items
from ..core.targeting import targets_from_text
from ..data import stable_seed
from ..io.files import atomic_write_json
from .base import FederatedConfig, pack, unpack
from .client import client_round
from .server import ServerCore

LIST_KEYS = {"client_ranks": int, "stragglers": int}


def blob_record(blob: bytes, key: str) -> ArrayRecord:
    return ArrayRecord({key: Array(dtype="uint8", shape=(len(blob),), stype="safetensors", data=blob)})


def config_from_run_config(run_config: dict[str, Any]) -> FederatedConfig:
    """A Flower run config (``[tool.flwr.app.config]``: dashed keys, comma-separated lists) as a FederatedConfig."""
    values = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name == "output":
            continue
        if name in LIST_KEYS and isinstance(value, str):
            value = [LIST_KEYS[name](v) for v in comma_items(value, key, "values")]
        elif name in LIST_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [LIST_KEYS[name](value)]  # one TOML number: `client-ranks = 8`, `stragglers = 1`
        elif name == "target_modules" and isinstance(value, str):  # 'all-linear' and a regex stay whole
            value = targets_from_text(value, key)
        values[name] = value
    if values.get("model") in ("", "bundled"):
        values["model"] = None
    return FederatedConfig.from_dict(values)


# -- client ---------------------------------------------------------------------------------------------
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    settings = msg.content["config"]
    config = FederatedConfig.from_dict(json.loads(settings["federated"]))
    client = int(context.node_config["partition-id"])
    received = unpack(msg.content["arrays"]["state"].data)
    checksum = float(settings["a-checksum"]) if "a-checksum" in settings else None
    update, metrics = client_round(config, client, int(settings["server-round"]), received, checksum)
    metrics = {**metrics, "client": client}
    content = RecordDict({"arrays": blob_record(pack(update), "update"), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


# -- server ---------------------------------------------------------------------------------------------
class FlowerLoraStrategy(FedAvg):
    """FedAvg's client sampling (``fraction``, ``min_clients``, seeded per round) with lorakit aggregation."""

    def __init__(self, core: ServerCore):
        config = core.config
        sampled = max(config.min_clients, int(config.clients * config.fraction))
        super().__init__(fraction_train=config.fraction, fraction_evaluate=0.0, min_train_nodes=min(sampled, config.clients),
                         min_available_nodes=config.clients, weighted_by_key="num-examples")
        self.core = core
        self.sent: dict[int, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        random.seed(stable_seed("lorakit-federated-sample", self.core.config.seed, server_round))  # FedAvg samples with `random`
        config["federated"] = json.dumps(self.core.config.to_dict())
        if self.core.a_checksum is not None:
            config["a-checksum"] = self.core.a_checksum
        messages = list(super().configure_train(server_round, blob_record(self.core.downlink_bytes(), "state"),
                                                config, grid))
        self.sent[server_round] = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good, failures = [], []
        for msg in replies:
            if msg.has_error():
                failures.append(f"node {msg.metadata.src_node_id}: {msg.error.reason}")
                continue
            try:
                metrics = dict(msg.content["metrics"])
                blob = msg.content["arrays"]["update"].data
                client = int(metrics["client"])
            except (KeyError, TypeError, ValueError) as error:
                failures.append(f"node {msg.metadata.src_node_id}: malformed reply ({error!r})")
                continue
            good.append((client, blob, metrics))
        record = self.core.receive(server_round, good, failures, sent=self.sent.get(server_round, len(good)))
        metrics = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        return blob_record(self.core.downlink_bytes(), "state"), MetricRecord(metrics)


def run_server(grid: Grid, config: FederatedConfig, adapter_dir: Path | None = None) -> dict[str, Any]:
    """Run ``config.rounds`` rounds on ``grid``; returns ``{"config", "rounds": [...], "evaluation": [...]}``, and
    with ``adapter_dir`` writes the final global model there as a PEFT LoRA (``ServerCore.save_adapter``; its path
    under ``"adapter"``)."""
    core = ServerCore(config)
    strategy = FlowerLoraStrategy(core)
    evaluation: list[dict[str, Any]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if not config.evaluate:
            return None
        metrics = {"round": server_round, **core.evaluate()}
        evaluation.append(metrics)
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    strategy.start(grid=grid, initial_arrays=blob_record(core.downlink_bytes(), "state"), num_rounds=config.rounds,
                   timeout=config.round_timeout_s, evaluate_fn=evaluate)
    result = {"config": config.to_dict(), "rounds": core.history, "evaluation": evaluation}
    if adapter_dir is not None:
        saved = core.save_adapter(adapter_dir)
        result["adapter"] = str(saved) if saved is not None else None
    return result


def make_server_app(config: FederatedConfig | None = None, sink: dict | None = None,
                    output: str | Path | None = None) -> ServerApp:
    """A ServerApp running ``config`` (None: read it from the Flower run config); the result goes into ``sink``.
    With an output folder (``output``, else the run config's ``output``) the final global adapter is written to
    ``<output>/adapter`` and, from the run config, the result to ``<output>/federated.json``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        folder = output or run_config.get("output")
        result = run_server(grid, config or config_from_run_config(run_config),
                            adapter_dir=Path(str(folder)) / "adapter" if folder else None)
        if sink is not None:
            sink.update(result)
        if run_config.get("output"):
            atomic_write_json(Path(str(run_config["output"])) / "federated.json", result)

    return app


server_app = make_server_app()
