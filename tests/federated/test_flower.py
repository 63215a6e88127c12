"""The real Flower engines: the simulation engine (``lorakit federate``'s path) and the deployment engine — a
SuperLink and two SuperNodes started as processes on localhost, a Flower App submitted with ``flwr run``.

Both start Ray / gRPC servers and take tens of seconds: marked slow (``pytest -m slow tests/federated``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
BIN = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedit", "ffa", "flora", "lora_fair"])
def test_simulation_two_rounds(strategy, tiny_config):
    from lorakit.federated.simulate import federate

    config = tiny_config(strategy, client_ranks=[2, 4] if strategy == "flora" else None)
    result = federate(config, backend_cpus=2)
    assert [r["accepted"] for r in result["rounds"]] == [2, 2]
    assert [e["round"] for e in result["evaluation"]] == [0, 1, 2]


@pytest.mark.slow
def test_simulation_tolerates_a_straggler(tiny_config):
    """3 clients; client 2 replies long after the round timeout: rounds aggregate what came and go on; the
    straggler's update never counts. (The timeout leaves room for a loaded machine's Ray worker start-up.)"""
    from lorakit.federated.simulate import federate

    config = tiny_config("fedit", clients=3, rounds=2, stragglers=[2], straggler_delay_s=150.0, round_timeout_s=90.0,
                         evaluate=False)
    result = federate(config, backend_cpus=3)
    rounds = result["rounds"]
    assert all(r["sampled"] == 3 and r["no_reply"] >= 1 and 2 not in r["clients"] for r in rounds)
    assert any(sorted(r["clients"]) == [0, 1] for r in rounds)


@pytest.mark.slow
def test_simulation_samples_a_fraction_of_clients(tiny_config):
    from lorakit.federated.simulate import federate

    result = federate(tiny_config("ffa", clients=4, rounds=2, fraction=0.5, evaluate=False), backend_cpus=2)
    assert [(r["sampled"], r["accepted"]) for r in result["rounds"]] == [(2, 2), (2, 2)]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


APP = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lorakit-federated-app"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lorakit"

[tool.flwr.app.components]
serverapp = "lorakit.federated.apps:server_app"
clientapp = "lorakit.federated.apps:client_app"

[tool.flwr.app.config]
strategy = "flora"
clients = 2
rounds = 2
model = "{model}"
data = "reverse,sort"
train-examples = 16
eval-examples = 4
local-steps = 2
batch-size = 4
client-ranks = "2,4"
target-modules = "q_proj,o_proj"
output = "{output}"
"""


@pytest.mark.slow
def test_superlink_and_two_supernodes_run_two_rounds(tiny_model_dir, tmp_path):
    link, node0, node1 = _free_ports(3)  # SuperLink's one HTTP port (Fleet, Control, ServerAppIo), each SuperNode's
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(APP.format(model=tiny_model_dir, output=tmp_path / "out"))
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # flower-superexec, flwr-clientapp
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("superlink", "node0", "node1")}
    procs = [subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--port", str(link),
                               "--database", str(tmp_path / "state.db")],
                              stdout=logs["superlink"], stderr=subprocess.STDOUT, env=env, cwd=tmp_path)]
    try:
        time.sleep(3)
        for k, port in enumerate((node0, node1)):
            procs.append(subprocess.Popen([str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                           f"127.0.0.1:{link}", "--port", str(port),
                                           "--node-config", f"partition-id={k} num-partitions=2"],
                                          stdout=logs[f"node{k}"], stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
        run = subprocess.run([str(BIN / "flwr"), "run", str(app), "local", "--stream"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        out = tmp_path / "out" / "federated.json"
        if not out.exists():
            for log in logs.values():
                log.flush()
            pytest.fail(f"no result; flwr run said:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\nsuperlink log:\n"
                        f"{(tmp_path / 'superlink.log').read_text()[-3000:]}\nnode0 log:\n"
                        f"{(tmp_path / 'node0.log').read_text()[-3000:]}")
        result = json.loads(out.read_text())
        assert [r["accepted"] for r in result["rounds"]] == [2, 2]
        assert result["config"]["client_ranks"] == [2, 4]
        # the ServerApp also wrote the global model: FLoRA's stacks of 2 rounds × ranks (2, 4) as one rank-12 LoRA
        from lorakit import read_adapter_config

        assert result["adapter"] == str(tmp_path / "out" / "adapter")
        assert read_adapter_config(tmp_path / "out" / "adapter").r == 12
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs.values():
            log.close()
