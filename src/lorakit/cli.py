"""``lorakit`` command line: train, eval, generate, methods, tasks, inspect, merge, export, serve, federate, bench,
pretrain-base, regmix, infer-mixture.

One ``cmd_<name>`` function and one ``_add_<name>`` parser function per subcommand; a new subcommand adds
both and one line in ``build_parser``. Method options are generated from the chosen method's config dataclass
(``cli_options``), so every registered method gets its flags (``lorakit train --method NAME --help``).

What a user can rely on: every check that needs no model (flags, data files, output folders, checkpoints) runs
before the model is loaded; outputs are checked for writability before any work; an existing output is only
replaced with ``--overwrite``; Ctrl-C during training saves a checkpoint and prints the command that resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .cli_options import add_config_options, config_from_args
from .cli_options import flag as flag_for
from .cli_parser import (CommandParser, DefaultsFormatter, check_output_dir, device_arg, int_or_none, json_arg,
                         max_length_arg, positive_int, seed_arg)
from .core.errors import ConfigError, LorakitError, comma_items, did_you_mean
from .core.threads import NUM_THREADS_HELP, default_num_threads, resolve_num_threads
from .data.classification import LABELS_FILE  # a SEQ_CLS adapter's label names, in head order

DEFAULT_METHOD = "lora"
TASK_TRAIN_EXAMPLES, TASK_EVAL_EXAMPLES = 2000, 100  # per built-in task; user files are used whole


# -- helpers shared by the commands ------------------------------------------------------------------------
def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "num_threads", None) is not None:
        import torch

        torch.set_num_threads(resolve_num_threads(args.num_threads))


def _print_metrics(label: str, metrics: dict) -> None:
    per = ", ".join(f"{k} {v['exact_match']:.3f}" for k, v in sorted(metrics.get("per_task", {}).items()))
    if "mcc" in metrics:  # a classifier (SEQ_CLS): its exact match is the accuracy
        print(f"{label}: accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['f1']:.3f}, MCC {metrics['mcc']:.3f} "
              f"on {metrics['n']} examples")
        return
    print(f"{label}: exact match {metrics['exact_match']:.3f} on {metrics['n']} examples" + (f" ({per})" if per else ""))


def _classifier_head(model, adapter_config):
    """SEQ_CLS: the config with the model's classification head in ``modules_to_save`` (PEFT's convention: its
    ``classifier`` or ``score`` module, trained and saved in full) unless the user chose modules_to_save."""
    if adapter_config.modules_to_save:
        return adapter_config
    from .core.targeting import iter_host_modules

    heads = [name for name in ("classifier", "score") if any(key == name for key, _ in iter_host_modules(model))]
    if not heads:
        raise LorakitError(f"{type(model).__name__} has no 'classifier' or 'score' head; name the head to train with "
                           "--modules-to-save")
    return dataclasses.replace(adapter_config, modules_to_save=heads)


def _is_file_spec(spec: str) -> bool:
    from .data import looks_like_path

    return Path(spec).is_file() or looks_like_path(spec)


def _load_examples(spec: str, split: str, n: int | None, default_per_task: int, seed: int, tokenizer: Any):
    """Built-in tasks: ``n`` (default ``default_per_task``) per task; a user file: all of it unless ``n``, with a
    warning on stderr when the file holds fewer than the ``n`` asked (``--train-examples`` / ``--eval-examples``)."""
    from .data import load_examples

    if _is_file_spec(spec):
        examples = load_examples(spec, split, n=n, seed=seed, tokenizer=tokenizer)
        if n is not None and len(examples) < n:
            flag = "--train-examples" if split == "train" else "--eval-examples"
            print(f"warning: {flag} {n} asks for {n} examples, but {spec} holds only {len(examples)}; using those "
                  f"{len(examples)}", file=sys.stderr)
        return examples
    return load_examples(spec, split, n=n or default_per_task, seed=seed, tokenizer=tokenizer)


def _with_mode_token(examples, mode_token: str, tokenizer):
    from .pretrain.ul2 import with_mode_token  # a ConfigError (a LorakitError) when the token is not there

    return with_mode_token(examples, mode_token, tokenizer)


def _task_index(adapter: str | None, examples: Sequence[Any] | None = None, source: str = "") -> dict | None:
    """The adapter's saved task -> key id mapping, checked against ``examples`` (unknown task: DataError)."""
    from .data import check_tasks, read_task_index

    index = read_task_index(adapter) if adapter else None
    if index is not None and examples is not None:
        check_tasks(index, (ex.task for ex in examples), source)
    return index


def _add_init_options(parser: argparse.ArgumentParser) -> None:
    from .core.inits import list_inits

    g = parser.add_argument_group("initialisation (lorakit.list_inits())")
    g.add_argument("--init", default=None, metavar="NAME",
                   help="a registered init run on the adapter before training: " + ", ".join(
                       i.name + ("*" if i.needs_data else "") for i in list_inits())
                   + " (* = data-driven: runs on the first --init-batches training batches)")
    g.add_argument("--init-options", type=json_arg, default={}, metavar="JSON",
                   help='the init\'s options as a JSON object, e.g. \'{"rho": 1.0}\' for eva')
    g.add_argument("--init-batches", type=positive_int, default=4, help="batches a data-driven init gets (default: 4)")


def _add_with_init(model, adapter_config, args) -> None:
    from . import add_adapter
    from .core.inits import set_init_options

    if args.init_options:  # also for an init the config names (--init-lora-weights eva)
        set_init_options(model, args.adapter_name, **args.init_options)
    add_adapter(model, adapter_config, name=args.adapter_name, init=args.init)


def _check_init_options(args, adapter_config) -> None:
    """--init-options name options the init takes, there is an init to take them (--init, or one the
    method's config names, e.g. --init-lora-weights eva), the init works on --method's adapters (LoRA-SB needs
    a B·M·A method such as lora_xs), and --init is not given beside another init the method's own option names:
    ConfigError before the model is loaded."""
    from .core.inits import check_init_config

    named = adapter_config.requested_init()
    if args.init is not None and named is not None and named != args.init:
        field = next((f.name for f in dataclasses.fields(adapter_config) if getattr(adapter_config, f.name) == named),
                     None)  # the method's init field (LoRA's init_lora_weights, B·M·A's init_weights): its flag
        given = f"{flag_for(field)} {named}" if field else f"the method's own init option ({named})"
        raise ConfigError(f"--init {args.init} and {given} name two inits; give one of them.")
    if args.init is not None and named is None:
        # the method's own init typed beside --init (--init-lora-weights gaussian / True): --init would replace it
        chosen = adapter_config.with_init(args.init)
        for f in dataclasses.fields(adapter_config):
            typed = getattr(args, f.name, None)
            if typed is not None and getattr(chosen, f.name) != getattr(adapter_config, f.name):
                raise ConfigError(f"--init {args.init} replaces {flag_for(f.name)} {typed} (both set how A and B "
                                  f"start); give one of them.")
    spec = args.init if args.init is not None else named
    if spec is None:
        if args.init_options:
            raise ConfigError("--init-options is given but no init runs: name one with --init NAME "
                              "(lorakit train --help lists them).")
        return
    init = check_init_config(spec, adapter_config)
    init.check_options(args.init_options, adapter_config.with_init(spec))
    if init.changes_base and getattr(args, "quantize", None):
        raise ConfigError(f"--init {spec} changes the base weights, which --quantize {args.quantize} stores in 4 bit; "
                          "initialise on the full-precision base (no --quantize; loftq quantizes it itself), or use an "
                          "init that leaves the base as it is (eva).")


def _resave_for_original_base(model, name: str, adapter_dir: Path, rerun_fits: bool = True) -> None:
    """An init that changed the base and cannot be redone exactly on load (LoRA-GA, CorDA; PiSSA's randomised
    pissa_niter_K): write the adapter as the rank-2r LoRA for the original base (PEFT's conversion), so
    eval/generate/PEFT load it on the plain model.
    ``rerun_fits=False`` (LoRAM: the adapter goes to another base than it was trained on, where PiSSA / OLoRA
    would factorise other weights) converts for those inits too."""
    from . import save_adapter
    from .core.inits import base_edits, requested_init
    from .core.model import adapter_state

    init = requested_init(model, name)
    exact = init is not None and init.reruns_exactly(adapter_state(model).configs[name].requested_init())
    if init is not None and base_edits(model, name) and not (exact and rerun_fits):
        save_adapter(model, adapter_dir, name, original_base=True)
        print(f"init {init.name!r} changed the base: the saved adapter is the rank-2r LoRA for the original base")


def _require_task_keys(adapter: str | None, task_to_id: dict | None, tasks, what: str) -> None:
    """An adapter that routes by task key and sends keyless rows to the base model (``default_expert = -1``) must
    get a key for every row: otherwise it would silently answer as the base model (the server refuses the same)."""
    if not adapter or not task_to_id or all(t is not None for t in tasks):
        return
    from .data.keys import keyless_rows_get_base
    from .io.peft_format import read_adapter_config

    if keyless_rows_get_base(read_adapter_config(adapter)):
        raise LorakitError(f"adapter {adapter} routes by task and has no default expert, so {what} without a task "
                           f"would get the base model's answer; give one of: {', '.join(sorted(task_to_id))}")


def _quantize_config(args):
    """``--quantize nf4 [--compute-dtype D] [--no-double-quant]``: the 4-bit base (QLoRA), else None. LorakitError
    for --compute-dtype / --[no-]double-quant without --quantize (they set the 4-bit layers; alone they did nothing)."""
    if getattr(args, "quantize", None) is None:
        given = [flag for flag, value in (("--compute-dtype", getattr(args, "compute_dtype", None)),
                                          ("--double-quant / --no-double-quant", getattr(args, "double_quant", None)))
                 if value is not None]
        if given:
            raise LorakitError(f"{' and '.join(given)} without --quantize: these flags set up the 4-bit base, so "
                               "alone they do nothing; give --quantize nf4 (or fp4) too, or drop them")
        return None
    from .quantize import QuantizeConfig

    return QuantizeConfig(quant_type=args.quantize, double_quant=args.double_quant is not False,
                          compute_dtype=args.compute_dtype or "float32")


def _base_settings(args) -> dict[str, Any]:
    """The flags that change the base a run trains on, besides --model: the 4-bit storage (QLoRA) and LoRAM's
    pruning (ratio, criterion, the seed of random pruning, alignment). A checkpoint's adapter fits only the base
    it was trained on: LoRAM with another criterion keeps other units at the same shapes, so nothing else catches it."""
    q, loram = args.quantize is not None, args.loram_ratio is not None
    quantize = _quantize_config(args)
    return {"quantize": args.quantize, "compute_dtype": quantize.compute_dtype if q else None,
            "double_quant": quantize.double_quant if q else None, "loram_ratio": args.loram_ratio,
            "loram_criterion": args.loram_criterion if loram else None,
            "seed": args.seed if loram and (args.loram_criterion == "random" or args.loram_align_steps) else None,
            "loram_align_steps": args.loram_align_steps if loram else None,
            "loram_align_lr": args.loram_align_lr if loram else None}


def _check_resume_base(checkpoint: Path, args) -> None:
    """--resume-from's run trained on the base these flags make (its run folder's base.json, when it has one)."""
    from .io.files import read_json
    from .io.peft_format import BASE_FILE

    saved_file = checkpoint.parent / BASE_FILE
    if not saved_file.is_file():
        return  # a checkpoint written before base.json existed, or moved out of its run folder
    saved, now = read_json(saved_file), _base_settings(args)
    diff = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, this run {now[k]!r}"
            for k in now if saved.get(k) != now[k]]
    if diff:
        raise LorakitError(f"--resume-from {checkpoint} was trained on another base ({'; '.join(diff)}); resume with "
                           f"the flags of that run (its {saved_file}).")


def _adapter_base_mismatch(adapter: str | None, args) -> str | None:
    """Why ``adapter`` (a folder ``lorakit train`` wrote: its ``adapter/`` or a ``checkpoint-N``, or the run folder)
    was trained on another 4-bit setting of the base than these flags load (its run folder's base.json), or None
    (:func:`~lorakit.io.peft_format.trained_base_mismatch`, which ``lorakit serve``'s adapter store reads too)."""
    from .io.peft_format import trained_base_mismatch

    quantize = getattr(args, "quantize", None)
    return trained_base_mismatch(adapter, quantize, _quantize_config(args).double_quant if quantize else None)


def _recorded_bases(adapters: Sequence[str]) -> dict[str, str]:
    """adapter folder -> the base model its adapter_config.json records (``base_model_name_or_path``, a bundled base
    by its name); folders that record none, or cannot be read (their loader reports that), are left out."""
    from .hub import bundled_name
    from .io.peft_format import read_adapter_config

    recorded = {}
    for adapter in adapters:
        try:
            base = read_adapter_config(adapter).base_model_name_or_path
        except (LorakitError, OSError):
            continue
        if base:
            recorded[str(adapter)] = bundled_name(base) or base
    return recorded


def _adapters_base(args, adapters: Sequence[str], what: str = "adapters") -> None:
    """Without --model: the base model the adapters were trained on (what PEFT's AutoPeftModel loads), when it
    loads here without a download (a bundled name, a local folder, a cached hub id: hub.check_model), said on
    stderr; the bundled model only when no adapter records a base. LorakitError naming --model when the recorded
    base is not here, or when the adapters record different bases (``what`` names them in that message). The base
    chosen is said by :func:`_say_base`, when it loads: after the other checks, whose errors come first."""
    if args.model is not None:
        return
    from .hub import check_model, same_model

    recorded = _recorded_bases(adapters)
    if not recorded:
        return
    (first, base), *rest = recorded.items()
    other = next(((a, b) for a, b in rest if not same_model(b, base)), None)
    if other is not None:
        raise LorakitError(f"the {what} were trained on different base models: {first!r} on {base!r} and "
                           f"{other[0]!r} on {other[1]!r} (their adapter_config.json's base_model_name_or_path); "
                           "pass --model to choose the base they all load onto")
    try:
        check_model(base, flag="its base_model_name_or_path")
    except LorakitError as e:
        raise LorakitError(f"{first} was trained on {base!r}, which cannot be loaded here: {e}. Pass --model with a "
                           "local copy of that base (or the model to use instead).") from None
    args.model = base
    args.base_note = f"base model: {base} (recorded in {first}/adapter_config.json; --model chooses another)"


def _say_base(args) -> None:
    """The base :func:`_adapters_base` chose in place of --model, said on stderr once, as it loads."""
    note = getattr(args, "base_note", None)
    if note:
        print(note, file=sys.stderr)
        args.base_note = None


def _load_adapter_on(model, args) -> None:
    """``load_adapter(model, args.adapter)``; a --model other than the base the adapter records is warned about
    (PEFT warns the same way), and a load that fails on it (tensors missing, shapes that do not fit) names that
    base."""
    from . import load_adapter
    from .core.errors import AdapterLoadError
    from .hub import same_model

    recorded = _recorded_bases([args.adapter]).get(str(args.adapter))
    used = args.model or "bundled"
    other = recorded is not None and not same_model(recorded, used)
    if other:
        print(f"warning: {args.adapter} was trained on {recorded!r} (its base_model_name_or_path), this run loads it "
              f"onto --model {used}", file=sys.stderr)
    try:
        load_adapter(model, args.adapter, config_overrides=_overrides(args))
    except AdapterLoadError as e:
        if not other:
            raise
        raise AdapterLoadError(f"{e} ({args.adapter} was trained on {recorded!r}, not on {used!r}: leave --model out "
                               f"to use its base, or pass --model {recorded})") from None




def _adapter_labels(adapter: str | None, model: str | None) -> list[str] | None:
    """The label names of a SEQ_CLS adapter folder in head-output order (None for any other adapter): its
    ``labels.json`` (lorakit writes it), else the ``id2label`` of a ``config.json`` in the folder, else that of the
    base ``model`` when it is a ``*ForSequenceClassification`` checkpoint (a PEFT SEQ_CLS adapter saves neither
    labels nor config; its base's head names them), in id order, said on stderr. LorakitError naming the file to
    write when none of them has the names."""
    from .data.classification import config_labels
    from .hub import classifier_labels
    from .io.files import read_json
    from .io.peft_format import file_task_type

    if not adapter or file_task_type(read_json(Path(adapter) / "adapter_config.json")) != "SEQ_CLS":
        return None
    if (Path(adapter) / LABELS_FILE).is_file():
        return list(read_json(Path(adapter) / LABELS_FILE)["labels"])
    config = Path(adapter) / "config.json"
    for labels, source in ((config_labels(read_json(config)) if config.is_file() else None, config),
                           (classifier_labels(model), f"the base {model or 'bundled'}'s config.json")):
        if labels:
            print(f"note: {adapter} has no {LABELS_FILE}; its labels {labels} are the id2label of {source}, in id "
                  "order", file=sys.stderr)
            return labels
    raise LorakitError(f"{adapter} is a sequence-classification (SEQ_CLS) adapter without {LABELS_FILE}, and neither "
                       f"a config.json beside it nor the base {model or 'bundled'} (not a *ForSequenceClassification "
                       f"checkpoint) names its labels (id2label). Write {Path(adapter) / LABELS_FILE} as "
                       '{"labels": ["first", "second", ...]}: the label names in head-output order')


def _check_labels(labels: list[str], examples, head: str, which: str) -> None:
    """DataError naming the first of ``examples`` whose label is not one of ``labels`` (``head``'s outputs)."""
    from .data.errors import DataError

    known = set(labels)
    for n, ex in enumerate(examples):
        if ex.completion not in known:
            raise DataError(f"{which} example {n} has label {ex.completion!r}, which is not one of {head}'s labels "
                            f"{labels}")


def _check_classifier_eval(args, adapter_config, labels: list[str], examples) -> None:
    """A SEQ_CLS adapter's evaluation, before the model loads: every label of the data is one of the head's
    (``labels``, labels.json), and an adapter that does not save the head is evaluated on a base whose head has
    those outputs (another base head would be replaced by a random one)."""
    from .hub import classifier_labels

    _check_labels(labels, examples, f"{args.adapter}", f"{args.data}:")
    head = classifier_labels(args.model)
    if head is not None and len(head) != len(labels) and not getattr(adapter_config, "modules_to_save", None):
        raise LorakitError(f"{args.adapter} does not save the classification head (no modules_to_save) and has "
                           f"{len(labels)} labels ({LABELS_FILE}), but {args.model}'s head has {len(head)} outputs: "
                           "evaluate it on the model it was trained on.")


def _load_with_adapter(args, any_model: bool = False, labels: list[str] | None = None):
    """(model with ``--adapter`` loaded, tokenizer); ``any_model``: also a non-causal-LM folder (a diffusers UNet,
    a Whisper; hub.load_model_for_merge), whose tokenizer may be None; ``labels``: a SEQ_CLS adapter's label names
    (the classifier is built with that head)."""
    from .hub import load_model_and_tokenizer, load_model_for_merge

    _quantize_config(args)  # --compute-dtype without --quantize: before the model loads
    mismatch = _adapter_base_mismatch(getattr(args, "adapter", None), args)
    if mismatch:  # eval / generate on another base may be what the user wants to measure: said, not refused
        print(f"warning: {mismatch}; its outputs differ from the trained model's. Pass the run's flags to use the "
              "base it was trained on.", file=sys.stderr)
    if getattr(args, "rank", None) is not None and not getattr(args, "adapter", None):  # before the model loads
        raise LorakitError("--rank needs --adapter (it picks the rank of a nested-rank adapter such as DyLoRA)")
    if getattr(args, "adapter", None):
        _overrides(args)  # before the model loads
    _say_base(args)
    if labels is not None:  # a SEQ_CLS adapter: the classifier with its head
        model, tokenizer = load_model_and_tokenizer(args.model, quantize=_quantize_config(args), task_type="seq-cls",
                                                    labels=labels)
    elif any_model and not getattr(args, "quantize", None):
        model, tokenizer = load_model_for_merge(args.model)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, quantize=_quantize_config(args))
    if getattr(args, "adapter", None):
        _load_adapter_on(model, args)
        _load_trained_base_params(model, Path(args.adapter))
    return model, tokenizer


def _load_trained_base_params(model, adapter: Path) -> None:
    """Base tensors a run trained in full next to its adapter (LongLoRA's embeddings and norms, LISA's blocks,
    GaLore's matrices; ``trainable_params.safetensors`` in the adapter folder or the run folder above it) go into
    ``model`` too: without them the adapter scores differently than it did in training."""
    from .io.peft_format import CHECKPOINT_TENSORS, trained_base_file
    from .training.procedures.longlora import load_checkpoint_params, load_trainable_params

    found = trained_base_file(adapter)
    if found is not None:  # a checkpoint's own tensors at its step, else the run's trainable_params.safetensors
        names = load_checkpoint_params(model, found.parent) if found.name == CHECKPOINT_TENSORS else \
            load_trainable_params(model, found)
        print(f"loaded {len(names)} base tensors trained with the adapter from {found}", file=sys.stderr)


def _overrides(args) -> dict | None:
    """``--rank b``: evaluate / generate / export a nested-rank adapter (DyLoRA) at rank b; checked against the
    adapter's config before any model loads (a method without nested ranks is named, not its config's fields)."""
    if getattr(args, "rank", None) is None:
        return None
    import dataclasses

    from .io.peft_format import override_config, read_adapter_config

    config = read_adapter_config(args.adapter)
    if "rank" not in {f.name for f in dataclasses.fields(config)}:
        raise ConfigError(f"--rank applies to nested-rank adapters (dylora); {args.adapter} is a "
                          f"{type(config).method!r} adapter, which runs at its trained rank: leave --rank out")
    override_config(config, {"rank": args.rank}, source=str(args.adapter))  # the rank's own checks (1..r)
    return {"rank": args.rank}


# -- train --------------------------------------------------------------------------------------------------
def _check_own_init_value(config_cls, spec: str) -> None:
    """ConfigError pointing to the method's own init flag when ``spec`` (given to --init) is no registered init but
    a value that flag takes (LoRA's --init-lora-weights gaussian / orthogonal, PEFT's init_lora_weights values)."""
    from .core.inits import own_init_field

    try:
        config = config_cls()
    except Exception:  # noqa: BLE001  (a config that needs arguments)
        return
    field = own_init_field(config, spec)
    if field is not None:
        raise ConfigError(f"--init {spec}: {spec!r} is no registered init (--init runs those) but a value of the "
                          f"method's own {flag_for(field)}; use {flag_for(field)} {spec}.")


def _train_configs(args: argparse.Namespace, ctx=None):
    """Method, adapter config, TrainConfig and output folder, all validated without a model. Under torchrun
    (``ctx``, a ``training.distributed.Distributed``) rank 0 checks the output folder (removing a killed save's
    temp files; --overwrite lets the run write over what is there, it does not empty it) while the others wait."""
    from . import get_method
    from .training import TrainConfig

    from .hub import normalize_task_type

    normalize_task_type(args.task_type)  # an unknown name fails now, before any data or model is loaded
    method = get_method(args.method)
    if args.init is not None:
        from .core.inits import find_init, get_init
        if find_init(args.init) is None:
            _check_own_init_value(method.config_cls, args.init)
        get_init(args.init)  # an unknown name fails now (with near matches), not after loading the model
    # "all-linear" unless the method has its own default targets (MixLoRA / MoLE: attention + the FFN blocks).
    targets = {} if method.config_cls.has_own_targets() else {"target_modules": "all-linear"}
    adapter_config = config_from_args(method.config_cls, args, **targets)
    _check_init_options(args, adapter_config)
    _check_loram_flags(args, adapter_config)
    adapter_config.check_inputs()  # files the config names (a mixture's source adapters), before any model loads
    _quantize_config(args)  # --compute-dtype without --quantize
    resume = Path(args.resume_from).resolve() if args.resume_from else None
    out = Path(args.output)
    resuming_inside = resume is not None and out.resolve() in resume.parents
    check = lambda: check_output_dir(out, "--output", overwrite=args.overwrite, allow_existing=resuming_inside)  # noqa: E731
    check() if ctx is None else ctx.on_main(check)
    replaces = ["adapter", "trainable_params.safetensors", "checkpoint-*",  # what the run writes whole in --output
                *(["adapter_pruned", LORAM_BASE] if args.loram_ratio is not None else []),
                *(["pruned_model"] if args.procedure == "loraprune" else [])]
    _refuse_replaced_inputs(out, [args.model, args.data, args.eval_data,
                                  *(getattr(adapter_config, "adapter_paths", None) or [])], replaces)
    train_config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps or 0,
        warmup_ratio=0.0 if args.warmup_steps else args.warmup_ratio, lr_schedule=args.lr_schedule,
        max_grad_norm=args.max_grad_norm, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
        max_length=args.max_length, log_every=args.log_every, output_dir=args.output, resume_from=args.resume_from,
        init_batches=args.init_batches, distributed=args.distributed,
        gradient_checkpointing=args.gradient_checkpointing, **_procedure_settings(args),
    )
    adapter_config.check_steps(train_config.steps)  # a schedule the run ends before (IncreLoRA's first growth)
    train_config.check_steps()  # --save-every / --eval-every / a procedure's interval past --steps
    if train_config.procedure is not None:  # e.g. ALLoRA on a DoRA adapter: refused now, not after the model loads
        from .training.procedures import get_procedure
        procedure = get_procedure(train_config.procedure)
        procedure.check_adapter(train_config.procedure_args or {}, adapter_config, normalize_task_type(args.task_type))
        if args.quantize and not procedure.cls.quantized_base_ok:
            raise ConfigError(f"--procedure {procedure.name} trains base weights in full, which --quantize "
                              f"{args.quantize} stores in 4 bit with no gradient; drop --quantize, or train the "
                              "4-bit base with a procedure that trains the adapter alone.")
    if args.resume_from:
        typed = getattr(args, "_renamed_flags_given", {})  # a renamed field's spelling as typed (old or new)
        given = {f.name: typed.get(f.name, flag_for(f.name)) for f in dataclasses.fields(method.config_cls)
                 if getattr(args, f.name, None) is not None}
        procedure_flags = {} if args.procedure is None else {
            name: flag_for(dest) for name, dest in _procedure_dests(args.procedure, args.method).items()}
        _check_resume(Path(args.resume_from), adapter_config, train_config, given, procedure_flags)
        _check_resume_base(Path(args.resume_from), args)
    return method, adapter_config, train_config


def _check_loram_flags(args, adapter_config) -> None:
    """LoRAM's flags, before any data or model is loaded: the alignment flags need --loram-ratio, and the adapter
    must be a plain LoRA — recovery re-inserts the pruned rows / columns of lora_A and lora_B only, so a DoRA
    magnitude, a lora_bias, modules_to_save copies or a mixture's expert tensors would stay at the pruned width."""
    from .methods.lora import LoraConfig

    if getattr(args, "loram_ratio", None) is None:
        for flag, value in (("--loram-align-steps", args.loram_align_steps), ("--loram-align-lr", args.loram_align_lr)):
            if value:
                raise LorakitError(f"{flag} aligns LoRAM's pruned base: give --loram-ratio too")
        return
    from .prune.loram import LoramConfig

    from .hub import normalize_task_type

    LoramConfig(ratio=args.loram_ratio, criterion=args.loram_criterion, seed=args.seed)  # its ConfigError now
    if normalize_task_type(args.task_type) == "seq-cls":
        raise LorakitError("--loram-ratio prunes a causal LM; it does not combine with --task-type seq-cls")
    if args.procedure == "loraprune":
        raise LorakitError("--loram-ratio trains on a pruned base and recovers the adapter for the full model, "
                           "--procedure loraprune prunes the base while training and writes the pruned model: "
                           "choose one.")
    if args.loram_align_steps < 0:
        raise LorakitError(f"--loram-align-steps must be >= 0 (0 = no alignment), got {args.loram_align_steps}")
    if args.loram_align_lr is not None and args.loram_align_steps == 0:
        raise LorakitError("--loram-align-lr is the alignment's learning rate: give --loram-align-steps N too")
    if args.loram_align_steps:
        _align_config(args)  # its ConfigError now, not after pruning
    if type(adapter_config) is not LoraConfig:
        raise LorakitError(f"--loram-ratio recovers a plain LoRA (lora_A / lora_B) to the full model's shapes; "
                           f"--method {args.method} makes other tensors. Use --method lora.")
    for flag, on in (("--use-dora", adapter_config.use_dora), ("--lora-bias", adapter_config.lora_bias),
                     ("--modules-to-save", bool(adapter_config.modules_to_save))):
        if on:
            raise LorakitError(f"--loram-ratio recovers lora_A / lora_B only; {flag} adds tensors that would stay at "
                               f"the pruned width. Train a plain LoRA with LoRAM.")


def _check_resume(checkpoint: Path, adapter_config, train_config, given: Mapping[str, str],
                  procedure_flags: Mapping[str, str]) -> None:
    """Step, method and the adapter options given on this command line against the checkpoint's, before any
    model is loaded (options left at their defaults are checked by the loop, tensor by tensor). ``given``: the
    method fields given -> the flag typed; ``procedure_flags``: the procedure's fields -> their flags here
    (``--galore-beta1`` where the method has a ``beta1`` too), so that messages name what the user typed."""
    from .io.files import TensorFile, read_json
    from .io.peft_format import check_adapter_folder
    from .training.checkpoint import STATE_JSON, STATE_TENSORS

    state = read_json(checkpoint / STATE_JSON)
    if state.get("step", 0) >= train_config.steps:
        raise LorakitError(f"--resume-from {checkpoint} is at step {state['step']}, and --steps is "
                           f"{train_config.steps}: nothing would be trained. --steps is the total; set it above "
                           f"{state['step']}.")
    saved_train = state.get("config") or {}
    before, now_proc = saved_train.get("procedure"), train_config.procedure
    flag_of = lambda p: f"--procedure {p}" if p else "no --procedure"  # noqa: E731
    if before != now_proc:
        raise LorakitError(f"--resume-from {checkpoint} was trained with {flag_of(before)}, this run has "
                           f"{flag_of(now_proc)}; resume with the same procedure and its options.")
    saved_args, now_args = saved_train.get("procedure_args") or {}, dict(train_config.procedure_args or {})
    if saved_args != now_args:
        keys = sorted(set(saved_args) | set(now_args))
        diff = [f"{procedure_flags.get(k, flag_for(k))}: checkpoint {saved_args.get(k)!r}, this run {now_args.get(k)!r}"
                for k in keys if saved_args.get(k) != now_args.get(k)]
        raise LorakitError(f"--resume-from {checkpoint} was trained with other --procedure {now_proc} options "
                           f"({'; '.join(diff)}); resume with the same ones.")
    saved_config = check_adapter_folder(checkpoint)  # the weights file's header too, before the model loads
    TensorFile(checkpoint / STATE_TENSORS)  # and the optimizer / RNG state file's
    if type(saved_config) is not type(adapter_config):
        raise LorakitError(f"--resume-from {checkpoint} was trained with method {type(saved_config).method!r}, this "
                           f"run uses {type(adapter_config).method!r}; resume with the same --method.")
    saved, now = saved_config.to_dict(), adapter_config.to_dict()
    diff = [f"{given[k]}: checkpoint {saved.get(k)!r}, this run {now.get(k)!r}"
            for k in sorted(given) if k in now and saved.get(k) != now.get(k)]
    if diff:
        raise LorakitError(f"--resume-from {checkpoint} was trained with other adapter settings ({'; '.join(diff)}); "
                           "resume with the same method options.")


def _metrics_logger(path: Path, resume_from: str | None):
    """An on_log callback appending one JSON line per record (loss, lr, grad norm / evaluations) as they happen.

    Resuming from ``checkpoint-N`` keeps the log's records up to step N and drops the later ones (the run that wrote
    them went on past the checkpoint; the resumed run writes those steps again), so each step is logged once."""
    from .io.files import atomic_write_bytes, read_json
    from .training.checkpoint import STATE_JSON

    path.parent.mkdir(parents=True, exist_ok=True)
    if resume_from is not None and path.is_file():
        step = read_json(Path(resume_from) / STATE_JSON).get("step", 0)  # (checked by _check_resume before)
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short when the earlier run stopped
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write_bytes(path, "".join(kept).encode())
    handle = open(path, "a" if resume_from is not None else "w", buffering=1)

    def log(record: dict) -> None:
        handle.write(json.dumps(record) + "\n")

    return log, handle


def cmd_train(args: argparse.Namespace) -> int:
    """Train; under ``torchrun`` / ``accelerate launch`` every process runs this, rank 0 alone prints and writes."""
    from .training.distributed import device_for, setup

    ctx = setup(device_for(None), args.distributed)
    if ctx.is_main:
        return _train_command(args, ctx)
    from transformers.utils import logging as transformers_logging

    # transformers' loading bar and notes go to stderr: said by rank 0 (it loads the same model), not once per process
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        return _train_command(args, ctx)


def _refuse_replaced_inputs(out: Path, inputs: Sequence[str | None], replaces: Sequence[str]) -> None:
    """LorakitError, before any model loads, when one of ``inputs`` (the run's --model, --data, --eval-data, a
    mixture's --adapter-paths) is or lies inside an entry of ``out`` that the run replaces whole (``replaces``:
    names or ``fnmatch`` patterns, e.g. ``adapter``, ``checkpoint-*``). Was: ``lorakit train --method xlora
    --adapter-paths runs/a/adapter ... --output runs/a --overwrite`` read the source LoRA, then replaced
    runs/a/adapter with the X-LoRA: the input was lost. Other files of the folder (a data file kept in the run
    folder) stay allowed, since the run does not replace them."""
    import fnmatch

    target = out.resolve()
    for given in inputs:
        if not given or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if target not in source.parents:
            continue
        entry = source.relative_to(target).parts[0]
        if any(fnmatch.fnmatchcase(entry, pattern) for pattern in replaces):
            raise LorakitError(f"--output {out} holds the input {given} in {entry}, which this run replaces; choose "
                               "another --output, or move the input out of it first")


def _train_command(args: argparse.Namespace, ctx) -> int:
    out = Path(args.output)
    fresh = not (out.is_dir() and any(out.iterdir()))  # before the checks clean temp files
    made = _missing_folders(out)  # the folders the run creates (deepest first): the only ones a failure may remove
    method, adapter_config, config = _train_configs(args, ctx)
    with _removed_if_unfinished(out, fresh and ctx.is_main, made):
        return _train_run(args, ctx, method, adapter_config, config)


# What ``lorakit train`` writes in --output before its first training step: the base record, the step-0 record of
# metrics.jsonl, a LoRAM run's pruned base. A run that fails before its first step removes these and nothing else.
def _setup_entries() -> tuple[str, ...]:
    from .io.peft_format import BASE_FILE

    return ("metrics.jsonl", BASE_FILE, LORAM_BASE)


def _missing_folders(out: Path) -> list[Path]:
    """``out`` and its ancestors that do not exist yet (the run's mkdir creates them), deepest first."""
    missing = []
    for folder in (out, *out.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    return missing


@contextlib.contextmanager
def _removed_if_unfinished(out: Path, fresh: bool, made: Sequence[Path]):
    """Undo a run's setup when the run, which found ``out`` ``fresh`` (absent or empty), fails before it trained a
    logged step or wrote a checkpoint or an adapter: the files it writes before its first step (:func:`_setup_entries`)
    are removed, then the folders in ``made`` (those it created, deepest first) while they are empty.

    Without this, an error the loop raises while it sets up (``--procedure lisa --lisa-activated-layers 100`` on a
    6-block model) left base.json and metrics.jsonl, a folder the same command, corrected, refused without
    --overwrite. Nothing else is touched: a file another process or the user put in the folder meanwhile stays (and
    keeps the folder), a folder that existed before (``--output .``, a symlink to a folder, a mount point) keeps its
    inode and permissions, and a folder that held anything before the run, that has a checkpoint (Ctrl-C writes
    one) or logged training steps (a failure late in a run keeps its loss curve), or a run stopped by Ctrl-C, is
    left as it is. Was: ``shutil.rmtree(out)``, which also deleted files written into the folder during the run and
    re-created a pre-existing folder (a new inode: the cwd of ``--output .`` was gone)."""
    try:
        yield
    except Exception:
        log = out / "metrics.jsonl"
        trained = log.is_file() and '"loss"' in log.read_text(errors="replace")
        if fresh and out.is_dir() and not trained and not any(out.glob("checkpoint-*")) \
                and not os.path.lexists(out / "adapter"):
            for name in _setup_entries():
                entry = out / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                elif os.path.lexists(entry):
                    entry.unlink(missing_ok=True)
            for folder in made:
                try:
                    folder.rmdir()  # only while empty
                except OSError:
                    break
        raise


def _train_run(args: argparse.Namespace, ctx, method, adapter_config, config) -> int:
    import torch

    from . import add_adapter, disable_adapters, print_trainable_parameters
    from .hub import load_model_and_tokenizer, load_tokenizer
    from .training import train
    from .hub import normalize_task_type
    from .training.objectives import objective_for
    from .training.plot import plot_metrics

    tokenizer = load_tokenizer(args.model)
    train_examples = _load_examples(args.data, "train", args.train_examples, TASK_TRAIN_EXAMPLES, args.seed, tokenizer)
    if args.eval_data:
        eval_examples = _load_examples(args.eval_data, "test", args.eval_examples, TASK_EVAL_EXAMPLES, args.seed,
                                       tokenizer)
    elif _is_file_spec(args.data):  # a single user file: hold out its last tenth, in file order
        if len(train_examples) < 2:
            raise LorakitError(f"{args.data} has {len(train_examples)} example; give at least 2 (one is held out for "
                               "evaluation) or pass --eval-data")
        from .data import hold_out

        total = len(train_examples)
        train_examples, eval_examples = hold_out(train_examples)
        print(f"hold-out: the last {len(eval_examples)} of {total} examples of {args.data} are kept for evaluation "
              f"and not trained on (pass --eval-data FILE to evaluate on another file)")
    else:
        eval_examples = _load_examples(args.data, "test", args.eval_examples, TASK_EVAL_EXAMPLES, args.seed, tokenizer)
    if args.mode_token:
        train_examples, eval_examples = (_with_mode_token(e, args.mode_token, tokenizer)
                                         for e in (train_examples, eval_examples))

    adapter_config.check_examples(train_examples)  # data the method cannot train on (a task without an expert, ...)
    if config.procedure is not None:  # a held-out split the data cannot give (Flexora): refused before any model loads
        from .training.loop import split_validation
        from .training.procedures import get_procedure
        split_validation(get_procedure(config.procedure).build(config), config, train_examples)
    torch.manual_seed(args.seed)
    classify = normalize_task_type(args.task_type) == "seq-cls"
    if args.loram_ratio is not None:
        model, tokenizer, plan = _loram_base(args, ctx, lambda m, t: _check_lengths(m, t, train_examples,
                                                                                   args.max_length, ctx))
    elif classify:  # one head output per label of the training data (sorted names; a classifier's own order)
        from .data.classification import head_labels, label_names
        from .hub import classifier_labels
        from .io.files import read_json
        saved = Path(args.resume_from or "") / LABELS_FILE
        if args.resume_from and saved.is_file():  # the checkpoint's head, in its order
            labels, note = list(read_json(saved)["labels"]), None
            _check_labels(labels, train_examples, f"--resume-from {args.resume_from}'s head", "training")
        elif args.resume_from:  # a checkpoint of an older lorakit, without labels.json: its head is in string order
            labels, note = sorted(label_names(train_examples)), None
        else:
            labels, note = head_labels(label_names(train_examples), classifier_labels(args.model))
        if note and ctx.is_main:
            print(f"note: {args.model}: {note}", file=sys.stderr)
        _check_labels(labels, eval_examples, "the head", "evaluation")  # before the model loads
        model, tokenizer = load_model_and_tokenizer(args.model, quantize=_quantize_config(args), task_type="seq-cls",
                                                    labels=labels)
        adapter_config = _classifier_head(model, adapter_config)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, quantize=_quantize_config(args))
    if args.loram_ratio is None:  # (LoRAM: checked on the pruned base, before it is written)
        _check_lengths(model, tokenizer, train_examples, args.max_length, ctx)
    if args.init is None:
        _add_with_init(model, adapter_config, args)  # target errors now, before any evaluation
    print(f"model: {args.model or 'bundled'}{f' ({args.quantize} 4-bit base)' if args.quantize else ''} | "
          f"method: {method.name} | data: {args.data} "
          f"({len(train_examples)} train / {len(eval_examples)} eval examples) | threads: {torch.get_num_threads()}")
    objective = objective_for(model)
    with disable_adapters(model):
        before = objective.evaluate(ctx, model, tokenizer, eval_examples, batch_size=args.eval_batch_size,
                                    task_to_id=None, progress=not args.quiet and ctx.is_main)
    if args.init is not None:  # an init may change the base weights: the "before" score is taken on the untouched base
        _add_with_init(model, adapter_config, args)
    _print_metrics("before", before)
    print_trainable_parameters(model)

    config = dataclasses.replace(config, eval_examples=len(eval_examples))  # the loop evaluates all of them
    out = Path(args.output)
    log, handle = _metrics_logger(out / "metrics.jsonl", args.resume_from or None) if ctx.is_main else (
        lambda record: None, contextlib.nullcontext())
    if not args.resume_from:
        log({"step": 0, "eval": before})
    if ctx.is_main:
        from .io.files import atomic_write_json
        from .io.peft_format import BASE_FILE
        atomic_write_json(out / BASE_FILE, _base_settings(args))
    with handle:
        result = train(model, tokenizer, train_examples, config, adapter_name=args.adapter_name,
                       eval_examples=eval_examples, progress=not args.quiet and ctx.is_main, on_log=[log])
    if not ctx.is_main:
        return 0  # rank 0 writes the summary and plot
    after = result.final_metrics  # the loop's last evaluation, on all eval examples (not run a second time)
    if result.adapter_dir is not None:
        _resave_for_original_base(model, args.adapter_name, Path(result.adapter_dir),
                                  rerun_fits=args.loram_ratio is None)
    extra = {}
    if args.loram_ratio is not None and result.adapter_dir is not None:
        extra = {"after_pruned_model": after}
        _print_metrics("after, pruned base", after)
        after = _loram_recover(args, plan, Path(result.adapter_dir), eval_examples)
        print(f"recovered adapter (for the full model) in {result.adapter_dir}; the pruned model's in "
              f"{Path(result.adapter_dir).with_name('adapter_pruned')} (its base: {out / LORAM_BASE})")
    if (out / "pruned_model" / "config.json").is_file():  # a pruning procedure's smaller model: make it loadable
        from .io.files import write_dir_atomically

        def with_tokenizer(folder: Path) -> None:  # the model's files and the tokenizer's, renamed in at once
            shutil.copytree(out / "pruned_model", folder, dirs_exist_ok=True)
            tokenizer.save_pretrained(folder)

        write_dir_atomically(out / "pruned_model", with_tokenizer)
        print(f"pruned model saved to {out / 'pruned_model'} (use it as --model)")
    if (out / "trainable_params.safetensors").is_file():  # base tensors trained in full (LongLoRA, LISA, GaLore)
        print(f"base tensors trained with the adapter in {out / 'trainable_params.safetensors'} (eval, generate "
              f"and merge load them with --adapter {result.adapter_dir})")
    _print_metrics("after ", after)
    summary = {"method": method.name, "data": args.data, "model": args.model or "bundled", "quantize": args.quantize,
               "task_type": objective.name, "trainable_params": result.trainable_params,
               "total_params": result.total_params,
               "procedure": config.procedure, "procedure_args": dict(config.procedure_args or {}),
               "mode_token": args.mode_token,
               "before": before,
               "after": after, "adapter_dir": result.adapter_dir, "wall_time_s": result.wall_time_s,
               "peak_memory_mb": result.peak_memory_mb, "steps": args.steps, "metrics_log": str(out / "metrics.jsonl"),
               **extra}
    from .mixtures import router_summary
    routed = router_summary(result.router_stats)  # the training forwards only
    if routed is not None:
        summary["router"] = routed
        print(f"router over {routed['layers']} layers: expert load {routed['min_load_fraction']:.2f}–"
              f"{routed['max_load_fraction']:.2f} (uniform {routed['uniform_fraction']:.2f}), mean entropy "
              f"{routed['entropy']:.2f} nats")
    plot = plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    if plot is not None:
        summary["plot"] = str(plot)
    from .io.files import atomic_write_json
    atomic_write_json(out / "summary.json", summary)
    score = "accuracy" if "mcc" in after else "exact match"
    print(f"{score} {before['exact_match']:.3f} -> {after['exact_match']:.3f} | "
          f"{result.wall_time_s:.0f}s | peak memory {result.peak_memory_mb:.0f} MB")
    print(f"per-step metrics: {out / 'metrics.jsonl'}" + (f" (plot: {plot})" if plot else ""))
    print(f"adapter saved to {result.adapter_dir} ({_format_note(method)})")
    return 0


def _align_config(args):
    """LoRAM's alignment config from --loram-align-steps / --loram-align-lr (ConfigError naming AlignConfig's
    fields, which the train parser's field_flags write as those flags)."""
    from .pretrain.loram_align import AlignConfig

    return AlignConfig(steps=args.loram_align_steps, lr=1e-3 if args.loram_align_lr is None else args.loram_align_lr,
                       warmup_steps=min(20, max(args.loram_align_steps, 0) // 10), seed=args.seed)


LORAM_BASE = "pruned_base"  # a LoRAM run's pruned (and aligned) base, the one adapter_pruned/ fits


def _loram_base(args, ctx, check: Callable[[Any, Any], None]):
    """LoRAM: the base pruned by --loram-ratio (then quantized with --quantize: QLoRAM); (model, tokenizer, plan).
    ``check(model, tokenizer)`` (the length check) runs on the pruned base before its alignment and before anything
    is written, so a run it refuses leaves ``--output`` as it was. Then rank 0 (``ctx.on_main``: its failure stops
    every process) writes the base, before any 4-bit quantization, with its tokenizer as ``--output``/pruned_base,
    named so that the adapters trained on it record it as their base (eval / generate load them without --model;
    :func:`_record_pruned_base_relative` makes that record relative to the run folder at the end)."""
    from .hub import load_model_and_tokenizer
    from .io.files import write_dir_atomically
    from .prune.loram import LoramConfig, loram_prune, plan_summary

    full, tokenizer = load_model_and_tokenizer(args.model)
    model, plan = loram_prune(full, LoramConfig(ratio=args.loram_ratio, criterion=args.loram_criterion, seed=args.seed))
    summary = plan_summary(plan, full, model)
    del full  # training holds only the pruned base
    check(model, tokenizer)
    if args.loram_align_steps:
        from .pretrain.loram_align import align_pruned
        aligned = align_pruned(model, tokenizer, _align_config(args), log=lambda line: None if args.quiet else print(line))
        print(f"LoRAM alignment: {aligned['tokens']:,} tokens in {aligned['seconds']:.0f}s; held-out LM loss of the "
              f"pruned base {aligned['eval_loss_before']:.3f} -> {aligned['eval_loss_after']:.3f} nats/token")
    folder = (Path(args.output) / LORAM_BASE).resolve()
    ctx.on_main(lambda: write_dir_atomically(folder, lambda tmp: (model.save_pretrained(tmp),
                                                                  tokenizer.save_pretrained(tmp))))
    model.name_or_path = model.config._name_or_path = str(folder)  # noqa: SLF001 (what save_adapter records)
    if args.quantize:
        from .quantize import quantize_model
        quantize_model(model, _quantize_config(args))
    print(f"LoRAM: training on the pruned base ({summary['params_pruned']:,} of {summary['params_full']:,} "
          f"parameters, {summary['removed_fraction']:.1%} removed); the adapter is recovered for the full model")
    return model, tokenizer, plan


def _loram_recover(args, plan, adapter_dir: Path, eval_examples) -> dict:
    """Keep the pruned model's adapter as adapter_pruned/, write the recovered one as adapter/ (for the original
    model) with the plan, and evaluate the original model with it; returns those metrics."""
    import shutil

    from . import load_adapter
    from .data import evaluate_examples
    from .hub import load_model_and_tokenizer
    from .prune.loram import recover_adapter

    pruned_dir = adapter_dir.with_name("adapter_pruned")
    if pruned_dir.exists():
        shutil.rmtree(pruned_dir)
    adapter_dir.rename(pruned_dir)
    _record_pruned_base_relative(Path(args.output), [pruned_dir, *Path(args.output).glob("checkpoint-*")])
    full, tokenizer = load_model_and_tokenizer(args.model)
    recover_adapter(pruned_dir, plan, adapter_dir, base_model_name_or_path=full.name_or_path)
    plan.save(adapter_dir.with_name("loram_plan"))
    load_adapter(full, adapter_dir)
    metrics = evaluate_examples(full, tokenizer, eval_examples, batch_size=args.eval_batch_size, progress=not args.quiet)
    return metrics


def _record_pruned_base_relative(out: Path, adapters: Sequence[Path]) -> None:
    """The adapters of a LoRAM run trained on ``out``/pruned_base record it relative to their folder
    (``../pruned_base``, :func:`lorakit.io.peft_format.relative_base`), so the run folder still loads after it is
    moved or copied. Was: the absolute path, so a moved run's ``adapter_pruned`` named a base that was gone."""
    from .io.files import atomic_write_json, read_json
    from .io.peft_format import CONFIG_NAME, relative_base

    base = (out / LORAM_BASE).resolve()
    for folder in adapters:
        path = folder / CONFIG_NAME
        if not path.is_file():
            continue
        config = read_json(path)
        if config.get("base_model_name_or_path") == str(base):
            atomic_write_json(path, {**config, "base_model_name_or_path": relative_base(base, folder)})


def _check_lengths(model, tokenizer, examples, max_length: int, ctx=None) -> None:
    """--max-length beyond the model's positions is an error; examples it cuts are counted and said. Under a
    distributed launcher each process counts its share of the examples and the counts are summed, so no
    process tokenizes the whole set."""
    from .data import encode_prompt
    from .data.collate import encode_completion

    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise LorakitError(f"--max-length {max_length} exceeds the model's {limit} positions "
                           "(max_position_embeddings); set it to at most that")
    mine = examples if ctx is None else ctx.shard(examples)
    long = sum(len(encode_prompt(tokenizer, ex.prompt)) + len(encode_completion(tokenizer, ex.completion)) > max_length
               for ex in mine)
    if ctx is not None:
        long = ctx.sum_counts([long])[0]
    if long:
        print(f"truncation: {long} of {len(examples)} training examples are longer than --max-length {max_length} "
              "tokens; their prompts are cut from the left (completions are kept whole when they fit)")


def _format_note(method) -> str:
    if method.peft_type is not None:
        return f"PEFT format, peft_type {method.peft_type}"
    export = ("`lorakit export` writes it as a plain PEFT LoRA" if method.to_lora is not None
              else "it has no plain-LoRA form")
    return f"lorakit format for method {method.name}; PEFT cannot load it, lorakit can; {export}"


def _resume_command(argv: Sequence[str], checkpoint: str) -> str:
    """The user's own command with ``--resume-from CHECKPOINT`` (replacing any earlier one); under a launcher on one
    machine, started with torchrun and this machine's process count (``LOCAL_WORLD_SIZE``, which torchrun and
    accelerate launch set)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume-from":
            skip = True
        elif not a.startswith("--resume-from="):
            kept.append(a)
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE")
    if world != "1" and world == local:
        return shlex.join(["torchrun", "--nproc-per-node", local, "-m", "lorakit", "--", *kept, "--resume-from",
                           checkpoint])
    return shlex.join(["lorakit", *kept, "--resume-from", checkpoint])


# -- eval / generate ------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from .data import build_task_index, evaluate_examples
    from .hub import load_tokenizer

    adapter_config = None
    if args.adapter:
        from .io.peft_format import check_adapter_folder
        args.adapter = _adapter_of_run(args.adapter, "evaluating")
        adapter_config = check_adapter_folder(args.adapter)  # a bad folder or weights file fails before the model loads
        _adapters_base(args, [args.adapter])
    tokenizer = load_tokenizer(args.model)
    examples = _load_examples(args.data, "test", args.eval_examples, TASK_EVAL_EXAMPLES, args.seed, tokenizer)
    if args.mode_token:
        examples = _with_mode_token(examples, args.mode_token, tokenizer)
    # Keyed methods: the task ids the adapter was trained with (saved beside it), never a renumbering of the
    # tasks present in this data; a task the adapter does not know is an error.
    task_to_id = _task_index(args.adapter, examples, f"in {args.data}")
    if adapter_config is not None and task_to_id is None:
        # what the method needs of each row (RecLoRA's user vectors), before the model loads. Only where the task
        # ids are the data's own, as in training: with a saved task index they are the training run's, checked above
        adapter_config.check_examples(examples)
    _require_task_keys(args.adapter, task_to_id, [ex.task for ex in examples],
                       f"rows of {args.data} (add a \"task\" field to each JSONL line)")
    labels = _adapter_labels(args.adapter, args.model)
    if labels is not None:  # before the model loads: labels the head lacks, a base head of another size
        _check_classifier_eval(args, adapter_config, labels, examples)
    model, tokenizer = _load_with_adapter(args, labels=labels)
    if labels is not None:
        from .training.objectives import objective_for

        metrics = objective_for(model).evaluate(None, model, tokenizer, examples, batch_size=args.eval_batch_size,
                                                task_to_id=task_to_id, progress=not args.quiet)
    else:
        metrics = evaluate_examples(model, tokenizer, examples, batch_size=args.eval_batch_size,
                                    task_to_id=task_to_id or build_task_index(examples) or None, progress=not args.quiet)
    _print_metrics("eval", metrics)
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


def _read_prompts(args: argparse.Namespace) -> tuple[list[str], list[str | None]]:
    """Prompts from --prompt or stdin (plain lines, or JSONL objects with "prompt" and optional "task"/"key")."""
    if args.prompt:
        return list(args.prompt), [args.task] * len(args.prompt)
    prompts, tasks = [], []
    for n, line in enumerate(sys.stdin, start=1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorakitError(f"stdin line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(record.get("prompt"), str):
                raise LorakitError(f"stdin line {n}: a JSON line needs a string 'prompt'")
            prompts.append(record["prompt"])
            tasks.append(record.get("task", record.get("key", args.task)))
        else:
            prompts.append(line)
            tasks.append(args.task)
    return prompts, tasks


def cmd_generate(args: argparse.Namespace) -> int:
    from .data import Example, generate_completions
    from .data.evaluate import example_routing

    if args.adapter:
        from .io.peft_format import check_adapter_folder
        args.adapter = _adapter_of_run(args.adapter, "generating with", file=sys.stderr)
        check_adapter_folder(args.adapter)  # a bad adapter folder or weights file fails before the model loads
        _adapters_base(args, [args.adapter])
    prompts, tasks = _read_prompts(args)
    if not prompts:
        raise LorakitError("no prompt: pass --prompt TEXT (repeatable) or pipe prompts on stdin, one per line")
    if any(t is not None for t in tasks) and not (args.adapter and _task_index(args.adapter)):
        raise LorakitError("--task needs an adapter trained with task keys (its folder has task_index.json)")
    rows = [Example(prompt=p, completion="", task=t) for p, t in zip(prompts, tasks)]
    task_to_id = _task_index(args.adapter, rows, "--task / the JSONL key")
    _require_task_keys(args.adapter, task_to_id, tasks, "prompts (pass --task, or a \"task\" in each JSONL line)")
    labels = _adapter_labels(args.adapter, args.model)
    if labels is not None:  # a classifier writes no text: each prompt's predicted label, tab-separated
        from .data.classification import predict_labels

        model, tokenizer = _load_with_adapter(args, labels=labels)
        label2id = {name: i for i, name in enumerate(labels)}
        rows = [Example(prompt=ex.prompt, completion=labels[0], task=ex.task) for ex in rows]
        for p, i in zip(prompts, predict_labels(model, tokenizer, rows, label2id, task_to_id=task_to_id)):
            print(f"{p}\t{labels[i]}")
        return 0
    model, tokenizer = _load_with_adapter(args)
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                       row_routing=example_routing(rows, task_to_id))
    for p, c in zip(prompts, completions):
        print(f"{p}{c}")
    return 0


# -- listing and inspection -----------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    from . import list_methods

    methods = list_methods()
    if args.markdown:  # the README's table is generated from the registry with this
        print("| method | what it does | paper | PEFT-compatible file | mergeable | variants |")
        print("|---|---|---|---|---|---|")
        for m in methods:
            print(f"| `{m.name}` | {m.description} | {m.paper} | {'yes (' + m.peft_type + ')' if m.peft_type else 'lorakit'} "
                  f"| {'yes' if m.mergeable else 'no'} | {', '.join(m.variants)} |")
        return 0
    width = max(len(m.name) for m in methods)
    for m in methods:
        peft = f" [PEFT: {m.peft_type}]" if m.peft_type else ""
        print(f"{m.name:<{width}}  {m.description}{peft}")
        if args.verbose:
            print(f"{'':<{width}}  paper: {m.paper}; layers: {', '.join(m.layer_kinds)}; variants: "
                  f"{', '.join(m.variants)}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .data import ROTATE_FAMILY, TASKS, get_task, rotate_task
    from .data.tasks import MAX_ROTATE_OFFSET

    if args.jsonl:  # write a task's examples as a JSONL file a user could have brought
        for ex in get_task(args.jsonl).generate(args.split, args.n, args.seed):
            print(json.dumps({"prompt": ex.prompt, "completion": ex.completion}))
        return 0
    width = max(map(len, TASKS))
    for name, task in TASKS.items():
        ex = task.generate("train", 1, 0)[0]
        print(f"{name:<{width}}  {task.description:<48}  e.g. {ex.prompt!r} -> {ex.completion!r}")
    ex = rotate_task(2).generate("train", 1, 0)[0]
    print(f"{ROTATE_FAMILY:<{width}}  {'rotate by k letters, k=2..' + str(MAX_ROTATE_OFFSET) + ' (rotate is k=1)':<48}  "
          f"e.g. {ex.prompt!r} -> {ex.completion!r}")
    return 0


_DELTA_PARTS = ("lora_", "router", "classifier", "gate")  # first key component that belongs to the delta


def _meta_base(config):
    """The adapter's base model (``base_model_name_or_path``) built on the meta device from its config alone, or
    None when it has none or it cannot be built here."""
    base = getattr(config, "base_model_name_or_path", None)
    if not base:
        return None
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from .hub import resolve_model_path  # a bundled asset folder of another installation -> ours

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(base),
                                                                               local_files_only=True))
    except Exception:  # any failure to rebuild the base: inspect reads the file alone
        return None


def _check_tensors(meta_base, directory: Path, config, tensors) -> bool:
    """``load_adapter``'s checks of the tensors against the config (AdapterLoadError on a mismatch), on the base
    built on the meta device; a method whose deltas are built from the base weights (an SVD of them: LoRA-XS,
    LaMDA …) is checked on the real base, loaded from its local files. False where that cannot be loaded."""
    from .io.peft_format import check_adapter_tensors

    try:
        check_adapter_tensors(meta_base, directory, config, tensors)
        return True
    except (NotImplementedError, RuntimeError) as e:  # torch's "Cannot copy out of meta tensor": it read a weight
        if "meta" not in str(e):
            raise
    try:
        from transformers import AutoModelForCausalLM

        from .hub import resolve_model_path

        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.base_model_name_or_path),
                                                    local_files_only=True)
    except Exception:  # noqa: BLE001  (no local weights: inspect reads the file alone and says so)
        return False
    check_adapter_tensors(base, directory, config, tensors)
    return True


def _adapted_modules(keys: Sequence[str], base) -> list[str]:
    """The host modules a saved adapter adapts: the longest key prefix that is a module of its base model
    (``_meta_base``); without it, the key up to its first delta part."""
    from .io.peft_format import PREFIX

    host = None if base is None else {n for n, _ in base.named_modules() if n}
    modules = set()
    for key in keys:
        parts = key.removeprefix(PREFIX).split(".")
        if host is not None:
            cut = max((i for i in range(1, len(parts)) if ".".join(parts[:i]) in host), default=len(parts) - 1)
        else:
            cut = next((i for i, p in enumerate(parts) if i and p.startswith(_DELTA_PARTS)), len(parts) - 1)
        modules.add(".".join(parts[:cut]))
    return sorted(modules)


def _adapter_of_run(adapter: str, doing: str, file=None) -> str:
    """``adapter``, or its ``adapter/`` when it is a training run folder (``lorakit train --output``: the adapter the
    run ended with, not a ``checkpoint-N``), said on ``file`` (stdout by default; generate, whose stdout is its
    completions, says it on stderr): every command that takes an adapter folder (inspect, eval, generate, merge,
    merge-adapters, export, transfer) resolves it here, the same way."""
    from .io.peft_format import run_adapter

    inner = run_adapter(adapter)
    if inner is None:
        return adapter
    print(f"{adapter} is a training run folder; {doing} its adapter {inner}", file=file)
    return str(inner)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .data import read_task_index
    from .io.files import load_tensors
    from .io.peft_format import WEIGHTS_NAME, read_adapter_config, weights_path

    directory = Path(_adapter_of_run(args.adapter, "inspecting"))
    config = read_adapter_config(directory)
    tensors = load_tensors(weights_path(directory))
    base = _meta_base(config)
    checked = base is not None and _check_tensors(base, directory, config, tensors)
    modules = _adapted_modules(list(tensors), base)
    n_params = sum(t.numel() for t in tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    print(f"adapter:   {directory}")
    print(f"method:    {type(config).method}")
    print(f"tensors:   {len(tensors)} ({n_params:,} parameters, {', '.join(dtypes)}), "
          f"{(directory / WEIGHTS_NAME).stat().st_size / 1e6:.2f} MB")
    print(f"modules:   {len(modules)} adapted" + (f", e.g. {modules[0]}" if modules else ""))
    print(f"checked:   tensors match the config on {config.base_model_name_or_path}" if checked else
          "checked:   not against a base model (base_model_name_or_path is unset or cannot be loaded here)")
    tasks = read_task_index(directory)
    if tasks:
        print(f"tasks:     {', '.join(sorted(tasks, key=tasks.get))} (routing key ids 0..{len(tasks) - 1})")
    print("config:")
    for k, v in config.to_dict().items():
        if v not in (None, [], {}, False) or k in ("r", "lora_alpha"):
            print(f"  {k}: {v}")
    if args.tensors:
        for k, t in tensors.items():
            print(f"  {k} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
    return 0


# -- merge / export ---------------------------------------------------------------------------------------------
def _mergeable_or_raise(method) -> None:
    if method.mergeable:
        return
    if method.to_lora is not None:
        hint = "`lorakit export ADAPTER --output DIR` writes it as a plain LoRA, which merge accepts"
    else:
        hint = ("it has no plain-LoRA form either, so use it unmerged: `lorakit generate --adapter`, "
                "`lorakit eval --adapter`, or lorakit.load_adapter / lorakit.serving in Python")
    raise LorakitError(f"method {method.name!r} is input-dependent (its experts are chosen per token or per row), "
                       f"so it cannot be merged into the base weights; {hint}")


def cmd_merge(args: argparse.Namespace) -> int:
    from . import get_method, merge_and_unload
    from .io.peft_format import check_adapter_folder
    from .io.files import write_dir_atomically

    args.adapter = _adapter_of_run(args.adapter, "merging")
    _mergeable_or_raise(get_method(check_adapter_folder(args.adapter)))
    _adapters_base(args, [args.adapter])
    _quantize_config(args)  # --compute-dtype without --quantize: refused first, as before
    mismatch = _adapter_base_mismatch(args.adapter, args)
    if mismatch:  # a merged model is kept and shipped: it must be the model that was trained
        raise LorakitError(f"{mismatch}. Merging would write a model other than the one trained (W + ΔW for the "
                           "full-precision W, where the adapter learned ΔW against the 4-bit weights). Pass the run's "
                           "flags (e.g. --quantize nf4: the dequantized 4-bit weights + ΔW, saved in full precision); "
                           "to merge into the other base on purpose, copy the adapter folder out of its run folder.")
    out = check_output_dir(args.output, "--output", overwrite=args.overwrite, reads=[args.adapter, args.model])
    model, tokenizer = _load_with_adapter(args, any_model=True)
    if args.quantize:  # the adapter was trained on the 4-bit base: merge into its dequantized weights
        from .quantize import dequantize_model
        dequantize_model(model)
    merged = merge_and_unload(model)

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    write_dir_atomically(out, write)
    print(f"merged model written to {out}")
    return 0


def cmd_merge_adapters(argv: Sequence[str]) -> int:
    """``lorakit merge-adapters A B ... --weights ... --method NAME --output DIR``: one adapter from several
    (lorakit.compose.merge_adapters). Its own parser: ``--method`` here names a merge method, not an adapter one."""
    from .compose import list_merge_methods, merge_adapters
    from .io.files import write_dir_atomically

    p = CommandParser(prog="lorakit merge-adapters", field_flags={"lambda_": "--lambda"}, formatter_class=_Formatter,
                      description=(
        "Merge several LoRA adapters trained on the same base model (lorakit or PEFT folders) into one adapter folder: "
        "a weighted sum (--method linear, the default) or another merge method (ties, dare_ties, della, breadcrumbs, "
        "svd, lego, ...: --method lists them all; each reads the options below that name it). The result loads like any adapter "
        "(lorakit eval --adapter OUTPUT). Example: lorakit merge-adapters runs/a/adapter runs/b/adapter "
        "--weights 0.5 0.5 --method ties --density 0.5 --output runs/merged"))
    p.add_argument("sources", nargs="+", help="adapter folders (lorakit or PEFT LoRA; a training run folder: its adapter/)")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="one per source (default 1.0 each)")
    p.add_argument("--method", default="linear", help=f"one of: {', '.join(list_merge_methods())}")
    p.add_argument("--output", required=True, help="folder for the merged adapter")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output folder (whole: nothing of the old one is left beside the result)")
    _common_model(p, "the sources' base, else the bundled model")
    for flag, kind, text in (("density", float, "fraction kept (ties, dare, della, breadcrumbs, magnitude_prune)"),
                             ("svd-rank", int, "rank of svd / *_svd results; k for lego"),
                             ("majority-sign-method", str, "total | frequency"), ("rescale", str, "density | l1 | none"),
                             ("lambda", float, "scale of the merged delta"), ("epsilon", float, "DELLA"),
                             ("gamma", float, "breadcrumbs"), ("select-topk", float, "SCE"),
                             ("seed", seed_arg, "DARE/DELLA/lego"),
                             ("reweighting", str, "lego: dual | parameter | output | none"),
                             ("saved-modules", str, "modules_to_save copies that differ: error | first | merge")):
        p.add_argument(f"--{flag}", type=kind, default=None, help=text)
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None, help="divide by Σ weights")
    args = p.parse_args(argv)
    opts = {k: v for k, v in vars(args).items()
            if v is not None and k not in ("sources", "weights", "method", "output", "model", "num_threads", "overwrite")}
    with ErrorsReported(p) as run:
        _set_threads(args)
        args.sources = [_adapter_of_run(source, "merging") for source in args.sources]
        _adapters_base(args, args.sources, what="sources")
        check_output_dir(args.output, "--output", overwrite=args.overwrite, reads=[*args.sources, args.model])
        # --model loads only after the sources and options are checked (and the base is said after: merge_adapters
        # checks every source first, and those errors come first)
        merged = merge_adapters(args.sources, args.weights, args.method, model=args.model, **opts)
        _say_base(args)
        # the folder is replaced whole (check_output_dir refused one that is, holds or lies inside a source)
        out = write_dir_atomically(args.output, merged.save)
        print(f"merged {len(args.sources)} adapters ({args.method}) into {out}")
    return run.status


def cmd_generate_adapter(argv: Sequence[str]) -> int:
    """``lorakit generate-adapter --task T --generator G --output OUT``: a PEFT LoRA for task T from an ICM-LoRA
    generator; ``lorakit generate-adapter train --adapters DIR... --output G`` trains one on an adapter collection
    (ICM-LoRA, arXiv 2501.17635; lorakit.compose.icm_lora_generator)."""
    from .compose.icm_lora import CvaeConfig
    from .compose.icm_lora_generator import IcmLoraConfig, generate_adapter, train_icm_lora
    from .io.files import write_dir_atomically

    training = argv[:1] == ["train"]
    prog = "lorakit generate-adapter" + (" train" if training else "")
    p = CommandParser(prog=prog, formatter_class=_Formatter, description=(
        "Train an ICM-LoRA generator (arXiv:2501.17635) on a collection of LoRA adapters for several tasks; "
        "`lorakit generate-adapter --task T --generator DIR --output OUT` then writes a LoRA for task T with it."
        if training else
        "Generate a LoRA adapter (PEFT format) for a task with an ICM-LoRA generator (arXiv:2501.17635), without "
        "training on the task: a built-in task or a JSONL file of examples. Train a generator first with "
        "`lorakit generate-adapter train --adapters DIR ... --output DIR`."))
    p.add_argument("--output", required=True, help="folder for the generator" if training else "folder for the adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    _common_model(p)
    if training:
        d, c = IcmLoraConfig(), CvaeConfig()
        p.add_argument("--adapters", nargs="+", required=True,
                       help="adapter folders, run folders (their checkpoint-*/ are used) or TASK=DIR")
        for flag, kind, default, text in (
                ("epochs", int, d.epochs, "passes over the collection"), ("batch-size", int, d.batch_size, "adapters per step"),
                ("lr", float, d.lr, "AdamW learning rate"), ("seed", int, d.seed, "seed"),
                ("n-shots", int, d.n_shots, "solved demonstrations before each query (task vector)"),
                ("n-queries", int, d.n_queries, "queries averaged into the task vector"),
                ("latent-dim", int, c.latent_dim, "CVAE latent size"), ("kernel-size", int, c.kernel_size, "conv kernel"),
                ("divide-slice-length", int, c.divide_slice_length, "input padded to a multiple of this"),
                ("kld-weight", float, c.kld_weight, "weight of the KL term")):
            p.add_argument(f"--{flag}", type=kind, default=default, help=text)
        p.add_argument("--channels", type=int, nargs="+", default=list(c.channels), help="encoder widths")
        p.add_argument("--quiet", action="store_true", help="no per-epoch log")
    else:
        p.add_argument("--task", required=True, help="built-in task name (see `lorakit tasks`) or a JSONL file")
        p.add_argument("--generator", required=True, help="folder written by `lorakit generate-adapter train`")
        p.add_argument("--seed", type=seed_arg, default=0, help="seed of the latent sample")
        p.add_argument("--temperature", type=float, default=1.0, help="z = temperature * N(0, I); 0 = the prior mean")
    if argv[:1] and not training and not argv[0].startswith("-"):  # `generate-adapter trian ...`: name the typo
        p.error(f"unknown subcommand {argv[0]!r}: `lorakit generate-adapter train ...` trains a generator, "
                f"`lorakit generate-adapter --task ...` (no subcommand) generates an adapter.{did_you_mean(argv[0], ['train'])}")
    args = p.parse_args(argv[1:] if training else argv)
    with ErrorsReported(p, also=(ValueError, FileNotFoundError)) as run:
        _set_threads(args)
        inputs = [a.split("=", 1)[-1] for a in args.adapters] if training else [args.generator]
        for given in inputs:  # a generator is no adapter, nor a collection a generator: --overwrite would lose it
            if Path(given).exists() and Path(given).resolve() == Path(args.output).resolve():
                what = "an adapter of the collection" if training else "the --generator folder"
                raise LorakitError(f"--output {args.output} is {what}; the {'generator' if training else 'adapter'} "
                                   f"would replace it. Choose another folder.")
        check_output_dir(args.output, "--output", overwrite=args.overwrite, reads=[*inputs, args.model])
        if args.model is not None:
            from .hub import check_model
            check_model(args.model)  # the name now; the model loads once the adapters / the generator are read
        model, tokenizer = args.model, None
        if training:
            config = IcmLoraConfig(
                cvae=CvaeConfig(latent_dim=args.latent_dim, channels=tuple(args.channels), kernel_size=args.kernel_size,
                                divide_slice_length=args.divide_slice_length, kld_weight=args.kld_weight),
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, n_shots=args.n_shots,
                n_queries=args.n_queries)
            log = None if args.quiet else (lambda r: print(f"epoch {r['epoch']}: loss {r['loss']:.4f} recon "
                                                           f"{r['recon']:.4f} kld {r['kld']:.4f}", file=sys.stderr))
            gen = train_icm_lora(args.adapters, config, model=model, tokenizer=tokenizer, log=log)
            # the folder is replaced whole, as --overwrite says (it wrote into it, leaving the old files beside)
            out = write_dir_atomically(args.output, gen.save)
            print(f"ICM-LoRA generator for {', '.join(sorted(gen.conditions))} written to {out}")
        else:
            out = generate_adapter(args.generator, args.task, args.output, seed=args.seed, temperature=args.temperature,
                                   model=model, tokenizer=tokenizer, overwrite=args.overwrite)  # atomic, whole
            print(f"generated LoRA for {args.task} written to {out} (PEFT format)")
    return run.status


def cmd_transfer(argv: Sequence[str]) -> int:
    """``lorakit transfer --adapter A --source-model S --target-model T --data D --output OUT``: Trans-LoRA
    (lorakit.compose.translora.transfer); prints its summary as JSON. Bad input: one-line error, exit 2."""
    import dataclasses

    from .compose.translora import TransLoraConfig, build_parser, check_inputs, transfer
    from .data import load_examples
    from .hub import load_tokenizer

    p = build_parser()
    args = p.parse_args(argv)
    with ErrorsReported(p, also=(ValueError, FileNotFoundError)) as run:
        _set_threads(args)
        config = TransLoraConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TransLoraConfig)})
        args.adapter = _adapter_of_run(args.adapter, "transferring")
        check_output_dir(args.output, "--output", overwrite=args.overwrite, reads=[
            args.adapter, args.source_model, args.target_model, args.data])
        check_inputs(args.adapter, args.source_model, args.target_model)  # before the source tokenizer and data
        real = load_examples(args.data, "train", args.real_examples, config.seed, load_tokenizer(args.source_model))
        result = transfer(args.adapter, args.source_model, args.target_model, real, args.output, config,
                          overwrite=args.overwrite)
        print(json.dumps(result.summary()))
    return run.status


def cmd_quantize(argv: Sequence[str]) -> int:
    """``lorakit quantize --method rtn|cbq --bits B``: post-training weight quantization (W{B}A16) of a model's
    transformer blocks, calibrated on the bundled tasks' train split; prints the perplexity on their test split
    before and after, and with ``--output`` writes the quantized model (weights on the b-bit grid, stored in the
    model's dtype). Its own parser: ``--method`` here names a quantizer, not an adapter method."""
    from .quantize import QUANTIZERS, check_group_size, perplexity, quantize_weights, task_token_rows

    p = CommandParser(prog="lorakit quantize", formatter_class=_Formatter, description=(
        "Quantize a model's weights after training (weights in --bits bits, activations in 16): round-to-nearest (rtn) or CBQ (arXiv:2312.07950), "
        "calibrated on the bundled tasks. Prints the perplexity before and after; with --output writes the "
        "quantized model (weights on the quantization grid, stored in the model's dtype). --method names a "
        "quantizer here, not an adapter method."))
    p.add_argument("--method", default="cbq", choices=QUANTIZERS, help="rtn: round-to-nearest; cbq: CBQ (arXiv:2312.07950)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight, 2-8")
    p.add_argument("--group-size", type=int_or_none, default=None,
                   help="input columns per scale; none: one per output channel (default: none)")
    p.add_argument("--calib-rows", type=int, default=32, help="calibration rows of --seq-len tokens (cbq)")
    p.add_argument("--eval-rows", type=int, default=32, help="test rows of --seq-len tokens for the perplexity")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration / test row")
    p.add_argument("--steps", type=int, default=None, help="cbq: optimisation steps per window (default 100)")
    p.add_argument("--window", type=int, default=None, help="cbq: blocks per window (default 2)")
    p.add_argument("--overlap", type=int, default=None, help="cbq: blocks shared by consecutive windows (default 1)")
    p.add_argument("--r", type=int, default=None, help="cbq: rank of the LoRA-Rounding matrices (default 8)")
    p.add_argument("--no-cfp", action="store_true", help="cbq: skip the coarse-to-fine weight-outlier truncation")
    p.add_argument("--output", default=None, help="folder for the quantized model (default: not written)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    _common_model(p)
    args = p.parse_args(argv)
    options = {k: v for k, v in (("steps", args.steps), ("window", args.window), ("overlap", args.overlap),
                                 ("r", args.r)) if v is not None}
    if args.no_cfp:
        options["cfp"] = False
    with ErrorsReported(p) as run:
        _set_threads(args)
        if args.method == "rtn" and options:
            raise LorakitError(f"--method rtn takes no CBQ options (got {', '.join(sorted(options))})")
        for flag, value, low in (("--eval-rows", args.eval_rows, 1), ("--calib-rows", args.calib_rows, 1),
                                 ("--seq-len", args.seq_len, 2)):  # a perplexity predicts tokens 2..T of a row
            if value < low:
                raise LorakitError(f"{flag} must be at least {low}, got {value}.")
        from .quantize import CBQConfig, QuantSpec
        if args.method == "cbq":  # the flags' errors before the model loads and its perplexity is measured
            CBQConfig(bits=args.bits, group_size=args.group_size, **options)
        else:
            QuantSpec(args.bits, args.group_size)
        out = check_output_dir(args.output, "--output", overwrite=args.overwrite, reads=[args.model]) if args.output else None
        from .hub import load_model_and_tokenizer
        from .io.files import write_dir_atomically

        model, tokenizer = load_model_and_tokenizer(args.model)
        check_group_size(model, QuantSpec(args.bits, args.group_size))  # before the perplexity, not after it
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and args.seq_len > limit:
            raise LorakitError(f"--seq-len {args.seq_len} exceeds the model's {limit} positions "
                               "(max_position_embeddings); set it to at most that.")
        test = task_token_rows(tokenizer, "test", args.eval_rows, args.seq_len)
        before = perplexity(model, test)
        calib = task_token_rows(tokenizer, "train", args.calib_rows, args.seq_len) if args.method == "cbq" else None
        summary = quantize_weights(model, args.method, calib, bits=args.bits, group_size=args.group_size,
                                   progress=print, **options)
        after = perplexity(model, test)
        print(f"{args.method} W{args.bits}A16 ({summary['layers']} linear layers): perplexity {before:.3f} -> "
              f"{after:.3f}")
        if out is not None:
            def write(folder: Path) -> None:
                model.save_pretrained(folder, safe_serialization=True)
                tokenizer.save_pretrained(folder)
                (folder / "quantization.json").write_text(json.dumps({**summary, "perplexity_before": before,
                                                                      "perplexity_after": after}, indent=2))

            write_dir_atomically(out, write)
            print(f"quantized model written to {out}")
    return run.status


def cmd_export(args: argparse.Namespace) -> int:
    """Write a plain PEFT LoRA for an adapter: identity for PEFT LoRA / rsLoRA / DoRA (for the untouched base), the
    method's to_lora hook otherwise; a method with neither (mixtures, RandLoRA, MiSS) is refused."""
    from . import get_method, save_adapter
    from .hub import load_model_and_tokenizer
    from .io.peft_format import check_adapter_folder
    from .io.files import write_dir_atomically

    args.adapter = _adapter_of_run(args.adapter, "exporting")
    method = get_method(check_adapter_folder(args.adapter))
    if method.to_lora is None and method.peft_type != "LORA":
        # PEFT's other formats (MISS, RANDLORA) were copied as they are and reported as "PEFT LoRA", which vLLM,
        # SGLang and LoRAX (plain LoRA only) refuse all the same
        already = (f"; {args.adapter} is already PEFT's {method.peft_type} format (PEFT loads it as it is)"
                   if method.peft_type is not None else "")
        raise LorakitError(f"method {method.name!r} has no exact plain-LoRA form, so there is nothing to export"
                           f"{already}; use the adapter as it is with lorakit (generate / eval / merge)")
    _adapters_base(args, [args.adapter])
    out = check_output_dir(args.output, "--output", overwrite=args.overwrite, reads=[args.adapter, args.model])
    _overrides(args)  # before the model loads
    _say_base(args)
    model, _ = load_model_and_tokenizer(args.model)
    _load_adapter_on(model, args)

    def write(folder: Path) -> None:
        if method.peft_type is not None:  # for the untouched base when an init changed it (PiSSA, OLoRA): rank 2r
            save_adapter(model, folder, original_base=True)
            return
        from .methods._plain import save_plain_lora
        save_plain_lora(model, "default", folder)

    write_dir_atomically(out, write)
    print(f"exported PEFT LoRA adapter to {out}")
    from .io.peft_format import trained_base_file
    trained = trained_base_file(args.adapter)
    if trained:  # LongLoRA / LISA / GaLore: the run's model is the adapter on a base whose tensors it also trained
        print(f"warning: the run also trained base tensors ({trained}), which a PEFT LoRA cannot hold: {out} on the "
              "original base is not the trained model; `lorakit merge` writes the whole trained model", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .io.peft_format import run_adapter
    from .serving.server import ServerLimits, serve
    from .serving.store import adapter_folders

    folders = [run_adapter(d) or d for root in args.adapters for d in adapter_folders(root)]
    _adapters_base(args, [str(f) for f in folders])
    _say_base(args)
    serve(args.model, args.adapters, host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("LORAKIT_API_KEY"), max_loras=args.max_loras,
          max_cpu_loras=args.max_cpu_loras, kv_cache_mb=args.kv_cache_mb, max_batch=args.max_batch,
          limits=ServerLimits(max_tokens=args.max_tokens_limit, max_n=args.max_n,
                              adapter_queue_timeout_s=args.adapter_queue_timeout), rank=args.rank, device=args.device,
          cuda_graphs=args.cuda_graphs, quantize=_quantize_config(args))
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from .core.targeting import targets_from_text
    from .federated import FederatedConfig

    resume = Path(args.resume_from) if args.resume_from else None
    if args.output is None:  # resuming: into the run it continues, by default
        from .federated.checkpoint import STATE_JSON

        args.output = str(resume.parent if (resume / STATE_JSON).is_file() else resume) if resume else "runs/federated"
    from .federated.checkpoint import resumes_in_place

    # a run resumed into another folder writes there as a fresh run does: a non-empty one needs --overwrite
    out = check_output_dir(args.output, "--output", overwrite=args.overwrite,
                           allow_existing=resumes_in_place(args.output, resume))

    def split(text, kind, flag):
        """A comma-separated flag value as a list of ``kind``; LorakitError naming the flag for a bad or empty item."""
        if not text:
            return None
        items = comma_items(text, flag, "names" if kind is str else f"{kind.__name__} values")
        try:
            return [kind(v) for v in items]
        except ValueError:
            raise LorakitError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values") from None

    config = FederatedConfig(
        strategy=args.strategy, clients=args.clients, rounds=args.rounds, fraction=args.fraction,
        min_clients=args.min_clients, model=args.model, data=args.data, eval_data=args.eval_data,
        train_examples=args.train_examples,
        eval_examples=args.eval_examples, partition=args.partition, skew_alpha=args.skew_alpha,
        target_modules=targets_from_text(args.target_modules, "--target-modules"), r=args.r,
        client_ranks=split(args.client_ranks, int, "--client-ranks"),
        lora_alpha=args.lora_alpha, local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, dp_noise_multiplier=args.dp_noise_multiplier, dp_max_grad_norm=args.dp_max_grad_norm,
        dp_delta=args.dp_delta, stragglers=split(args.stragglers, int, "--stragglers") or [], straggler_delay_s=args.straggler_delay,
        round_timeout_s=args.round_timeout, device=args.device, max_length=args.max_length,
        fair_lambda=args.fair_lambda, fair_lr=args.fair_lr, fair_steps=args.fair_steps, evaluate=not args.no_evaluate)
    from .federated.client import check_model
    from .federated.simulate import federate
    from .io.files import atomic_write_json

    check_model(config)  # the model loads and the targets match, before Flower and Ray start

    try:
        result = federate(config, backend_cpus=args.backend_cpus, quiet=args.quiet, output=out, resume_from=resume)
    except (KeyboardInterrupt, RuntimeError):
        from .federated.checkpoint import CHECKPOINT, STATE_JSON
        from .io.files import read_json

        if (out / CHECKPOINT / STATE_JSON).is_file():
            done = read_json(out / CHECKPOINT / STATE_JSON).get("round")
            print(f"lorakit federate: the run stopped; round {done} of {config.rounds} is checkpointed in "
                  f"{out / CHECKPOINT}. Resume with the same command and --resume-from {out}", file=sys.stderr)
        raise
    atomic_write_json(out / "federated.json", result)
    for r in result["rounds"]:
        ev = next((e for e in result["evaluation"] if e["round"] == r["round"]), {})
        print(f"round {r['round']}: {r['accepted']}/{r['sampled']} updates accepted"
              + (f", {len(r['rejected'])} rejected" if r["rejected"] else "")
              + (f", {len(r['failures'])} failed" if r["failures"] else "")
              + (f", {r['no_reply']} no reply (timeout)" if r["no_reply"] else "")
              + f" | up {r['uplink_bytes_per_client'] / 1024:.1f} KiB/client, down {r['downlink_bytes_per_client'] / 1024:.1f} KiB"
              + (f" | eval loss {ev['eval_loss']:.4f}, exact match {ev['exact_match']:.3f}" if ev else "")
              + (f" | ε {r['epsilon']:.2f}" if "epsilon" in r else ""))
    print(f"results: {out / 'federated.json'}")
    if result.get("adapter"):
        print(f"global adapter (PEFT LoRA): {result['adapter']} (lorakit eval --adapter {result['adapter']} ...)")
    return 0


def cmd_pretrain_base(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .pretrain.train import main as pretrain_main

    return pretrain_main(list(rest))


# -- parser: one function per subcommand -----------------------------------------------------------------
_Formatter = DefaultsFormatter


def _add_quantize(p: argparse.ArgumentParser, what: str) -> None:
    from .quantize import COMPUTE_DTYPES, QUANT_TYPES

    g = p.add_argument_group("4-bit base (QLoRA, bitsandbytes; pip install 'lorakit[quantize]')")
    g.add_argument("--quantize", default=None, choices=QUANT_TYPES,
                   help=f"load the base's linear layers in 4 bit (nf4: QLoRA's NormalFloat) and {what} "
                        "(default: full precision)")
    g.add_argument("--compute-dtype", default=None, choices=list(COMPUTE_DTYPES),
                   help="dtype of the 4-bit layers' matmuls (the QLoRA paper uses bfloat16) (default: float32)")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the 4-bit blocks' constants too (QLoRA's double quantization) (default: on)")


ADAPTER_BASE_DEFAULT = "the adapter's base, else the bundled model"


def _common_model(p: argparse.ArgumentParser, default: str = "the bundled model") -> None:
    """--model and --num-threads; ``default``: what an absent --model loads (commands that take adapters load the
    base their adapter_config.json records: ``ADAPTER_BASE_DEFAULT``)."""
    p.add_argument("--model", default=None, help=f"HF model folder or cached hub id (default: {default}); "
                   "lorakit runs offline, set HF_HUB_OFFLINE=0 to allow downloads")
    p.add_argument("--num-threads", type=int, default=default_num_threads(),
                   help=f"CPU threads for torch; lower it when other jobs share the machine ({NUM_THREADS_HELP}; "
                        "default: that, here %(default)s)")


# -- training procedures: --procedure NAME and that procedure's options -----------------------------------
def _add_procedure_options(parser: argparse.ArgumentParser, procedure_name: str | None, method_name: str) -> None:
    from .training.procedures import get_procedure, list_procedures

    parser.add_argument("--procedure", default=None, choices=[p.name for p in list_procedures()],
                        help="training procedure (optimizer, parameter groups, per-step hooks); "
                             "`lorakit train --procedure NAME --help` lists its options (default: plain AdamW)")
    if procedure_name is not None:
        add_config_options(parser, get_procedure(procedure_name).config_cls,
                           prefixed=_shared_fields(procedure_name, method_name))


def _shared_fields(procedure_name: str, method_name: str) -> dict[str, str]:
    """The procedure's fields that the method's config has too (GaLore's and IncreLoRA's beta1, GaLore's and
    DyLoRA's rank): the procedure's get ``--PROCEDURE-FIELD`` flags, so both can be given (was: argparse's
    "conflicting option string" crash)."""
    from . import get_method
    from .cli_options import NOT_ON_CLI
    from .training.procedures import get_procedure

    method_fields = {f.name for f in dataclasses.fields(get_method(method_name).config_cls)} - NOT_ON_CLI
    return {f.name: procedure_name for f in dataclasses.fields(get_procedure(procedure_name).config_cls)
            if f.name in method_fields}


def _procedure_settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.procedure is None:
        return {}
    from .training.procedures import get_procedure

    dest = _procedure_dests(args.procedure, args.method)
    return {"procedure": args.procedure, "procedure_args": {name: getattr(args, d) for name, d in dest.items()
                                                            if getattr(args, d, None) is not None}}


def _procedure_dests(procedure_name: str, method_name: str) -> dict[str, str]:
    """The procedure's fields -> their argparse dests: ``PROCEDURE_FIELD`` for one the method shares
    (``_shared_fields``), the field's name otherwise."""
    from .training.procedures import get_procedure

    shared = _shared_fields(procedure_name, method_name)
    return {f.name: f"{procedure_name}_{f.name}" if f.name in shared else f.name
            for f in dataclasses.fields(get_procedure(procedure_name).config_cls)}


def _add_train(sub, method_name: str, procedure_name: str | None = None) -> None:
    from . import get_method, list_methods
    from .data import HOLDOUT_FRACTION

    t = sub.add_parser("train", help="train an adapter on built-in task(s) or a JSONL file", formatter_class=_Formatter,
                       description="Train an adapter. `lorakit train --method NAME --help` lists NAME's options. "
                                   "Ctrl-C saves a checkpoint and prints the command that resumes it.")
    _common_model(t)
    _add_quantize(t, "train the adapter on that frozen 4-bit base")
    g = t.add_argument_group("LoRAM: train on a pruned base, use the adapter on the full one (arXiv:2502.13533)")
    g.add_argument("--loram-ratio", type=float, default=None,
                   help="prune this fraction of attention groups and FFN channels before training; the adapter is "
                        "recovered to the full model's shapes (adapter/), evaluated on the full model (default: off)")
    g.add_argument("--loram-criterion", default="random", choices=["random", "magnitude"],
                   help="which units LoRAM prunes: random (LoRAM-Rand) or the smallest weight norms")
    g.add_argument("--loram-align-steps", type=int, default=0, metavar="N",
                   help="LoRAM's alignment: continue pre-training the pruned base for N steps (16 x 128 tokens each) "
                        "on lorakit's offline pretraining corpus before training the adapter; 0 = off (default)")
    g.add_argument("--loram-align-lr", type=float, default=None,
                   help="peak learning rate of the alignment (warmup, then cosine to 0; default 1e-3)")
    t.add_argument("--task-type", default="causal-lm", metavar="{causal-lm,seq-cls}",
                   help="causal-lm: generate the completion (default); seq-cls (PEFT's SEQ_CLS): a classification head "
                        "on the model (AutoModelForSequenceClassification, one output per label of --data's "
                        '{"text", "label"} records), trained in full as modules_to_save; metrics accuracy, macro F1, '
                        "MCC (docs/classification.md)")
    t.add_argument("--data", default="reverse",
                   help="built-in task name(s), comma-separated (see `lorakit tasks`), or a JSONL file (all of it is "
                        f"used; without --eval-data its last 1/{HOLDOUT_FRACTION} is held out for evaluation)")
    t.add_argument("--eval-data", default=None,
                   help="evaluation task(s) or JSONL file (default: the tasks' test split, or the hold-out of --data)")
    t.add_argument("--method", default=method_name, choices=[m.name for m in list_methods()],
                   help="adapter method (`lorakit methods` describes each)")
    t.add_argument("--output", default="runs/lorakit",
                   help="output folder: adapter/, checkpoint-N/, metrics.jsonl, metrics.png, summary.json")
    t.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote in --output")
    t.add_argument("--adapter-name", default="default", help="name of the trained adapter inside the model")
    t.add_argument("--steps", type=int, default=200, help="optimizer steps (the total, when resuming)")
    t.add_argument("--batch-size", type=int, default=16, help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: --warmup-ratio)")
    t.add_argument("--warmup-ratio", type=float, default=0.05, help="warmup as a fraction of --steps")
    t.add_argument("--lr-schedule", default="cosine", choices=["constant", "linear", "cosine"],
                   help="learning-rate decay after warmup")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block's activations in backward instead of keeping them (less memory, "
                        "about one more forward per step)")
    t.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl record every N steps")
    t.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only on Ctrl-C)")
    t.add_argument("--resume-from", default=None, help="checkpoint folder (output/checkpoint-N) to resume from")
    t.add_argument("--max-length", type=max_length_arg, default=128,
                   help="tokens per training example; longer ones lose prompt tokens from the left")
    t.add_argument("--train-examples", type=positive_int, default=None,
                   help=f"examples per built-in task (default {TASK_TRAIN_EXAMPLES}); for a file, use only its first N "
                        "lines (default: all)")
    t.add_argument("--eval-examples", type=positive_int, default=None,
                   help=f"test examples per built-in task (default {TASK_EVAL_EXAMPLES}); for --eval-data FILE, only "
                        "its first N lines (default: all)")
    t.add_argument("--eval-batch-size", type=positive_int, default=64, help="rows per evaluation batch")
    t.add_argument("--seed", type=seed_arg, default=0, help="seed of the adapter init, data order and built-in tasks")
    t.add_argument("--mode-token", default=None, metavar="TOKEN",
                   help="UL2 mode switching: prepend this mode token ([R], [S] or [X] of a base pretrained with "
                        "--objective ul2) to every prompt, in training and evaluation (default: none)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.field_flags.update({"AlignConfig.steps": "--loram-align-steps", "AlignConfig.lr": "--loram-align-lr",
                          "LoramConfig.ratio": "--loram-ratio", "LoramConfig.criterion": "--loram-criterion"})
    from .training.config import DISTRIBUTED_MODES
    t.add_argument("--distributed", default="ddp", choices=DISTRIBUTED_MODES,
                   help="under torchrun / accelerate launch: DDP over the adapter, or FSDP2 sharding the frozen base "
                        "(--batch-size is per process; see docs/distributed.md)")
    _add_init_options(t)
    add_config_options(t, get_method(method_name).config_cls)
    _add_procedure_options(t, procedure_name, method_name)
    t.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="exact-match evaluation on built-in task(s) or a JSONL file", formatter_class=_Formatter)
    _common_model(e, ADAPTER_BASE_DEFAULT)
    _add_quantize(e, "evaluate on it (use the settings the adapter was trained with)")
    e.add_argument("--adapter", default=None, help="adapter folder (lorakit or PEFT; a training run folder evaluates its "
                   "adapter/); default: the base model alone")
    e.add_argument("--data", required=True,
                   help="built-in task name(s), comma-separated, or a JSONL file (every line is scored)")
    e.add_argument("--eval-examples", type=positive_int, default=None,
                   help=f"test examples per built-in task (default {TASK_EVAL_EXAMPLES}); for a file, only its first "
                        "N lines (default: all)")
    e.add_argument("--eval-batch-size", type=positive_int, default=64, help="rows per evaluation batch")
    e.add_argument("--seed", type=seed_arg, default=0, help="seed of the built-in tasks' test examples")
    e.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    e.add_argument("--mode-token", default=None, metavar="TOKEN",
                   help="UL2 mode token prepended to every prompt (use the one the adapter was trained with)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--rank", type=positive_int, default=None,
                   help="rank of a nested-rank adapter (DyLoRA) to evaluate at")
    e.set_defaults(func=cmd_eval)


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="greedy generation for prompts (a classifier adapter: their labels)",
                       formatter_class=_Formatter)
    _common_model(g, ADAPTER_BASE_DEFAULT)
    _add_quantize(g, "generate with it")
    g.add_argument("--adapter", default=None, help="adapter folder (lorakit or PEFT; a training run folder uses its adapter/)")
    g.add_argument("--prompt", action="append",
                   help="a prompt (repeatable); default: stdin, one prompt per line or JSONL {\"prompt\", \"task\"}")
    g.add_argument("--task", default=None,
                   help="task key for adapters that route by task (routed_lora): one the adapter was trained on")
    g.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated per prompt (greedy)")
    g.add_argument("--rank", type=positive_int, default=None,
                   help="rank of a nested-rank adapter (DyLoRA) to generate with")
    g.set_defaults(func=cmd_generate)


def _add_methods(sub) -> None:
    m = sub.add_parser("methods", help="list registered methods")
    m.add_argument("-v", "--verbose", action="store_true")
    m.add_argument("--markdown", action="store_true", help="a markdown table (used for the README)")
    m.set_defaults(func=cmd_methods)


def _add_tasks(sub) -> None:
    ts = sub.add_parser("tasks", help="list built-in tasks, or write one as JSONL", formatter_class=_Formatter)
    ts.add_argument("--jsonl", metavar="TASK", default=None, help="print TASK's examples as JSONL prompt/completion lines")
    ts.add_argument("--split", default="train", choices=["train", "test"], help="with --jsonl: which split")
    ts.add_argument("-n", type=int, default=1000, help="with --jsonl: how many examples")
    ts.add_argument("--seed", type=seed_arg, default=0, help="with --jsonl: seed")
    ts.set_defaults(func=cmd_tasks)


def _add_inspect(sub) -> None:
    i = sub.add_parser("inspect", help="describe and validate an adapter folder")
    i.add_argument("adapter", help="adapter folder; a training run folder (train --output) shows its adapter/")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.set_defaults(func=cmd_inspect)


def _add_merge(sub) -> None:
    mg = sub.add_parser("merge", help="merge an adapter into its base and write a full HF model", formatter_class=_Formatter)
    _common_model(mg, ADAPTER_BASE_DEFAULT)
    mg.add_argument("--adapter", required=True, help="adapter folder; a training run folder (train --output) merges "
                    "its adapter/")
    mg.add_argument("--output", required=True, help="folder for the merged model")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    _add_quantize(mg, "merge into the dequantized 4-bit weights (for an adapter trained with train --quantize); "
                      "the merged model is saved in full precision")
    mg.set_defaults(func=cmd_merge)


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="write an adapter as a plain PEFT LoRA", formatter_class=_Formatter)
    _common_model(x, ADAPTER_BASE_DEFAULT)
    x.add_argument("adapter", help="adapter folder; a training run folder (train --output) exports its adapter/")
    x.add_argument("--output", required=True, help="folder for the PEFT LoRA")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    x.add_argument("--rank", type=positive_int, default=None, help="export a nested-rank adapter (DyLoRA) at this rank")
    x.set_defaults(func=cmd_export)


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible server: the base model and many adapters in one batch",
                        formatter_class=_Formatter)
    _common_model(sv, "the adapters' base, else the bundled model")
    sv.add_argument("--adapters", action="append", default=[],
                    help="folder holding adapter folders (repeatable); served by folder name, and the only roots "
                         "/v1/load_lora_adapter may load from. A name belongs to the first root that has it: a later "
                         "root's folder of that name is skipped with a warning, even when the first one is broken")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or env LORAKIT_API_KEY)")
    sv.add_argument("--max-loras", type=positive_int, default=64, help="adapters resident in the banks at most")
    sv.add_argument("--max-cpu-loras", type=positive_int, default=256, help="adapters in the host-memory cache at most")
    sv.add_argument("--kv-cache-mb", type=positive_int, default=256, help="KV cache budget, preallocated (every byte of the cache, its blocks and one scratch token slot, "
                         "within it; /metrics reports the bytes allocated)")
    sv.add_argument("--max-batch", type=positive_int, default=32, help="running requests at most")
    sv.add_argument("--max-tokens-limit", type=positive_int, default=1024, help="largest max_tokens a request may ask")
    sv.add_argument("--max-n", type=positive_int, default=128,
                    help="most choices (n) a request may ask (default 128, OpenAI's bound); n beyond --max-batch runs "
                         "in waves as rows free up")
    sv.add_argument("--adapter-queue-timeout", type=float, default=120.0, metavar="SECONDS",
                    help="seconds a /v1/load_lora_adapter or unload request waits for the busy engine to start it; "
                         "one not started by then is cancelled (it never runs) and answered 503 with Retry-After; "
                         "one started is answered with its outcome")
    sv.field_flags.update({"ServerLimits.adapter_queue_timeout_s": "--adapter-queue-timeout"})
    sv.add_argument("--rank", type=positive_int, default=None,
                    help="serve nested-rank adapters (DyLoRA) at this rank (<= each one's r); others unaffected")
    sv.add_argument("--device", default="cpu", type=device_arg, help="where the model, adapter banks and KV cache live: cpu or cuda")
    sv.add_argument("--cuda-graphs", action="store_true",
                    help="decode steps of banked rows as static-shape steps, captured in CUDA graphs per batch and "
                         "context bucket (with --device cuda; on the CPU they run eagerly); bank storage is reserved "
                         "for --max-loras adapters up front; not with --quantize on cuda")
    _add_quantize(sv, "serve adapters trained on it (`lorakit train --quantize`)")
    sv.set_defaults(func=cmd_serve)


def _add_federate(sub) -> None:
    from .federated import FederatedConfig, list_strategies

    f = sub.add_parser("federate", help="federated LoRA on Flower's simulation engine (FedIT, FFA, FLoRA, LoRA-FAIR)",
                       formatter_class=_Formatter, description="Federated LoRA fine-tuning: N clients, R rounds, one "
                       "strategy, Flower's simulation engine. docs/federated.md runs the same apps on SuperLink/SuperNodes.")
    _common_model(f)
    f.add_argument("--strategy", default="fedit", choices=list_strategies(), help="server aggregation strategy")
    f.add_argument("--clients", type=int, default=4, help="number of clients (simulated SuperNodes)")
    f.add_argument("--rounds", type=int, default=3, help="server rounds")
    f.add_argument("--fraction", type=float, default=1.0, help="share of clients sampled per round")
    f.add_argument("--min-clients", type=int, default=1, help="sample at least this many clients per round")
    f.add_argument("--data", default="reverse,sort,upper,add",
                   help="built-in tasks, comma-separated, or a JSONL file (without --eval-data its last 1/10 is held "
                        "out for the server's evaluation)")
    f.add_argument("--eval-data", default=None,
                   help="the server's evaluation task(s) or JSONL file (default: the tasks' test split, or the "
                        "hold-out of --data)")
    f.add_argument("--train-examples", type=int, default=None,
                   help="training examples per built-in task (default 64), split over the clients; for a file, only its "
                        "first N lines (default: all)")
    f.add_argument("--eval-examples", type=int, default=None,
                   help="held-out examples per built-in task for the server's evaluation (default 32); for a file, only "
                        "the first N (default: all)")
    f.add_argument("--partition", default="task", choices=["iid", "task", "skew"],
                   help="non-IID split: whole tasks per client, or Dirichlet task skew")
    f.add_argument("--skew-alpha", type=float, default=0.5, help="Dirichlet concentration for --partition skew")
    f.add_argument("--target-modules", default="q_proj,v_proj", help="adapted modules: comma-separated names, one regex, or all-linear")
    f.add_argument("--r", type=int, default=4, help="LoRA rank of every client")
    f.add_argument("--client-ranks", default=None, help="per-client ranks, comma-separated, cycled (flora stacks them, fedit zero-pads)")
    f.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank, scaling 2)")
    f.add_argument("--local-steps", type=int, default=10, help="optimizer steps per client per round")
    f.add_argument("--batch-size", type=int, default=8, help="examples per local step")
    f.add_argument("--lr", type=float, default=3e-3, help="client learning rate (AdamW)")
    f.add_argument("--max-length", type=max_length_arg, default=FederatedConfig.max_length, help="tokens per training example")
    f.add_argument("--fair-lambda", type=float, default=FederatedConfig.fair_lambda, help="lora_fair: weight λ of the server's ‖ΔB‖² penalty")
    f.add_argument("--fair-lr", type=float, default=FederatedConfig.fair_lr, help="lora_fair: the server's SGD learning rate for ΔB")
    f.add_argument("--fair-steps", type=int, default=FederatedConfig.fair_steps, help="lora_fair: the server's SGD steps for ΔB at most")
    f.add_argument("--no-evaluate", action="store_true", help="skip the server's evaluation of the global model")
    f.add_argument("--dp-noise-multiplier", type=float, default=0.0, help="DP-SGD noise multiplier (0: no DP)")
    f.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="DP-SGD per-example clipping norm")
    f.add_argument("--dp-delta", type=float, default=1e-5, help="delta at which epsilon is reported")
    f.add_argument("--stragglers", default=None, help="client ids that reply late, comma-separated")
    f.add_argument("--straggler-delay", type=float, default=0.0, help="seconds a straggler sleeps before replying")
    f.add_argument("--round-timeout", type=float, default=600.0, help="seconds the server waits for replies per round (the first round includes the clients' start-up)")
    f.add_argument("--device", default="cpu", type=device_arg, help="where clients train: cpu or cuda")
    f.add_argument("--backend-cpus", type=positive_int, default=None, help="clients training at once (default: half the CPUs)")
    f.add_argument("--seed", type=seed_arg, default=0, help="seed of data, splits, sampling and adapter inits")
    f.add_argument("--output", default=None, help="folder for federated.json, the global adapter/ and the per-round "
                   "checkpoint/ (default: runs/federated, or with --resume-from the run it continues)")
    f.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in --output")
    f.add_argument("--resume-from", default=None, help="an interrupted run's --output (or its checkpoint/): continue "
                   "after its last completed round, with the same settings (--rounds may grow)")
    f.add_argument("--quiet", action="store_true", help="less Flower logging")
    f.field_flags.update({"FederatedConfig.straggler_delay_s": "--straggler-delay",
                          "FederatedConfig.round_timeout_s": "--round-timeout"})
    f.set_defaults(func=cmd_federate)


def build_parser(method_name: str = DEFAULT_METHOD, procedure_name: str | None = None) -> argparse.ArgumentParser:
    parser = CommandParser(prog="lorakit", description="Low-rank adaptation toolkit (PEFT-compatible).")
    from ._version import __version__
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub, method_name, procedure_name)
    _add_eval(sub)
    _add_generate(sub)
    _add_methods(sub)
    _add_tasks(sub)
    _add_inspect(sub)
    _add_merge(sub)
    _add_export(sub)
    sub.add_parser("merge-adapters", help="merge several LoRA adapters into one (see lorakit merge-adapters --help)",
                   add_help=False)
    _add_serve(sub)
    sub.add_parser("quantize", help="post-training weight quantization, RTN or CBQ (see lorakit quantize --help)",
                   add_help=False)
    sub.add_parser("generate-adapter", help="ICM-LoRA: generate a LoRA for a task, or `generate-adapter train` a "
                   "generator (see lorakit generate-adapter --help)", add_help=False)
    _add_federate(sub)
    sub.add_parser("transfer", help="Trans-LoRA: move an adapter to another base model without its training data "
                   "(see lorakit transfer --help)", add_help=False)
    from .bench.cli import BENCHMARKS
    sub.add_parser("bench", help=f"benchmarks: `lorakit bench {'|'.join(BENCHMARKS)} [--quick]` (see lorakit bench "
                   "--help)", add_help=False)
    sub.add_parser("diffusion", help="small diffusion model on the bundled digits: train-base, train-loras, "
                   "train-classifier, bench (see lorakit diffusion --help; extra 'diffusion')", add_help=False)
    sub.add_parser("compose-image", help="compose LoRAs while sampling images: merge, switch, composite, cmlora, "
                   "composer (see lorakit compose-image --help)", add_help=False)
    pb = sub.add_parser("pretrain-base", help="rebuild the bundled base model (options: lorakit pretrain-base --help)",
                        add_help=False)
    pb.set_defaults(func=None)
    sub.add_parser("regmix", help="RegMix: proxy models on random domain mixtures -> the predicted best mixture "
                   "(see lorakit regmix --help)", add_help=False)
    sub.add_parser("infer-mixture", help="infer a BPE tokenizer's training-data mixture from its merges "
                   "(see lorakit infer-mixture --help)", add_help=False)
    return parser


def _method_from_argv(argv: Sequence[str], option: str = "--method", default: str | None = DEFAULT_METHOD) -> str | None:
    for i, a in enumerate(argv):
        if a == option and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return default


def _rank_zero() -> bool:
    """Whether this process is rank 0 of a torchrun / accelerate launch (True without one, or with a broken one)."""
    from .training.distributed import is_main_process

    try:
        return is_main_process()
    except LorakitError:  # RANK / WORLD_SIZE unreadable: better every process speaks than none
        return True


class ErrorsReported:
    """Around a command's work (``with ErrorsReported(parser) as run: run.status = work()``, then ``run.status``):
    the errors it raises become the exit status, as every ``lorakit`` command reports them.

    - lorakit's own errors (LorakitError and subclasses, and ``also``): ``<prog>: error: <message>`` on stderr,
      config fields written as ``command``'s flags (``CommandParser.fail``), status 2; an AdapterSaveError
      (the work was done, the adapter could not be written where asked) status 1;
    - Ctrl-C: status 130 (TrainingInterrupted says where its checkpoint is, and ``resume(checkpoint)`` the command
      that resumes it when given); under a distributed launcher only rank 0 prints it, as it alone prints an error
      of a write it made for every process (the others' RankZeroFailed: status 2, nothing printed);
    - any other exception propagates (a bug shows its traceback).

    ``command`` may be replaced inside the block (the chosen subcommand's parser, once the arguments are parsed).
    """

    def __init__(self, command: CommandParser, also: tuple[type[Exception], ...] = (),
                 resume: Callable[[str], str] | None = None) -> None:
        self.command, self.also, self.resume = command, also, resume
        self.status: int = 0

    def __enter__(self) -> "ErrorsReported":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        from .training import AdapterSaveError, TrainingInterrupted
        from .training.distributed import RankZeroFailed

        # Ctrl-C under torchrun reaches every process: rank 0 alone says so (its checkpoint is the run's)
        if isinstance(error, TrainingInterrupted):
            hint = f"\nresume with:\n  {self.resume(error.checkpoint)}" if self.resume else ""
            if _rank_zero():
                print(f"\n{self.command.prog}: {error}{hint}", file=sys.stderr)
            self.status = 130
        elif isinstance(error, KeyboardInterrupt):
            if _rank_zero():
                print(f"\n{self.command.prog}: interrupted", file=sys.stderr)
            self.status = 130
        elif isinstance(error, RankZeroFailed):  # rank 0 says what failed; the others stop quietly
            self.status = 2
        elif isinstance(error, AdapterSaveError):
            self.status = self.command.fail(error, status=1)
        elif isinstance(error, (LorakitError, *self.also)):
            self.status = self.command.fail(error)
        else:
            return False
        return True


def _run(argv: list[str]) -> int:
    # whose errors these are: train's for its --method / --procedure read before the parser is built (it depends on
    # them), then the chosen subcommand's parser
    with ErrorsReported(CommandParser(prog="lorakit train" if argv[:1] == ["train"] else "lorakit"),
                        also=(ValueError, FileNotFoundError), resume=lambda ckpt: _resume_command(argv, ckpt)) as run:
        from . import get_method
        # --method / --procedure are train's (its flags depend on them); another command given them says it has no
        # such flag (was: `lorakit federate --method dora` answered "unknown method 'dora'" with train's method list)
        training = argv[:1] == ["train"]
        method_name = _method_from_argv(argv) if training else DEFAULT_METHOD
        get_method(method_name)  # a clear error for an unknown --method before argparse's generic one
        procedure_name = _method_from_argv(argv, "--procedure", None) if training else None
        if procedure_name is not None:
            from .training.procedures import get_procedure
            get_procedure(procedure_name)  # a clear error (with near matches) for an unknown --procedure
        parser = build_parser(method_name, procedure_name)
        args = parser.parse_args(argv)
        run.command = parser.chosen(args)
        _set_threads(args)
        run.status = args.func(args)
    return run.status


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m lorakit -- train --r 16`: the launcher's "--" ends its own options
        argv = argv[1:]
    if argv[:1] == ["pretrain-base"]:
        return cmd_pretrain_base(argparse.Namespace(), argv[1:])
    if argv[:1] == ["regmix"]:
        from .pretrain.regmix import main as regmix_main
        return regmix_main(argv[1:])
    if argv[:1] == ["infer-mixture"]:
        from .pretrain.mixture_inference import main as infer_main
        return infer_main(argv[1:])
    if argv[:1] == ["merge-adapters"]:
        return cmd_merge_adapters(argv[1:])
    if argv[:1] == ["generate-adapter"]:
        return cmd_generate_adapter(argv[1:])
    if argv[:1] == ["quantize"]:
        return cmd_quantize(argv[1:])
    if argv[:1] == ["diffusion"]:
        from .diffusion.cli import main as diffusion_main
        return diffusion_main(argv[1:])
    if argv[:1] == ["compose-image"]:
        from .diffusion.cli import compose_main
        return compose_main(argv[1:])
    if argv[:1] == ["transfer"]:
        return cmd_transfer(argv[1:])
    if argv[:1] == ["bench"]:
        from .bench.cli import main as bench_main
        return bench_main(argv[1:])
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        # The reader went away (`lorakit inspect ... | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
