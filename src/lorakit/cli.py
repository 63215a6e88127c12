"""``lorakit`` command line: train, eval, generate, methods, tasks, inspect, merge, export, pretrain-base.

Method options are generated from the chosen method's config dataclass, so every registered method gets
its flags (``lorakit train --method NAME --help`` lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from .core.errors import LorakitError

DEFAULT_METHOD = "lora"
_NOT_ON_CLI = {"inference_mode", "base_model_name_or_path"}


# -- method options from config dataclasses --------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
    group = parser.add_argument_group(f"{config_cls.method} options (from {config_cls.__name__})")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in _NOT_ON_CLI:
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if f.name == "target_modules" and not config_cls.has_own_targets():
            default = "all-linear (the library default None = per-architecture defaults)"
        args = typing.get_args(hint)
        if hint is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default: {default})")
        elif hint in (int, float, str):
            group.add_argument(_flag(f.name), type=hint, default=None, help=f"(default: {default})")
        elif typing.get_origin(hint) is dict or any(typing.get_origin(a) is dict for a in args):
            group.add_argument(_flag(f.name), type=json.loads, default=None, metavar="JSON",
                               help=f"a JSON object (default: {default!r})")
        elif any(typing.get_origin(a) is list for a in args) or typing.get_origin(hint) is list:
            regex = str in args
            group.add_argument(_flag(f.name), nargs="+", default=None, metavar="X",
                               help=("module names, or one regex / 'all-linear'" if regex else "one or more values")
                               + f" (default: {default})")
        else:  # unions like bool | str, int | None
            group.add_argument(_flag(f.name), type=_scalar, default=None, help=f"(default: {default!r})")


def _scalar(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def config_from_args(config_cls: type, args: argparse.Namespace, **overrides: Any):
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if isinstance(value, list) and len(value) == 1 and str in typing.get_args(hints[f.name]):
            value = value[0]  # a single regex / "all-linear"
        elif isinstance(value, list) and int in [typing.get_args(a)[0] for a in typing.get_args(hints[f.name]) if typing.get_args(a)]:
            value = [int(v) for v in value]
        kwargs[f.name] = value
    for k, v in overrides.items():
        kwargs.setdefault(k, v)
    return config_cls(**kwargs)


# -- commands ---------------------------------------------------------------------------------------------
def _print_metrics(label: str, metrics: dict) -> None:
    per = ", ".join(f"{k} {v['exact_match']:.3f}" for k, v in sorted(metrics.get("per_task", {}).items()))
    print(f"{label}: exact match {metrics['exact_match']:.3f} on {metrics['n']} examples" + (f" ({per})" if per else ""))


def _eval_examples(args, tokenizer):
    from .data import load_examples

    if getattr(args, "eval_data", None):
        return load_examples(args.eval_data, "test", n=args.eval_examples, seed=args.seed, tokenizer=tokenizer)
    if str(args.data).endswith(".jsonl") or Path(str(args.data)).is_file():
        return None  # the caller holds out part of the file
    return load_examples(args.data, "test", n=args.eval_examples, seed=args.seed, tokenizer=tokenizer)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from . import get_method, print_trainable_parameters
    from .data import build_task_index, evaluate_examples, load_examples
    from .hub import load_model_and_tokenizer
    from .training import TrainConfig, train

    torch.manual_seed(args.seed)
    method = get_method(args.method)
    if args.init is not None:
        from .core.inits import get_init
        get_init(args.init)  # an unknown name fails now (with near matches), not after loading the model
    # "all-linear" unless the method has its own default targets (MixLoRA / MoLE: attention + the FFN blocks).
    targets = {} if method.config_cls.has_own_targets() else {"target_modules": "all-linear"}
    adapter_config = config_from_args(method.config_cls, args, **targets)
    model, tokenizer = load_model_and_tokenizer(args.model)
    train_examples = load_examples(args.data, "train", n=args.train_examples, seed=args.seed, tokenizer=tokenizer)
    eval_examples = _eval_examples(args, tokenizer)
    if eval_examples is None:  # a single JSONL file: hold out a deterministic tail for evaluation
        cut = max(1, len(train_examples) // 10)
        train_examples, eval_examples = train_examples[:-cut], train_examples[-cut:]
    print(f"model: {args.model or 'bundled'} | method: {method.name} | data: {args.data} "
          f"({len(train_examples)} train / {len(eval_examples)} eval examples)")
    before = evaluate_examples(model, tokenizer, eval_examples, batch_size=args.eval_batch_size)
    _print_metrics("before", before)

    _add_with_init(model, adapter_config, args)
    print_trainable_parameters(model)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps or 0,
        warmup_ratio=0.0 if args.warmup_steps else args.warmup_ratio, lr_schedule=args.lr_schedule,
        max_grad_norm=args.max_grad_norm, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
        max_length=args.max_length, output_dir=args.output, resume_from=args.resume_from,
        init_batches=args.init_batches, **_procedure_settings(args),
    )
    result = train(model, tokenizer, train_examples, config, adapter_name=args.adapter_name,
                   eval_examples=eval_examples, progress=not args.quiet)
    # Keyed methods see the task ids of the training data's task index, as in training.
    after = evaluate_examples(model, tokenizer, eval_examples, batch_size=args.eval_batch_size,
                              task_to_id=build_task_index(train_examples) or None)
    _print_metrics("after ", after)
    adapter_dir = Path(args.output) / "adapter"
    _resave_for_original_base(model, args.adapter_name, adapter_dir)
    summary = {"method": method.name, "data": args.data, "model": args.model or "bundled", "before": before,
               "after": after, "adapter_dir": str(adapter_dir), "wall_time_s": result.wall_time_s,
               "peak_memory_mb": result.peak_memory_mb, "steps": args.steps}
    from .mixtures import router_summary
    routed = router_summary(result.router_stats)  # the training forwards only
    if routed is not None:
        summary["router"] = routed
        print(f"router over {routed['layers']} layers: expert load {routed['min_load_fraction']:.2f}–"
              f"{routed['max_load_fraction']:.2f} (uniform {routed['uniform_fraction']:.2f}), mean entropy "
              f"{routed['entropy']:.2f} nats")
    from .io.files import atomic_write_json
    atomic_write_json(Path(args.output) / "summary.json", summary)
    print(f"exact match {before['exact_match']:.3f} -> {after['exact_match']:.3f} | "
          f"{result.wall_time_s:.0f}s | peak memory {result.peak_memory_mb:.0f} MB")
    print(f"adapter saved to {adapter_dir} (PEFT format)")
    return 0


def _add_init_options(parser: argparse.ArgumentParser) -> None:
    from .core.inits import list_inits

    g = parser.add_argument_group("initialisation (lorakit.list_inits())")
    g.add_argument("--init", default=None, metavar="NAME",
                   help="a registered init run on the adapter before training: " + ", ".join(
                       i.name + ("*" if i.needs_data else "") for i in list_inits())
                   + " (* = data-driven: runs on the first --init-batches training batches)")
    g.add_argument("--init-options", type=json.loads, default={}, metavar="JSON",
                   help='the init\'s options as a JSON object, e.g. \'{"rho": 1.0}\' for eva')
    g.add_argument("--init-batches", type=int, default=4, help="batches a data-driven init gets (default: 4)")


def _add_with_init(model, adapter_config, args) -> None:
    from . import add_adapter
    from .core.inits import set_init_options

    if args.init is not None:
        set_init_options(model, args.adapter_name, **args.init_options)
    add_adapter(model, adapter_config, name=args.adapter_name, init=args.init)


def _resave_for_original_base(model, name: str, adapter_dir: Path) -> None:
    """An init that changed the base and cannot be redone on load (LoRA-GA, CorDA): write the adapter as the
    rank-2r LoRA for the original base (PEFT's conversion), so eval/generate/PEFT load it on the plain model."""
    from . import save_adapter
    from .core.inits import base_edits, requested_init

    init = requested_init(model, name)
    if init is not None and base_edits(model, name) and not init.rerun_on_load:
        save_adapter(model, adapter_dir, name, original_base=True)
        print(f"init {init.name!r} changed the base: the saved adapter is the rank-2r LoRA for the original base")


def _load_with_adapter(args):
    from . import load_adapter
    from .hub import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    if getattr(args, "adapter", None):
        load_adapter(model, args.adapter, config_overrides=_overrides(args))
    elif getattr(args, "rank", None) is not None:
        raise LorakitError("--rank needs --adapter (it picks the rank of a nested-rank adapter such as DyLoRA)")
    return model, tokenizer


def _overrides(args) -> dict | None:
    """``--rank b``: evaluate / generate / export a nested-rank adapter (DyLoRA) at rank b."""
    return {"rank": args.rank} if getattr(args, "rank", None) is not None else None


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import build_task_index, evaluate_examples, load_examples

    model, tokenizer = _load_with_adapter(args)
    examples = load_examples(args.data, "test", n=args.eval_examples, seed=args.seed, tokenizer=tokenizer)
    # Task ids for keyed methods: positions among the sorted task names, as training numbered them (the same
    # when the evaluation data has the training data's tasks).
    metrics = evaluate_examples(model, tokenizer, examples, batch_size=args.eval_batch_size,
                                task_to_id=build_task_index(examples) or None)
    _print_metrics("eval", metrics)
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .data import generate_completions

    model, tokenizer = _load_with_adapter(args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise LorakitError("no prompt: pass --prompt TEXT (repeatable) or pipe prompts on stdin, one per line")
    for p, c in zip(prompts, generate_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)):
        print(f"{p}{c}")
    return 0


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
    from .data import TASKS

    width = max(map(len, TASKS))
    for name, task in TASKS.items():
        ex = task.generate("train", 1, 0)[0]
        print(f"{name:<{width}}  {task.description:<48}  e.g. {ex.prompt!r} -> {ex.completion!r}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .io.files import load_tensors
    from .io.peft_format import WEIGHTS_NAME, read_adapter_config, weights_path

    directory = Path(args.adapter)
    config = read_adapter_config(directory)
    tensors = load_tensors(weights_path(directory))
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in tensors})
    n_params = sum(t.numel() for t in tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    print(f"adapter:   {directory}")
    print(f"method:    {type(config).method}")
    print(f"tensors:   {len(tensors)} ({n_params:,} parameters, {', '.join(dtypes)}), "
          f"{(directory / WEIGHTS_NAME).stat().st_size / 1e6:.2f} MB")
    print(f"modules:   {len(modules)}" + (f" e.g. {modules[0]}" if modules else ""))
    print("config:")
    for k, v in config.to_dict().items():
        if v not in (None, [], {}, False) or k in ("r", "lora_alpha"):
            print(f"  {k}: {v}")
    if args.tensors:
        for k, t in tensors.items():
            print(f"  {k} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from . import merge_and_unload

    model, tokenizer = _load_with_adapter(args)
    merged = merge_and_unload(model)
    out = Path(args.output)
    tmp = out.with_name(out.name + ".tmp-merge")
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        raise LorakitError(f"{out} already exists; choose a new --output (the merged model is in {tmp})")
    tmp.rename(out)
    print(f"merged model written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a plain PEFT LoRA for an adapter: identity for lora, the method's to_lora hook otherwise."""
    from . import get_method, load_adapter, save_adapter
    from .hub import load_model_and_tokenizer
    from .io.peft_format import read_adapter_config

    config = read_adapter_config(args.adapter)
    method = get_method(config)
    model, _ = load_model_and_tokenizer(args.model)
    load_adapter(model, args.adapter, config_overrides=_overrides(args))
    if method.peft_type is not None:
        save_adapter(model, args.output)
    elif method.to_lora is not None:
        from .methods._plain import save_plain_lora
        save_plain_lora(model, "default", args.output)
    else:
        raise LorakitError(f"method {method.name!r} has no exact plain-LoRA form; nothing to export")
    print(f"exported PEFT LoRA adapter to {args.output}")
    return 0


def cmd_pretrain_base(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .pretrain.train import main as pretrain_main

    return pretrain_main(list(rest))


# -- parser -----------------------------------------------------------------------------------------------
def _common_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model folder or cached hub id (default: the bundled model)")


# -- training procedures: --procedure NAME and that procedure's options -----------------------------------
def _add_procedure_options(parser: argparse.ArgumentParser, procedure_name: str | None) -> None:
    from .training.procedures import get_procedure, list_procedures

    parser.add_argument("--procedure", default=None, choices=[p.name for p in list_procedures()],
                        help="training procedure (optimizer, parameter groups, per-step hooks); "
                             "`lorakit train --procedure NAME --help` lists its options (default: plain AdamW)")
    if procedure_name is not None:
        _add_config_options(parser, get_procedure(procedure_name).config_cls)


def _procedure_settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.procedure is None:
        return {}
    from .training.procedures import get_procedure

    fields = dataclasses.fields(get_procedure(args.procedure).config_cls)
    return {"procedure": args.procedure, "procedure_args": {f.name: getattr(args, f.name) for f in fields
                                                            if getattr(args, f.name, None) is not None}}


def build_parser(method_name: str = DEFAULT_METHOD, procedure_name: str | None = None) -> argparse.ArgumentParser:
    from . import get_method, list_methods

    parser = argparse.ArgumentParser(prog="lorakit", description="Low-rank adaptation toolkit (PEFT-compatible).")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an adapter on built-in task(s) or a JSONL file",
                       description="Train an adapter. `lorakit train --method NAME --help` lists NAME's options.")
    _common_model(t)
    t.add_argument("--data", default="reverse",
                   help="built-in task name(s), comma-separated (see `lorakit tasks`), or a .jsonl file")
    t.add_argument("--eval-data", default=None, help="evaluation task(s)/JSONL (default: the tasks' test split)")
    t.add_argument("--method", default=method_name, choices=[m.name for m in list_methods()])
    t.add_argument("--output", default="runs/lorakit", help="output folder (adapter/, checkpoints, summary.json)")
    t.add_argument("--adapter-name", default="default")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: --warmup-ratio)")
    t.add_argument("--warmup-ratio", type=float, default=0.05, help="warmup as a fraction of --steps")
    t.add_argument("--lr-schedule", default="cosine", choices=["constant", "linear", "cosine"])
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    t.add_argument("--resume-from", default=None, help="checkpoint folder to resume from")
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--train-examples", type=int, default=2000, help="examples per built-in task (JSONL: line cap)")
    t.add_argument("--eval-examples", type=int, default=100, help="test examples per built-in task")
    t.add_argument("--eval-batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_init_options(t)
    _add_config_options(t, get_method(method_name).config_cls)
    _add_procedure_options(t, procedure_name)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="exact-match evaluation on built-in task(s) or a JSONL file")
    _common_model(e)
    e.add_argument("--adapter", default=None, help="adapter folder (lorakit or PEFT)")
    e.add_argument("--data", required=True)
    e.add_argument("--eval-examples", type=int, default=100)
    e.add_argument("--eval-batch-size", type=int, default=64)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    e.add_argument("--rank", type=int, default=None, help="rank of a nested-rank adapter (DyLoRA) to evaluate at")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="greedy generation for prompts")
    _common_model(g)
    g.add_argument("--adapter", default=None)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); default: read stdin lines")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--rank", type=int, default=None, help="rank of a nested-rank adapter (DyLoRA) to generate with")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("methods", help="list registered methods")
    m.add_argument("-v", "--verbose", action="store_true")
    m.add_argument("--markdown", action="store_true", help="a markdown table (used for the README)")
    m.set_defaults(func=cmd_methods)

    ts = sub.add_parser("tasks", help="list built-in tasks")
    ts.set_defaults(func=cmd_tasks)

    i = sub.add_parser("inspect", help="describe and validate an adapter folder")
    i.add_argument("adapter")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.set_defaults(func=cmd_inspect)

    mg = sub.add_parser("merge", help="merge an adapter into its base and write a full HF model")
    _common_model(mg)
    mg.add_argument("--adapter", required=True)
    mg.add_argument("--output", required=True)
    mg.set_defaults(func=cmd_merge)

    x = sub.add_parser("export", help="write an adapter as a plain PEFT LoRA")
    _common_model(x)
    x.add_argument("adapter")
    x.add_argument("--output", required=True)
    x.add_argument("--rank", type=int, default=None, help="export a nested-rank adapter (DyLoRA) at this rank")
    x.set_defaults(func=cmd_export)

    sub.add_parser("bench", help="benchmarks: `lorakit bench methods|perf [--quick]` (see lorakit bench --help)",
                   add_help=False)
    pb = sub.add_parser("pretrain-base", help="rebuild the bundled base model (options: lorakit pretrain-base --help)",
                        add_help=False)
    pb.set_defaults(func=None)
    return parser


def _method_from_argv(argv: Sequence[str], option: str = "--method", default: str | None = DEFAULT_METHOD) -> str | None:
    for i, a in enumerate(argv):
        if a == option and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return default


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pretrain-base"]:
        return cmd_pretrain_base(argparse.Namespace(), argv[1:])
    if argv[:1] == ["bench"]:
        from .bench.cli import main as bench_main
        return bench_main(argv[1:])
    try:
        from . import get_method
        method_name = _method_from_argv(argv)
        get_method(method_name)  # a clear error for an unknown --method before argparse's generic one
        procedure_name = _method_from_argv(argv, "--procedure", None)
        if procedure_name is not None:
            from .training.procedures import get_procedure
            get_procedure(procedure_name)  # a clear error (with near matches) for an unknown --procedure
        args = build_parser(method_name, procedure_name).parse_args(argv)
        return args.func(args)
    except LorakitError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
