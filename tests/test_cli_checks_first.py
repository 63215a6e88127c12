"""Bad input is named before expensive work: a corrupt adapter file, a pickle-only adapter folder or a wrong model
name fails every command that takes one before any base model loads (load_model_and_tokenizer, load_model_for_merge
and the diffusion base are replaced by a function that fails the test)."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main

LORA_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


@pytest.fixture
def no_model_load(monkeypatch):
    import lorakit.hub

    def no_load(*args, **kwargs):
        raise AssertionError("a base model was loaded before the input was checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    monkeypatch.setattr(lorakit.hub, "load_model_for_merge", no_load)
    try:
        import lorakit.diffusion.model
        monkeypatch.setattr(lorakit.diffusion.model, "load_base", no_load)
    except ImportError:  # diffusers missing: compose-image is skipped below
        pass


def _adapter(folder, weights: bytes | None, name: str = "adapter_model.safetensors"):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    if weights is not None:
        (folder / name).write_bytes(weights)
    return folder


def _commands(a, tmp_path):
    out = str(tmp_path / "out")
    return {
        "eval": ["eval", "--adapter", a, "--data", "reverse"],
        "generate": ["generate", "--adapter", a, "--prompt", "x"],
        "merge": ["merge", "--adapter", a, "--output", out],
        "export": ["export", a, "--output", out],
        "merge-adapters": ["merge-adapters", a, a, "--model", "bundled", "--output", out],
        "transfer": ["transfer", "--adapter", a, "--target-model", "bundled-small", "--data", "reverse", "--output", out],
        "train --resume-from": ["train", "--resume-from", a, "--output", out],
        "generate-adapter train": ["generate-adapter", "train", "--adapters", f"reverse={a}", "--model", "bundled",
                                   "--output", out],
        "compose-image": ["compose-image", "--base", str(tmp_path / "base"), "--lora", a],
    }


COMMANDS = ["eval", "generate", "merge", "export", "merge-adapters", "transfer", "train --resume-from",
            "generate-adapter train", "compose-image"]
BROKEN = {  # weights file content -> what the error says
    "not safetensors": (b"\x80\x04\x95 this is a pickle, not safetensors", "is not a valid safetensors file"),
    "truncated": (b"\x05\x00", "is not a valid safetensors file (truncated: 2 bytes"),
    "pickle only": (None, "holds only adapter_model.bin, a pickle file; lorakit never unpickles"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_adapter_file_fails_before_the_base_model_loads(command, broken, tmp_path, capsys, no_model_load):
    if command == "compose-image":
        pytest.importorskip("diffusers")
        (tmp_path / "base" / "unet").mkdir(parents=True)  # a train-base folder (load_base is replaced)
    weights, says = BROKEN[broken]
    folder = tmp_path / "a"
    if weights is None:
        _adapter(folder, b"pickle bytes", name="adapter_model.bin")
    else:
        _adapter(folder, weights)
    if command == "train --resume-from":
        (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "config": {}}))
    argv = _commands(str(folder), tmp_path)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit {command.split(' --')[0]}: error: "), err
    assert says in err and str(folder) in err, err
    assert not (tmp_path / "out").exists()


def _good_adapter(folder):
    from safetensors.torch import save_file
    import torch

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(2, 4)}, str(folder / "adapter_model.safetensors"))
    return str(folder)


def test_transfer_checks_both_models_before_loading_either(tmp_path, capsys, no_model_load):
    """Was: `transfer --target-model nope` loaded the source model (and its tokenizer and data) first."""
    a, out = _good_adapter(tmp_path / "a"), str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    base = ["transfer", "--adapter", a, "--data", "reverse", "--output", out]
    cases = [
        (["--target-model", "nope"], "--target-model 'nope' is not a local folder, not a bundled model (bundled, "
                                     "bundled-small) and not in the Hugging Face cache"),
        (["--source-model", "nope", "--target-model", "bundled-small"], "--source-model 'nope' is not a local folder"),
        (["--target-model", "bundled-smal"], "neither a folder nor a bundled model. Did you mean: bundled-small"),
        (["--target-model", str(tmp_path / "empty")], f"--target-model {tmp_path / 'empty'}: {tmp_path / 'empty'} has "
                                                      "no config.json, so it is not a model folder"),
        (["--target-model", a], f"{a} is an adapter folder, not a model"),
    ]
    for extra, says in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("lorakit transfer: error: ") and says in err, (extra, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge-adapters", "generate-adapter train"])
def test_a_wrong_model_name_is_named_before_the_adapters_are_read(command, tmp_path, capsys, no_model_load):
    a, out = _good_adapter(tmp_path / "a"), str(tmp_path / "out")
    argv = {"merge-adapters": ["merge-adapters", a, a, "--model", "nope", "--output", out],
            "generate-adapter train": ["generate-adapter", "train", "--adapters", f"reverse={a}", "--model", "nope",
                                       "--output", out]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit {command}: error: --model 'nope' is not a local folder"), err


def test_a_wrong_generator_lists_the_generators_beside_it(tmp_path, capsys, monkeypatch, no_model_load):
    """Was: 'missing config file nope/icm_lora_config.json'."""
    monkeypatch.chdir(tmp_path)
    for name in ("gen_reverse", "gen_upper"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "icm_lora_config.json").write_text("{}")
    _good_adapter(tmp_path / "runs" / "a")
    cases = [("nope", "ICM-LoRA generator 'nope' does not exist. Generators in .: runs/gen_reverse, runs/gen_upper."),
             ("runs/gen_revers", "ICM-LoRA generator 'runs/gen_revers' does not exist. Generators in runs: "
                                 "runs/gen_reverse, runs/gen_upper. Did you mean: runs/gen_reverse"),
             ("runs/a", "'runs/a' is an adapter folder (adapter_config.json), not a generator"),
             ("runs", "'runs' has no icm_lora_config.json, so it is not a generator")]
    for generator, says in cases:
        assert main(["generate-adapter", "--task", "reverse", "--generator", generator, "--output", "o"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lorakit generate-adapter: error: ") and says in err, (generator, err)
        assert "lorakit generate-adapter train --adapters ... --output DIR" in err
    assert not (tmp_path / "o").exists()


def test_a_run_folder_is_taken_as_its_adapter_by_every_command(tmp_path, capsys, no_model_load):
    """`lorakit inspect RUN` (a `train --output` folder) shows RUN/adapter; transfer takes RUN as RUN/adapter too,
    through the one resolver, says so, and then does what RUN/adapter gives it (was: refused with 'did you mean
    RUN/adapter?', as eval, generate and merge-adapters did). Those and merge / export on a real run:
    tests/test_cli.py."""
    run = tmp_path / "r1"
    _good_adapter(run / "adapter")
    _good_adapter(run / "checkpoint-2")
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run} is a training run folder; inspecting its adapter {run / 'adapter'}\n"), out
    assert f"adapter:   {run / 'adapter'}" in out and "method:    lora" in out
    # transfer: past the adapter check (as RUN/adapter is), to the next input it checks before any model loads
    for given in (run, run / "adapter"):
        assert main(["transfer", "--adapter", str(given), "--target-model", str(tmp_path / "nope"), "--data", "reverse",
                     "--output", str(tmp_path / "t")]) == 2
        captured = capsys.readouterr()
        assert captured.out == (f"{run} is a training run folder; transferring its adapter {run / 'adapter'}\n"
                                if given == run else ""), captured.out
        assert captured.err.startswith("lorakit transfer: error: ") and "--target-model" in captured.err, captured.err
        assert "training run folder" not in captured.err


def test_resume_from_a_checkpoint_with_a_corrupt_state_file_fails_before_the_model_loads(tmp_path, capsys,
                                                                                         no_model_load):
    checkpoint = tmp_path / "run" / "checkpoint-1"
    _good_adapter(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1, "config": {}}))
    (checkpoint / "trainer_state.safetensors").write_bytes(b"\x02\x00")
    assert main(["train", "--resume-from", str(checkpoint), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit train: error: {checkpoint / 'trainer_state.safetensors'} is not a valid safetensors "
                          "file (truncated: 2 bytes"), err


COUNTS = [  # a count flag of generate / eval / serve out of range, and what the error says: argparse's usage error
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be a positive integer, got 0"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-3"], "argument --max-new-tokens: must be a positive integer"),
    (["generate", "--prompt", "x", "--rank", "0"], "argument --rank: must be a positive integer, got 0"),
    (["eval", "--data", "reverse", "--rank", "0"], "argument --rank: must be a positive integer, got 0"),
    (["serve", "--max-loras", "0"], "argument --max-loras: must be a positive integer, got 0"),
    (["serve", "--max-cpu-loras", "0"], "argument --max-cpu-loras: must be a positive integer, got 0"),
    (["serve", "--kv-cache-mb", "0"], "argument --kv-cache-mb: must be a positive integer, got 0"),
    (["serve", "--max-batch", "0"], "argument --max-batch: must be a positive integer, got 0"),
    (["serve", "--max-tokens-limit", "0"], "argument --max-tokens-limit: must be a positive integer, got 0"),
    (["serve", "--max-n", "0"], "argument --max-n: must be a positive integer, got 0"),
    (["serve", "--rank", "0"], "argument --rank: must be a positive integer, got 0"),
    (["serve", "--adapter-queue-timeout", "0"],
     "server limit --adapter-queue-timeout must be a positive, finite number of seconds, got 0.0"),
    (["serve", "--adapter-queue-timeout", "inf"],
     "server limit --adapter-queue-timeout must be a positive, finite number of seconds, got inf"),
    # --rank picks a rank of the adapter: without one it is named before the model loads, not after
    (["generate", "--prompt", "x", "--rank", "2"], "--rank needs --adapter"),
    (["eval", "--data", "reverse", "--rank", "2"], "--rank needs --adapter"),
    # --device: a name torch does not know, or CUDA where there is none (was: after the model loaded)
    (["serve", "--device", "gpu"], "argument --device: must be cpu, cuda or cuda:N, got 'gpu'"),
    (["serve", "--device", "cpu:1"], "argument --device: must be cpu, cuda or cuda:N, got 'cpu:1'"),
    (["federate", "--device", "tpu"], "argument --device: must be cpu, cuda or cuda:N, got 'tpu'"),
]
if not torch.cuda.is_available():
    COUNTS += [(["serve", "--device", "cuda", "--cuda-graphs"],
                "argument --device: 'cuda': CUDA is not available on this machine; use cpu"),
               (["federate", "--device", "cuda:0"],
                "argument --device: 'cuda:0': CUDA is not available on this machine; use cpu")]


@pytest.mark.parametrize("argv,says", COUNTS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in COUNTS])
def test_count_flags_are_checked_before_the_model_loads(argv, says, capsys, no_model_load, monkeypatch):
    """Was: `generate --max-new-tokens 0` loaded the model and then failed in generation; serve's counts failed
    after the model loaded (AdapterStore, Engine)."""
    import lorakit.serving.server

    monkeypatch.setattr(lorakit.serving.server, "serve", lambda *a, **k: pytest.fail("serve started"))
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and says in err.strip().splitlines()[-1], err


def test_serve_hands_its_limits_to_the_server(monkeypatch):
    """The limit flags reach the server as its ServerLimits (``--adapter-queue-timeout``: seconds a load or unload
    waits for the engine to start it), the others at their defaults."""
    import lorakit.serving.server
    from lorakit.serving.server import ServerLimits

    got = {}
    monkeypatch.setattr(lorakit.serving.server, "serve", lambda *a, **k: got.update(k))
    assert main(["serve", "--adapter-queue-timeout", "2.5", "--max-n", "7", "--max-tokens-limit", "99"]) == 0
    assert got["limits"] == ServerLimits(max_tokens=99, max_n=7, adapter_queue_timeout_s=2.5)


def test_bench_device_is_checked_before_any_model(capsys):
    from lorakit.bench.cli import main as bench_main

    with pytest.raises(SystemExit) as e:
        bench_main(["perf", "--quick", "--device", "gpu"])
    assert e.value.code == 2 and "argument --device: must be cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["xlora", "meteora", "routed_lora"])
def test_a_mixtures_source_adapters_are_checked_before_the_model_loads(method, tmp_path, capsys, no_model_load):
    """`lorakit train --method xlora --adapter-paths ...`: a source the mixture refuses (mixtures/sources.py: DoRA,
    a base-changing init such as PiSSA, a missing folder) was read only when the adapter was built on the loaded
    model; AdapterConfig.check_inputs reads the sources first."""
    import lorakit
    from lk_models import tiny_llama

    dora = tmp_path / "dora"
    lorakit.save_adapter(lorakit.add_adapter(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"],
                                                                            use_dora=True)), dora)
    pissa = tmp_path / "pissa"
    lorakit.save_adapter(lorakit.add_adapter(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]),
                                             init="pissa"), pissa)
    for source, says in ((dora, "sets use_dora=True, which mixtures of existing adapters do not support"),
                         (pissa, "init_lora_weights='pissa' moved part of the base into the adapter"),
                         (tmp_path / "missing", "does not exist")):
        assert main(["train", "--method", method, "--adapter-paths", str(source), str(source), "--data", "reverse",
                     "--steps", "1", "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert says in err and str(source) in err and "Traceback" not in err, err


@pytest.mark.parametrize("flags,says", [
    (["--method", "lora", "--init-lora-weights", "pissa", "--init", "olora"], "--init olora and --init-lora-weights pissa name two inits"),
])
def test_two_inits_fail_before_the_model_loads(flags, says, tmp_path, capsys, no_model_load):
    """--init beside another init the method's own option names is known from the flags alone (README: settings that
    need no model are checked before it loads). Before, it silently trained --init's."""
    assert main(["train", "--output", str(tmp_path / "o"), "--steps", "2", *flags]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "merge", "merge-adapters"])
def test_an_output_folder_holding_the_input_is_refused(command, tmp_path, capsys, no_model_load):
    """These commands replace --output whole. An --output that holds the adapter they read (its run folder) would
    lose the adapter, checkpoints and metrics with it: refused before anything loads, and the folder is intact.
    Before, `lorakit export runs/a/adapter --output runs/a --overwrite` left runs/a holding only the export."""
    run = tmp_path / "run"
    from safetensors.torch import save

    adapter = _adapter(run / "adapter", save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                              torch.zeros(2, 32)}))
    (run / "metrics.jsonl").write_text("{}\n")
    argv = {"export": ["export", str(adapter)], "merge": ["merge", "--adapter", str(adapter)],
            "merge-adapters": ["merge-adapters", str(adapter), str(adapter)]}[command]
    assert main([*argv, "--output", str(run), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--output {run} holds the input {adapter}" in err
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "metrics.jsonl"]


@pytest.mark.parametrize("command", ["export", "merge", "merge-adapters", "transfer"])
@pytest.mark.parametrize("where", ["is", "inside"])
def test_an_output_folder_that_is_or_lies_inside_an_input_is_refused(command, where, tmp_path, capsys, no_model_load):
    """Was: `lorakit merge-adapters a b --output b --overwrite` replaced source b with the merge (the input lost), and
    `--output a/merged` nested the result into source a (which then held an adapter not its own). Both refused before
    anything loads, for every command that replaces --output whole; the inputs are left byte for byte."""
    from safetensors.torch import save

    weights = save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)})
    a, b = _adapter(tmp_path / "a", weights), _adapter(tmp_path / "b", weights)
    before = {p: p.read_bytes() for p in (*a.iterdir(), *b.iterdir())}
    out = b if where == "is" else b / "merged"
    argv = {"export": ["export", str(b)], "merge": ["merge", "--adapter", str(b)],
            "merge-adapters": ["merge-adapters", str(a), str(b)],
            "transfer": ["transfer", "--adapter", str(b), "--target-model", "bundled-small", "--data", "reverse"]}
    assert main([*argv[command], "--output", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    says = "is the input" if where == "is" else "lies inside the input"
    assert f"--output {out} {says} {b}" in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in (*a.iterdir(), *b.iterdir())} == before


@pytest.mark.parametrize("method,flags,says", [
    ("routed_lora", ["--num-experts", "2", "--expert-r", "2", "2", "--data", "reverse,rotate,sort"],
     "['sort'] would reach no expert"),
    ("routed_lora", ["--num-experts", "2", "--expert-r", "2", "2", "--data", "KEYLESS"],
     "--default-expert -1 sends rows without a task key to the base model and no training example has one"),
    ("meteora", ["--num-experts", "2", "--expert-r", "2", "2", "--data", "reverse,rotate,sort"],
     "--task-to-adapter is unset and the training data has 3 tasks"),
    ("reclora", ["--user-dim", "5", "--data", "USERS"], "example 0 of the data has 4 numbers as its routing vector"),
    ("reclora", ["--user-dim", "4", "--data", "KEYLESS"], "example 0 of the data has none as its routing vector"),
])
def test_data_a_keyed_method_cannot_train_on_fails_before_the_model_loads(method, flags, says, tmp_path, capsys,
                                                                        no_model_load):
    """routed_lora on key-less data (or more tasks than experts) trained nothing for those rows and exited 0;
    MeteoRA's task without an adapter and RecLoRA's missing or wrong-sized user vectors failed at the first batch,
    after the model loaded (RecLoRA's with a LayerNorm traceback). AdapterConfig.check_examples names them first."""
    keyless, users = tmp_path / "keyless.jsonl", tmp_path / "users.jsonl"
    keyless.write_text("".join(json.dumps({"prompt": f"p{i} =>", "completion": " c"}) + "\n" for i in range(4)))
    users.write_text("".join(json.dumps({"prompt": f"p{i} =>", "completion": " c",
                                         "routing": {"user_state": [0.1 * i, 0.2, 0.3, 0.4]}}) + "\n" for i in range(4)))
    flags = [{"KEYLESS": str(keyless), "USERS": str(users)}.get(f, f) for f in flags]
    assert main(["train", "--method", method, *flags, "--train-examples", "8", "--steps", "1",
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def test_eval_data_a_reclora_adapter_cannot_route_fails_before_the_model_loads(tmp_path, capsys, no_model_load):
    """`lorakit eval` of a RecLoRA adapter on rows without user vectors failed at the first batch, after the base
    model loaded; the adapter folder's config checks the data (AdapterConfig.check_examples) first."""
    import lorakit as lk
    from lk_models import tiny_llama
    from lorakit.methods.routed import RecLoraConfig

    model = tiny_llama()
    lk.add_adapter(model, RecLoraConfig(num_experts=2, r=2, user_dim=4, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "adapter")
    keyless = tmp_path / "keyless.jsonl"
    keyless.write_text("".join(json.dumps({"prompt": f"p{i} =>", "completion": " c"}) + "\n" for i in range(3)))
    assert main(["eval", "--adapter", str(tmp_path / "adapter"), "--data", str(keyless)]) == 2
    err = capsys.readouterr().err
    assert "example 0 of the data has none as its routing vector 'user_state'" in err and "Traceback" not in err, err
