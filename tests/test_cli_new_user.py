"""The CLI as a new user meets it (issue 11): one test (or a few) per kind of trap, on the bundled model.

In-process ``main([...])`` where only the outcome matters; a real subprocess where the user's terminal is part of
the behaviour (Ctrl-C, a closed pipe, the process umask). ``--model /nonexistent`` in a check proves the check ran
before any model was loaded: otherwise the error would be about the model.
"""

from __future__ import annotations

import argparse

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorakit.cli import main

LORAKIT = str(Path(sys.executable).parent / "lorakit")
TINY = ["--steps", "2", "--batch-size", "4", "--train-examples", "8", "--eval-examples", "4", "--quiet"]


def run_cli(*argv: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([LORAKIT, *argv], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """routed_lora with two experts trained on reverse + rotate (key ids 0 and 1 in sorted task order)."""
    out = tmp_path_factory.mktemp("routed") / "run"
    assert main(["train", "--method", "routed_lora", "--num-experts", "2", "--data", "reverse,rotate", "--lr", "3e-2",
                 "--output", str(out), *TINY]) == 0
    return out / "adapter"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert main(["train", "--output", str(out), "--r", "4", "--log-every", "1", *TINY]) == 0
    return out


# -- 1. the task -> expert mapping travels with the adapter ----------------------------------------------------
def test_routed_adapter_saves_its_task_index(routed):
    assert json.loads((routed / "task_index.json").read_text()) == {"task_to_id": {"reverse": 0, "rotate": 1}}


def test_eval_of_a_task_subset_keeps_the_trained_ids(routed, capsys):
    """Evaluating rotate alone scores it exactly as it scores inside reverse+rotate (before the fix rotate became
    id 0, reverse's expert)."""
    assert main(["eval", "--adapter", str(routed), "--data", "rotate", "--eval-examples", "4", "--json", "--quiet"]) == 0
    alone = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert main(["eval", "--adapter", str(routed), "--data", "reverse,rotate", "--eval-examples", "4", "--json",
                 "--quiet"]) == 0
    both = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert alone["per_task"]["rotate"] == both["per_task"]["rotate"]


def test_eval_on_a_task_the_adapter_never_saw_is_an_error(routed, capsys):
    assert main(["eval", "--adapter", str(routed), "--data", "sort", "--eval-examples", "2", "--quiet"]) == 2
    assert "task 'sort'" in capsys.readouterr().err


def test_generate_task_routes_to_that_tasks_expert(routed, capsys):
    """``generate --task rotate`` prints what the model gives with routing key id 1 (rotate's), computed here
    through the Python API; an unknown task is an error naming the known ones."""
    import lorakit
    from lorakit.data import generate_completions
    from lorakit.hub import load_model_and_tokenizer

    prompt = "rotate: a b c d =>"
    assert main(["generate", "--adapter", str(routed), "--task", "rotate", "--prompt", prompt,
                 "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    model, tokenizer = load_model_and_tokenizer(None)
    lorakit.load_adapter(model, routed)
    want = generate_completions(model, tokenizer, [prompt], max_new_tokens=6,
                                row_routing=lambda rows: {"keys": torch.tensor([1])})[0]
    assert printed == prompt + want
    assert main(["generate", "--adapter", str(routed), "--task", "rotat", "--prompt", prompt]) == 2
    err = capsys.readouterr().err
    assert "task 'rotat'" in err and "reverse, rotate" in err


def test_routed_adapter_without_a_task_is_an_error_not_the_base_model(routed, tmp_path, capsys):
    """A keyless row on routed_lora (default_expert = -1) would silently get the base model's answer: generate and
    eval refuse it and list the adapter's tasks, as the server does."""
    assert main(["generate", "--adapter", str(routed), "--prompt", "rotate: a b c d =>"]) == 2
    assert "reverse, rotate" in capsys.readouterr().err
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "rotate: a b =>", "completion": " b a"}) + "\n")
    assert main(["eval", "--adapter", str(routed), "--data", str(data), "--quiet"]) == 2
    assert "routes by task" in capsys.readouterr().err


def test_merge_adapters_with_a_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["merge-adapters", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "out"),
                 "--model", str(tmp_path / "nonexistent")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit merge-adapters: error:") and "Traceback" not in err


# -- 2. failures found before the work --------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "--lr must be > 0"),  # the flags typed, not the config fields (lorakit.cli_parser)
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--output", "/proc/lorakit-test-out"], "cannot write"),
])
def test_bad_settings_fail_before_the_model_loads(flags, message, tmp_path, capsys):
    argv = ["train", "--model", "/nonexistent/model", "--output", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "cannot load model" not in err


def test_output_that_is_a_file_fails_first_for_train_merge_and_export(lora_run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    adapter = str(lora_run / "adapter")
    for argv in (["train", "--output", str(afile)], ["merge", "--adapter", adapter, "--output", str(afile)],
                 ["export", adapter, "--output", str(afile)]):
        assert main([*argv, "--model", "/nonexistent/model"]) == 2
        err = capsys.readouterr().err
        assert "is an existing file" in err and "cannot load model" not in err


def test_mistyped_target_fails_before_the_first_evaluation(tmp_path, capsys):
    assert main(["train", "--target-modules", "q_prj", "--output", str(tmp_path / "o"), *TINY]) == 2
    captured = capsys.readouterr()
    assert "'q_prj' (closest: q_proj" in captured.err and "before:" not in captured.out


def test_failed_save_keeps_the_adapter_and_says_where(tmp_path):
    """The output folder cannot be created (a file is in the way) when training ends: the adapter is written to a
    temporary folder instead, named in the error."""
    import lorakit
    from lorakit.data import load_examples
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.training import AdapterSaveError, TrainConfig, train

    model, tokenizer = load_model_and_tokenizer(None)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    config = TrainConfig(steps=1, batch_size=2, lr=1e-3, output_dir=str(blocker / "run"))
    with pytest.raises(AdapterSaveError) as info:
        train(model, tokenizer, load_examples("reverse", n=4), config, progress=False)
    rescue = Path(info.value.rescue_dir)
    assert str(rescue) in str(info.value) and (rescue / "adapter_model.safetensors").is_file()
    fresh, _ = load_model_and_tokenizer(None)
    lorakit.load_adapter(fresh, rescue)  # the rescued adapter is complete


# -- 3. runs are not lost ------------------------------------------------------------------------------------------
def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--steps", "100000", "--batch-size", "2", "--train-examples", "8", "--eval-examples", "2",
            "--output", str(out), "--r", "2", "--log-every", "1", "--quiet",
            "--lr-schedule", "constant", "--warmup-ratio", "0"]  # the same lr at every step, whatever --steps
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([LORAKIT, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and '"loss"' in log.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    command = err.split("resume with:\n", 1)[1].strip()
    words = shlex.split(command)
    checkpoint = Path(words[words.index("--resume-from") + 1])
    assert words[:len(argv) + 1] == ["lorakit", *argv] and (checkpoint / "trainer_state.json").is_file()
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    # The printed command resumes (here with a total of step + 1 steps, to keep the test short).
    words[words.index("--steps") + 1] = str(step + 1)
    assert main(words[1:]) == 0
    assert json.loads((out / "train_result.json").read_text())["start_step"] == step
    # ... and the interrupted + resumed run equals a straight run of the same length, bit for bit.
    straight = words[1:words.index("--resume-from")]
    straight[straight.index("--output") + 1] = str(tmp_path / "straight")
    assert main(straight) == 0
    from lorakit.io.files import load_tensors
    a = load_tensors(out / "adapter" / "adapter_model.safetensors")
    b = load_tensors(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_needs_overwrite_and_leftover_tmp_is_cleaned(lora_run, capsys):
    leftover = lora_run / ".adapter.tmp-killed"
    leftover.mkdir()
    (lora_run / ".summary.json.x1y2.tmp").write_text("partial")
    assert main(["train", "--output", str(lora_run), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not leftover.exists() and not (lora_run / ".summary.json.x1y2.tmp").exists()


# -- 4. user files are used whole; the hold-out is printed ---------------------------------------------------------
def test_a_jsonl_file_is_used_whole_with_a_printed_holdout(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    assert main(["tasks", "--jsonl", "reverse", "-n", "30"]) == 0
    data.write_text(capsys.readouterr().out)
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "o"), "--steps", "1", "--batch-size", "2",
                 "--quiet", "--r", "2"]) == 0
    out = capsys.readouterr().out
    assert "hold-out: the last 3 of 30 examples" in out and "(27 train / 3 eval examples)" in out
    assert main(["eval", "--data", str(data), "--quiet"]) == 0
    assert "on 30 examples" in capsys.readouterr().out


# -- 5. resume edges -------------------------------------------------------------------------------------------------
def test_resume_with_another_rank_or_too_few_steps_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--r", "4", "--save-every", "2", *TINY]) == 0
    ckpt = str(out / "checkpoint-2")
    base = ["train", "--output", str(out), "--model", "/nonexistent/model", "--resume-from", ckpt]
    assert main([*base, "--steps", "4", "--r", "8"]) == 2
    assert "--r: checkpoint 4, this run 8" in capsys.readouterr().err
    assert main([*base, "--steps", "2", "--r", "4"]) == 2
    assert "is at step 2, and --steps is 2" in capsys.readouterr().err


RESUMABLE = ["--steps", "2", "--save-every", "1", "--batch-size", "4", "--train-examples", "8", "--eval-examples", "4",
             "--quiet"]


def test_resume_messages_name_a_prefixed_procedure_flag(tmp_path, capsys):
    """A procedure option named like the method's gets --PROCEDURE-FIELD (GaLore's projection rank is --galore-rank
    under DyLoRA, whose --rank is its serving rank; cli._shared_fields). Was: a changed --galore-rank on resume said
    "--rank: checkpoint 2, this run 3", naming the method's flag."""
    out = tmp_path / "run"
    tiny = RESUMABLE
    # --update-proj-gap 1: the default 200 would never refresh the projection in 2 steps (refused)
    assert main(["train", "--method", "dylora", "--procedure", "galore", "--r", "4", "--rank", "2",
                 "--galore-rank", "2", "--update-proj-gap", "1", "--output", str(out), *tiny]) == 0
    base = ["train", "--method", "dylora", "--procedure", "galore", "--update-proj-gap", "1", "--r", "4",
            "--output", str(out), "--model",
            "/nonexistent/model", "--resume-from", str(out / "checkpoint-1"), "--steps", "3"]
    assert main([*base, "--rank", "2", "--galore-rank", "3"]) == 2
    err = capsys.readouterr().err
    assert "other --procedure galore options (--galore-rank: checkpoint 2, this run 3)" in err, err
    assert main([*base, "--rank", "3", "--galore-rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "other adapter settings (--rank: checkpoint 2, this run 3)" in err, err


def test_resume_messages_name_a_renamed_flag_as_typed(tmp_path, capsys):
    """A renamed method field given under its old spelling is named as typed (MoLA's --experts-per-layer, now
    --num-experts), not under a flag the user did not write."""
    tiny = RESUMABLE
    mola = tmp_path / "mola"
    assert main(["train", "--method", "mola", "--num-experts", "2", "--r", "2", "--output", str(mola), *tiny]) == 0
    with pytest.warns(FutureWarning, match="--experts-per-layer is deprecated"):
        assert main(["train", "--method", "mola", "--experts-per-layer", "4", "--r", "2", "--output", str(mola),
                     "--model", "/nonexistent/model", "--resume-from", str(mola / "checkpoint-1"), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "other adapter settings (--experts-per-layer: checkpoint 2, this run 4)" in err, err


def test_loop_resume_names_the_tensor_and_both_shapes(tmp_path):
    """Through the Python API (no CLI pre-check): another r fails in load_checkpoint with the tensor and shapes."""
    import lorakit
    from lorakit.data import load_examples
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.training import TrainConfig, train

    examples = load_examples("reverse", n=4)
    model, tokenizer = load_model_and_tokenizer(None)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    train(model, tokenizer, examples, TrainConfig(steps=1, batch_size=2, save_every=1, output_dir=str(tmp_path)),
          progress=False)
    model, tokenizer = load_model_and_tokenizer(None)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules=["q_proj"]))
    config = TrainConfig(steps=2, batch_size=2, resume_from=str(tmp_path / "checkpoint-1"))
    with pytest.raises(ValueError, match=r"lora_A.*has shape \(4, 256\) but this run's is \(8, 256\)"):
        train(model, tokenizer, examples, config, progress=False)


# -- 6. nonsense settings ---------------------------------------------------------------------------------------------
def test_prompt_longer_than_the_model_is_an_error(lora_run, capsys):
    long_prompt = "reverse: " + " ".join("abcdefgh"[i % 8] for i in range(400)) + " =>"
    assert main(["generate", "--adapter", str(lora_run / "adapter"), "--prompt", long_prompt]) == 2
    err = capsys.readouterr().err
    assert "exceeds the model's 256 positions" in err


def test_training_truncation_is_stated_and_max_length_is_bounded(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--output", str(out), "--max-length", "12", *TINY]) == 0
    assert "training examples are longer than --max-length 12 tokens" in capsys.readouterr().out
    assert main(["train", "--output", str(tmp_path / "p"), "--max-length", "4096", *TINY]) == 2
    assert "exceeds the model's 256 positions" in capsys.readouterr().err


# -- 7. messages that say what happened --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "my_data.json"], "data file 'my_data.json' not found"),
    (["eval", "--data", "reverse", "--model", "{adapter}"], "is an adapter folder, not a model: pass it as --adapter"),
    (["eval", "--data", "reverse", "--model", "no-such-org/no-such-model"], "not in the Hugging Face cache"),
    # was: transformers' "It looks like the config file at '...' is not a valid JSON file"
    (["eval", "--data", "reverse", "--model", "{adapter}/adapter_config.json"], "adapter_config.json is a file, not a "
                                                                                 "model: give the model's folder"),
    (["train", "--data", "{adapter}"], "is a folder; give a JSONL file"),
    (["train", "--layers-to-transform", "99"], "layers 0..5 (6 layers, 0-based)"),
])
def test_messages_name_the_real_problem(argv, message, lora_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline is lorakit's own default, not the env's
    argv = [a.replace("{adapter}", str(lora_run / "adapter")) for a in argv]
    if argv[0] == "train":
        argv += ["--output", str(tmp_path / "o"), *TINY]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_saved_message_tells_the_format_and_merge_export_agree_for_mixtures(tmp_path, capsys):
    out = tmp_path / "mix"
    assert main(["train", "--method", "mixlora", "--output", str(out), "--num-experts", "2", *TINY]) == 0
    assert "(lorakit format for method mixlora; PEFT cannot load it" in capsys.readouterr().out
    adapter = str(out / "adapter")
    assert main(["merge", "--adapter", adapter, "--output", str(tmp_path / "m")]) == 2
    merge_err = capsys.readouterr().err
    assert main(["export", adapter, "--output", str(tmp_path / "x")]) == 2
    export_err = capsys.readouterr().err
    assert "cannot be merged" in merge_err and "no plain-LoRA form" in merge_err  # not "export it"
    assert "no exact plain-LoRA form" in export_err
    assert main(["inspect", adapter]) == 0  # 24 attention projections + 6 FFN blocks, not router sub-modules
    assert "modules:   30 adapted" in capsys.readouterr().out


# -- 8. files other tools open ------------------------------------------------------------------------------------------
def test_auto_peft_model_loads_a_saved_adapter_with_the_same_logits(lora_run):
    """The file records its base as PEFT does (the folder it was loaded from), so AutoPeftModel rebuilds it."""
    from peft import AutoPeftModelForCausalLM

    import lorakit
    from lorakit.hub import load_model_and_tokenizer

    adapter = lora_run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and Path(config["base_model_name_or_path"]).is_dir()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    model, tokenizer = load_model_and_tokenizer(None)
    lorakit.load_adapter(model, adapter)
    ids = torch.tensor([tokenizer.encode("reverse: a b c =>")])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("umask,mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_saved_files_follow_the_umask(umask, mode, dir_mode, tmp_path):
    from lorakit.io.files import atomic_write_json
    from lorakit.io.files import write_dir_atomically

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        folder = write_dir_atomically(tmp_path / "d", lambda d: atomic_write_json(d / "b.json", {}))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((folder / "b.json").stat().st_mode) == mode
    assert stat.S_IMODE(folder.stat().st_mode) == dir_mode


# -- 10. threads ---------------------------------------------------------------------------------------------------------
def test_num_threads_flag_and_a_contention_safe_default(monkeypatch, capsys):
    from lorakit.cli import default_num_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_num_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= default_num_threads() <= max(1, len(os.sched_getaffinity(0)) // 2)
    before = torch.get_num_threads()
    try:
        assert main(["eval", "--data", "reverse", "--eval-examples", "2", "--num-threads", "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["eval", "--data", "reverse", "--num-threads", "-1"]) == 2
    assert "--num-threads must be >= 0" in capsys.readouterr().err


def test_num_threads_0_is_the_default_in_every_command(monkeypatch, capsys):
    """One rule for ``--num-threads`` and ``pretrain-base``'s ``num_threads``: 0 means the default
    (lorakit.core.threads.default_num_threads: OMP_NUM_THREADS when set). Was: the CLI refused 0, which
    ``pretrain-base`` documents as its default."""
    from lorakit.compose.translora import build_parser

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert main(["eval", "--data", "reverse", "--eval-examples", "2", "--num-threads", "0", "--quiet"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for command in (["eval"], ["train"], ["transfer"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        helped = " ".join(capsys.readouterr().out.split())
        assert "0: OMP_NUM_THREADS if set, else half the CPUs" in helped, command
    assert build_parser().parse_args(["--adapter", "a", "--target-model", "b", "--data", "c",
                                      "--output", "d"]).num_threads == 0


# -- also: help, metrics log, plot, one final evaluation, inspect | head ---------------------------------------------
def test_help_describes_method_options_with_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "mixlora", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--routing-strategy {topk,top_p,switch}" in text
    assert "--steps STEPS optimizer steps (the total, when resuming) (default: 200)" in text
    assert "--lora-alpha LORA_ALPHA scaling numerator" in text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--data DATA built-in task name(s)" in " ".join(capsys.readouterr().out.split())


def test_every_basic_flag_has_help_and_shows_its_default():
    """train / eval / generate: each flag says what it does, and a set default (0 included) is shown."""
    from lorakit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("train", "eval", "generate"):
        parser = sub.choices[command]
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{command} {action.option_strings[0]} has no help"
            shown = parser.formatter_class(command)._get_help_string(action)
            if action.default is not None and action.default is not False:
                assert "default" in shown, f"{command} {action.option_strings[0]} hides its default"


def test_metrics_log_and_plot_with_one_final_evaluation(lora_run):
    records = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in steps] == [1, 2] and all({"lr", "grad_norm"} <= set(r) for r in steps)
    assert [r["step"] for r in evals] == [0, 2]  # before training, and once at the end
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["after"] == {**evals[-1]["eval"], "step": 2}
    assert (lora_run / "metrics.png").stat().st_size > 0


def test_inspect_into_a_closed_pipe_is_quiet(lora_run):
    """The reader (``true``) exits before lorakit writes: no BrokenPipeError traceback, as with Unix tools."""
    result = subprocess.run(f"{shlex.quote(LORAKIT)} inspect --tensors {shlex.quote(str(lora_run / 'adapter'))} | true",
                            shell=True, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0 and "BrokenPipeError" not in result.stderr, result.stderr


def test_a_mistyped_option_names_its_near_matches_under_the_subcommand(capsys):
    from lorakit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--lora-alfa", "2", "--output", "unused"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "lorakit train: error: unrecognized arguments: --lora-alfa 2" in err
    assert "Did you mean: --lora-alpha" in err and "usage: lorakit train" in err
    with pytest.raises(SystemExit):
        main(["train", "--procedure", "flexora", "--val_size", "10", "--output", "unused"])
    assert "Did you mean: --val-size" in capsys.readouterr().err


def test_resume_into_the_same_output_logs_each_step_once(tmp_path):
    """Was: resuming from checkpoint-2 of a 4-step run appended steps 3-4 again after the first run's 3-4, so
    metrics.jsonl (and its plot) had steps 1, 2, 3, 4, 3, 4. Records after the checkpoint are dropped on resume."""
    out = tmp_path / "run"
    first = ["train", "--output", str(out), "--r", "4", "--save-every", "2", "--log-every", "1", *TINY]
    assert main([*first, "--steps", "4"]) == 0
    assert main([*first, "--steps", "4", "--resume-from", str(out / "checkpoint-2"), "--overwrite"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert records[0] == {"step": 0, "eval": records[0]["eval"]}  # the untrained model's score, kept


@pytest.mark.parametrize("method", ["randlora", "miss"])
def test_export_refuses_a_peft_format_that_is_not_lora(method, tmp_path, capsys):
    """randlora / miss adapters are PEFT RANDLORA / MISS files with no plain-LoRA form; export copied them as they
    were and printed "exported PEFT LoRA adapter", which vLLM (plain LoRA only) refuses all the same."""
    out = tmp_path / method
    assert main(["train", "--method", method, "--r", "2", "--output", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["export", str(out / "adapter"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"method {method!r} has no exact plain-LoRA form" in err and f"already PEFT's {method.upper()}" in err
    assert not (tmp_path / "x").exists()


def test_train_with_a_rank_far_beyond_the_layers_says_so(tmp_path, capsys):
    """``lorakit train --r 100000`` was killed for memory with no message; now a one-line error naming --r, the
    layer's shape and the counts (core.model.MAX_ADAPTER_TO_BASE), and no output folder."""
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--r", "100000", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--r 100000 asks for" in err and "in_features=" in err and "base model's" in err, err
    assert "Lower --r: a full-rank update of that module needs r = min(in_features, out_features)" in err, err
