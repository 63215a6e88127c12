import json
import math

import pytest

from lorakit.core.errors import LorakitError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.core.errors import ConfigError
from lorakit.pretrain import BASE_MODEL_DIR, OBJECTIVES, CorpusConfig, PretrainConfig, build_corpus, pretrain_base
from lorakit.pretrain.corpus import split_chunks, stdlib_files
from lorakit.io.files import write_dir_atomically
from lorakit.pretrain.train import build_parser, config_from_args, pack_corpus
from lorakit.pretrain.tokenizer import train_tokenizer

MAX_BYTES = 30 * 1024 * 1024


def tiny_config(**overrides) -> PretrainConfig:
    values = dict(
        corpus=CorpusConfig(stdlib_chars=40_000, task_fraction=0.5, seed=0),
        vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
        max_position_embeddings=64, seq_len=32, batch_size=8, steps=6, lr=1e-2, warmup_steps=1,
        bf16=False, num_threads=1, log_every=3,
    )
    values.update(overrides)
    return PretrainConfig(**values)


@pytest.fixture(scope="module")
def bundled():
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    info = pretrain_base(tiny_config(), root / "model", log=lambda line: None)
    return root, info


# ---------------------------------------------------------------- the bundled model


def test_bundled_model_loads_and_runs(bundled):
    model, tokenizer = bundled
    assert model.config.model_type == "llama"
    assert model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer)
    batch = tokenizer(["add: 2 + 3 =>", "def f(x):"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(logits).all()


def test_bundled_files_and_size():
    names = {p.name for p in BASE_MODEL_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "pretrain_info.json"} <= names
    assert not any(name.endswith(".bin") for name in names)
    assert sum(p.stat().st_size for p in BASE_MODEL_DIR.iterdir()) <= MAX_BYTES
    info = json.loads((BASE_MODEL_DIR / "pretrain_info.json").read_text())
    assert info["steps"] == info["config"]["steps"]
    assert math.isfinite(info["final_loss"]) and info["final_loss"] < info["first_loss"]
    assert {"torch", "transformers"} <= set(info["versions"])


def test_bundled_tokenizer_special_tokens(bundled):
    _, tokenizer = bundled
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x ** 2  # square\n",
    "reverse: a b c =>  c b a",
    "ünïcödé, tabs\tand emoji \U0001F600",
])
def test_bundled_tokenizer_round_trips(bundled, text):
    _, tokenizer = bundled
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_bundled_tokenizer_splits_digits(bundled):
    _, tokenizer = bundled
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("mul: 123 * 45 => 5535", add_special_tokens=False).input_ids)
    digit_pieces = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_pieces == list("123455535")


def test_bundled_chat_template(bundled):
    _, tokenizer = bundled
    messages = [{"role": "user", "content": "reverse: a b =>"}, {"role": "assistant", "content": "b a"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith(tokenizer.bos_token)
    assert "reverse: a b =>" in text and text.rstrip().endswith("b a" + tokenizer.eos_token)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=False) != prompt
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.eos_token_id in ids


# ---------------------------------------------------------------- corpus and tokenizer


def test_stdlib_files_skip_tests_and_third_party():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    for path in files:
        assert not {"test", "tests", "site-packages", "idlelib"} & set(path.parts)


def test_split_chunks_keeps_text():
    text = "".join(f"line {i}\n" for i in range(200))
    chunks = split_chunks(text, 100)
    assert all(len(c) <= 100 for c in chunks)
    assert "\n".join(chunks) + "\n" == text


def test_corpus_mixture_and_determinism():
    config = CorpusConfig(stdlib_chars=30_000, task_fraction=0.25, seed=3)
    corpus = build_corpus(config)
    stats = corpus.stats()
    assert corpus.n_stdlib > 0 and corpus.n_task > 0
    assert 0.15 < stats["task_char_fraction"] < 0.35
    assert build_corpus(config).documents == corpus.documents
    assert build_corpus(CorpusConfig(stdlib_chars=30_000, task_fraction=0.0)).n_task == 0


def test_train_tokenizer_and_pack():
    corpus = build_corpus(CorpusConfig(stdlib_chars=20_000))
    tokenizer = train_tokenizer(corpus.documents, vocab_size=400)
    blocks = pack_corpus(corpus, tokenizer, seq_len=16, seed=0)
    assert blocks.shape[1] == 16 and blocks[0, 0] == tokenizer.bos_token_id
    assert (blocks == tokenizer.eos_token_id).any()


# ---------------------------------------------------------------- config and CLI


@pytest.mark.parametrize("overrides, match", [
    ({"objective": "casual"}, "causal"),
    ({"seq_len": 512}, "max_position_embeddings"),
    ({"num_heads": 3}, "divisible"),
    ({"steps": 0}, "steps"),
    # were: transformers' RoPE ValueError traceback after the corpus was built, and a saved model of NaN losses
    ({"hidden_size": 30, "num_heads": 2}, r"hidden_size \(30\) / num_heads \(2\) = 15 per head; rotary"),
    ({"seq_len": 1}, "seq_len must be >= 2"),
])
def test_config_errors_say_what_to_change(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(**overrides)


@pytest.mark.parametrize("overrides, says", [  # each used to pass the config: a traceback or a NaN model, exit 0
    ({"lr": float("nan")}, "PretrainConfig.lr must be > 0 and finite, got nan."),  # was: AdamW's ValueError traceback
    ({"lr": -1.0}, "PretrainConfig.lr must be > 0 and finite, got -1.0."),  # (after the corpus and tokenizer were built)
    ({"lr": float("inf")}, "PretrainConfig.lr must be > 0 and finite, got inf."),
    ({"weight_decay": float("nan")}, "PretrainConfig.weight_decay must be >= 0 and finite"),  # was: a NaN model saved
    ({"weight_decay": -0.1}, "PretrainConfig.weight_decay must be >= 0 and finite"),  # was: weights pushed outwards
    ({"grad_clip": 0.0}, "PretrainConfig.grad_clip must be > 0 and finite"),  # was: every gradient clipped to 0
    ({"grad_clip": float("nan")}, "PretrainConfig.grad_clip must be > 0 and finite"),  # was: a NaN model saved
    ({"warmup_steps": -1}, "PretrainConfig.warmup_steps must be >= 0"),
    ({"num_threads": -2},  # was: torch's RuntimeError
     "PretrainConfig.num_threads must be >= 0 (0: OMP_NUM_THREADS if set, else half the CPUs)"),
    ({"mixture_scale": 0.5}, "mixture_scale 0.5 is read only with a mixture"),  # was: silently ignored
    ({"regmix_dir": "runs/regmix"}, "regmix_dir 'runs/regmix' is read only with mixture='regmix'"),  # likewise
    ({"mixture": "natural", "mixture_scale": float("inf")}, "PretrainConfig.mixture_scale must be > 0 and finite"),
])
def test_bad_numbers_and_unread_options_are_refused(overrides, says):
    with pytest.raises(ConfigError) as e:
        tiny_config(**overrides)
    assert says in str(e.value)


def test_cli_refuses_a_bad_lr_by_its_flag_before_any_work(tmp_path, capsys):
    from lorakit.cli import main

    assert main(["pretrain-base", "--out", str(tmp_path / "base"), "--lr", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "lorakit pretrain-base: error: --lr must be > 0 and finite, got nan.", err
    assert main(["pretrain-base", "--out", str(tmp_path / "base"), "--mixture-scale", "2"]) == 2
    assert "--mixture-scale 2.0 is read only with a mixture" in capsys.readouterr().err
    assert not (tmp_path / "base").exists()


def test_a_checkpoint_cadence_past_the_last_step_is_refused_by_the_command_and_warned_in_python(tmp_path, capsys):
    """--checkpoint-every at or past --steps wrote no checkpoint, silently (the loop saves after every N-th step
    but the last): the command refuses it naming both flags before any work; pretrain_base warns and trains."""
    from lorakit.cli import main

    assert main(["pretrain-base", "--out", str(tmp_path / "base"), "--steps", "4", "--checkpoint-every", "4"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint-every 4 with --steps 4" in err and "no checkpoint" in err, err
    assert not (tmp_path / "base").exists()
    tiny_config(steps=4, checkpoint_every=3).check_steps()  # a checkpoint after step 3
    with pytest.warns(UserWarning, match="checkpoint_every=5 with steps=2"):
        pretrain_base(tiny_config(steps=2, checkpoint_every=5), tmp_path / "m", log=lambda line: None)
    assert not (tmp_path / "m.checkpoint").exists() and (tmp_path / "m" / "config.json").is_file()


def test_ctrl_c_names_the_checkpoint_a_run_without_checkpoint_every_resumes_from(tmp_path, capsys, monkeypatch):
    """A run without --checkpoint-every resumes from a checkpoint an earlier run left (``pretrain_base``), and that
    checkpoint stays until the model is saved: Ctrl-C must name it as kept, not say "nothing was saved" (which told
    the user the steps were lost and how to avoid it, while rerunning the same command resumes them)."""
    from lorakit.cli import main
    from lorakit.pretrain import train
    from lorakit.pretrain.train import checkpoint_dir

    out = tmp_path / "base"
    state = checkpoint_dir(out) / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"format": train.CHECKPOINT_FORMAT, "step": 7}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "pretrain_base", interrupted)
    assert main(["pretrain-base", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lorakit pretrain-base: interrupted; the checkpoint of step 7 in {state.parent} is kept: run the same "
        f"command again to resume")


def test_corpus_config_errors():
    with pytest.raises(ConfigError, match="task_fraction"):
        CorpusConfig(task_fraction=1.0)


def test_objective_registry():
    assert "causal" in OBJECTIVES
    blocks = torch.arange(6).view(2, 3)
    kwargs = OBJECTIVES["causal"](blocks, torch.Generator())
    assert torch.equal(kwargs["input_ids"], blocks) and torch.equal(kwargs["labels"], blocks)


def test_cli_arguments_reach_config(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path), "--steps", "7", "--seed", "5", "--corpus-seed", "2",
                                      "--task-fraction", "0.3", "--bf16"])
    config = config_from_args(args)
    assert (config.steps, config.seed, config.bf16) == (7, 5, True)
    assert config_from_args(build_parser().parse_args([])).bf16 is False  # fp32 unless asked (benchmarks/pretrain_bf16)
    assert (config.corpus.seed, config.corpus.task_fraction) == (2, 0.3)
    assert args.out == tmp_path
    assert build_parser().parse_args([]).out == BASE_MODEL_DIR


# ---------------------------------------------------------------- training and saving


def test_tiny_pretrain_saves_loadable_model(tiny_run):
    root, info = tiny_run
    assert [p.name for p in root.iterdir()] == ["model"]  # no temp or backup folder left beside it
    assert math.isfinite(info["final_loss"]) and info["final_loss"] < info["first_loss"]
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    assert model.config.num_hidden_layers == 1 and len(tokenizer) == model.config.vocab_size
    saved = json.loads((root / "model" / "pretrain_info.json").read_text())
    assert saved["config"]["steps"] == 6 and saved["wall_time_s"] > 0


def test_tiny_pretrain_is_seeded(tiny_run, tmp_path):
    _, first = tiny_run
    again = pretrain_base(tiny_config(), tmp_path / "again", log=lambda line: None)
    assert again["loss_curve"] == first["loss_curve"]


def test_write_dir_atomically_replaces_and_survives_failure(tmp_path):
    target = tmp_path / "model"
    write_dir_atomically(target, lambda d: (d / "a.txt").write_text("one"))
    write_dir_atomically(target, lambda d: (d / "b.txt").write_text("two"))
    assert [p.name for p in target.iterdir()] == ["b.txt"]

    def broken(folder):
        (folder / "half.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_dir_atomically(target, broken)
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_pretrain_reuses_a_given_tokenizer(tmp_path):
    """``tokenizer=<model folder>`` (``--tokenizer``): the new base keeps that folder's token ids, as the second
    bundled base keeps the first's (Trans-LoRA's logit distillation needs one tokenizer on both sides)."""
    pretrain_base(tiny_config(tokenizer=str(BASE_MODEL_DIR), steps=2), tmp_path / "m", log=lambda line: None)
    ours, theirs = AutoTokenizer.from_pretrained(tmp_path / "m"), AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    assert ours.get_vocab() == theirs.get_vocab()
    text = "reverse: a b c => c b a 123"
    assert ours(text).input_ids == theirs(text).input_ids
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.vocab_size == len(theirs)
    with pytest.raises(ConfigError, match="tokenizer.json"):
        tiny_config(tokenizer=str(tmp_path))


def test_second_bundled_base_shares_the_tokenizer_and_differs_in_shape():
    """'bundled-small' (assets/base_model_small): another Llama shape, the same token ids, small enough to ship."""
    from lorakit.assets import SMALL_BASE_MODEL_PATH
    from lorakit.hub import load_tokenizer, resolve_model_path

    assert resolve_model_path("bundled-small") == str(SMALL_BASE_MODEL_PATH)
    with pytest.raises(LorakitError, match="Did you mean: bundled-small"):
        resolve_model_path("bundled-smal")
    small = AutoModelForCausalLM.from_pretrained(SMALL_BASE_MODEL_PATH).config
    big = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR).config
    for name in ("hidden_size", "num_hidden_layers", "head_dim"):
        assert getattr(small, name) != getattr(big, name)
    assert load_tokenizer("bundled-small").get_vocab() == load_tokenizer("bundled").get_vocab()
    assert sum(p.stat().st_size for p in SMALL_BASE_MODEL_PATH.iterdir()) < 15 * 1024 * 1024
    info = json.loads((SMALL_BASE_MODEL_PATH / "pretrain_info.json").read_text())
    assert info["config"]["tokenizer"].endswith("base_model")


def test_cli_will_not_replace_a_bundled_base_without_overwrite(capsys):
    """``lorakit pretrain-base --steps 2`` (default --out) used to replace the shipped base with a 2-step model."""
    from lorakit.pretrain.train import main

    before = sorted(p.stat().st_mtime_ns for p in BASE_MODEL_DIR.iterdir())
    assert main(["--steps", "2"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert sorted(p.stat().st_mtime_ns for p in BASE_MODEL_DIR.iterdir()) == before


# ---------------------------------------------------------------- checkpoints and resume


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def log(line: str) -> None:
        if line.startswith(f"step {step}/"):
            raise _Stop(line)
    return log


def test_interrupted_pretrain_resumes_to_the_uninterrupted_model(tmp_path):
    from safetensors.torch import load_file

    from lorakit.pretrain.train import checkpoint_dir

    config = tiny_config(steps=8, log_every=3, checkpoint_every=2)
    full = pretrain_base(config, tmp_path / "full", log=lambda line: None)
    assert not checkpoint_dir(tmp_path / "full").exists()  # removed once the model is saved
    with pytest.raises(_Stop):  # stopped in the middle of step 6's log line: the checkpoint of step 4 remains
        pretrain_base(config, tmp_path / "cut", log=_stop_at(6))
    saved = json.loads((checkpoint_dir(tmp_path / "cut") / "state.json").read_text())
    assert saved["step"] == 4 and len(saved["losses"]) == 4 and not (tmp_path / "cut").exists()
    lines = []
    resumed = pretrain_base(config, tmp_path / "cut", log=lines.append)
    assert any(line.startswith("resumed from") and "at step 4/8" in line for line in lines)
    assert resumed["resumed_from_step"] == 4 and not checkpoint_dir(tmp_path / "cut").exists()
    assert resumed["loss_curve"] == full["loss_curve"] and resumed["final_loss"] == full["final_loss"]
    assert resumed["eval_loss"] == full["eval_loss"]
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_allows_other_log_and_checkpoint_cadence(tmp_path):
    """--log-every and --checkpoint-every change no step: a resume with them changed was refused as 'other
    settings'. The resumed weights must equal an uninterrupted run's; --checkpoint-every 0 still resumes."""
    from safetensors.torch import load_file

    full = pretrain_base(tiny_config(steps=6), tmp_path / "full", log=lambda line: None)
    with pytest.raises(_Stop):  # checkpoint of step 2 written, stopped at step 3's log line
        pretrain_base(tiny_config(steps=6, checkpoint_every=2, log_every=3), tmp_path / "cut", log=_stop_at(3))
    lines = []
    resumed = pretrain_base(tiny_config(steps=6, checkpoint_every=0, log_every=2), tmp_path / "cut",
                            log=lines.append)
    assert resumed["resumed_from_step"] == 2 and any("at step 2/6" in line for line in lines)
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["eval_loss"] == full["eval_loss"]


def test_num_threads_0_follows_omp_num_threads_as_every_command(tmp_path, monkeypatch):
    """--num-threads 0 took every core and ignored OMP_NUM_THREADS, unlike every other command's default."""
    from lorakit.cli import default_num_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    info = pretrain_base(tiny_config(steps=1, num_threads=0), tmp_path / "m", log=lambda line: None)
    assert info["num_threads"] == 1 == default_num_threads()


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    with pytest.raises(_Stop):
        pretrain_base(tiny_config(steps=6, checkpoint_every=2), tmp_path / "m", log=_stop_at(3))
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.01 -> 0.02\).*delete the folder"):
        pretrain_base(tiny_config(steps=6, checkpoint_every=2, lr=2e-2), tmp_path / "m", log=lambda line: None)
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 0"):
        tiny_config(checkpoint_every=-1)


def test_resume_compares_the_threads_used_not_the_option(tmp_path, monkeypatch):
    """A resume needs the thread count the checkpoint was trained with, as used: torch's CPU kernels split their sums
    by thread, so the weights differ across counts (measured on the bundled base's size, 4 steps: 1 vs 2, 3 or 4
    threads differ by up to 6e-4; the tiny model here happens to agree). The same count reached another way resumes
    to the uninterrupted model (was: refused as 'other settings (num_threads: 0 -> 1)'); another count reached by
    the same option, 0 with OMP_NUM_THREADS changed, is refused saying why and with what to rerun (was: resumed)."""
    from safetensors.torch import load_file

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    full = pretrain_base(tiny_config(steps=6), tmp_path / "full", log=lambda line: None)
    with pytest.raises(_Stop):
        pretrain_base(tiny_config(steps=6, checkpoint_every=2, num_threads=0), tmp_path / "cut", log=_stop_at(3))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with pytest.raises(ConfigError, match=r"trained with 1 CPU thread\(s\), this run has 2 \(num_threads=0: "
                                          r"OMP_NUM_THREADS, else half the CPUs\): torch's CPU kernels split their "
                                          r"sums by thread.*Rerun with num_threads=1 to resume"):
        pretrain_base(tiny_config(steps=6, checkpoint_every=2, num_threads=0), tmp_path / "cut", log=lambda line: None)
    with pytest.raises(ConfigError, match=r"this run has 2 \(num_threads=2\)"):
        pretrain_base(tiny_config(steps=6, checkpoint_every=2, num_threads=2), tmp_path / "cut", log=lambda line: None)
    resumed = pretrain_base(tiny_config(steps=6, checkpoint_every=2, num_threads=1), tmp_path / "cut",
                            log=lambda line: None)
    assert resumed["resumed_from_step"] == 2 and resumed["num_threads"] == 1
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_batch_larger_than_the_corpus_is_refused_before_training(tmp_path):
    """batch_size above the number of training blocks trained every step on all of them while pretrain_info.json
    counted tokens_seen and tok/s at batch_size rows a step (a 100000-row batch of 3577 blocks: 28x too many)."""
    with pytest.raises(ConfigError, match=r"batch_size=100000 exceeds the \d+ training blocks"):
        pretrain_base(tiny_config(batch_size=100_000), tmp_path / "m", log=lambda line: None)
    assert not tmp_path.joinpath("m").exists()


TINY_FLAGS = ["--stdlib-chars", "40000", "--vocab-size", "400", "--hidden-size", "32", "--num-layers", "1",
              "--num-heads", "2", "--num-kv-heads", "1", "--intermediate-size", "64", "--max-position-embeddings", "64",
              "--seq-len", "32", "--batch-size", "8", "--lr", "0.01", "--warmup-steps", "1", "--num-threads", "1"]


@pytest.mark.slow  # ~25 s: a child process until its first checkpoint, then three runs that stop at it
def test_ctrl_c_keeps_the_checkpoint_and_a_damaged_checkpoint_is_named(tmp_path, capsys):
    """Ctrl-C in `lorakit pretrain-base` printed a KeyboardInterrupt traceback (and said nothing of the checkpoint
    it keeps); a cut-off or edited checkpoint then ended in an AdapterLoadError / JSONDecodeError / KeyError
    traceback (main caught ConfigError only). Now: exit 130 naming the checkpoint's step and how to resume, and a
    one-line error saying which file cannot be read and to delete the folder."""
    import signal
    import subprocess
    import sys
    import time

    from lorakit.cli import main
    from lorakit.pretrain.train import checkpoint_dir

    out = tmp_path / "base"
    flags = ["--out", str(out), *TINY_FLAGS, "--steps", "100000", "--checkpoint-every", "1", "--log-every", "50"]
    child = subprocess.Popen([sys.executable, "-m", "lorakit", "pretrain-base", *flags], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    state = checkpoint_dir(out) / "state.json"
    deadline = time.monotonic() + 240
    while not state.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=120)[1]
    assert child.returncode == 130, err
    assert "Traceback" not in err
    step = json.loads(state.read_text())["step"]
    assert err.strip().splitlines()[-1] == (f"lorakit pretrain-base: interrupted; the checkpoint of step {step} in "
                                            f"{state.parent} is kept: run the same command again to resume")
    assert not out.exists()

    tensors = state.parent / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    assert main(["pretrain-base", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"lorakit pretrain-base: error: The checkpoint {state.parent} cannot be read (")
    assert "state.safetensors is not a valid safetensors file" in lines[-1] and "delete the folder" in lines[-1]
    for text in ('{"format": "lorakit-pretrain-checkpoint/1", "step": 2', '{"format": "lorakit-pretrain-checkpoint/1"}'):
        state.write_text(text)
        assert main(["pretrain-base", *flags]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"lorakit pretrain-base: error: The checkpoint {state.parent} cannot be read ("), last
    assert "no 'config'" in last
    assert not out.exists()


def test_an_unreadable_tokenizer_to_reuse_is_a_one_line_error(tmp_path, capsys):
    """--tokenizer DIR whose tokenizer.json is cut off: the tokenizers library's bare Exception was a traceback."""
    from lorakit.cli import main

    (tmp_path / "tok").mkdir()
    text = (BASE_MODEL_DIR / "tokenizer.json").read_text()
    (tmp_path / "tok" / "tokenizer.json").write_text(text[: len(text) // 3])
    assert main(["pretrain-base", "--out", str(tmp_path / "m"), *TINY_FLAGS, "--steps", "2",
                 "--tokenizer", str(tmp_path / "tok")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lorakit pretrain-base: error: --tokenizer {tmp_path / 'tok'}: "), last
    assert "cannot be loaded (" in last and "leave --tokenizer empty to train one" in last
    assert not (tmp_path / "m").exists()


def test_the_readme_command_of_bundled_small_gives_its_recorded_config():
    """The README's build command of `bundled-small` was `pretrain-base --tokenizer ... --task-fraction 0.95`: with the
    default --out it is refused (the bundled base), with --overwrite it replaced the *other* base with a 1500-step
    6-layer model. The shown command now parses to the config its pretrain_info.json records."""
    import dataclasses
    import re
    import shlex

    from lorakit.assets import SMALL_BASE_MODEL_PATH

    readme = (BASE_MODEL_DIR.parents[3] / "README.md").read_text()
    line = re.search(r"\nlorakit pretrain-base (--out src/lorakit/assets/base_model_small .*?)\n```", readme, re.S)
    argv = shlex.split(line.group(1).replace("\\\n", " "))
    args = build_parser().parse_args(argv)
    assert args.out.as_posix() == "src/lorakit/assets/base_model_small" and args.overwrite
    shown = json.loads(json.dumps(dataclasses.asdict(config_from_args(args))))
    recorded = json.loads((SMALL_BASE_MODEL_PATH / "pretrain_info.json").read_text())["config"]
    shown.pop("checkpoint_every")  # added after the base was built; its default (0) is what that run did
    assert shown == recorded
