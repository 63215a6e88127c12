"""Per-round checkpoints of a federated run's server, and resuming from them (``lorakit federate --resume-from``).

After every completed round the server writes ``<output>/checkpoint/`` (replacing the previous round's, through
``io.files.write_dir_atomically``: a crash leaves the last complete one):

- ``server_state.safetensors``: the strategy's global state, keyed as it is on the wire (FedIT / LoRA-FAIR: the
  global ``<path>.lora_A`` / ``lora_B``, LoRA-FAIR's B already corrected by ΔB; FFA: B̄ (A is rebuilt from the seed
  and checked against the stored checksum); FLoRA: every round's ``<path>.stack_A`` / ``stack_B``);
- ``server_state.json``: the format, the round completed, the run's config, the per-round history and evaluations
  so far, the DP accounting history (per client: noise multiplier, sample rate, steps), FFA's A checksum, and how
  clients are sampled.

Client sampling needs no saved generator: round ``t`` draws the partition ids from ``(seed, t)``
(``base.sample_clients``, in both runners), and clients seed their adapter, data order and training from ``(seed, t,
client)``; so a run resumed after round k samples and trains rounds k+1.. as the uninterrupted run does. Nothing
is pickled: loading runs no code from the file.

Both runners, Flower's (``apps.run_server``) and ``simulate.federate_in_process``, start a run with
:func:`start_run` and end every round with :func:`end_round`: the same evaluations, checkpoints and resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.errors import LorakitError
from ..io.files import atomic_write_json, load_tensors, read_json, save_tensors, write_dir_atomically

CHECKPOINT = "checkpoint"
STATE_TENSORS = "server_state.safetensors"
STATE_JSON = "server_state.json"
FORMAT = "lorakit-federated-state/1"
SAMPLING = ("round t trains sorted(random.Random(stable_seed('lorakit-federated-sample', seed, t))"
            ".sample(range(clients), max(min_clients, int(clients * fraction)))) (partition ids)")
# settings that may change on resume: more rounds, and how long the server waits (neither changes a finished round)
MAY_DIFFER = ("rounds", "round_timeout_s")


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint folder of ``path``: ``path`` itself when it holds ``server_state.json``, else
    ``path/checkpoint`` (``--resume-from`` takes the run's ``--output`` or its checkpoint)."""
    path = Path(path)
    return path if (path / STATE_JSON).is_file() else path / CHECKPOINT


def resumes_in_place(output: str | os.PathLike, resume_from: str | os.PathLike | None) -> bool:
    """Whether a run resuming from ``resume_from`` continues in ``output`` itself (``output/checkpoint`` is the
    checkpoint it resumes from): then ``output``'s results are that run's and stay. False for a fresh run, or one
    resumed into another folder, which is then a fresh output (``--overwrite`` for a non-empty one; an older run's
    results there are removed). LorakitError when ``output`` holds the checkpoint resumed from anywhere else (it is
    ``output`` itself, or under its ``adapter/``): this run would write over its own input."""
    if resume_from is None:
        return False
    source, out = checkpoint_dir(resume_from).resolve(), Path(output).resolve()
    if (out / CHECKPOINT).resolve() == source:
        return True
    if source == out or out in source.parents:
        raise LorakitError(f"--output {output} holds the checkpoint --resume-from {resume_from} continues ({source}), "
                           f"and not as its {CHECKPOINT}/; the run would write over it. Give the run's own folder "
                           "(the default) or a new one")
    return False


def save_round(directory: str | os.PathLike, core, server_round: int, evaluation: list[dict[str, Any]]) -> Path:
    """Write ``core``'s state after ``server_round`` (a :class:`~lorakit.federated.server.ServerCore`) and the
    evaluations so far into ``directory`` (atomically replacing it). Returns the folder."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in core.state.items()}
    record = {"format": FORMAT, "round": server_round, "config": core.config.to_dict(), "history": core.history,
              "evaluation": evaluation, "a_checksum": core.a_checksum, "sampling": SAMPLING,
              "dp_history": {str(c): [list(h) for h in hs] for c, hs in core.dp_history.items()}}

    def write(tmp: Path) -> None:
        save_tensors(tmp / STATE_TENSORS, tensors)
        atomic_write_json(tmp / STATE_JSON, record)

    return write_dir_atomically(directory, write)


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"field: saved -> now"`` for every FederatedConfig field that differs (``MAY_DIFFER`` fields excepted)."""
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in MAY_DIFFER and saved.get(k) != now.get(k)]


def read_round(path: str | os.PathLike, config) -> dict[str, Any]:
    """The checkpoint record of ``path`` (a run's output folder or its ``checkpoint/``), checked against ``config``
    (a FederatedConfig), with its tensors under ``"state"`` and its folder under ``"directory"``. Raises LorakitError when there is none, it is of another format, either file is damaged
    (JSON fields missing or of the wrong type, tensors unreadable, truncated, non-finite or not floating point), it
    was written by a run with other settings (naming every differing field), or it is past ``config.rounds``. All
    of it before Flower starts (``simulate.federate`` calls it up front): a damaged file failed in the ServerApp's
    thread, or as a KeyError / TypeError traceback."""
    directory = checkpoint_dir(path)
    if not (directory / STATE_JSON).is_file():
        raise LorakitError(f"--resume-from {path}: no federated checkpoint there ({directory / STATE_JSON} is missing; "
                           "a run writes it after its first completed round)")
    record = read_json(directory / STATE_JSON)
    if record.get("format") != FORMAT:
        raise LorakitError(f"--resume-from {path}: {directory / STATE_JSON} has format {record.get('format')!r}, "
                           f"expected {FORMAT!r}")
    damage = _record_damage(record)
    if damage:
        raise LorakitError(f"--resume-from {path}: {directory / STATE_JSON} is damaged ({damage}); it cannot be "
                           "resumed. Start the run again (--overwrite)")
    tensors = load_tensors(directory / STATE_TENSORS)  # AdapterLoadError naming the file: missing, truncated, NaN
    odd = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if odd:
        raise LorakitError(f"--resume-from {path}: {directory / STATE_TENSORS} holds non-floating-point tensors "
                           f"{odd[:3]}; it is not a federated server state")
    diff = config_differences(record["config"], config.to_dict())
    if diff:
        raise LorakitError(f"--resume-from {path} was run with other settings ({'; '.join(diff)}); resume with the "
                           "same ones (only --rounds and --round-timeout may change)")
    if record["round"] > config.rounds:
        raise LorakitError(f"--resume-from {path} has completed {record['round']} rounds, more than --rounds "
                           f"{config.rounds}; give --rounds {record['round']} or more")
    record["directory"] = str(directory)
    record["state"] = tensors  # restore_round takes them from here: the file is read once per resume
    return record


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record_damage(record: dict[str, Any]) -> str | None:
    """What is wrong with a ``server_state.json`` record as :func:`save_round` writes it, or None."""
    done = record.get("round")
    if not _whole(done) or done < 1:
        return f"'round' is {done!r}, not a completed round (a whole number >= 1)"
    for key, kind in (("config", dict), ("history", list), ("evaluation", list), ("dp_history", dict)):
        if not isinstance(record.get(key, {} if key == "dp_history" else None), kind):
            expected = "object" if kind is dict else "list"
            return f"'{key}' is {type(record.get(key)).__name__}, expected a JSON {expected}"
    rounds = [h.get("round") if isinstance(h, dict) else None for h in record["history"]]
    if rounds != list(range(1, done + 1)):
        more = '…' if len(rounds) > 5 else ''
        return f"'history' has rounds {rounds[:5]}{more}, expected one record per round 1..{done}"
    if not all(isinstance(e, dict) and _whole(e.get("round")) for e in record["evaluation"]):
        return "'evaluation' holds a record without a whole 'round'"
    for client, steps in record.get("dp_history", {}).items():
        if not (client.isdigit() and isinstance(steps, list) and all(
                isinstance(h, list) and len(h) == 3 and all(isinstance(v, (int, float)) for v in h) for h in steps)):
            return f"'dp_history' of client {client!r} is not a list of [noise multiplier, sample rate, steps]"
    checksum = record.get("a_checksum")
    if checksum is not None and (isinstance(checksum, bool) or not isinstance(checksum, (int, float))):
        return f"'a_checksum' is {checksum!r}, not a number"
    return None


def restore_round(core, record: dict[str, Any]) -> None:
    """Put a checkpoint's state and history (``read_round``'s record) into a freshly built ServerCore of the same
    config. Raises LorakitError when its tensors do not fit this server's (another model or targets)."""
    directory = Path(record["directory"])
    state = record["state"]
    if set(state) != set(core.state):
        extra, missing = sorted(set(state) - set(core.state)), sorted(set(core.state) - set(state))
        raise LorakitError(f"--resume-from {directory}: its global state names other tensors than this run's "
                           f"(only in the checkpoint: {extra[:3]}, only in this run: {missing[:3]})")
    for key, value in state.items():
        # FLoRA's stacks grow with the rounds: only the adapted dimension (in / out) has to agree
        fixed = 1 if key.endswith(".stack_A") else 0 if key.endswith(".stack_B") else None
        mine = core.state[key]
        if (tuple(value.shape) != tuple(mine.shape) if fixed is None else value.shape[fixed] != mine.shape[fixed]):
            raise LorakitError(f"--resume-from {directory}: {key} has shape {tuple(value.shape)}, this run's is "
                               f"{tuple(mine.shape)} (another model or rank?)")
    if record.get("a_checksum") != core.a_checksum:
        raise LorakitError(f"--resume-from {directory}: FFA's frozen A differs from this run's (checksum "
                           f"{record.get('a_checksum')} vs {core.a_checksum}); resume with the same model and seed")
    core.state = {k: v.to(core.state[k].dtype) for k, v in state.items()}
    core.history = list(record["history"])
    core.dp_history = {int(c): [(float(s), float(q), int(n)) for s, q, n in hs]
                       for c, hs in record.get("dp_history", {}).items()}


def start_run(config, resume_from: str | os.PathLike | None = None) -> tuple[Any, list[dict[str, Any]], int]:
    """``(core, evaluation, done)`` to run ``config`` from: a fresh :class:`~lorakit.federated.server.ServerCore`,
    or one holding ``resume_from``'s checkpoint (``read_round``'s errors), its evaluations so far and the number
    of rounds it completed. ``simulate.federate`` calls it before Flower starts (a checkpoint whose tensors do not
    fit this run's model is refused there, not in the ServerApp after Ray's start-up) and hands the result to the
    ServerApp (``apps.run_server``'s ``start``)."""
    from .server import ServerCore

    record = read_round(resume_from, config) if resume_from is not None else None
    core = ServerCore(config)
    if record is None:
        return core, [], 0
    restore_round(core, record)
    return core, list(record["evaluation"]), int(record["round"])


def end_round(core, server_round: int, evaluation: list[dict[str, Any]],
              checkpoint: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """After round ``server_round`` of the run (0: before round 1): evaluate the global model when the config says
    so (appended to ``evaluation`` and returned), then, from round 1 on, checkpoint into ``checkpoint``."""
    metrics = None
    if core.config.evaluate:
        metrics = {"round": server_round, **core.evaluate()}
        evaluation.append(metrics)
    if checkpoint is not None and server_round > 0:
        save_round(checkpoint, core, server_round, evaluation)
    return metrics
