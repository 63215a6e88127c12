"""Two in-process rounds per strategy on a tiny real Llama (the client and server halves Flower runs), update
rejection, client-side DP-SGD with ε reported. The Flower engines themselves are in test_flower.py."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lorakit.federated import list_strategies, pack, unpack
from lorakit.federated.client import client_round
from lorakit.federated.server import ServerCore


def run_rounds(config):
    core = ServerCore(config)
    start = {k: v.clone() for k, v in core.state.items()}
    for server_round in (1, 2):
        down = unpack(core.downlink_bytes())
        replies = []
        for client in range(config.clients):
            update, metrics = client_round(config, client, server_round, down, core.a_checksum)
            replies.append((client, pack(update), metrics))
        core.receive(server_round, replies, sent=config.clients)
    return core, start


def test_fedit_heterogeneous_ranks_pad_on_the_server_and_truncate_on_clients(tiny_config):
    """FedIT with client_ranks 2 and 4: the server's global factors have rank 4; the rank-2 client starts from
    their leading block (A[:2], B[:, :2]) and sends rank-2 factors, which the server zero-pads."""
    from lorakit.federated.base import read_factors
    from lorakit.federated.client import attach, fresh_model
    from lorakit.federated.fedit import FedIT

    config = tiny_config("fedit", client_ranks=[2, 4])
    core, start = run_rounds(config)
    assert [h["accepted"] for h in core.history] == [2, 2] and not any(h["rejected"] for h in core.history)
    assert all(v.shape[0] == 4 for k, v in core.state.items() if k.endswith(".lora_A"))
    assert any(not torch.equal(start[k], core.state[k]) for k in start)
    model, _ = fresh_model(config)
    strategy = FedIT(config)
    attach(model, config, strategy, 2, 4.0, 0)
    strategy.client_start(model, core.state)
    got = read_factors(model)
    for key, value in got.items():
        expected = core.state[key][:2] if key.endswith(".lora_A") else core.state[key][:, :2]
        torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("strategy", list_strategies())
def test_two_rounds(strategy, tiny_config):
    config = tiny_config(strategy, client_ranks=[2, 4] if strategy == "flora" else None)
    core, start = run_rounds(config)
    assert [h["accepted"] for h in core.history] == [2, 2]
    assert all(not h["rejected"] for h in core.history)
    assert any(not torch.equal(start[k], core.state[k]) for k in start) or strategy == "flora"
    metrics = core.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and 0 <= metrics["exact_match"] <= 1
    if strategy == "flora":  # two rounds stacked: Σ over rounds and clients of r_k
        key = next(k for k in core.state if k.endswith("stack_A"))
        assert core.state[key].shape[0] == 2 * (2 + 4)


def test_ffa_sends_half_of_fedit(tiny_config):
    """q_proj and o_proj of the tiny Llama are square (32×32): B alone is half the bytes of A and B."""
    up = {}
    for strategy in ("fedit", "ffa"):
        core, _ = run_rounds(tiny_config(strategy, rounds=1))
        up[strategy] = core.history[0]["uplink_bytes_per_client"]
    assert 0.48 < up["ffa"] / up["fedit"] < 0.53


def test_bad_updates_are_rejected_and_the_round_goes_on(tiny_config, caplog):
    config = tiny_config("fedit", clients=4)
    core = ServerCore(config)
    down = unpack(core.downlink_bytes())
    good, metrics = client_round(config, 0, 1, down)
    nan = {k: v.clone() for k, v in good.items()}
    next(iter(nan.values()))[0, 0] = float("nan")
    wrong = {k: (v[:1] if k.endswith("lora_A") else v) for k, v in good.items()}
    replies = [(0, pack(good), metrics), (1, pack(nan), metrics), (2, pack(wrong), metrics), (3, b"not safetensors", metrics)]
    with caplog.at_level(logging.WARNING, logger="lorakit.federated"):
        record = core.receive(1, replies)
    assert record["accepted"] == 1 and [r["client"] for r in record["rejected"]] == [1, 2, 3]
    assert "NaN" in record["rejected"][0]["reason"] and "shape" in record["rejected"][1]["reason"]
    assert caplog.text.count("rejected the update") == 3
    for k, v in good.items():  # the one accepted update is the new global state
        torch.testing.assert_close(core.state[k], v)


def test_a_second_reply_from_one_client_is_rejected(tiny_config, caplog):
    """Two replies with one client id in a round (two SuperNodes given the same partition-id) counted that client
    twice in the weighted average (FedAvg weights each client once, by its example count)."""
    config = tiny_config("fedit", clients=2)
    core = ServerCore(config)
    down = unpack(core.downlink_bytes())
    first, metrics = client_round(config, 0, 1, down)
    other = {k: v + 1.0 for k, v in first.items()}
    with caplog.at_level(logging.WARNING, logger="lorakit.federated"):
        record = core.receive(1, [(0, pack(first), metrics), (0, pack(other), metrics)])
    assert record["accepted"] == 1 and record["clients"] == [0]
    assert "a second reply from client 0" in record["rejected"][0]["reason"]
    for k, v in first.items():  # the first reply alone is the new global state
        torch.testing.assert_close(core.state[k], v)


def test_dp_sgd_reports_epsilon(tiny_config):
    """Opacus DP-SGD on the clients: ε from the RDP accountant grows with rounds and shrinks with more noise."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    config = tiny_config("ffa", dp_noise_multiplier=1.0, dp_max_grad_norm=0.5)
    core, _ = run_rounds(config)
    eps = [h["epsilon"] for h in core.history]
    assert 0 < eps[0] < eps[1] < math.inf
    # reference: Opacus' RDP analysis (compute_rdp, get_privacy_spent) on the same (σ, q, steps) histories, worst client
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    reference = max(get_privacy_spent(orders=orders, rdp=sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders)
                                                              for s, q, n in h), delta=config.dp_delta)[0]
                    for h in core.dp_history.values())
    assert eps[-1] == pytest.approx(reference, rel=1e-6)
    quieter, _ = run_rounds(tiny_config("ffa", rounds=1, dp_noise_multiplier=4.0, dp_max_grad_norm=0.5))
    assert quieter.history[0]["epsilon"] < eps[0]


@pytest.fixture
def flower_task():
    """Flower builds Messages inside a run; outside one its task identity must be set (restored afterwards)."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_flower_strategy_rejects_bad_replies_and_aggregates_the_rest(tiny_config, flower_task, caplog):
    """FlowerLoraStrategy.aggregate_train on real Flower reply Messages: a NaN update, an error reply and a reply
    without an update are set aside and logged; the good update becomes the global state."""
    from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

    from lorakit.federated.apps import FlowerLoraStrategy, blob_record

    config = tiny_config("fedit", clients=3)
    core = ServerCore(config)
    strategy = FlowerLoraStrategy(core)
    good, metrics = client_round(config, 0, 1, unpack(core.downlink_bytes()))
    nan = {k: torch.full_like(v, float("nan")) for k, v in good.items()}
    sent = {node: Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                          message_type="train") for node in (7, 8, 9, 10)}

    def reply(update, client, node):
        return Message(content=RecordDict({"arrays": blob_record(pack(update), "update"),
                                           "metrics": MetricRecord({**metrics, "client": client})}), reply_to=sent[node])

    replies = [reply(good, 0, 7), reply(nan, 1, 8), Message(Error(code=0, reason="client crashed"), reply_to=sent[9]),
               Message(content=RecordDict({"metrics": MetricRecord({"client": 2})}), reply_to=sent[10])]
    strategy.sent[1] = 4
    strategy.trains = {1: {7: 0, 8: 1, 9: 2, 10: 2}}  # round -> node id -> the partition-id configure_train sent it
    with caplog.at_level(logging.WARNING, logger="lorakit.federated"):
        arrays, agg = strategy.aggregate_train(1, replies)
    record = core.history[-1]
    assert record["clients"] == [0] and record["rejected"][0]["client"] == 1 and len(record["failures"]) == 2
    assert agg["accepted"] == 1.0
    state = unpack(arrays["state"].data)
    for k, v in good.items():
        torch.testing.assert_close(state[k], v)
    assert "NaN" in caplog.text and "client crashed" in caplog.text


def _round_one_sent_to_nodes_21_and_22(tiny_config):
    """A fedit server whose round 1 sent client 0's training to Flower node 21 and client 1's to node 22 (as
    configure_train records it), the two clients' real updates, and ``reply(node, claimed, client)``: node's reply
    carrying ``client``'s update and saying it is client ``claimed``."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from lorakit.federated.apps import FlowerLoraStrategy, blob_record

    config = tiny_config("fedit")
    core = ServerCore(config)
    strategy = FlowerLoraStrategy(core)
    down = unpack(core.downlink_bytes())
    updates = {client: client_round(config, client, 1, down) for client in (0, 1)}
    sent = {node: Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                          message_type="train") for node in (21, 22)}
    strategy.sent[1], strategy.trains = 2, {1: {21: 0, 22: 1}}

    def reply(node, claimed, client):
        update, metrics = updates[client]
        return Message(content=RecordDict({"arrays": blob_record(pack(update), "update"),
                                           "metrics": MetricRecord({**metrics, "client": claimed})}), reply_to=sent[node])

    return core, strategy, updates, reply


def test_a_reply_claiming_another_clients_id_is_refused(tiny_config, flower_task, caplog):
    """Was: the server took each reply's client id from the reply's own metrics, so a node sent client 1's training
    could report "client": 0 and be aggregated (and DP-accounted) as client 0, whose real update then counted as a
    duplicate. Now the id is the one the server sent to the replying node (Flower's ``src_node_id``, which the
    SuperLink checks against the instruction's ``dst_node_id``); a claim that differs is refused."""
    core, strategy, updates, reply = _round_one_sent_to_nodes_21_and_22(tiny_config)

    # node 22 (sent client 1) answers first, as client 0: it must not take client 0's place
    with caplog.at_level(logging.WARNING, logger="lorakit.federated"):
        arrays, _ = strategy.aggregate_train(1, [reply(22, 0, 1), reply(21, 0, 0)])
    record = core.history[-1]
    assert record["clients"] == [0] and not record["rejected"]
    assert record["failures"] == ["node 22: says it is client 0, but it was sent client 1's training; refused (it "
                                  "is asked its partition-id again next round)"]
    state = unpack(arrays["state"].data)
    for k, v in updates[0][0].items():
        torch.testing.assert_close(state[k], v)
    assert "says it is client 0" in caplog.text


@pytest.mark.parametrize("strategy", list_strategies())
def test_the_global_adapter_is_saved_as_a_peft_lora_of_the_global_model(strategy, tiny_config, tmp_path):
    """Was: a federated run left only federated.json; the trained global model was lost when the server exited.
    The saved folder, loaded on the untouched base (lorakit and PEFT), gives the server's global model's logits
    (FLoRA: its stacks as one LoRA of rank Σ r_k, here 2 + 4; FedIT zero-padded to rank 4 for ranks 2, 4)."""
    import copy

    import peft

    import lorakit
    from lorakit.federated.simulate import federate_in_process

    ranks = {"flora": [2, 4], "fedit": [2, 4]}.get(strategy)
    config = tiny_config(strategy, rounds=1, client_ranks=ranks, evaluate=False)
    core = ServerCore(config)
    down = unpack(core.downlink_bytes())
    core.receive(1, [(k, pack(client_round(config, k, 1, down, core.a_checksum)[0]), {"num-examples": 8 + k})
                     for k in range(2)])
    saved = core.save_adapter(tmp_path / "adapter")
    assert saved is not None and lorakit.read_adapter_config(saved).r == {"flora": 6, "fedit": 4}.get(strategy, 2)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = core.global_model()(input_ids=ids).logits
        mine = lorakit.load_adapter(copy.deepcopy(core.base), saved)
        torch.testing.assert_close(mine(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(core.base), str(saved))
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, core.base(input_ids=ids).logits)  # the round moved the global model
    if strategy == "flora":  # before any round the global model is the base: nothing to save
        assert ServerCore(config).save_adapter(tmp_path / "none") is None
    result = federate_in_process(config, adapter_dir=tmp_path / "run" / "adapter")
    assert result["adapter"] == str(tmp_path / "run" / "adapter")


def test_dp_epsilon_counts_the_updates_the_server_rejected(tiny_config):
    """A DP client's privacy is spent when it releases its noised update, whatever the server then does with it.
    Was: only accepted updates entered the RDP accounting, so a client whose update was rejected (here NaN, as a
    diverged client's) spent no ε: its two released rounds were reported as one. Reference: Opacus' RDP analysis
    (opacus/accountants/analysis/rdp.py compute_rdp, get_privacy_spent; the accountant dp_epsilon wraps) composed
    over every (σ, q, steps) the client reported."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    config = tiny_config("ffa", dp_noise_multiplier=1.0, dp_max_grad_norm=0.5)
    core = ServerCore(config)
    down = unpack(core.downlink_bytes())
    released = {0: [], 1: []}
    replies = []
    for client in (0, 1):
        update, metrics = client_round(config, client, 1, down, core.a_checksum)
        released[client].append((1.0, metrics["dp-sample-rate"], metrics["dp-steps"]))
        if client == 1:
            update = {k: torch.full_like(v, float("nan")) for k, v in update.items()}
        replies.append((client, pack(update), metrics))
    first = core.receive(1, replies, sent=2)
    assert first["accepted"] == 1 and [r["client"] for r in first["rejected"]] == [1]
    update, metrics = client_round(config, 1, 2, unpack(core.downlink_bytes()), core.a_checksum)
    released[1].append((1.0, metrics["dp-sample-rate"], metrics["dp-steps"]))
    second = core.receive(2, [(1, pack(update), metrics)], sent=2)  # client 0 did not reply this round
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

    def epsilon(history):
        rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)
        return get_privacy_spent(orders=orders, rdp=rdp, delta=config.dp_delta)[0]

    assert first["epsilon"] == pytest.approx(max(epsilon(released[0]), epsilon(released[1][:1])), rel=1e-6)
    assert second["epsilon"] == pytest.approx(epsilon(released[1]), rel=1e-6)  # client 1: two releases
    assert second["epsilon"] > first["epsilon"]


def test_a_node_whose_partition_id_changed_is_asked_again_not_refused_every_round(tiny_config, flower_task):
    """A SuperNode restarted under the same node id with another partition-id (its operator moved it to client 2)
    replies as client 2 to the training the server sent for its cached partition-id 1: refused that round, as any
    claim that differs. Was: the cached answer stayed, so the node was sent client 1's training and refused every
    round after. Now the refusal drops the cache entry: the node is asked its partition-id again (configure_train's
    QUERY), and the nodes that answered as expected keep theirs."""
    core, strategy, _, reply = _round_one_sent_to_nodes_21_and_22(tiny_config)
    strategy.partition_of = {21: 0, 22: 1}  # as the nodes answered the first QUERY
    strategy.aggregate_train(1, [reply(21, 0, 0), reply(22, 2, 1)])  # (the refused update's values do not matter)
    assert core.history[-1]["clients"] == [0] and "node 22: says it is client 2" in core.history[-1]["failures"][0]
    assert strategy.partition_of == {21: 0}  # node 22 is asked again before the next round
