"""Data-parallel training (training/distributed.py) with real torchrun, gloo and 2 CPU processes.

One ``python -m torch.distributed.run --nproc-per-node 2`` launch of ``dist_worker.py`` trains every scenario
(imports dominate the cost); each test compares one scenario with single-process training on the same global batch:
2 processes at ``batch_size=2`` against 1 process at ``batch_size=4`` (same ``grad_accum``), which the loop defines
to be the same training (``training/distributed.py``), so adapter weights agree to float tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.io.files import load_tensors
from lorakit.training import train

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as worker  # noqa: E402

WORKER = Path(worker.__file__)
ATOL = 2e-5


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def torchrun(*args: str, timeout: int = 600, launcher: tuple[str, ...] | None = None, fails: bool = False) -> str:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`` (a free local rendezvous port);
    fails the test on error (``fails``: unless it fails), kills the whole process group on timeout. Returns stdout
    (``fails``: stderr)."""
    cmd = [*(launcher or (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")),
           *args]
    process = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{cmd[:6]} timed out after {timeout}s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    if fails:
        assert process.returncode != 0, f"{cmd[:6]} succeeded:\n{stdout[-3000:]}"
        return stderr
    assert process.returncode == 0, f"{cmd[:6]} failed ({process.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return stdout


@pytest.fixture(scope="module")
def single():
    """Single-process references (batch_size 4 = 2 processes × 2), trained in this process."""
    train_examples, eval_examples, tokenizer = worker.data()

    def run(kind: str, layers: int = 2, evaluate: bool = False, **overrides):
        model = worker.build(tokenizer, kind, layers)
        result = train(model, tokenizer, train_examples, worker.train_config(4, **overrides),
                       eval_examples=eval_examples if evaluate else None, progress=False)
        return model, result

    return run, eval_examples


@pytest.fixture(scope="module")
def launched(tmp_path_factory, single):
    """The 2-process run of every scenario; the 1→2 resume starts from a checkpoint written here by 1 process."""
    out = tmp_path_factory.mktemp("dist")
    run, _ = single
    run("lora", steps=4, save_every=2, output_dir=str(out / "run1"))
    torchrun(str(WORKER), str(out), str(out / "run1" / "checkpoint-2"))
    records = [json.loads((out / f"records-{rank}.json").read_text()) for rank in (0, 1)]
    return out, records


def _close(tensors: dict[str, torch.Tensor], model) -> None:
    reference = worker.weights(model)
    assert set(tensors) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(tensors[key], value, atol=ATOL, rtol=1e-4, msg=key)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_equals_one_process_on_the_same_global_batch(launched, single, mode):
    out, records = launched
    run, eval_examples = single
    model, result = run("lora", evaluate=True, eval_every=3)
    loaded = load_tensors(out / f"{mode}.safetensors")
    assert any(v.abs().sum() > 0 for k, v in loaded.items() if "lora_B" in k)  # training moved B off its init
    _close(loaded, model)
    assert records[0][mode]["ranks_identical"] and records[1][mode]["ranks_identical"]
    assert records[0][mode]["losses"] == pytest.approx(result.losses, abs=1e-5)  # the global step loss is logged
    # data: each process tokenized only the rows it read (3 steps × 2 micro-batches × 2 rows), none twice, and the
    # two shares are disjoint halves of the 24 rows of the global stream (32 examples: no epoch wrap)
    shares = [set(records[rank][mode]["tokenized"]) for rank in (0, 1)]
    assert [len(s) for s in shares] == [12, 12] and not shares[0] & shares[1]
    # evaluation: every rank generated for its share and gathered all 5 predictions
    for rank in (0, 1):
        assert records[rank][mode]["final_metrics"]["n"] == len(eval_examples)
        assert records[rank][mode]["final_metrics"]["exact_match"] == result.final_metrics["exact_match"]


def test_checkpoint_of_two_processes_resumes_in_one(launched, single, tmp_path):
    out, records = launched
    run, _ = single
    straight, _ = run("lora", steps=4)
    checkpoint = out / "run2" / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    resumed, result = run("lora", steps=4, resume_from=str(checkpoint))
    assert result.start_step == 2
    _close(worker.weights(straight), resumed)
    _close(load_tensors(out / "ddp_4steps.safetensors"), straight)  # and the uninterrupted 2-process run
    assert not list(out.glob("run2/.*tmp*")), "rank 0 writes through a temporary folder that it renames"


def test_resuming_with_another_global_batch_warns_naming_both(launched, single):
    """docs/distributed.md allows resuming with another number of processes; the same global batch (2 processes ×
    batch 2 → 1 × 4, grad_accum 2: 8 per step) resumes silently, another one (1 × 2: 4 per step) gets a warning
    naming the checkpoint's 8 and this run's 4 (was: silence)."""
    import warnings

    out, _ = launched
    run, _ = single
    checkpoint = str(out / "run2" / "checkpoint-2")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="resuming .* with another global batch")
        run("lora", steps=3, resume_from=checkpoint)
    with pytest.warns(UserWarning, match=r"the checkpoint trained on 8 examples per step \(batch_size 2 × grad_accum "
                                         r"2 × 2 processes\), this run trains on 4 \(batch_size 2 × grad_accum 2 × 1 "
                                         r"process\)"):
        _, result = run("lora", steps=3, resume_from=checkpoint, batch_size=2)
    assert result.start_step == 2  # allowed: it goes on


def test_checkpoint_of_one_process_resumes_in_two(launched, single):
    out, records = launched
    run, _ = single
    straight, _ = run("lora", steps=4)
    _close(load_tensors(out / "resumed_1to2.safetensors"), straight)
    assert records[0]["resumed_1to2"]["ranks_identical"]


def test_mixture_balance_loss_and_router_stats_are_global(launched, single):
    """MixLoRA's load-balancing loss (coef 0.5) on the joined routing records of both processes: weights equal
    one process on the whole batch. (Averaging two per-process losses would not: f_i·P_i is not linear.)"""
    out, records = launched
    run, _ = single
    model, result = run("mixlora")
    _close(load_tensors(out / "mixlora.safetensors"), model)
    for rank in (0, 1):
        stats = records[rank]["mixlora"]["router_stats"]
        assert set(stats) == set(result.router_stats)
        for layer, reference in result.router_stats.items():
            assert stats[layer]["tokens"] == reference["tokens"]  # both processes' tokens, summed
            assert stats[layer]["load"] == pytest.approx(reference["load"])


def test_dylora_draws_the_same_rank_on_every_process(launched):
    _, records = launched
    drawn = [records[rank]["dylora"]["drawn"] for rank in (0, 1)]
    assert drawn[0] == drawn[1]
    assert len(set(drawn[0])) > 1  # ranks were really sampled
    # the processes' own RNG streams did drift apart (dropout on different shapes): agreement was not free
    assert records[0]["dylora"]["own_rng"] != records[1]["dylora"]["own_rng"]
    assert records[0]["dylora"]["ranks_identical"]


def test_gradient_accumulation_and_processes_are_interchangeable(launched, single):
    """2 processes × batch 2 × grad_accum 1 read the same 4 rows per step as 1 process × batch 2 × grad_accum 2 (the
    stream's micro-batch i of a step is rows [i·N·b, (i+1)·N·b)), and the loss is the token mean over the step:
    the same training, to float tolerance."""
    out, records = launched
    run, _ = single
    model, result = run("lora", batch_size=2, grad_accum=2)
    _close(load_tensors(out / "accum1.safetensors"), model)
    assert records[0]["accum1"]["losses"] == pytest.approx(result.losses, abs=1e-5)


def test_dropout_masks_differ_between_processes(launched):
    """One process at batch N·b draws a dropout mask per row; N processes must too. Was: every process was seeded
    alike, so rank 1's rows got exactly rank 0's masks whenever the shapes agreed (here: every row truncated to 4
    tokens), making N processes not even equal in distribution to one."""
    _, records = launched
    masks = [records[rank]["dropout_masks"] for rank in (0, 1)]
    assert len(masks[0]) == len(masks[1]) == 2 and all(len(a) == len(b) for a, b in zip(*masks))
    assert all(a != b for a, b in zip(*masks))
    kept = [sum(m) / len(m) for rank in masks for m in rank]
    assert all(0.3 < k < 0.7 for k in kept)  # lora_dropout=0.5 on each


def test_lisa_unfreezes_the_same_blocks_on_every_process(launched, single):
    out, records = launched
    run, _ = single
    active = [records[rank]["lisa"]["active"] for rank in (0, 1)]
    assert active[0] == active[1]
    assert len({tuple(a) for a in active[0]}) > 1  # the draw changed blocks during the run
    model, _ = run("lora", layers=4, steps=4, procedure="lisa",
                   procedure_args={"lisa_activated_layers": 1, "lisa_interval_steps": 1})
    _close(load_tensors(out / "lisa.safetensors"), model)
    for name, value in records[0]["lisa"]["blocks"].items():  # the trained base blocks match too
        torch.testing.assert_close(torch.tensor(value), model.model.layers.get_parameter(name).detach(), atol=ATOL,
                                   rtol=1e-4)


def test_smora_balancing_bias_counts_every_process(launched, single):
    """SMoRA's bias b_i ← b_i + u·sign(c̄ − c_i) (arXiv:2501.15103; official srmole/layer.py) counts the tokens of a
    forward's whole micro-batch: 2 processes at batch 2 end with one process's bias and weights at batch 4. Was:
    each process counted its own rows, the biases drifted apart and the processes routed differently."""
    out, records = launched
    run, _ = single
    model, _ = run("smora", max_length=10)
    loaded = load_tensors(out / "smora.safetensors")
    assert records[0]["smora"]["ranks_identical"] and records[1]["smora"]["ranks_identical"]
    biases = [k for k in loaded if k.endswith("selection_bias")]
    assert biases and any(loaded[k].abs().sum() > 0 for k in biases)  # the bias moved
    _close(loaded, model)


def test_increlora_allocates_the_same_ranks_on_every_process(launched):
    """IncreLoRA's importance score comes from each process's own ∂L/∂ΔW; the processes average it, so they grow the
    same modules (was: different EMAs on each process, so each would grow its own choice of modules)."""
    _, records = launched
    assert records[0]["increlora"]["ranks_identical"] and records[1]["increlora"]["ranks_identical"]
    ranks = [records[r]["increlora"]["ranks"] for r in (0, 1)]
    assert ranks[0] == ranks[1] and sum(ranks[0].values()) > 2 * len(ranks[0])  # ranks grew past r=2


def test_fsdp_saves_the_tensors_a_method_freezes_whole(launched, single):
    """FFA-LoRA's A is frozen: FSDP must keep it whole like the trained B (was: sharded with the base, so training
    and the saved adapter.safetensors saw a DTensor)."""
    out, records = launched
    run, _ = single
    model, _ = run("ffa_lora")
    saved = Path(records[0]["ffa_fsdp"]["adapter_dir"]) / "adapter_model.safetensors"
    loaded = load_tensors(saved)
    assert any("lora_A" in k for k in loaded)
    _close(loaded, model)
    _close(load_tensors(out / "ffa_fsdp" / "checkpoint-3" / "adapter_model.safetensors"), model)


def test_galore_per_layer_is_refused_under_torchrun(launched):
    """GaLore's per-layer mode (its default) steps each weight in a gradient hook before DDP / FSDP averaged the
    gradient: refused by name on every process before the model trains (was: DDP's 'Encountered gradient which is
    undefined ... bug in DDP implementation', and under FSDP processes that silently trained apart)."""
    _, records = launched
    for rank in (0, 1):
        said = records[rank]["galore_per_layer"]
        assert said is not None and "per_layer=True" in said and "--no-per-layer" in said and "2 processes" in said


def test_fsdp_refuses_a_procedure_that_edits_the_base(launched):
    """LoRAPrune masks and prunes base weights between steps, which FSDP holds as shards on each process: refused
    before the model loads (was: 'aten.add.Tensor got mixed torch.Tensor and DTensor' at its first pruning step)."""
    _, records = launched
    for rank in (0, 1):
        said = records[rank]["loraprune_fsdp"]
        assert said is not None and "distributed='fsdp'" in said and "'loraprune'" in said and "'ddp'" in said


def test_processes_that_disagree_on_options_or_data_are_refused(launched):
    """Every process must run one training: a node started with another --lr, or reading a stale copy of the data
    (31 examples instead of 32), is refused on every process, naming the setting and each rank's value (was: both
    trained, on other options or another data stream, without a word)."""
    _, records = launched
    for rank in (0, 1):
        lr, data = records[rank]["other_lr"], records[rank]["other_data"]
        assert lr is not None and "TrainConfig.lr: rank 0 0.01, rank 1 0.02" in lr, lr
        assert data is not None and "training data: rank 0 '32 examples" in data and "rank 1 '31 examples" in data, data
        assert "same command on every process" in data
        empty = records[rank]["empty_data"]
        assert empty is not None and "training data: rank 0 '32 examples" in empty and "rank 1 '0 examples" in empty, \
            empty


CLI_ARGS = ["train", "--data", "reverse", "--train-examples", "24", "--eval-examples", "3", "--steps", "2",
            "--max-length", "32", "--warmup-steps", "0", "--lr-schedule", "constant", "--save-every", "2",
            "--log-every", "1", "--r", "4", "--quiet"]


def _cli_outputs_agree(two: Path, one: Path) -> None:
    """The 2-process run wrote what the 1-process run wrote (rank 0 alone), with matching adapter weights."""
    a, b = load_tensors(two / "adapter" / "adapter_model.safetensors"), load_tensors(one / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b)
    # Adam's first steps move each weight by about ±lr whatever the gradient's size, so a weight whose gradient is
    # ~1e-8 (near Adam's eps) turns float-summation noise into a visible difference: the bulk must agree within 3% of
    # lr (3e-3), and a few such weights (seen: 2 of 111,000 on an AVX512 CPU, 2e-4 off) within Adam's bound of
    # 2 steps × lr each way.
    diffs = {key: (a[key] - b[key]).abs() for key in a}
    for key, diff in diffs.items():
        assert float(diff.max()) <= 2 * 2 * 3e-3, key
    off = sum(int((diff > 1e-4 + 1e-4 * b[key].abs()).sum()) for key, diff in diffs.items())
    assert off <= 1e-4 * sum(t.numel() for t in b.values()), off
    assert json.loads((two / "checkpoint-2" / "trainer_state.json").read_text())["world_size"] == 2
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (two, one)]
    assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]]  # rank 0 alone wrote the log
    for ours, reference in zip(*records):
        if "loss" in reference:  # the logged loss is the global step's
            assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5)
            assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert json.loads((two / "summary.json").read_text())["after"]["n"] == 3  # every rank's predictions gathered


@pytest.mark.slow  # ~90 s on a loaded 2-core machine (two processes load the bundled model); the loop's own
def test_torchrun_runs_lorakit_train_unchanged(tmp_path):  # torchrun tests above run in CI
    """``torchrun --nproc-per-node 2 -m lorakit train`` (gloo) on the bundled model equals ``lorakit train`` in one
    process at twice the batch; only rank 0 prints and writes."""
    from lorakit.cli import main

    # "--": torchrun's parser would take lorakit's --r for an abbreviation of its own --rdzv-*/--role options
    stdout = torchrun("-m", "lorakit", "--", *CLI_ARGS, "--batch-size", "2", "--output", str(tmp_path / "two"))
    assert stdout.count("adapter saved to") == 1
    assert main([*CLI_ARGS, "--batch-size", "4", "--output", str(tmp_path / "one")]) == 0
    _cli_outputs_agree(tmp_path / "two", tmp_path / "one")


@pytest.mark.slow
def test_accelerate_launch_runs_lorakit_train(tmp_path):
    pytest.importorskip("accelerate")
    from lorakit.cli import main

    # --multi_gpu: accelerate's launcher through torch's elastic agent (on a machine without CUDA the processes use
    # gloo); with --cpu accelerate would start a single process (its multi-CPU path needs mpirun).
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(_free_port()), "-m")
    stdout = torchrun("lorakit", "--", *CLI_ARGS, "--batch-size", "2", "--output", str(tmp_path / "two"), launcher=launcher)
    assert stdout.count("adapter saved to") == 1
    assert main([*CLI_ARGS, "--batch-size", "4", "--output", str(tmp_path / "one")]) == 0
    _cli_outputs_agree(tmp_path / "two", tmp_path / "one")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_needs_no_launcher(monkeypatch):
    from lorakit.core.errors import ConfigError
    from lorakit.training.distributed import env_world, setup

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.enabled) == (0, 1, False)
    assert ctx.sum_counts([3, 4]) == [3, 4] and ctx.shard([1, 2, 3]) == [1, 2, 3]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2"):
        env_world()
    with pytest.raises(ConfigError, match="Did you mean: fsdp"):
        worker.train_config(2, distributed="fsdq")


@pytest.mark.slow  # two processes each load a tiny encoder; ~1-2 min on a loaded 2-core machine
def test_torchrun_trains_and_evaluates_a_classifier(tmp_path):
    """SEQ_CLS under torchrun: the step's loss is the mean over all processes' rows and the evaluation gathers every
    rank's predictions, so 2 processes at batch 2 write the head, adapter and metrics of 1 process at batch 4."""
    from transformers import BertConfig, BertModel

    from lk_models import word_level_tokenizer
    from lorakit.cli import main
    from lorakit.data import Example

    words = ["good", "bad", "film", "plot", "cast", "long", "short", "music"]
    texts = [" ".join(words[(i * 3 + j) % len(words)] for j in range(1 + i % 4)) for i in range(30)]
    tok = word_level_tokenizer([Example(t, "") for t in texts])
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(tmp_path / "encoder")
    tok.save_pretrained(tmp_path / "encoder")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "pos" if "good" in t else "neg"}) + "\n" for t in texts))
    args = ["train", "--task-type", "seq-cls", "--model", str(tmp_path / "encoder"), "--data", str(data), "--steps", "2",
            "--max-length", "16", "--warmup-steps", "0", "--lr-schedule", "constant", "--save-every", "2",
            "--log-every", "1", "--r", "4", "--target-modules", "query", "value", "--seed", "0", "--quiet"]
    stdout = torchrun("-m", "lorakit", "--", *args, "--batch-size", "2", "--output", str(tmp_path / "two"))
    assert stdout.count("adapter saved to") == 1
    assert main([*args, "--batch-size", "4", "--output", str(tmp_path / "one")]) == 0
    _cli_outputs_agree(tmp_path / "two", tmp_path / "one")
    two, one = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("two", "one"))
    assert one["after"]["n"] == 3  # the hold-out (last tenth of 30); _cli_outputs_agree checked the 2-process n
    assert two["after"] == pytest.approx(one["after"]) and two["before"] == pytest.approx(one["before"])


@pytest.mark.slow  # ~30 s: two processes import lorakit.cli and torch
def test_an_existing_output_is_refused_once_under_torchrun(tmp_path):
    """rank 0 checks --output (before any model loads) and says why it stops; the other process stops too, silently
    (was: rank 1 repeated it as 'rank 0 failed to write: LorakitError: ...'). What was there is left alone."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    stderr = torchrun("-m", "lorakit", "--", "train", "--data", "reverse", "--steps", "1", "--output", str(out),
                      fails=True, timeout=300)
    assert stderr.count("already exists and is not empty; pass --overwrite") == 1, stderr
    assert "rank 0 failed to write" not in stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_only_rank_zero_prints_the_interrupt_and_resume_command(monkeypatch, capsys):
    """Ctrl-C reaches every torchrun process: each stops with TrainingInterrupted (status 130), rank 0 alone says so."""
    from lorakit.cli import CommandParser, ErrorsReported
    from lorakit.training import TrainingInterrupted

    for rank, says in ((0, True), (1, False)):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        with ErrorsReported(CommandParser(prog="lorakit train"), resume=lambda c: f"lorakit train --resume-from {c}") as run:
            raise TrainingInterrupted(3, 10, "out/checkpoint-3")
        err = capsys.readouterr().err
        assert run.status == 130 and ("resume with:\n  lorakit train --resume-from out/checkpoint-3" in err) == says, err
        with ErrorsReported(CommandParser(prog="lorakit train")) as run:
            raise KeyboardInterrupt
        assert run.status == 130 and ("interrupted" in capsys.readouterr().err) == says


@pytest.mark.slow  # ~1 min: two processes load the bundled model and train until interrupted
def test_ctrl_c_of_a_torchrun_job_checkpoints_and_says_so_once(tmp_path):
    """Ctrl-C in a terminal reaches torchrun, which forwards SIGINT to every worker: each finishes the same step, rank
    0 writes one checkpoint, and the notice, the interruption and a torchrun resume command are printed once (was:
    every process printed 'interrupt: finishing this step ...', and the resume command was plain 'lorakit train')."""
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lorakit",
           "--", *CLI_ARGS[:CLI_ARGS.index("--steps")], "--steps", "100000", "--max-length", "16", "--log-every", "1",
           "--r", "4", "--quiet", "--batch-size", "1", "--output", str(out)]
    process = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or '"loss"' not in (out / "metrics.jsonl").read_text():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)  # the terminal's Ctrl-C: torchrun's process group only
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert stderr.count("interrupt: finishing this step") == 1, stderr
    assert stderr.count("Loading weights:   0%") <= 1, stderr  # transformers' loading bar: rank 0's alone
    assert stderr.count("lorakit train: interrupted at step") == 1, stderr
    step = int(stderr.split("interrupted at step ")[1].split()[0])
    checkpoint = out / f"checkpoint-{step}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
    assert f"torchrun --nproc-per-node 2 -m lorakit -- train --data reverse" in stderr
    assert f"--resume-from {checkpoint}" in stderr
    assert not list(out.glob(".*tmp*")) and not (out / "adapter").exists()


@pytest.mark.slow  # two processes import lorakit.cli and torch
def test_torchrun_interrupt_message_comes_once(tmp_path):
    torchrun(str(Path(__file__).parent / "interrupt_worker.py"), str(tmp_path), timeout=300)
    said = {rank: (tmp_path / f"stderr-{rank}.txt").read_text() for rank in (0, 1)}
    assert "interrupted at step 3 of 10" in said[0] and "resume with:" in said[0], said
    assert said[1] == "", said
