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
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..core.errors import ConfigError, comma_items
from ..core.targeting import targets_from_text
from ..io.files import atomic_write_json, remove_dir_atomically
from .base import FederatedConfig, pack, sample_clients, unpack
from .checkpoint import CHECKPOINT, resumes_in_place
from .client import client_round
from .server import ServerCore

log = logging.getLogger("lorakit.federated")

# Run-config keys whose value is a list of whole numbers: a comma-separated string or one TOML number.
LIST_KEYS = ("client_ranks", "stragglers")


def _whole_number(value: str | int | float, key: str) -> int:
    """``value`` of run-config ``key`` as an int; ``8.5`` / ``"8.5"`` / ``"eight"`` is a ConfigError naming ``key``
    (``int()`` truncated 8.5 to 8 without a word)."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, float) and text.is_integer():
        return int(text)
    if isinstance(text, int) or (isinstance(text, str) and text.lstrip("+-").isdigit()):
        return int(text)
    raise ConfigError(f"run config {key!r}: {value!r} is not a whole number; give integers, e.g. {key} = \"8,4\"")


def blob_record(blob: bytes, key: str) -> ArrayRecord:
    return ArrayRecord({key: Array(dtype="uint8", shape=(len(blob),), stype="safetensors", data=blob)})


def config_from_run_config(run_config: dict[str, Any]) -> FederatedConfig:
    """A Flower run config (``[tool.flwr.app.config]``: dashed keys, comma-separated lists) as a FederatedConfig."""
    values = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in ("output", "overwrite", "resume"):  # where the ServerApp writes, not a setting of the run
            continue
        if name in LIST_KEYS and isinstance(value, str):
            value = [_whole_number(v, key) for v in comma_items(value, key, "values")]
        elif name in LIST_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [_whole_number(value, key)]  # one TOML number: `client-ranks = 8`, `stragglers = 1`
        elif name == "target_modules" and isinstance(value, str):  # 'all-linear' and a regex stay whole
            value = targets_from_text(value, key)
        values[name] = value
    if values.get("model") in ("", "bundled"):
        values["model"] = None
    return FederatedConfig.from_dict(values)


# -- client ---------------------------------------------------------------------------------------------
client_app = ClientApp()


@client_app.query()
def partition(msg: Message, context: Context) -> Message:
    """The node's ``partition-id``: the server samples clients by partition (``base.sample_clients``), not by the
    node ids Flower draws at random when nodes register."""
    record = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)


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
class RunStopped(Exception):
    """The process running the simulation was interrupted (Ctrl-C): the ServerApp ends where it is, without
    recording or checkpointing the round in progress."""


@dataclass
class RunControl:
    """How ``simulate.federate`` stops the ServerApp it runs in a thread of its own. Flower's simulation ends its
    clients on Ctrl-C but not that thread, which went on waiting out every remaining round's timeout and then
    checkpointed each as completed with no update (a resumed run skipped them) and wrote the adapter.
    ``stop``: set by the interrupted process; ``started`` / ``finished``: set by the ServerApp."""

    stop: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.stop.is_set():
            raise RunStopped("the run was interrupted")


class StoppableGrid:
    """``grid`` (a Flower Grid) whose waits end as soon as ``control.stop`` is set (RunStopped): ``send_and_receive``
    polls for replies the way Flower's grids do, but checks the stop every ``poll_s`` seconds, and a stopped run
    never returns a round's replies (a round cut short would be aggregated and checkpointed as complete)."""

    def __init__(self, grid: Grid, control: RunControl, poll_s: float = 0.1):
        self._grid, self._control, self._poll_s = grid, control, poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        self._control.check()  # Flower's sample_nodes waits in a loop on it until enough nodes connect
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self._control.check()
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            self._control.stop.wait(self._poll_s)
            self._control.check()
        self._control.check()
        return replies


class FlowerLoraStrategy(FedAvg):
    """FedAvg's round loop with lorakit's client sampling and aggregation.

    Sampling draws partition ids (``base.sample_clients``: ``fraction`` of the clients, at least ``min_clients``,
    seeded per round) and sends to the nodes holding them. FedAvg's own sampling draws among node ids, which
    Flower's simulation (and every SuperNode restart) draws at random: the same seed then named other clients in
    every run, so neither a rerun nor a resumed run trained the same clients. Each node is asked its partition-id
    once (a QUERY message, ``client_app``'s ``partition``).

    A reply's client is the partition-id this server sent to the node it came from (``metadata.src_node_id``, which
    Flower's SuperLink checks against the instruction's ``dst_node_id``), not the id the reply says: a reply that
    says another (a node claiming another client's place in the average and the DP accounting) is refused, listed
    in the round's ``failures``, and that node is asked its partition-id again before the next round (a SuperNode
    restarted under its node id with another partition-id then trains as the client it now is).

    ``done``: rounds a resumed run has already completed; Flower's loop counts from 1 again, and round ``t`` of
    it is the run's round ``done + t`` (sent to clients, seeding their sampling and training, and recorded)."""

    def __init__(self, core: ServerCore, done: int = 0, control: RunControl | None = None):
        config = core.config
        sampled = max(config.min_clients, int(config.clients * config.fraction))
        super().__init__(fraction_train=config.fraction, fraction_evaluate=0.0, min_train_nodes=min(sampled, config.clients),
                         min_available_nodes=config.clients, weighted_by_key="num-examples")
        self.core, self.done, self.control = core, done, control
        self.sent: dict[int, int] = {}
        self.partition_of: dict[int, int] = {}  # node id -> partition-id, as each node answered
        self.trains: dict[int, dict[int, int]] = {}  # round -> {node id: the partition-id it was sent to train}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.done
        config["federated"] = json.dumps(self.core.config.to_dict())
        config["server-round"] = server_round
        if self.core.a_checksum is not None:
            config["a-checksum"] = self.core.a_checksum
        nodes = self._nodes_by_partition(grid)
        sampled = sample_clients(self.core.config, server_round)
        missing = [p for p in sampled if p not in nodes]
        if missing:
            log.warning("round %d: sampled client(s) %s have no connected SuperNode (partition-id); counted as no "
                        "reply", server_round, missing)
        record = RecordDict({self.arrayrecord_key: blob_record(self.core.downlink_bytes(), "state"),
                             self.configrecord_key: config})
        self.sent[server_round] = len(sampled)
        self.trains[server_round] = {nodes[p]: p for p in sampled if p in nodes}
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=nodes[p])
                for p in sampled if p in nodes]

    def _nodes_by_partition(self, grid: Grid) -> dict[int, int]:
        """partition-id -> node id of the connected nodes (waiting, as FedAvg does, for ``clients`` of them); a node
        not seen before is asked its partition-id. Two nodes with one partition-id: the lower node id trains it."""
        _, online = sample_nodes(grid, self.min_available_nodes, 0)
        unknown = [n for n in online if n not in self.partition_of]
        if unknown:
            queries = [Message(content=RecordDict({}), message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
            for reply in grid.send_and_receive(queries, timeout=self.core.config.round_timeout_s):
                try:
                    if reply.has_error():
                        raise ValueError(reply.error.reason)
                    self.partition_of[reply.metadata.src_node_id] = int(reply.content["metrics"]["partition-id"])
                except (KeyError, TypeError, ValueError) as error:
                    log.warning("node %s did not say its partition-id (%s); it is not sampled",
                                reply.metadata.src_node_id, error)
        by_partition: dict[int, int] = {}
        for node in sorted(online):
            if node in self.partition_of:
                by_partition.setdefault(self.partition_of[node], node)
        return by_partition

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.done
        if self.control is not None:  # interrupted while the replies came in: the round did not complete
            self.control.check()
        good, failures = [], []
        trained = self.trains.pop(server_round, {})
        for msg in replies:
            node = msg.metadata.src_node_id  # set by Flower from the connection the reply came on, not by the client
            if msg.has_error():
                failures.append(f"node {node}: {msg.error.reason}")
                continue
            client = trained.get(node)
            try:
                metrics = dict(msg.content["metrics"])
                blob = msg.content["arrays"]["update"].data
                claimed = int(metrics["client"])
            except (KeyError, TypeError, ValueError) as error:
                failures.append(f"node {node}: malformed reply ({error!r})")
                continue
            if client is None:
                failures.append(f"node {node}: a reply from a node that was sent no training this round (it says "
                                f"client {claimed}); refused")
            elif claimed != client:  # the client id is the server's, from the node it sent client `client` to
                failures.append(f"node {node}: says it is client {claimed}, but it was sent client {client}'s "
                                "training; refused (it is asked its partition-id again next round)")
                # a SuperNode restarted under the same node id with another partition-id answered the first QUERY
                # with its old one: asked again, it trains as the client it now is, not refused every round
                self.partition_of.pop(node, None)
            else:
                good.append((client, blob, metrics))
        record = self.core.receive(server_round, good, failures, sent=self.sent.get(server_round, len(good)))
        metrics = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        return blob_record(self.core.downlink_bytes(), "state"), MetricRecord(metrics)


def run_server(grid: Grid, config: FederatedConfig, adapter_dir: Path | None = None,
               checkpoint: Path | None = None, resume_from: Path | None = None,
               control: RunControl | None = None, start: tuple | None = None) -> dict[str, Any]:
    """Run ``config.rounds`` rounds on ``grid``; returns ``{"config", "rounds": [...], "evaluation": [...]}``, and
    with ``adapter_dir`` writes the final global model there as a PEFT LoRA (``ServerCore.save_adapter``; its path
    under ``"adapter"``; with no global adapter, FLoRA before an accepted round, None and an older one is removed).

    ``checkpoint``: the folder written after every round (``federated.checkpoint.save_round``); ``resume_from``: a
    run's output or checkpoint folder to continue from (its config must equal ``config``, but for ``rounds``), which
    skips the rounds it completed. ``control``: once its ``stop`` is set, RunStopped at the next wait or round end;
    the checkpoint stays that of the last completed round, and no adapter is written. ``start``: ``(core, evaluation,
    done)`` as ``checkpoint.start_run(config, resume_from)`` gives it, built by the caller before Flower started
    (None: built here)."""
    from .checkpoint import end_round, start_run

    core, evaluation, done = start if start is not None else start_run(config, resume_from)
    strategy = FlowerLoraStrategy(core, done, control)
    if control is not None:
        grid = StoppableGrid(grid, control)

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower calls it before round 1 (0) and after every round: evaluate, then checkpoint the round."""
        if control is not None:
            control.check()
        if server_round == 0 and done:
            return None  # the checkpoint's evaluations hold round `done`'s
        metrics = end_round(core, server_round + done, evaluation, checkpoint)
        return MetricRecord({k: float(v) for k, v in metrics.items()}) if metrics else None

    if done < config.rounds:
        strategy.start(grid=grid, initial_arrays=blob_record(core.downlink_bytes(), "state"),
                       num_rounds=config.rounds - done, timeout=config.round_timeout_s, evaluate_fn=after_round)
    if control is not None:
        control.check()
    return core.run_result(evaluation, adapter_dir)


def output_options(run_config: dict[str, Any]) -> tuple[Path | None, bool, bool]:
    """``(output, overwrite, resume)`` from a Flower run config's ``output``, ``overwrite`` and ``resume`` keys."""
    folder = run_config.get("output")
    return Path(str(folder)) if folder else None, _switch(run_config, "overwrite"), _switch(run_config, "resume")


def _switch(run_config: dict[str, Any], key: str) -> bool:
    """A true/false run-config key; anything else is a ConfigError (``bool("false")`` is True: a quoted
    ``overwrite = "false"`` would have removed the output folder)."""
    value = run_config.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"run config {key!r}: {value!r} is not true or false; write {key} = true (TOML, unquoted)")
    return value


def make_server_app(config: FederatedConfig | None = None, sink: dict | None = None,
                    output: str | Path | None = None, resume_from: str | Path | None = None,
                    control: RunControl | None = None, start: tuple | None = None) -> ServerApp:
    """A ServerApp running ``config`` (None: read it from the Flower run config); the result goes into ``sink``.

    With an output folder (``output``, else the run config's ``output``) the server checkpoints every round to
    ``<output>/checkpoint`` and writes the final global adapter to ``<output>/adapter``; from the run config, also
    the result to ``<output>/federated.json``. A run config's ``output`` is checked as ``lorakit federate`` checks
    ``--output`` (``lorakit.cli.check_output_dir``): an existing non-empty folder needs ``overwrite = true``, or
    ``resume = true`` (continue from its checkpoint). ``resume_from``: a run's output or checkpoint folder to
    continue from (``lorakit federate --resume-from``). ``control``: lets the caller stop the run
    (:class:`RunControl`). ``start``: the run's server already built (see :func:`run_server`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if control is None:
            return run(grid, context)
        control.started.set()
        try:
            control.check()
            return run(grid, context)
        finally:
            control.finished.set()

    def run(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        resume = Path(str(resume_from)) if resume_from else None
        folder = Path(str(output)) if output else None
        if folder is None:
            folder, overwrite, resuming = output_options(run_config)
            if folder is not None:
                from ..cli_parser import check_output_dir

                check_output_dir(folder, "output (Flower run config)", overwrite=overwrite, allow_existing=resuming)
                resume = folder if resuming else None
        settings = config or config_from_run_config(run_config)  # a bad setting fails before anything is removed
        if folder is not None and not resumes_in_place(folder, resume):
            # a fresh run (--overwrite), or one resumed into another folder: none of an older run's results stays to
            # be taken for this run's, nor its checkpoint to be resumed into this one, even when this run stops early
            remove_dir_atomically(folder / CHECKPOINT)
            remove_dir_atomically(folder / "adapter")
            (folder / "federated.json").unlink(missing_ok=True)
        result = run_server(grid, settings,
                            adapter_dir=folder / "adapter" if folder else None,
                            checkpoint=folder / CHECKPOINT if folder else None, resume_from=resume, control=control,
                            start=start)
        if sink is not None:
            sink.update(result)
        if run_config.get("output"):
            atomic_write_json(Path(str(run_config["output"])) / "federated.json", result)

    return app


server_app = make_server_app()
