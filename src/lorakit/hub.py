"""Loading base models and tokenizers: the bundled model by default, any local HF folder or cached hub id."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from .assets import BUNDLED_MODELS
from .core.errors import LorakitError

BUNDLED = "bundled"


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """The folder or hub id to load; raises LorakitError for a file or an adapter folder given as a model.

    ``None``/``""``/``"bundled"`` is the bundled base, ``"bundled-small"`` the second, smaller bundled base."""
    if model in (None, "") or (isinstance(model, str) and model in BUNDLED_MODELS):
        name = model or BUNDLED
        path = BUNDLED_MODELS[name]
        if not (path / "config.json").is_file():
            raise LorakitError(f"the bundled base model {name!r} is missing at {path}; rebuild it with "
                               f"`lorakit pretrain-base` (its pretrain_info.json in the repository has the options).")
        return str(path)
    path = Path(model)
    if not path.exists() and bundled_name(model):  # an adapter trained in another installation records its path
        return resolve_model_path(bundled_name(model))
    if isinstance(model, str) and not path.exists():
        from .core.errors import did_you_mean

        hint = did_you_mean(model, list(BUNDLED_MODELS))
        if hint:  # a mistyped bundled name, not a hub id
            raise LorakitError(f"model {model!r} is neither a folder nor a bundled model.{hint}")
    if path.is_file():
        raise LorakitError(f"{path} is a file, not a model: give the model's folder (config.json + weights), a hub id "
                           "in your Hugging Face cache, or leave --model out for the bundled one.")
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise LorakitError(f"{path} is an adapter folder, not a model: pass it as --adapter (and its base model as "
                           "--model, or leave --model out for the base the adapter records).")
    return str(model)


def bundled_name(name_or_path: str | os.PathLike | None) -> str | None:
    """The bundled base (``"bundled"``, ``"bundled-small"``) that ``name_or_path`` names, else None: its name, its
    asset folder here, or its asset folder in another installation (a path that does not exist here and ends in
    ``lorakit/assets/<folder>``, what an adapter trained elsewhere records as ``base_model_name_or_path``)."""
    if name_or_path in (None, ""):
        return None
    text = os.fspath(name_or_path)
    if text in BUNDLED_MODELS:
        return text
    path = Path(text)
    try:
        here = path.resolve()
    except (OSError, RuntimeError):
        return None
    for name, folder in BUNDLED_MODELS.items():
        if here == folder.resolve():
            return name
    if not path.exists():
        for name, folder in BUNDLED_MODELS.items():
            if len(path.parts) > 3 and path.parts[-3:] == folder.parts[-3:]:
                return name
    return None


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model names (``base_model_name_or_path`` values, a model's ``name_or_path``) name the same
    model: a bundled model's name and its asset folder (here or in another installation) alike, folders by resolved
    path, hub ids as written."""
    def key(name: str | os.PathLike) -> str:
        bundled = bundled_name(name)
        if bundled:
            return bundled
        text = os.fspath(name)
        return str(Path(text).resolve()) if Path(text).exists() else text

    return key(a) == key(b)


def check_model(model: str | os.PathLike | None, flag: str = "--model") -> str:
    """Before anything loads: that ``model`` names a model (a bundled name, a folder with config.json, or a hub id
    in the local Hugging Face cache when offline) — the folder or hub id to load. Reads no weights; a command that
    loads two models checks both first. Raises LorakitError naming ``flag`` and ``model`` (near matches of the
    bundled names)."""
    from .core.errors import did_you_mean

    path = resolve_model_path(model)
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise LorakitError(f"{flag} {model}: {path} has no config.json, so it is not a model folder; give the "
                               "model's folder (config.json + weights) or a hub id in your Hugging Face cache")
        return path
    if _offline():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
        except Exception:  # not a valid hub id either (e.g. several slashes)
            cached = False
        if not cached:
            raise LorakitError(
                f"{flag} {model!r} is not a local folder, not a bundled model ({', '.join(BUNDLED_MODELS)}) and not "
                f"in the Hugging Face cache (lorakit runs offline: download it once with `huggingface-cli download "
                f"ID`, or pass a local folder).{did_you_mean(str(model), list(BUNDLED_MODELS))}")
    return path


def _offline() -> bool:
    """lorakit never downloads unless HF_HUB_OFFLINE is explicitly set to a false value (0/false/no/off)."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off")


def _load_error(path: str, error: Exception) -> LorakitError:
    if Path(path).exists():
        return LorakitError(f"cannot load model {path!r}: {error}")
    return LorakitError(
        f"cannot load model {path!r}: it is not a local folder, and not in the Hugging Face cache (lorakit runs "
        "offline: download it once with `huggingface-cli download ID`, or pass a local folder)."
    )


def load_tokenizer(model: str | os.PathLike | None = None):
    """The tokenizer of ``model`` (see ``load_model_and_tokenizer``), with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=_offline())
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TASK_TYPES = ("causal-lm", "seq-cls")  # PEFT's CAUSAL_LM and SEQ_CLS


def normalize_task_type(name: str) -> str:
    """``seq-cls`` / ``SEQ_CLS`` / ``seq_cls`` -> ``seq-cls``; LorakitError naming the choices for anything else."""
    from .core.errors import did_you_mean

    key = name.strip().lower().replace("_", "-")
    if key not in TASK_TYPES:
        raise LorakitError(f"unknown task type {name!r}; choose one of {', '.join(TASK_TYPES)} (PEFT: CAUSAL_LM, "
                           f"SEQ_CLS).{did_you_mean(key, TASK_TYPES)}")
    return key


def classifier_labels(model: str | os.PathLike | None) -> list[str] | None:
    """A ``*ForSequenceClassification`` checkpoint's label names in head-output order (``config.id2label``); None
    for any other model (a bare encoder, a causal LM), which a seq-cls load gives a new head. None too when the
    config cannot be read (the load itself then says why).

    Read once per config file and process: a classifier's eval, train or generate asks it before the model loads
    (labels to check, a head to compare) and :func:`load_model_and_tokenizer` again (each read built an AutoConfig).
    A local ``config.json`` rewritten since (its size or modification time) is read again."""
    path = resolve_model_path(model)
    try:
        stat = (Path(path) / "config.json").stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    except OSError:  # a hub id (its cached snapshot does not change), or no config: the load says why
        stamp = None
    labels = _classifier_labels(path, stamp, _offline())
    return None if labels is None else list(labels)


@functools.lru_cache(maxsize=32)
def _classifier_labels(path: str, stamp: tuple[int, int] | None, offline: bool) -> tuple[str, ...] | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError):
        return None
    if not any(str(a).endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        return None
    return tuple(str(config.id2label[i]) for i in range(config.num_labels))


def load_model_and_tokenizer(model: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", quantize=None, task_type: str = "causal-lm",
                             labels: list[str] | None = None):
    """(model, tokenizer) for a causal LM: ``None``/``"bundled"``, a local folder, or a hub id already cached.

    ``task_type="seq-cls"`` (PEFT's SEQ_CLS) loads ``AutoModelForSequenceClassification`` instead, with one output
    per name in ``labels`` (``config.id2label`` / ``label2id`` in that order; a head the checkpoint lacks, or has
    with another number of outputs, is newly initialised, as transformers does) and the tokenizer's pad id in the
    config (decoder classifiers pool the last non-pad token).

    Offline by default (``local_files_only``): an uncached hub id fails at once with a LorakitError instead of
    retrying the network; ``HF_HUB_OFFLINE=0`` allows downloads. ``quantize`` (``"nf4"`` or a
    ``lorakit.quantize.QuantizeConfig``) loads the linear layers straight into bitsandbytes 4 bit on ``device``
    (QLoRA's base; the output head stays in ``dtype``).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = load_tokenizer(model)
    path = resolve_model_path(model)
    extra: dict = {}
    auto = AutoModelForCausalLM
    if normalize_task_type(task_type) == "seq-cls":
        if not labels:
            raise LorakitError("task_type 'seq-cls' needs the label names (labels=[...]): the head has one output each")
        auto = AutoModelForSequenceClassification
        extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                 "label2id": {name: i for i, name in enumerate(labels)}, "pad_token_id": tokenizer.pad_token_id}
        head = classifier_labels(path)
        if head is not None and len(head) != len(labels):  # a classifier checkpoint with another head: a new one
            extra["ignore_mismatched_sizes"] = True
    if quantize is not None:
        from .quantize import QuantizeConfig

        config = QuantizeConfig.of(quantize)
        extra.update(quantization_config=config.to_transformers(), device_map={"": str(torch.device(device))})
    elif Path(path).is_dir():
        from .quantize.nf4 import check_saved_quantization

        check_saved_quantization(path)  # a 4-bit folder whose quantization_config was edited: one clear error
    from safetensors import SafetensorError

    try:
        lm = auto.from_pretrained(path, dtype=dtype, local_files_only=_offline(), **extra)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a cut-off or corrupt weights file
        raise _load_error(path, e) from None
    from .quantize import keep_qlora_layout

    if quantize is not None:
        lm.lorakit_quantize = config
        return keep_qlora_layout(lm).eval(), tokenizer
    # a checkpoint saved in 4 bit (its config.json has a quantization_config) loads in 4 bit without quantize=:
    # it gets the QLoRA layout and bitsandbytes check too (was: its first eval forward on a CPU with AVX512-BF16
    # raised bitsandbytes' "N must be divisible by block_n" for the bundled base's 688-wide layers)
    return keep_qlora_layout(lm.to(device)).eval(), tokenizer


def load_model_for_merge(model: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) for ``lorakit merge``: a causal LM as :func:`load_model_and_tokenizer`, else the
    class a local folder's ``config.json`` names — a diffusers model (``_class_name``, e.g. UNet2DModel, whose
    convolutions LoRA adapts) or a transformers architecture (``architectures[0]``, e.g.
    WhisperForConditionalGeneration), with its tokenizer when the folder has one. Raises LorakitError when the
    named class is not in the installed library."""
    path = resolve_model_path(model)
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    arch = (config.get("architectures") or [""])[0]
    if "_class_name" not in config and (not arch or arch.endswith("ForCausalLM")):
        return load_model_and_tokenizer(model, dtype=dtype)
    if "_class_name" in config:
        try:
            import diffusers
        except ImportError:
            raise LorakitError(f"{path} is a diffusers model ({config['_class_name']}); install diffusers: "
                               f"pip install 'lorakit[diffusion]'") from None
        library, name = diffusers, config["_class_name"]
    else:
        import transformers as library
        name = arch
    cls = getattr(library, name, None)
    if cls is None:
        raise LorakitError(f"{path}: config.json names {name!r}, which {library.__name__} {library.__version__} lacks")
    from safetensors import SafetensorError

    try:
        loaded = cls.from_pretrained(path, local_files_only=_offline())
    except (OSError, ValueError, SafetensorError) as e:
        raise _load_error(path, e) from None
    try:
        tokenizer = load_tokenizer(path)
    except (LorakitError, OSError, ValueError, TypeError):
        tokenizer = None  # e.g. a UNet, or an audio model saved without its tokenizer
    return loaded.to(dtype).eval(), tokenizer
