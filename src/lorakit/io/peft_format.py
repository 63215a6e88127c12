"""Save and load adapters in Hugging Face PEFT's layout.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors``; tensor keys are
``base_model.model.<module path>.<param>`` with the adapter name stripped (``...q_proj.lora_A.weight``,
DoRA ``...lora_magnitude_vector``, embeddings ``...lora_embedding_A``, modules_to_save ``...score.weight``).
Methods PEFT lacks use the same two files, with ``lorakit_method`` naming the method in the config.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping

import torch
from torch import nn

from .._version import __version__
from ..core.errors import (AdapterError, AdapterLoadError, ConfigError, TargetError, UnknownAdapterError,
                           UnknownMethodError, did_you_mean, did_you_mean_path, near_matches)
from ..core.delta import values_from_file
from ..core.layer import AdapterLayer, ModulesToSaveWrapper
from ..core.inits import InitRecord, base_edits, find_init, init_adapter
from ..core.model import (_check_new, adapter_layers, adapter_state, attach_plan, discard_adapter, host_path,
                          materialise, meta_plan, plan_adapter, temporarily_unmerged)
from ..core.registry import get_method, method_for_file
from .files import TensorFile, is_temp_name, read_json, save_tensors_and_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors with PEFT's on-disk keys."""
    state = adapter_state(model)
    if name not in state.configs:
        raise UnknownAdapterError(f"unknown adapter {name!r}.{did_you_mean(name, state.configs)} "
                                  f"Loaded: {list(state.configs)}")
    out: dict[str, torch.Tensor] = {}
    for real_path, module in model.named_modules():
        path = host_path(real_path)
        if isinstance(module, AdapterLayer) and name in module.adapters:
            for k, v in module.adapters[name].state_dict().items():
                out[f"{PREFIX}{path}.{k}"] = v
        elif isinstance(module, ModulesToSaveWrapper) and name in module.copies:
            for k, v in module.copies[name].state_dict().items():
                out[f"{PREFIX}{path}.{k}"] = v
    return out


def config_file_dict(model: nn.Module, name: str = "default") -> dict[str, Any]:
    """The ``adapter_config.json`` content of adapter ``name`` on ``model``."""
    infos = [layer.info for _, layer in adapter_layers(model) if name in layer.adapters]
    return file_config_dict(model, adapter_state(model).configs[name], infos)


def file_config_dict(model: nn.Module, config, infos: list) -> dict[str, Any]:
    """The ``adapter_config.json`` content for ``config`` adapting layers described by ``infos`` (LayerInfo) on
    ``model``, whether or not it is attached (merges write their result without attaching it)."""
    method = get_method(config)
    d = config.to_dict()
    if method.file_fields is not None:
        d.update(method.file_fields(config, infos))
    if method.peft_type is not None:
        d["peft_type"] = method.peft_type
    else:
        d["peft_type"] = method.name.upper()
        d["lorakit_method"] = method.name
    if "target_modules" in d and d["target_modules"] is None:
        # As PEFT saves them: the model type's default targets, resolved, so that a loader without the default
        # (PEFT on a model type it does not know, e.g. lorakit-mixln) still finds them.
        from ..core.targeting import default_targets

        try:
            d["target_modules"] = list(default_targets(model))
        except TargetError:
            pass
    if isinstance(d.get("target_modules"), str) and d.get("layers_to_transform") is not None:
        # PEFT refuses a str target_modules (a regex, "all-linear") beside layers_to_transform (its LoraConfig raises
        # ValueError), so such a file did not load there: name the modules chosen instead, in full (PEFT matches a
        # full name exactly, in whatever layer), which needs no layer filter.
        from ..core.targeting import select_targets

        d["target_modules"] = select_targets(model, config, strict=False)
        d["layers_to_transform"] = d["layers_pattern"] = None
    d["inference_mode"] = True  # as PEFT writes it: a saved adapter loads for inference unless asked otherwise
    # As PEFT fills them from the model: AutoPeftModelFor* needs both to rebuild the base model.
    # the folder the model was loaded from, as PEFT records it (AutoPeftModel loads the base from it); a bundled
    # base's asset folder from another installation is resolved back by lorakit (hub.bundled_name)
    d["base_model_name_or_path"] = d.get("base_model_name_or_path") or _name_or_path(model)
    d["task_type"] = peft_task_type(model, d.get("modules_to_save"))
    if d["task_type"] is None:  # as PEFT writes it then: AutoPeftModel* rebuild the base from this class
        d["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return d


# transformers head class suffix -> PEFT TaskType (peft.utils.peft_types.TaskType values).
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
               "ForSeq2SeqLM": "SEQ_2_SEQ_LM", "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


def task_type(model: nn.Module) -> str | None:
    """PEFT's TaskType name of ``model`` from its class name (``BertForSequenceClassification`` -> "SEQ_CLS"), or None."""
    return _class_task_type(type(model).__name__)


def _class_task_type(class_name: str) -> str | None:
    return next((task for suffix, task in _TASK_TYPES.items() if class_name.endswith(suffix)), None)


def file_task_type(config: dict[str, Any]) -> str | None:
    """The TaskType of the host an ``adapter_config.json`` dict was saved from: its ``task_type``, else the one of
    the class its ``auto_mapping`` names (what PEFT's ``save_pretrained`` writes for a config without task_type, and
    lorakit for a head it does not save: :func:`peft_task_type`; PEFT's ``AutoPeftModel`` builds that class)."""
    if config.get("task_type"):
        return config["task_type"]
    mapping = config.get("auto_mapping")
    base_class = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    return _class_task_type(base_class) if isinstance(base_class, str) else None


# Heads PEFT's task model classes add to modules_to_save and then require in the file (peft/peft_model.py:
# PeftModelForSequenceClassification / ...TokenClassification "classifier", "score"; ...QuestionAnswering
# "qa_outputs"), each matching the module paths ending in it.
_PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                    "QUESTION_ANS": ("qa_outputs",)}


def peft_task_type(model: nn.Module, modules_to_save: list[str] | None) -> str | None:
    """The ``task_type`` an adapter file of ``model`` records: :func:`task_type`, except None when PEFT's class for
    that task would look for a head the adapter does not save. PEFT's SEQ_CLS / TOKEN_CLS / QUESTION_ANS models add
    their head to ``modules_to_save`` and fail on a file without its weights (KeyError in
    ``set_peft_model_state_dict``); an adapter that leaves the head frozen is what PEFT writes for a config without
    a task_type, which loads there with the same outputs."""
    from ..core.targeting import iter_host_modules

    task = task_type(model)
    heads = _PEFT_TASK_HEADS.get(task, ())
    if not heads:
        return task
    saved = modules_to_save or []
    for path, _ in iter_host_modules(model):
        if path.endswith(heads) and not any(path == m or path.endswith("." + m) for m in saved):
            return None
    return task


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", *,
                 original_base: bool = False) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``, atomically as a pair (a
    failed save leaves the previous pair, not new tensors beside an old config).

    By default the file is the adapter as it is; when its init changed the base (PiSSA, OLoRA), its config still
    names that init, and loading it into the original base re-runs the init there first (as PEFT does).
    ``original_base=True`` instead writes an adapter that works on the *original, untouched* base, folding in
    what the init took from it (PEFT's ``path_initial_model_for_weight_conversion``: for LoRA a rank-2r LoRA,
    ``ΔW' = ΔW + (W_res − W_orig)``). Raises AdapterError when the method cannot express that
    (``Method.to_original_base`` missing), and for a ``directory`` that is not a path or lies at or under a file,
    before anything is written.
    """
    directory = _folder(directory, "save_adapter", AdapterError)
    tensors = adapter_state_dict(model, name)
    config = config_file_dict(model, name)
    edits = base_edits(model, name)
    if original_base and edits:
        method = get_method(adapter_state(model).configs[name])
        if method.to_original_base is None:
            raise AdapterError(f"method {method.name!r} cannot write adapter {name!r} for the original base (its init "
                               "changed the base weights); save it as is, or restore_base and retrain.")
        plain = {k[len(PREFIX):]: v for k, v in tensors.items()}
        config, plain = method.to_original_base(adapter_state(model).configs[name], config, plain, edits)
        tensors = {PREFIX + k: v for k, v in plain.items()}
    write_adapter_files(directory, tensors, config)
    return directory


# The safetensors metadata key holding the adapter_config.json written beside the tensors: a loader finding another
# config there knows the pair was not saved together (edited since, or a save interrupted between its two renames).
SAVED_CONFIG_KEY = "lorakit_adapter_config"
# Config fields that do not change what the tensors mean: editing them (a moved base folder) is no mismatch.
_FREE_FIELDS = {"base_model_name_or_path", "inference_mode", "revision", "auto_mapping", "peft_version",
                "lorakit_version"}


def write_adapter_files(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: dict[str, Any],
                        extra_json: Mapping[str | os.PathLike, Any] | None = None) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (+ ``extra_json`` files) into ``directory`` as one
    set (:func:`~lorakit.io.files.save_tensors_and_json`), the config also in the tensors' metadata
    (``SAVED_CONFIG_KEY``), which :func:`warn_config_changed` compares on load. AdapterError, before anything is
    written, when ``directory`` or a folder above it is a file."""
    directory = _folder(directory, "save_adapter", AdapterError)
    above = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        raise AdapterError(f"cannot save an adapter into {directory}: {above} is a file, and an adapter is a folder "
                           f"({CONFIG_NAME} + {WEIGHTS_NAME}); give a folder path")
    metadata = {"format": "pt", "lorakit_version": __version__, SAVED_CONFIG_KEY: json.dumps(config, sort_keys=True)}
    save_tensors_and_json(directory / WEIGHTS_NAME, tensors, {directory / CONFIG_NAME: config, **(extra_json or {})},
                          metadata=metadata)


def _folder(directory: Any, what: str, error: type[Exception]) -> Path:
    """``directory`` as a Path; ``error`` naming ``what`` takes it when it is no path (an int, None, a model)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise error(f"{what} takes an adapter folder's path (str or os.PathLike), got {directory!r:.80} "
                    f"({type(directory).__name__})")
    return Path(directory)


def warn_config_changed(directory: str | os.PathLike, file: TensorFile) -> None:
    """Warn (UserWarning naming the fields and both values) when ``directory``'s adapter_config.json is not the config
    lorakit saved with the tensors of ``file`` (its metadata): edited since, or a save into the folder was interrupted
    between its two files, leaving new tensors beside the old config. Files without that metadata (PEFT's) pass."""
    saved = file.metadata().get(SAVED_CONFIG_KEY)
    if saved is None:
        return
    try:
        saved = json.loads(saved)
    except json.JSONDecodeError:
        return
    now = read_json(Path(directory) / CONFIG_NAME)
    changed = sorted(k for k in set(saved) | set(now) if k not in _FREE_FIELDS and saved.get(k) != now.get(k))
    if changed:
        diffs = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in changed[:5])
        warnings.warn(f"{directory}: {CONFIG_NAME} is not the config its tensors were saved with ({diffs}): it was "
                      f"edited, or a save into this folder was interrupted between its two files (new tensors beside "
                      f"the old config). The adapter loads as the config now says.", UserWarning, stacklevel=3)


def read_adapter_config(directory: str | os.PathLike):
    """Parse and validate a saved adapter's config (lorakit or PEFT). A training run folder (``lorakit train
    --output``, holding ``adapter/``) is named as one, with the adapter folder inside it."""
    directory = _folder(directory, "read_adapter_config", AdapterLoadError)
    if not directory.is_dir():
        if directory.exists():
            raise AdapterLoadError(f"{directory} is a file, not an adapter folder (a folder holding {CONFIG_NAME} and "
                                   "adapter_model.safetensors)")
        raise AdapterLoadError(f"adapter folder {directory} does not exist.{did_you_mean_path(directory)}")
    path = directory / CONFIG_NAME
    inner = run_adapter(directory)
    if inner is not None:
        checkpoints = sorted(p.name for p in directory.glob("checkpoint-*") if (p / CONFIG_NAME).is_file())
        raise AdapterLoadError(f"{directory} is a training run folder, not an adapter folder; did you mean "
                               f"{inner}?" + (f" (its checkpoints: {', '.join(checkpoints)})" if checkpoints else ""))
    if not path.is_file():  # PEFT's save_pretrained puts an adapter not named "default" in a subfolder of its name
        inside = sorted(str(p) for p in directory.iterdir()
                        if (p / CONFIG_NAME).is_file() and not is_temp_name(p.name))[:5]
        if inside:
            raise AdapterLoadError(f"missing config file {path}; {directory} holds adapter folders: "
                                   f"{', '.join(inside)} (PEFT saves an adapter not named 'default' in a subfolder "
                                   f"named after it); give one of them")
    raw = _base_beside(read_json(path), directory)
    try:
        method = method_for_file(raw, source=str(path))
        raw = _without_untrained_bias(raw, method.config_cls, directory, path)
        return method.config_cls.from_dict(raw, source=str(path))
    except (ConfigError, UnknownMethodError) as e:
        message = str(e)  # named by its file, so a command reading several adapters says which one is wrong
        raise AdapterLoadError(message if str(path) in message else f"{path}: {message}") from None


def relative_base(base: str | os.PathLike, adapter: str | os.PathLike) -> str:
    """``base`` (a model folder) as the path to record in the adapter folder ``adapter``'s config: relative to the
    adapter folder and starting with ``./`` or ``../`` (e.g. ``../pruned_base``), so that the two folders move and
    copy together. lorakit reads such a path against the adapter folder (:func:`read_adapter_config`); PEFT's
    ``AutoPeftModel`` reads ``base_model_name_or_path`` against the working directory."""
    relative = Path(os.path.relpath(Path(base).resolve(), Path(adapter).resolve())).as_posix()
    return relative if relative.startswith("../") else f"./{relative}"


def _base_beside(raw: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``raw`` with a ``base_model_name_or_path`` written relative to the adapter folder (``./`` or ``../``, as
    :func:`relative_base` writes it, which no hub id starts with) made the absolute path of that folder, when a
    model folder is there; other values (hub ids, bundled names, absolute paths as older runs recorded them, a
    relative path with nothing beside the adapter) are kept as written."""
    base = raw.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.startswith(("./", "../")):
        return raw
    beside = directory / base
    if not (beside / "config.json").is_file():
        return raw
    return {**raw, "base_model_name_or_path": str(beside.resolve())}


def _without_untrained_bias(raw: dict[str, Any], config_cls: type, directory: Path, path: Path) -> dict[str, Any]:
    """``raw`` of a PEFT LoRA file with its ``bias`` ("all" / "lora_only": the host's biases train too) set back to
    "none" when the file holds no host bias (PEFT saves the biases it trained beside the adapter: every ``*.bias``
    of the model for "all", ``<module>.base_layer.bias`` of each adapted module for "lora_only",
    peft/tuners/tuners_utils.py ``_get_learnable_bias_state_dict``; a base without biases, e.g. Llama's, leaves
    none). Such a file is a plain adapter. One that holds host biases would need them written into the host, which
    lorakit leaves untouched: AdapterLoadError naming the first such tensor."""
    bias = raw.get("bias", "none")
    if bias in ("none", None) or raw.get("peft_type") != "LORA" or "bias" not in getattr(config_cls,
                                                                                           "foreign_fields", {}):
        return raw
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        return raw  # the missing file is reported by the load; the config error stays as it was
    saved = set(raw.get("modules_to_save") or [])
    host_biases = [k for k in TensorFile(weights).keys() if k.endswith(".bias") and not any(
        part.startswith("lora_") or part in saved or part == "modules_to_save" for part in k.split(".")[:-1])]
    if host_biases:
        raise AdapterLoadError(f"{path}: bias={bias!r} trained the host model's biases and the file holds them "
                               f"({len(host_biases)} tensor(s), e.g. {host_biases[0]!r}); lorakit keeps the host "
                               f"model untouched and cannot apply them. Load it with PEFT, or merge those biases "
                               f"into the base model first.")
    return {**raw, "bias": "none"}


def run_adapter(directory: str | os.PathLike) -> Path | None:
    """``directory/adapter`` when ``directory`` is a training run folder (``lorakit train --output``: no
    adapter_config.json of its own, an ``adapter/`` folder with one); else None."""
    directory = Path(directory)
    inner = directory / "adapter"
    if not (directory / CONFIG_NAME).is_file() and (inner / CONFIG_NAME).is_file():
        return inner
    return None


# Base tensors a training procedure trained in full (LongLoRA's embeddings and norms, LISA's blocks, GaLore's
# matrices), which ``lorakit train`` writes beside the run's adapter (host parameter names).
TRAINABLE_PARAMS_FILE = "trainable_params.safetensors"


# A training checkpoint's state (``lorakit.training.checkpoint``): base tensors it trained are ``param.<name>`` there.
CHECKPOINT_TENSORS = "trainer_state.safetensors"


def trained_base_file(adapter: str | os.PathLike) -> Path | None:
    """The file of base tensors trained in full that goes with the adapter folder ``adapter``, None when there is
    none: for a training checkpoint (``checkpoint-<step>``), its ``CHECKPOINT_TENSORS`` when that holds base
    parameters (``param.<name>``: the tensors as they were at its step; the run folder's file is the run's end),
    else the ``TRAINABLE_PARAMS_FILE`` in ``adapter`` or in the run folder above it (``RUN/adapter``). The adapter
    alone, on the untouched base, is then not the model the run trained: eval / generate / merge load the file with
    it, a server refuses it."""
    state = Path(adapter) / CHECKPOINT_TENSORS
    if state.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(state), framework="pt") as f:
                return state if any(k.startswith("param.") for k in f.keys()) else None
        except Exception:  # damaged: the checkpoint's own loaders name it; nothing known to have been trained
            return None
    for folder in (Path(adapter), Path(adapter).parent):
        if (folder / TRAINABLE_PARAMS_FILE).is_file():
            return folder / TRAINABLE_PARAMS_FILE
    return None


def trained_base_error(adapter: str | os.PathLike, where: str) -> str | None:
    """Why ``where`` (a server, a bank shared by many adapters) cannot serve ``adapter``: its run also trained base
    tensors (:func:`trained_base_file`), which an adapter on a shared, untouched base cannot carry; None when it
    trained none."""
    found = trained_base_file(adapter)
    if found is None:
        return None
    return (f"{adapter}: its run also trained base tensors in full ({found}: LongLoRA / LISA / GaLore), which "
            f"{where} cannot apply (its adapters share the untouched base), so its answers would not be the trained "
            f"model's. Serve the trained model instead: `lorakit merge --adapter {adapter} --output DIR`, then "
            f"serve DIR as --model")


BASE_FILE = "base.json"  # in a training run folder: the base's flags beyond --model (4 bit, LoRAM), as trained on


def trained_base_mismatch(adapter: str | os.PathLike | None, quantize: str | None, double_quant: bool | None, *,
                          loader: str = "this command") -> str | None:
    """Why ``adapter`` (a folder ``lorakit train`` wrote: its ``adapter/``, a ``checkpoint-N``, or the run folder)
    was trained on another 4-bit setting of the base than the one ``loader`` loads (``quantize``: ``"nf4"``, ``"fp4"``
    or None for full precision; ``double_quant`` with it), read from its run folder's ``base.json``; None when they
    agree or the folder has no such record (not in a run folder, or written before base.json existed). Only the
    stored weights count: the quant type and double quantization (the compute dtype changes the matmuls' dtype only).
    A LoRAM run's adapter is recovered for the original model (only its pruned copy was 4-bit): None."""
    if not adapter:
        return None
    folder = Path(adapter)
    run = folder if run_adapter(folder) is not None else folder.parent
    saved_file = run / BASE_FILE
    if not saved_file.is_file():
        return None
    saved = read_json(saved_file)
    if saved.get("loram_ratio") is not None:
        return None
    now = {"quantize": quantize, "double_quant": double_quant if quantize else None}
    diff = [f"--{k.replace('_', '-')}: trained {saved.get(k)!r}, {loader} {now[k]!r}"
            for k in ("quantize", "double_quant") if saved.get(k) != now[k]]
    return None if not diff else (f"{adapter} was trained on another base than {loader} loads ({'; '.join(diff)}; "
                                  f"its run's {saved_file})")


def check_adapter_folder(directory: str | os.PathLike):
    """An adapter folder's checks that need no model, for a command to run before it loads one: the config parses
    and validates (:func:`read_adapter_config`) and the weights file is a safetensors file whose header reads
    (:class:`~lorakit.io.files.TensorFile`; a pickle-only folder is named as such). Returns the config; raises
    AdapterLoadError naming the folder or file."""
    config = read_adapter_config(directory)
    TensorFile(weights_path(Path(directory)))
    return config


def override_config(config, overrides: dict[str, Any], source: str = "config"):
    """``config`` with ``overrides`` applied (re-validated); raises ConfigError for a field it does not have."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config)}
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"{source}: {type(config).method!r} adapters have no setting {key!r}."
                              f"{did_you_mean(key, fields)} Settings: {', '.join(sorted(fields))}.")
    return dataclasses.replace(config, **overrides)


def weights_path(directory: Path) -> Path:
    path = directory / WEIGHTS_NAME
    if not path.is_file() and (directory / PICKLE_NAME).is_file():
        raise AdapterLoadError(
            f"{directory} holds only {PICKLE_NAME}, a pickle file; lorakit never unpickles (it can run arbitrary "
            f"code). If you trust the file, convert it once: python -c \"import torch; from safetensors.torch "
            f"import save_file; save_file(torch.load('{directory / PICKLE_NAME}', weights_only=True), "
            f"'{path}')\""
        )
    return path


def _normalise_key(key: str) -> str:
    if not key.startswith(PREFIX):
        raise AdapterLoadError(f"tensor {key!r} does not start with {PREFIX!r}; not a PEFT-layout adapter file")
    key = key[len(PREFIX):]
    # Older PEFT versions saved DoRA's magnitude with a ".weight" suffix.
    if key.endswith("lora_magnitude_vector.weight"):
        key = key[: -len(".weight")]
    return key


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", *,
                 is_trainable: bool = False, autocast_adapter_dtype: bool = True,
                 config_overrides: dict[str, Any] | None = None) -> nn.Module:
    """Load a lorakit or PEFT adapter from ``directory`` as adapter ``name``.

    ``config_overrides`` replaces config fields that do not change the saved tensors (e.g. DyLoRA's serving
    ``rank``); an unknown field raises ConfigError naming the config's fields. Every check (config, file
    integrity, finiteness, key coverage, shapes) runs before the model is touched: a failed load leaves the
    model exactly as it was.

    A config naming an init that changes the base (PEFT's ``init_lora_weights="pissa"``, ``"olora"``) is relative
    to the changed base: that init runs again on this model's base (``Init.rerun_on_load``) before the saved
    tensors are copied in. A data-driven init is not re-run (the file holds its result).
    """
    directory = _folder(directory, "load_adapter", AdapterLoadError)
    config = read_adapter_config(directory)
    if config_overrides:
        config = override_config(config, config_overrides, source=str(directory))
    config.inference_mode = not is_trainable
    init = find_init(config.requested_init()) if config.requested_init() is not None else None
    if init is not None and init.changes_base and not init.rerun_on_load:
        raise AdapterLoadError(f"{directory}: the adapter is relative to a base that the data-driven init "
                               f"{init.name!r} changed, which cannot be recomputed here; save it with "
                               "save_adapter(..., original_base=True) to get a file for the original base (in PEFT: "
                               "save_pretrained(dir, path_initial_model_for_weight_conversion=...)).")
    if init is not None and init.rerun_on_load and not init.reruns_exactly(config.requested_init()):
        warnings.warn(_redrawn_base_warning(directory, config.requested_init()), UserWarning, stacklevel=2)
    file = TensorFile(weights_path(directory))
    warn_config_changed(directory, file)
    tensors = file.read_all()
    with temporarily_unmerged(model):  # checks compare base weights: those of the base, not of a merged adapter
        plan, given = _checked_plan(model, directory, config, tensors, name, autocast_adapter_dtype,
                                    overridden=set(config_overrides or ()))
    _refuse_meta(directory, plan)
    attach_plan(model, plan)
    if init is not None and init.rerun_on_load:
        try:
            init_adapter(model, name)  # rebuild the changed base, then put the trained tensors back
        except Exception:
            discard_adapter(model, name)  # e.g. a 4-bit base, or weights another adapter's LoftQ replaced
            raise
        with torch.no_grad():
            for path, (_, _, delta) in plan.deltas.items():
                _copy_into(delta, path, given)
    elif init is not None:  # its result is in the file: never run it again (e.g. by the training loop)
        adapter_state(model).inits[name] = InitRecord(init=init.name, spec=str(config.requested_init()))
    return model


def _redrawn_base_warning(directory: Path, spec: str) -> str:
    """What loading a file whose init is redone with fresh random numbers (``pissa_niter_K``) gets wrong, and the
    exact route. PEFT redoes it the same way on load, without a word: its reload of its own file depends on the RNG
    state (peft/tuners/lora/layer.py ``pissa_init``: ``svd_lowrank`` draws a random projection)."""
    return (f"{directory}: init_lora_weights={spec!r} is redone on load with a new random SVD (as PEFT does), so the "
            f"base it leaves differs from the one the adapter was trained on and the outputs differ from the model "
            f"that saved it. For exact outputs save the adapter for the original base: save_adapter(model, dir, "
            f"original_base=True) in lorakit, save_pretrained(dir, path_initial_model_for_weight_conversion=...) in "
            f"PEFT.")


def _refuse_meta(directory: Path, plan) -> None:
    """An adapter planned on the meta device (a base built under ``torch.device("meta")`` / accelerate's
    ``init_empty_weights``, or offloaded by a ``device_map``) would take none of the file's values: copying into a
    meta tensor is a no-op, so the model failed later or ran an empty adapter. PEFT 0.21.2 does the same, with only
    torch's warning, even with ``low_cpu_mem_usage=True``. Refused here, before the model is touched."""
    refuse_meta_tensors(directory, plan.state_dict())


def refuse_meta_tensors(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """AdapterLoadError naming ``directory`` when any of ``tensors`` (what the adapter's values would be copied into:
    its planned deltas here, the base weights its serving banks are built beside in ``lorakit.serving``) is on the
    meta device."""
    message = meta_tensors_message(directory, tensors)
    if message:
        raise AdapterLoadError(message)


def meta_tensors_message(source: Any, tensors: Mapping[str, torch.Tensor], then: str = "load the adapter") -> str:
    """What to tell the user when any of ``tensors`` is on the meta device (``source``: the folder, or the adapter,
    whose values would be lost; ``then``: the step to take once the base has weights); "" when none is."""
    on_meta = [key for key, value in tensors.items() if value.is_meta]
    if not on_meta:
        return ""
    return (f"{source}: the model's layer for {on_meta[0]!r} is on the meta device (no weights: built under "
            f"torch.device('meta') / init_empty_weights, or offloaded by a device_map), so the adapter would load "
            f"nothing ({len(on_meta)} tensor(s)). Load the base weights first (from_pretrained, or "
            f"model.to_empty(device=...) and load_state_dict), on devices that hold them, then {then}.")


def trained_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Every module path (and parent path) a PEFT-layout file holds tensors under: what was trained."""
    out: set[str] = set()
    for key in tensors:
        parts = _normalise_key(key).split(".")[:-1]
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def check_adapter_tensors(model: nn.Module, directory: str | os.PathLike, config, tensors: dict[str, torch.Tensor]
                          ) -> None:
    """The checks ``load_adapter`` makes of a saved adapter's tensors against its ``config`` on ``model`` (key
    coverage, shapes; a shape mismatch names the config field that would fit), without attaching anything.
    ``model`` may live on the meta device (``lorakit inspect`` builds the base from its config alone); base-model
    weights a file carries are then not compared. Raises AdapterLoadError naming the tensor."""
    with temporarily_unmerged(model):
        _checked_plan(model, Path(directory), config, tensors, "default", True, copy=False)


def _fields_that_fit(model: nn.Module, config, path: str, key: str, shape: tuple[int, ...]) -> list[str]:
    """``field=value`` settings of the config's integer fields under which module ``path``'s tensor ``key`` (its
    name inside the module's delta) would have ``shape``: what a mismatch says was edited (num_experts, r …). Each
    trial builds that one delta on the meta device."""
    import dataclasses

    from ..core.delta import describe_layer
    from ..core.targeting import iter_host_modules

    method = get_method(config)
    base = dict(iter_host_modules(model)).get(path)
    info = None if base is None else describe_layer(base)
    if info is None:
        return []
    fits = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if type(value) is not int:
            continue
        for size in sorted(set(shape) - {value}):
            try:
                trial = dataclasses.replace(config, **{f.name: size})
                with torch.device("meta"):
                    delta = method.build(base, info, trial.for_module(path), path=path)
                if tuple(delta.state_dict()[key].shape) == shape:
                    fits.append(f"{f.name}={size}")
            except Exception:  # noqa: BLE001  (a value the config or the method refuses explains nothing)
                continue
    return fits


def _checked_plan(model, directory, config, tensors, name, autocast_adapter_dtype, copy: bool = True,
                  overridden: Collection[str] = ()):
    """Check the file's ``tensors`` against what ``config`` builds on ``model`` (keys, shapes, base weights), then,
    with ``copy``, make the plan with the file's values: ``(plan, given tensors by key)``. The caller has unmerged
    the model (``temporarily_unmerged``). The adapter is built once, on the meta device (``meta_plan``), so a config
    whose sizes do not fit its file (an edited huge r) fails naming a tensor before anything of its size is
    allocated; the checked plan is then made from it and the file's values (``materialise``), or, for a method with
    state the file does not give, built for real and the file's values copied in. Without ``copy`` nothing is made
    (plan None). Every registered method builds on the meta device (tests/core/test_contract.py checks the shapes
    against the real build): whatever else a meta build raises is a bug in the method, and is raised as it is
    (no fallback to a real build, which would allocate before the checks). ``overridden``: the fields
    ``config_overrides`` set, which a shape error names as such rather than as the file's."""
    regenerated = get_method(config).regenerated_keys  # tensors the method rebuilds from its seed (RandLoRA's bases)
    tensors = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in regenerated}
    try:
        trained = trained_modules(tensors)
    except AdapterLoadError as e:  # a key outside PEFT's layout: name the file it is in
        raise AdapterLoadError(f"{Path(directory) / WEIGHTS_NAME}: {e}") from None
    _check_new(model, config, name)
    try:
        meta = meta_plan(model, config, name, trained)
    except (ConfigError, TargetError) as e:  # the config's own checks against this model (a method's prepare, its
        # targets): the same error, naming the folder it came from as every other load error does
        raise type(e)(f"{directory}: {e.args[0]}", field=e.field) from None
    deltas, saved = meta.delta_shapes(), meta.saved_shapes(model)
    expected = {f"{path}.{k}": shape for group in (deltas, saved) for path, keys in group.items()
                for k, shape in keys.items()}
    given = _checked_tensors(model, directory, meta.config, tensors, expected, deltas, overridden)
    _check_dtypes(directory, meta, given)
    if not copy:
        return None, given
    # every check passed: now the adapter is made
    plan = materialise(model, meta, given, autocast_adapter_dtype=autocast_adapter_dtype)
    if plan is None:
        with values_from_file():  # the checked file's tensors are copied in below
            plan = plan_adapter(model, config, name, autocast_adapter_dtype=autocast_adapter_dtype, trained=trained)
        with torch.no_grad():
            for path, (_, _, delta) in plan.deltas.items():
                _copy_into(delta, path, given)
    with torch.no_grad():
        for path, module in plan.saved.items():
            _copy_into(module, path, given)
    return plan, given


def _check_dtypes(directory: Path, meta, given: Mapping[str, torch.Tensor]) -> None:
    """AdapterLoadError naming the first file tensor that is not floating point where the adapter's tensor is (an
    int or bool ``lora_A``: a damaged or hand-made file; casting it would load rounded garbage without a word).
    Half precision and bfloat16 files are fine (cast to the adapter's dtype, as PEFT does)."""
    for path, (_, _, delta) in meta.deltas.items():
        for key, planned in delta.state_dict().items():
            value = given.get(f"{path}.{key}")
            if value is not None and planned.is_floating_point() and not value.is_floating_point():
                raise AdapterLoadError(f"{directory}: tensor {PREFIX + path + '.' + key!r} has dtype {value.dtype}; an "
                                       f"adapter's weights are floating point (float32, float16 or bfloat16). The "
                                       f"file is damaged or was not written as an adapter.")


def _checked_tensors(model, directory, config, tensors, expected: dict[str, tuple[int, ...]], deltas,
                     overridden: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The file's adapter tensors by key (prefix stripped), after checking them against ``expected`` (key -> shape
    of what ``config`` builds; ``deltas``: the adapted module paths): none unexpected, none missing, every shape
    right, base-model weights equal to the model's. Raises AdapterLoadError naming the tensor."""
    # every name, tied twins included (PEFT saves lm_head.base_layer.weight of a tied lm_head it targets, which
    # named_parameters() leaves out as a duplicate of embed_tokens.weight)
    host_params = dict(model.named_parameters(remove_duplicate=False))

    given: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in tensors.items():
        k = _normalise_key(key)
        if k in expected:
            given[k] = value
        elif ".base_layer." in k or k.replace(".base_layer.", ".") in host_params:
            # PEFT stores the base embedding when embeddings are targeted (for resized vocabularies); accept it
            # only when it equals the model's own, since lorakit does not overwrite base weights on load.
            # (PEFT's trainable token rows wrap the embedding as <path>.token_adapter.base_layer)
            base_key = k.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")
            current = host_params.get(base_key)
            if current is None:
                current = host_params.get(k)
            if current is not None and current.is_meta and current.shape == value.shape:
                continue  # a base built from its config alone (lorakit inspect): no weights to compare
            if current is None or current.shape != value.shape or not torch.equal(current.detach().cpu(), value.to(current.dtype)):
                raise AdapterLoadError(
                    f"{directory}: tensor {key!r} is a base-model weight that differs from this model's (a resized "
                    f"vocabulary?). Resize/load the base model to match before loading this adapter."
                )
        else:
            unexpected.append(key)
    if unexpected:
        sample = unexpected[:5]
        paths = {k.rsplit(".", 2)[0] for k in expected} | {p for p, _ in model.named_modules()}
        hints = "; ".join(f"{k!r} (closest modules: {', '.join(near_matches(_normalise_key(k).rsplit('.', 2)[0], paths, 3)) or 'none'})" for k in sample)
        raise AdapterLoadError(
            f"{directory}: {len(unexpected)} tensor(s) match no adapted module of this model: {hints}. "
            f"Is this adapter for a different base model, or are target_modules different?"
        )
    method = get_method(config)
    if method.check_file is not None:
        try:
            method.check_file(config, given)
        except AdapterLoadError as e:
            raise AdapterLoadError(f"{directory}: {e}") from None
    missing = [k for k in expected if k not in given and k.rsplit(".", 1)[-1] not in method.optional_keys]
    if missing:
        raise AdapterLoadError(
            f"{directory}: {len(missing)} tensor(s) the config requires are missing from {WEIGHTS_NAME}, e.g. "
            f"{', '.join(PREFIX + k for k in missing[:5])}"
        )
    _check_shapes(model, directory, config, {k: tuple(v.shape) for k, v in given.items()}, expected, deltas,
                  overridden)
    return given


def _check_shapes(model: nn.Module, directory: Path, config, given: dict[str, tuple[int, ...]],
                  expected: dict[str, tuple[int, ...]], deltas: Iterable[str], overridden: Collection[str] = ()
                  ) -> None:
    """AdapterLoadError naming the first file tensor (``given``: key without the prefix -> shape) whose shape is not
    the one ``expected`` holds for it, with the config field values that would fit (``_fields_that_fit``; ``deltas``:
    the adapted module paths; ``overridden``: fields a caller's ``config_overrides`` set, named as such)."""
    for k, shape in given.items():
        want = expected.get(k)
        if want is None or shape == want:
            continue
        path = next((p for p in deltas if k.startswith(p + ".")), None)
        fits = [] if path is None else _fields_that_fit(model, config, path, k[len(path) + 1:], shape)
        names = [f.split("=")[0] for f in fits]
        now = ", ".join(f"{n}={getattr(config, n)}" for n in names)
        if any(n in overridden for n in names):
            why = (f": config_overrides sets {now}, but the tensors were saved with {' or '.join(fits)} (leave it "
                   "out of config_overrides)")
        else:
            why = (f": {CONFIG_NAME} has {now}, but the tensors were saved with {' or '.join(fits)} (the config "
                   "was edited, or belongs to another adapter)" if fits else "")
        raise AdapterLoadError(
            f"{directory}: tensor {PREFIX + k!r} has shape {shape} but this model and config "
            f"(r / rank_pattern, module size) expect {want}{why}."
        )


def _copy_into(module: nn.Module, path: str, given: dict[str, torch.Tensor]) -> None:
    for k, t in module.state_dict(keep_vars=True).items():
        if f"{path}.{k}" in given:  # (the checks let only a method's optional_keys be absent)
            t.copy_(given[f"{path}.{k}"].to(dtype=t.dtype, device=t.device))
