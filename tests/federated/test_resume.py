"""Per-round server checkpoints and ``--resume-from`` (federated/checkpoint.py): a run interrupted after round k and
resumed ends with the same global adapter as the uninterrupted run, under Flower's real simulation engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.core.errors import LorakitError
from lorakit.io.files import load_tensors


def _core_after_one_round(config):
    """A ServerCore that aggregated one round of real client updates (in this process, no transport)."""
    from lorakit.federated.base import pack, unpack
    from lorakit.federated.client import client_round
    from lorakit.federated.server import ServerCore

    core = ServerCore(config)
    down = unpack(core.downlink_bytes())
    replies = []
    for client in range(config.clients):
        update, metrics = client_round(config, client, 1, down, core.a_checksum)
        replies.append((client, pack(update), metrics))
    core.receive(1, replies, sent=config.clients)
    return core


@pytest.mark.parametrize("strategy", ["flora", "lora_fair", "ffa"])
def test_a_round_checkpoint_restores_the_server_state(strategy, tiny_config, tmp_path):
    from lorakit.federated.checkpoint import read_round, restore_round, save_round
    from lorakit.federated.server import ServerCore

    config = tiny_config(strategy, client_ranks=[2, 3] if strategy == "flora" else None, evaluate=False)
    core = _core_after_one_round(config)
    save_round(tmp_path / "checkpoint", core, 1, [{"round": 1, "eval_loss": 1.5}])
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["server_state.json",
                                                                          "server_state.safetensors"]
    record = read_round(tmp_path, config)  # the run's folder finds its checkpoint/
    fresh = ServerCore(config)
    restore_round(fresh, record)
    assert fresh.state.keys() == core.state.keys()
    assert all(torch.equal(fresh.state[k], core.state[k]) for k in core.state)
    if strategy == "flora":  # the stacks of round 1: Σ r_k = 5 rows
        assert {v.shape[0] for k, v in fresh.state.items() if k.endswith(".stack_A")} == {5}
    assert fresh.history == json.loads(json.dumps(core.history)) and record["round"] == 1
    assert record["evaluation"] == [{"round": 1, "eval_loss": 1.5}]
    assert fresh.downlink_bytes() == core.downlink_bytes()


def test_resume_refuses_other_settings_naming_them(tiny_config, tmp_path):
    from lorakit.federated.checkpoint import read_round, save_round

    config = tiny_config("fedit", evaluate=False)
    save_round(tmp_path / "checkpoint", _core_after_one_round(config), 1, [])
    with pytest.raises(LorakitError, match=r"lr: 0.003 -> 0.01; seed: 0 -> 1"):
        read_round(tmp_path, tiny_config("fedit", evaluate=False, lr=0.01, seed=1))
    with pytest.raises(LorakitError, match="strategy: 'fedit' -> 'lora_fair'"):
        read_round(tmp_path, tiny_config("lora_fair", evaluate=False))
    read_round(tmp_path, tiny_config("fedit", evaluate=False, rounds=5))  # more rounds: allowed
    with pytest.raises(LorakitError, match="no federated checkpoint"):
        read_round(tmp_path / "nothing", config)


def _interrupt_after(monkeypatch, stop_round: int):
    """The server dies right after writing round ``stop_round``'s checkpoint (as a killed process would)."""
    import lorakit.federated.checkpoint as checkpoint

    original = checkpoint.save_round

    def save_then_die(directory, core, server_round, evaluation):
        folder = original(directory, core, server_round, evaluation)
        if server_round == stop_round:
            raise RuntimeError(f"interrupted after round {server_round}")
        return folder

    monkeypatch.setattr(checkpoint, "save_round", save_then_die)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedit", "flora"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(strategy, tiny_config, tmp_path, monkeypatch):
    """3 rounds straight vs 3 rounds stopped after round 1 and resumed (real Flower simulation, 2 Ray workers).
    Bit-equal: clients seed adapter, data and training from (seed, round, client), sampling from (seed, round), and
    the server aggregates in client order; the checkpoint stores the global state exactly (safetensors)."""
    from lorakit.federated.simulate import federate

    config = tiny_config(strategy, rounds=3, client_ranks=[2, 3] if strategy == "flora" else None)
    straight = federate(config, backend_cpus=2, output=tmp_path / "straight")

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(RuntimeError, match="interrupted after round 1"):  # the ServerApp's error comes through
            federate(config, backend_cpus=2, output=tmp_path / "cut")
    assert not (tmp_path / "cut" / "adapter").exists()
    state = json.loads((tmp_path / "cut" / "checkpoint" / "server_state.json").read_text())
    assert state["round"] == 1 and [r["round"] for r in state["history"]] == [1]

    resumed = federate(config, backend_cpus=2, output=tmp_path / "cut", resume_from=tmp_path / "cut")
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"] == straight["rounds"]
    assert resumed["evaluation"] == straight["evaluation"]  # rounds 0..3, round 0 and 1 from the checkpoint
    a = load_tensors(Path(straight["adapter"]) / "adapter_model.safetensors")
    b = load_tensors(Path(resumed["adapter"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "server_state.json").read_text())["round"] == 3


def test_cli_resume_names_the_differing_flags_before_flower_starts(tiny_model_dir, tiny_config, tmp_path, capsys):
    from lorakit.cli import main
    from lorakit.federated.checkpoint import save_round

    config = tiny_config("flora", client_ranks=[2, 4], evaluate=False)
    save_round(tmp_path / "run" / "checkpoint", _core_after_one_round(config), 1, [])
    args = ["federate", "--model", tiny_model_dir, "--strategy", "flora", "--client-ranks", "2,4", "--clients", "2",
            "--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--r", "2", "--data", "reverse,sort",
            "--train-examples", "16", "--eval-examples", "4", "--target-modules", "q_proj,o_proj", "--fair-steps", "20",
            "--no-evaluate", "--quiet", "--resume-from", str(tmp_path / "run")]
    assert main([*args, "--lr", "0.01", "--local-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "(--local-steps: 2 -> 3; lr: 0.003 -> 0.01)" in err and "resume with the same ones" in err, err
    assert main([*args[:-1], str(tmp_path / "elsewhere")]) == 2
    assert "no federated checkpoint" in capsys.readouterr().err


def _sampled(config, server_round: int) -> list[int]:
    """The clients round ``server_round`` samples, as federated/checkpoint.py documents it (SAMPLING): a
    ``random.Random`` seeded with ``stable_seed('lorakit-federated-sample', seed, round)`` draws
    ``max(min_clients, ⌊fraction·N⌋)`` of the partition ids 0..N-1."""
    import random

    from lorakit.data import stable_seed

    size = min(config.clients, max(config.min_clients, int(config.clients * config.fraction)))
    return sorted(random.Random(stable_seed("lorakit-federated-sample", config.seed, server_round))
                  .sample(range(config.clients), size))


@pytest.mark.parametrize("strategy", ["fedit", "flora"])
def test_the_in_process_run_checkpoints_and_resumes_as_the_uninterrupted_one(strategy, tiny_config, tmp_path,
                                                                             monkeypatch):
    """federate_in_process (lorakit bench federated) runs the same start / end-of-round code as Flower's ServerApp
    (checkpoint.start_run / end_round). Was: it wrote no checkpoint and could not resume. 2 of 3 clients per round
    (client sampling), 3 rounds, stopped after round 1 and resumed: bit-equal to the straight run."""
    from lorakit.federated.simulate import federate_in_process

    config = tiny_config(strategy, clients=3, fraction=0.67, rounds=3,
                         client_ranks=[2, 3] if strategy == "flora" else None)
    straight = federate_in_process(config, output=tmp_path / "straight")
    assert [r["clients"] for r in straight["rounds"]] == [_sampled(config, t) for t in (1, 2, 3)]
    assert json.loads((tmp_path / "straight" / "checkpoint" / "server_state.json").read_text())["round"] == 3

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(RuntimeError, match="interrupted after round 1"):
            federate_in_process(config, output=tmp_path / "cut")
    resumed = federate_in_process(config, output=tmp_path / "cut", resume_from=tmp_path / "cut")
    assert resumed["rounds"] == straight["rounds"] and resumed["evaluation"] == straight["evaluation"]
    assert [e["round"] for e in resumed["evaluation"]] == [0, 1, 2, 3]
    a = load_tensors(Path(straight["adapter"]) / "adapter_model.safetensors")
    b = load_tensors(Path(resumed["adapter"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_resumed_run_with_client_sampling_samples_and_ends_as_the_uninterrupted_one(tiny_config, tmp_path,
                                                                                      monkeypatch):
    """fraction 0.5 of 4 clients, 3 rounds, stopped after round 1 and resumed (real Flower simulation). Was: Flower's
    FedAvg sampled node ids, which the simulation draws at random for every run (secrets), so the seeded sample
    named other partitions in every run: neither a rerun nor a resumed run trained the same clients. Now the server
    samples partition ids with the seeded RNG and sends to the nodes that hold them."""
    from lorakit.federated.simulate import federate

    config = tiny_config("fedit", clients=4, fraction=0.5, rounds=3, evaluate=False)
    straight = federate(config, backend_cpus=2, output=tmp_path / "straight")
    assert [r["clients"] for r in straight["rounds"]] == [_sampled(config, t) for t in (1, 2, 3)]

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(RuntimeError, match="interrupted after round 1"):
            federate(config, backend_cpus=2, output=tmp_path / "cut")
    resumed = federate(config, backend_cpus=2, output=tmp_path / "cut", resume_from=tmp_path / "cut")
    assert resumed["rounds"] == straight["rounds"]
    a = load_tensors(Path(straight["adapter"]) / "adapter_model.safetensors")
    b = load_tensors(Path(resumed["adapter"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~60-120 s: a child process starts Ray and Flower and runs rounds until it is interrupted
def test_ctrl_c_stops_the_run_at_once_and_keeps_the_last_completed_round(tiny_model_dir, tmp_path):
    """A real Ctrl-C (SIGINT to the process group, as a terminal sends it, so the Ray workers get it too) during
    ``lorakit federate``. Was: Flower's simulation stopped its clients but not the ServerApp thread, so the process
    printed "interrupted" and went on: every remaining round waited out --round-timeout, was checkpointed as
    completed with 0 of 2 updates (a resume then skipped it) and the adapter was written, then the process died of
    a segmentation fault (status 139); Flower also logged each dying client's traceback. Now: status 130 within
    seconds, no traceback, the checkpoint holds exactly the rounds that completed (every one with both updates), no
    adapter, and the printed round is the checkpoint's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lorakit.federated.checkpoint import read_round

    out = tmp_path / "run"
    argv = ["federate", "--model", tiny_model_dir, "--data", "reverse,sort", "--clients", "2", "--rounds", "50",
            "--local-steps", "2", "--batch-size", "4", "--r", "2", "--train-examples", "16", "--eval-examples", "4",
            "--target-modules", "q_proj,o_proj", "--backend-cpus", "2", "--output", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-m", "lorakit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        state = out / "checkpoint" / "server_state.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None and not state.is_file():
            time.sleep(0.2)
        assert state.is_file(), child.communicate()[1]
        os.killpg(child.pid, signal.SIGINT)
        err = child.communicate(timeout=120)[1]  # the old code waited out --round-timeout (600 s) per round
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == 130, err
    assert "Traceback" not in err and "lorakit federate: interrupted" in err, err
    record = json.loads(state.read_text())
    done = record["round"]
    assert 1 <= done < 50 and f"round {done} of 50 is checkpointed" in err, err
    assert [(r["round"], r["accepted"]) for r in record["history"]] == [(t, 2) for t in range(1, done + 1)]
    assert not (out / "adapter").exists() and not (out / "federated.json").exists()
    from lorakit.federated import FederatedConfig

    config = FederatedConfig(model=tiny_model_dir, data="reverse,sort", clients=2, rounds=50, local_steps=2,
                             batch_size=4, r=2, train_examples=16, eval_examples=4, target_modules=["q_proj", "o_proj"])
    assert read_round(out, config)["round"] == done  # the kept state resumes


def _resume_without_flower(tiny_model_dir, run, monkeypatch) -> int:
    """`lorakit federate --resume-from run` with tiny_config("fedit", rounds=3, evaluate=False)'s settings; the test
    fails if Flower's simulation starts."""
    import flwr.simulation

    from lorakit.cli import main

    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda *a, **k: pytest.fail("Flower started"))
    return main(["federate", "--model", tiny_model_dir, "--strategy", "fedit", "--clients", "2", "--rounds", "3",
                 "--local-steps", "2", "--batch-size", "4", "--r", "2", "--data", "reverse,sort", "--train-examples",
                 "16", "--eval-examples", "4", "--target-modules", "q_proj,o_proj", "--fair-steps", "20",
                 "--no-evaluate", "--quiet", "--resume-from", str(run)])


def _damage_json(**changes):
    def damage(folder: Path) -> None:
        record = json.loads((folder / "server_state.json").read_text())
        record.update(changes)
        (folder / "server_state.json").write_text(json.dumps({k: v for k, v in record.items() if v is not None}))
    return damage


def _truncate(folder: Path) -> None:
    blob = (folder / "server_state.safetensors").read_bytes()
    (folder / "server_state.safetensors").write_bytes(blob[: len(blob) // 2])


def _int_tensor(folder: Path) -> None:
    from lorakit.io.files import save_tensors

    state = load_tensors(folder / "server_state.safetensors")
    save_tensors(folder / "server_state.safetensors", {k: v.to(torch.int64) for k, v in state.items()})


@pytest.mark.parametrize("damage,says", [
    (_damage_json(history=None), "server_state.json is damaged ('history' is NoneType, expected a JSON list)"),
    (_damage_json(config=None), "server_state.json is damaged ('config' is NoneType, expected a JSON object)"),
    (_damage_json(round="1"), "server_state.json is damaged ('round' is '1', not a completed round"),
    (_damage_json(round=-3), "server_state.json is damaged ('round' is -3, not a completed round"),
    (_damage_json(round=2), "'history' has rounds [1], expected one record per round 1..2"),
    (_damage_json(dp_history={"0": [[1.0, 0.5]]}), "'dp_history' of client '0' is not a list of"),
    (_truncate, "server_state.safetensors is not a valid safetensors file"),
    (_int_tensor, "server_state.safetensors holds non-floating-point tensors"),
])
def test_a_damaged_checkpoint_is_refused_before_flower_starts(damage, says, tiny_model_dir, tiny_config, tmp_path,
                                                              capsys, monkeypatch):
    """Was: a server_state.json without 'history' / 'config' / 'evaluation', or with a string round, was a KeyError or
    TypeError traceback (some inside Flower's ServerApp thread, after Ray's start-up), a negative round was resumed
    (rounds -2..2 ran), a truncated server_state.safetensors failed only inside the simulation, and integer tensors
    were cast and resumed. Now each is a one-line error naming the file, before Flower starts."""
    from lorakit.federated.checkpoint import save_round

    config = tiny_config("fedit", rounds=3, evaluate=False)
    save_round(tmp_path / "run" / "checkpoint", _core_after_one_round(config), 1, [])
    damage(tmp_path / "run" / "checkpoint")
    code = _resume_without_flower(tiny_model_dir, tmp_path / "run", monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, err


def test_a_run_resumed_into_another_folder_treats_it_as_a_fresh_output(tiny_model_dir, tiny_config, tmp_path, capsys,
                                                                        monkeypatch):
    """--resume-from A --output B. Was: B was allowed to be non-empty without --overwrite (the check let every
    resumed run write into an existing folder), and B's older results stayed: a resumed run with nothing left to run
    wrote its adapter beside another run's checkpoint/, which a later `--resume-from B` would have continued. And
    `--output A/checkpoint` wrote a checkpoint/checkpoint into the folder it resumed from. Now B is checked as a fresh
    run's output and cleared of an older run's results; an output holding the resumed checkpoint elsewhere than as
    its checkpoint/ is refused; resuming in place is unchanged."""
    import flwr.simulation

    from lorakit.cli import main
    from lorakit.federated.apps import make_server_app
    from lorakit.federated.checkpoint import save_round

    config = tiny_config("fedit", rounds=1, evaluate=False)
    core = _core_after_one_round(config)
    save_round(tmp_path / "a" / "checkpoint", core, 1, [])
    other = tmp_path / "b"
    (other / "checkpoint").mkdir(parents=True)
    (other / "checkpoint" / "server_state.json").write_text('{"format": "lorakit-federated-state/1", "round": 7}')
    (other / "federated.json").write_text("{}")
    (other / "notes.txt").write_text("mine")

    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda *a, **k: pytest.fail("Flower started"))
    args = ["federate", "--model", tiny_model_dir, "--strategy", "fedit", "--clients", "2", "--rounds", "1",
            "--local-steps", "2", "--batch-size", "4", "--r", "2", "--data", "reverse,sort", "--train-examples", "16",
            "--eval-examples", "4", "--target-modules", "q_proj,o_proj", "--fair-steps", "20", "--no-evaluate",
            "--quiet", "--resume-from", str(tmp_path / "a")]
    assert main([*args, "--output", str(other)]) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "a" / "checkpoint"), "--overwrite"]) == 2
    assert "holds the checkpoint --resume-from" in capsys.readouterr().err
    assert (tmp_path / "a" / "checkpoint" / "server_state.json").is_file()

    def context():
        from flwr.app import Context, RecordDict

        return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})

    # with --overwrite (the check passed): the run had completed its rounds, so only the adapter is written, and
    # nothing of the other run stays beside it; the checkpoint resumed from is untouched (grid: none needed)
    make_server_app(config, {}, output=other, resume_from=tmp_path / "a")(None, context())
    assert sorted(p.name for p in other.iterdir()) == ["adapter", "notes.txt"]
    assert json.loads((tmp_path / "a" / "checkpoint" / "server_state.json").read_text())["round"] == 1
    # resuming in place keeps the run's folder as it is
    make_server_app(config, {}, output=tmp_path / "a", resume_from=tmp_path / "a")(None, context())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter", "checkpoint"]


def test_a_checkpoint_of_another_shape_is_refused_before_flower_starts(tiny_model_dir, tiny_config, tmp_path,
                                                                       capsys, monkeypatch):
    """Was: a checkpoint whose tensors do not fit this run's model (same settings, another model in the folder, or an
    edited file) passed the up-front check and was refused only in the ServerApp, after Ray started. Now the server
    state is built and checked before Flower starts, naming the tensor."""
    from lorakit.federated.checkpoint import save_round
    from lorakit.io.files import save_tensors

    config = tiny_config("fedit", rounds=3, evaluate=False)
    folder = tmp_path / "run" / "checkpoint"
    save_round(folder, _core_after_one_round(config), 1, [])
    state = load_tensors(folder / "server_state.safetensors")
    key = sorted(k for k in state if k.endswith(".lora_A"))[0]
    state[key] = state[key][:1]  # rank 1 where the run has rank 2
    save_tensors(folder / "server_state.safetensors", state)
    code = _resume_without_flower(tiny_model_dir, tmp_path / "run", monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and f"{key} has shape (1, " in err and "another model or rank?" in err and "Traceback" not in err


def test_resume_reads_the_checkpoint_tensors_once(tiny_config, tmp_path, monkeypatch):
    """read_round loaded server_state.safetensors, then restore_round loaded it again (and ``federate`` ran
    read_round up front, then the ServerApp read and restored it: three reads per resume). Now once."""
    import lorakit.federated.checkpoint as checkpoint

    config = tiny_config("fedit", evaluate=False)
    saved = _core_after_one_round(config)
    checkpoint.save_round(tmp_path / "checkpoint", saved, 1, [])
    reads = []
    monkeypatch.setattr(checkpoint, "load_tensors", lambda path: reads.append(path) or load_tensors(path))
    core, evaluation, done = checkpoint.start_run(config, tmp_path)
    assert len(reads) == 1 and done == 1
    assert all(torch.equal(core.state[k], saved.state[k]) for k in saved.state)
