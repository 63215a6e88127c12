"""``lorakit bench methods|perf|tasks|mixtures|merge|serve|variants|reparam|init|quantize|gamma_mod|smaller|federated [--quick] [--output DIR]``: writes results.json, results.md and plots."""

from __future__ import annotations

import json
import sys
import time
from importlib import import_module
from pathlib import Path
from typing import Callable, Sequence

from ..cli_parser import CommaList, CommandParser, DefaultsFormatter, device_arg, positive_int, seed_arg
from ..core.errors import ConfigError, LorakitError, check_names, comma_items
from ..io.files import atomic_write_bytes, atomic_write_json


def _write(out: Path, name: str, result: dict, markdown: str, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["command"] = command
    atomic_write_json(out / f"{name}.json", result)
    header = f"# lorakit bench {name}\n\nCommand: `{command}`\n\nMachine: {json.dumps(result.get('machine', {}))}\n\n"
    atomic_write_bytes(out / f"{name}.md", (header + markdown).encode())


def _perf_rows() -> tuple[str, ...]:
    from . import conv_perf, distributed_perf, longlora, mixlora_perf, perf, procedures, serving, smaller  # noqa: F401  (rows register in perf.EXTRA_ROWS)
    return perf.row_names()


def _names(module: str, attribute: str) -> Callable[[], Sequence[str]]:
    return lambda: getattr(import_module(f".{module}", __package__), attribute)


# What ``--only`` picks in each bench that takes it, and the function giving its names (a bench's module is
# imported only when its --only is checked)
_ONLY: dict[str, tuple[str, Callable[[], Sequence[str]]]] = {
    "perf": ("bench perf row", _perf_rows), "init": ("bench init part", _names("inits", "PARTS")),
    "quantize": ("bench quantize part", _names("quantize", "PARTS")),
    "smaller": ("bench smaller variant", _names("smaller", "VARIANTS")),
    "gamma_mod": ("bench gamma_mod variant", _names("gamma_mod", "VARIANTS")),
}

BENCHMARKS = ("methods", "perf", "tasks", "mixtures", "merge", "serve", "variants", "reparam", "init", "quantize",
              "gamma_mod", "smaller", "federated")  # `lorakit bench WHAT`; `lorakit --help` lists them too


# Options only some benches read (dest -> the benches that read it); --device, --quick and --output, which every
# bench takes, are left out. A shared option a bench ignores is refused too (`bench perf --steps 0` used to run the
# whole perf bench).
_SERVE = {"serve"}
_ONE_SEED = {"quantize", "gamma_mod", "serve"}  # benches whose profile has one `seed`: --seeds takes one value
_ALL = set(BENCHMARKS)
_FLAG_SCOPE = {
    "steps": _ALL - {"perf", "serve"}, "seeds": _ALL - {"perf", "tasks"},
    "tasks": _ALL - {"perf", "serve", "quantize"}, "only": set(_ONLY),
    "methods": {"methods", "init", "federated", "variants", "reparam"},
    "combine": {"merge", "methods", "mixtures"}, "resume": {"variants", "init"}, "experiments": {"mixtures", "merge"},
    "repeats": {"init", "merge"}, "procedures": {"methods"}, "full_finetune": {"methods"},
    "first_variant_only": {"methods"}, "inits": {"methods"}, "step_time": {"variants", "reparam"}, "batch_size": {"reparam"},
    "rounds": {"federated"}, "clients": {"federated"}, "r": {"variants", "reparam", "gamma_mod"},
    "models": _SERVE, "num_adapters": _SERVE, "req_rate": _SERVE, "duration": _SERVE, "max_batch": _SERVE,
    "peft_max_n": _SERVE, "systems": _SERVE, "dtype": _SERVE,
}


def _read_results(files: Sequence[str | Path], flag: str) -> list[dict]:
    """Saved bench results (JSON objects) from ``files``; ConfigError naming ``flag`` and the file for a missing,
    unreadable or malformed one (nothing is written before they are all read)."""
    results = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"{flag}: no such result file: {path}")
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{flag}: {path} is not a readable JSON result ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("profile"), dict):
            raise ConfigError(f"{flag}: {path} is not a saved bench result (a JSON object with a 'profile')")
        results.append(obj)
    return results


def _combined(parser: argparse.ArgumentParser, combine, files: Sequence[str]) -> dict:
    """``combine(results, names=files)`` on the saved results in ``files``; a bad file or a refused combination
    exits with the error (prefixed ``--combine:``) before anything is written."""
    try:
        return combine(_read_results(files, "--combine"), names=list(files))
    except ConfigError as e:
        parser.error(str(e) if str(e).startswith("--combine") else f"--combine: {e}")


def _check_names(parser: CommandParser, flag: str, names: Sequence[str] | None, lookup) -> None:
    """Each of ``names`` through its registry's ``lookup`` (an error with near matches for a wrong one), as the
    usage error ``FLAG: <message>``."""
    for name in names or ():
        try:
            lookup(name)
        except (LorakitError, ValueError) as e:  # the registries' errors; a bench's own name check's ValueError
            parser.error(f"{flag}: {e}")


def _method_lookup(what: str):
    """The function that checks one ``--methods`` name of ``bench WHAT``: an init contender (``NAME[@LR]``) for
    init, a federated strategy for federated, a registered adapter method otherwise."""
    if what == "init":
        from .inits import parse_contender
        return lambda spec: parse_contender(spec, 1.0)
    if what == "federated":
        from ..federated import FederatedConfig
        return lambda name: FederatedConfig(strategy=name)
    from ..core.registry import get_method
    return get_method


def _override(profile, **values):
    """``profile`` with every given (non-None) command-line value; lists become tuples."""
    from dataclasses import replace

    given = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}
    return replace(profile, **given)


def main(argv: Sequence[str]) -> int:
    parser = CommandParser(prog="lorakit bench", field_flags={"duration_s": "--duration"},
                           formatter_class=DefaultsFormatter, description=(
        "Benchmarks: run one comparison (methods on the bundled tasks, performance ratios against PEFT, mixtures, "
        "merges, serving, ...) side by side in one run and write WHAT.json, WHAT.md and plots to --output. "
        "--quick runs a tiny smoke profile."))
    parser.add_argument("what", choices=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="tiny smoke profile (CI)")
    parser.add_argument("--output", default="runs/bench", help="folder for JSON, markdown and plots")
    parser.add_argument("--device", default=None, type=device_arg, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--only", action=CommaList, default=None,
                        help="perf rows to run (forward, mixed, ...); init: convergence and/or cost; quantize: cfp (CFP diagnosis); smaller: variants "
                             "(lora qlora loraprune loram loram_aligned); gamma_mod: lora gamma_mod gamma_mod_arank_mod gamma_mod_unmasked")
    parser.add_argument("--methods", action=CommaList, default=None,
                        help="methods to run (default: all registered); for init: the contenders; for federated: "
                             "strategies (space- or comma-separated, as every list flag here)")
    parser.add_argument("--seeds", action=CommaList, kind=seed_arg, default=None)
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="init: child processes per (init, library) for the cost comparison; merge: interleaved "
                             "timing repeats of the speed rows")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps (federated: local steps per round)")
    parser.add_argument("--rounds", type=int, default=None, help="federated: server rounds")
    parser.add_argument("--clients", type=int, default=None, help="federated: number of clients")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="reparam: examples per training step")
    parser.add_argument("--r", type=positive_int, default=None,
                        help="variants: the rank r (r_max for DyLoRA/SoRA); reparam: the LoRA reference rank")
    parser.add_argument("--step-time", action="store_true",
                        help="variants, reparam: only the interleaved training-step-time ratios (variants_step_time.*, "
                             "reparam_step_time_b<batch>.*)")
    parser.add_argument("--tasks", default=None, help="comma-separated built-in tasks (methods profile)")
    parser.add_argument("--resume", nargs="*", default=None, metavar="JSON",
                        help="variants: read back the seeds already in OUTPUT/variants.json and in these result files "
                             "(earlier runs with the same options, e.g. one seed each) and run only the missing seeds; "
                             "init (no files): keep the finished runs (same settings) of OUTPUT/init.json")
    parser.add_argument("--experiments", nargs="+", choices=["budget", "compose", "quality", "collapse", "speed"],
                        default=None, help="mixtures: budget/compose; merge: quality/collapse/speed (default: all)")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="merge, mixtures: pool saved results (e.g. one per seed; merge: and a speed-only run) into "
                             "one report instead of running; methods: pool saved tables (a later file's run of a "
                             "method and seed replaces an earlier one's, e.g. a re-run after a fix)")
    parser.add_argument("--procedures", action=CommaList, default=None,
                        help="methods: also train LoRA with these training procedures (rows lora+NAME)")
    parser.add_argument("--full-finetune", action="store_true", default=None,
                        help="methods: also a full fine-tuning row (every base weight, AdamW)")
    parser.add_argument("--inits", action=CommaList, default=None, metavar="INIT",
                        help="methods: also train rows METHOD+INIT with these initialisations (pissa, olora, corda, eva, "
                             "lora_ga, lora_ga_official, pissa_niter_4 on lora; lora_sb on lora_xs; nlora on slora)")
    parser.add_argument("--first-variant-only", action="store_true", help="methods: each method's default variant")
    serve = parser.add_argument_group("serve (S-LoRA workload; defaults: the full profile)")
    serve.add_argument("--models", action=CommaList, default=None, help="serve: bundled and/or random8x512")
    serve.add_argument("--num-adapters", action=CommaList, kind=int, default=None, help="serve: adapter counts N")
    serve.add_argument("--req-rate", type=float, default=None, help="serve: mean arrivals per second")
    serve.add_argument("--duration", type=float, default=None, help="serve: trace length in seconds")
    serve.add_argument("--max-batch", type=int, default=None, help="serve: running-batch cap (all systems)")
    serve.add_argument("--peft-max-n", type=int, default=None, help="serve: largest N the PEFT systems run")
    serve.add_argument("--systems", nargs="+", default=None,
                       choices=["lorakit", "merged", "peft_mixed", "peft_swap", "lorakit_graphs", "merged_graphs"],
                       help="serve: systems to run (*_graphs: the engine with --cuda-graphs' static decode step)")
    serve.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="serve: weights")
    serve.add_argument("--choices", type=int, default=None,
                       help="serve: choices per request (OpenAI's n); above 1 the systems default to lorakit (one "
                            "shared prefill per request) and lorakit_unshared (each choice prefills the prompt)")
    args = parser.parse_args(argv)
    for dest, benches in _FLAG_SCOPE.items():  # a flag another bench reads would be ignored here: refuse it
        value = getattr(args, dest)
        if value is not None and value is not False and args.what not in benches:  # 0 is a value (0 == False)
            flag = "--" + dest.replace("_", "-")
            parser.error(f"{flag} is an option of {' / '.join(f'`bench {b}`' for b in sorted(benches))} only "
                         f"(got `bench {args.what}`)")
    if args.what in _ONE_SEED and args.seeds and len(args.seeds) > 1:  # it would run the first one only
        parser.error(f"--seeds: bench {args.what} runs one seed, got {len(args.seeds)} "
                     f"({' '.join(map(str, args.seeds))}); run it once per seed")
    if args.combine:  # pooling runs nothing: an option of a run would be silently ignored
        ignored = ["--quick"] * args.quick + ["--" + d.replace("_", "-") for d in _FLAG_SCOPE
                                              if d != "combine" and getattr(args, d) not in (None, False)]
        if ignored:
            parser.error(f"--combine pools saved results and runs nothing, so {', '.join(ignored)} would be ignored; "
                         f"leave {'it' if len(ignored) == 1 else 'them'} out (to pool some methods or seeds only, "
                         "pass only the files that hold them)")
    if args.methods:  # what --methods names in this bench: wrong names fail now (near matches), before any model
        _check_names(parser, "--methods", args.methods, _method_lookup(args.what))
    if args.only:  # likewise --only (its bench takes it: checked above)
        what, names = _ONLY[args.what]
        choices = names()
        _check_names(parser, "--only", args.only, lambda name: check_names([name], choices, what))
    if args.tasks is not None:  # likewise --tasks: built-in task names, or a JSONL file (read: a bad line is named)
        from ..data import load_jsonl
        from ..data.tasks import get_task

        try:
            names = comma_items(args.tasks, "--tasks", "task names (see `lorakit tasks`)", required=True)
        except ConfigError as e:
            parser.error(str(e))
        args.tasks = ",".join(names)  # the benches split it again: "reverse, sort" as "reverse,sort"
        _check_names(parser, "--tasks", names, lambda t: load_jsonl(t) if Path(t).is_file() else get_task(t))
    if args.resume and args.what == "init":
        parser.error("bench init --resume takes no files: it keeps the finished runs of OUTPUT/init.json")
    from ..cli import ErrorsReported
    from ..cli_parser import check_output_dir
    from ..data import DataError

    try:  # now, not when the report is written after the run (most benches created --output only then); every
        # bench defaults to runs/bench, so another bench running there may have temp files in flight: leave them
        check_output_dir(args.output, "--output", overwrite=True, clean_leftovers=False)
    except LorakitError as e:
        parser.error(str(e))
    with ErrorsReported(parser, also=(DataError,)) as run:  # (a user's data file: named by file and line)  # a run's own error (a config's) reads as the command's, no traceback
        run.status = _run(parser, args, argv)
    return run.status


def _run(parser: CommandParser, args, argv: Sequence[str]) -> int:
    """Run the bench ``args.what`` with the checked options ``args``; write and print its report."""
    out = Path(args.output)
    command = "lorakit bench " + " ".join(argv)
    t0 = time.perf_counter()
    if args.what == "tasks":
        from . import methods
        profile = methods.TasksProfile(steps=3, train_examples=16, eval_examples=4, tasks=("reverse",)) if args.quick \
            else methods.TasksProfile()
        profile = _override(profile, tasks=tuple(args.tasks.split(",")) if args.tasks else None, steps=args.steps)
        result = methods.run_tasks(profile)
        markdown = methods.tasks_markdown(result)
    elif args.what == "mixtures":
        from . import mixtures
        if args.combine:
            result = _combined(parser, mixtures.combine_results, args.combine)
        else:
            profile = _override(mixtures.QUICK if args.quick else mixtures.FULL, seeds=args.seeds, steps=args.steps,
                                tasks=args.tasks, experiments=args.experiments)
            result = mixtures.run_mixtures(profile)
        markdown = mixtures.mixtures_markdown(result)
        out.mkdir(parents=True, exist_ok=True)
        result["plots"] = [str(mixtures.plot_mixtures(result, out))]
    elif args.what == "merge":
        from . import merge
        if args.combine:
            result = _combined(parser, merge.combine_results, args.combine)
        else:
            profile = _override(merge.QUICK if args.quick else merge.FULL, seeds=args.seeds, task_steps=args.steps,
                                tasks=args.tasks, experiments=args.experiments, speed_repeats=args.repeats)
            out.mkdir(parents=True, exist_ok=True)
            result = merge.run_merge(profile, partial=out / "merge.partial.json")
        out.mkdir(parents=True, exist_ok=True)
        markdown = merge.merge_markdown(result)
        result["plots"] = [str(p) for p in merge.plot_merge(result, out)]
    elif args.what == "serve":
        from . import serve as bench_serve
        profile = _override(bench_serve.QUICK if args.quick else bench_serve.FULL, device=args.device,
                            models=args.models, num_adapters=args.num_adapters, req_rate=args.req_rate,
                            duration_s=args.duration, max_batch=args.max_batch, peft_max_n=args.peft_max_n,
                            systems=args.systems if args.systems or (args.choices or 1) == 1 else
                            bench_serve.CHOICE_SYSTEMS, dtype=args.dtype, choices=args.choices,
                            seed=args.seeds[0] if args.seeds else None)
        out.mkdir(parents=True, exist_ok=True)
        result = bench_serve.run_serve_bench(profile, checkpoint=out / "serve.partial.json")
        markdown = bench_serve.serve_markdown(result)
        out.mkdir(parents=True, exist_ok=True)
        result["plots"] = [str(p) for p in bench_serve.plot_serve(result, out)]
    elif args.what == "init":
        from . import inits
        profile = _override(inits.QUICK if args.quick else inits.FULL, seeds=args.seeds, steps=args.steps,
                            tasks=args.tasks, contenders=args.methods, cost_repeats=args.repeats)
        out.mkdir(parents=True, exist_ok=True)

        def keep(partial: dict) -> None:  # a long run can be stopped and keeps its finished runs
            partial["plots"] = [str(inits.plot_inits(partial, out))]
            _write(out, "init", dict(partial), inits.inits_markdown(partial), command + " (partial)")

        parts = tuple(args.only) if args.only else inits.PARTS
        previous = None
        if args.resume is not None and (out / "init.json").exists():
            try:
                previous = _read_results([out / "init.json"], "--resume")[0]
            except ConfigError as e:
                parser.error(str(e))
        result = inits.run_inits(profile, device=args.device, progress=not args.quick, parts=parts, after_each=keep,
                                 previous=previous)
        markdown = inits.inits_markdown(result)
        result["plots"] = [str(inits.plot_inits(result, out))] if result["convergence"]["runs"] else []
    elif args.what == "federated":
        from . import federated
        profile = _override(federated.QUICK if args.quick else federated.FULL, seeds=args.seeds, local_steps=args.steps,
                            rounds=args.rounds, clients=args.clients, tasks=args.tasks,
                            strategies=args.methods)
        if args.methods:  # the DP and heterogeneous-rank rows only for the strategies asked for
            profile = _override(profile, dp_strategies=[s for s in profile.dp_strategies if s in args.methods],
                                hetero_strategies=[s for s in profile.hetero_strategies if s in args.methods])
        result = federated.run_federated_bench(profile, progress=not args.quick)
        markdown = federated.federated_markdown(result)
        out.mkdir(parents=True, exist_ok=True)
        result["plots"] = [str(federated.plot_federated(result, out))]
    elif args.what == "variants":
        from . import variants
        profile = _override(variants.QUICK if args.quick else variants.FULL, methods=args.methods, seeds=args.seeds,
                            steps=args.steps, tasks=args.tasks, r=args.r)
        if args.step_time:
            args.what = "variants_step_time"
            result = variants.run_step_times(profile)
            markdown = variants.step_times_markdown(result)
        else:
            previous = []
            if args.resume is not None:
                files = [out / "variants.json"] if (out / "variants.json").exists() else []
                files += [Path(f) for f in args.resume]
                try:
                    previous = _read_results(files, "--resume")
                except ConfigError as e:
                    parser.error(str(e))
            try:
                result = variants.run_variants(profile, previous=previous)
            except ConfigError as e:  # a previous result from other options
                parser.error(str(e))
            markdown = variants.variants_markdown(result)
            out.mkdir(parents=True, exist_ok=True)
            result["plots"] = [str(p) for p in variants.plot_variants(result, out)]
    elif args.what == "reparam":
        from . import reparam
        profile = _override(reparam.QUICK if args.quick else reparam.FULL, methods=args.methods, seeds=args.seeds,
                            steps=args.steps, tasks=args.tasks, r=args.r, batch_size=args.batch_size)
        if args.step_time:
            from .variants import step_times_markdown
            args.what = f"reparam_step_time_b{profile.batch_size}"
            result = reparam.run_step_times(profile)
            markdown = step_times_markdown(result)
        else:
            result = reparam.run_reparam(profile)
            markdown = reparam.reparam_markdown(result)
            result["plots"] = [str(p) for p in reparam.plot_reparam(result, out)]
    elif args.what == "quantize":
        from . import quantize as bench_quantize
        profile = _override(bench_quantize.QUICK if args.quick else bench_quantize.FULL, steps=args.steps,
                            seed=args.seeds[0] if args.seeds else None)
        if args.only:  # cfp, the one name it takes here: the outlier pre-processing's effect on RTN error, no
            # reconstruction (fast)
            result = bench_quantize.cfp_diagnosis(profile)
            args.what = "quantize_cfp"
            markdown = bench_quantize.cfp_markdown(result)
        else:
            result = bench_quantize.run_quantize(profile, progress=not args.quick)
            markdown = bench_quantize.quantize_markdown(result)
    elif args.what == "gamma_mod":
        from . import gamma_mod as bench_gamma_mod
        profile = _override(bench_gamma_mod.QUICK if args.quick else bench_gamma_mod.FULL, steps=args.steps,
                            tasks=args.tasks, r=args.r, seed=args.seeds[0] if args.seeds else None, variants=args.only)
        result = bench_gamma_mod.run_gamma_mod(profile, progress=not args.quick)
        markdown = bench_gamma_mod.gamma_mod_markdown(result)
    elif args.what == "smaller":
        from . import smaller
        profile = _override(smaller.QUICK if args.quick else smaller.FULL, seeds=args.seeds, steps=args.steps,
                            tasks=args.tasks, variants=args.only)
        result = smaller.run_smaller(profile)
        markdown = smaller.smaller_markdown(result)
    elif args.what == "perf":
        from . import perf
        _perf_rows()  # every row registered
        profile = perf.QUICK if args.quick else perf.FULL
        result = perf.run_perf(profile, device=args.device, only=args.only)
        markdown = perf.perf_markdown(result)
    else:
        from . import methods
        from ..training.procedures import get_procedure
        if args.combine:
            result = _combined(parser, methods.combine_results, args.combine)
        else:
            profile = _override(methods.QUICK if args.quick else methods.FULL, methods=args.methods, seeds=args.seeds,
                                steps=args.steps, tasks=args.tasks, all_variants=False if args.first_variant_only else None,
                                procedures=args.procedures, full_finetune=args.full_finetune, inits=args.inits)
            _check_names(parser, "--procedures", profile.procedures, get_procedure)  # wrong names fail now, with
            _check_names(parser, "--inits", profile.inits, methods.init_method)  # near matches, not after training
            out.mkdir(parents=True, exist_ok=True)
            result = methods.run_methods(profile, after_each=lambda partial: atomic_write_json(
                out / "methods.partial.json", {**partial, "command": command + " (partial)"}))
        markdown = methods.methods_markdown(result)
        out.mkdir(parents=True, exist_ok=True)
        result["plots"] = [str(p) for p in methods.plot_methods(result, out)]
    if "machine" not in result:
        from .perf import machine_description
        result["machine"] = machine_description(args.device or "cpu")
    result["wall_time_s"] = time.perf_counter() - t0
    _write(out, args.what, result, markdown, command)
    print(markdown)
    print(f"wrote {out / (args.what + '.json')}, {out / (args.what + '.md')} ({result['wall_time_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
