"""Training checkpoints: an adapter in PEFT format plus the loop's state, safetensors and JSON only.

``checkpoint-<step>/`` holds

- ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter, loadable by ``lorakit.load_adapter``
  and by PEFT as it is;
- ``trainer_state.safetensors``: AdamW's moments keyed ``optimizer.<param name>.<key>``, the torch RNG
  states (``rng.cpu``, ``rng.cuda`` as uint8 tensors, so dropout continues with the same masks), and
  ``param.<name>`` for any trainable parameter the adapter file does not hold; ``extra.<key>`` for a training
  procedure's state;
- ``trainer_state.json``: step, data position, seed, losses and evaluations so far, and the config.

Nothing is pickled, so a checkpoint from an untrusted source cannot run code when loaded. The folder is
written under a temporary name and renamed, so a crash never leaves a half-written ``checkpoint-<step>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..io.files import atomic_write_json, load_tensors, read_json, save_tensors, write_dir_atomically
from ..io.peft_format import CHECKPOINT_TENSORS, WEIGHTS_NAME, adapter_state_dict, save_adapter

STATE_TENSORS = CHECKPOINT_TENSORS  # (io.peft_format names it for the readers of an adapter folder)
STATE_JSON = "trainer_state.json"
FORMAT = "lorakit-trainer-state/1"


def _outside_adapter(model: nn.Module, adapter_name: str, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Trainable parameters the adapter file does not cover (matched by storage, since the two use different keys)."""
    in_adapter = {t.data_ptr() for t in adapter_state_dict(model, adapter_name).values()}
    return {name: p for name, p in params.items() if p.data_ptr() not in in_adapter}


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, adapter_name: str,
                    optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], state: dict[str, Any],
                    write_adapter: Callable[[Path], Any] | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one checkpoint folder. ``params`` are the optimizer's parameters by name, in optimizer order;
    ``write_adapter(folder)`` writes the adapter files (default: ``save_adapter``); ``extra_tensors`` (a training
    procedure's state) are stored as ``extra.<key>``."""
    names = list(params)
    tensors: dict[str, torch.Tensor] = {}
    for index, slots in optimizer.state_dict()["state"].items():
        for key, value in slots.items():
            tensors[f"optimizer.{names[index]}.{key}"] = torch.as_tensor(value)
    for name, p in _outside_adapter(model, adapter_name, params).items():
        tensors[f"param.{name}"] = p
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    device = next(iter(params.values())).device
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    record = {"format": FORMAT, "param_names": names, **state}

    def write(tmp: Path) -> None:
        if write_adapter is None:
            save_adapter(model, tmp, adapter_name)
        else:
            write_adapter(tmp)
        save_tensors(tmp / STATE_TENSORS, tensors)
        atomic_write_json(tmp / STATE_JSON, record)

    return write_dir_atomically(directory, write)


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, adapter_name: str,
                    optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, Any]:
    """Restore adapter weights, optimizer moments and RNG state in place; returns the JSON state, plus
    ``extra_tensors`` (what ``save_checkpoint`` got as ``extra_tensors``)."""
    directory = Path(directory)
    record = read_json(directory / STATE_JSON)
    if record.get("format") != FORMAT:
        raise ValueError(f"{directory / STATE_JSON} has format {record.get('format')!r}, expected {FORMAT!r}.")
    names = list(params)
    if record["param_names"] != names:
        missing = sorted(set(record["param_names"]) - set(names))
        extra = sorted(set(names) - set(record["param_names"]))
        raise ValueError(
            f"checkpoint {directory} was trained with other parameters than this model's trainable ones "
            f"(only in the checkpoint: {missing[:3]}, only in the model: {extra[:3]}); resume with the same "
            "model, adapter config and method."
        )
    saved_adapter = load_tensors(directory / WEIGHTS_NAME)
    current = adapter_state_dict(model, adapter_name)
    if set(saved_adapter) != set(current):
        raise ValueError(f"checkpoint {directory} holds a different adapter than {adapter_name!r} on this model "
                         f"(e.g. {sorted(set(saved_adapter) ^ set(current))[:3]}); add the same adapter config first.")
    tensors = load_tensors(directory / STATE_TENSORS)
    _check_shapes(directory, WEIGHTS_NAME, {k: (v, current[k]) for k, v in saved_adapter.items()})
    outside = _outside_adapter(model, adapter_name, params)
    _check_shapes(directory, STATE_TENSORS, {f"param.{n}": (tensors[f"param.{n}"], p) for n, p in outside.items()
                                             if f"param.{n}" in tensors})
    with torch.no_grad():
        for key, value in saved_adapter.items():
            current[key].copy_(value)
        for name, p in outside.items():
            p.copy_(tensors[f"param.{name}"])

    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    index_of = {name: i for i, name in enumerate(names)}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            name, slot = key[len("optimizer."):].rsplit(".", 1)
            optimizer_state.setdefault(index_of[name], {})[slot] = value
    # Optimizer moments are not checked against the parameters' shapes: a procedure's optimizer may keep them in
    # another space (GaLore's projected moments); the adapter and parameter checks above catch another r / model.
    # Hyperparameters come from this run's config (the schedule sets lr every step); only the moments resume.
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": optimizer.state_dict()["param_groups"]})

    torch.set_rng_state(tensors["rng.cpu"])
    device = next(iter(params.values())).device
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    record["extra_tensors"] = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return record


def _check_shapes(directory: Path, file: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """ValueError naming the first tensor whose saved shape differs from this run's (another r, another model)."""
    for key, (saved, current) in pairs.items():
        if tuple(saved.shape) != tuple(current.shape):
            raise ValueError(
                f"checkpoint {directory}: tensor {key!r} in {file} has shape {tuple(saved.shape)} but this run's is "
                f"{tuple(current.shape)}; resume with the adapter settings the checkpoint was trained with (r, "
                "target modules, method options) and the same model."
            )
