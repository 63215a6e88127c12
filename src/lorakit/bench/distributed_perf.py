"""``lorakit bench perf`` row: a training step of 2 DDP processes (gloo on CPU, nccl with 2 GPUs) vs 1 process on
the same global batch, both through ``lorakit.training.train`` (so the loop's own DDP path is what is timed).

The 1-process runs (batch ``2·b``) happen in this process, half before and half after one launch of 2 processes
(batch ``b`` each) that repeat their run as often: machine noise hits both sides alike. Each process uses one
torch thread on CPU, so the ratio shows what a second process (core) buys. Step time = the loop's training time
(setup, evaluation and saving excluded) / steps. Registered in ``perf.EXTRA_ROWS`` on import; ``--quick`` runs it
only as ``lorakit bench perf --quick --only ddp``.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
from pathlib import Path

import torch

from ..io.files import atomic_write_bytes
from .perf import EXTRA_ROWS, QUICK_ONLY_WHEN_NAMED
from .timing import ratio

ROW = "DDP 2 processes / 1 process (same global batch)"
STEPS = 6


def _run(per_process_batch: int, profile, device: str) -> float:
    """Seconds per optimizer step of one ``train`` run (LoRA r on all linear layers of the bundled model)."""
    from ..core.model import add_adapter
    from ..data import load_examples
    from ..hub import load_model_and_tokenizer
    from ..methods.lora import LoraConfig
    from ..training import TrainConfig, train

    model, tokenizer = load_model_and_tokenizer(None)
    add_adapter(model, LoraConfig(r=profile.r, lora_alpha=2 * profile.r, target_modules="all-linear"))
    examples = load_examples("reverse", "train", n=64, seed=0)
    config = TrainConfig(steps=STEPS, batch_size=per_process_batch, max_length=profile.seq, warmup_steps=0,
                         lr_schedule="constant", log_every=STEPS, device=device)
    result = train(model, tokenizer, examples, config, progress=False)
    return result.train_tokens / result.tokens_per_s / STEPS


def _worker(rank: int, port: int, profile, device: str, repeats: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    times = [_run(profile.batch, profile, f"cuda:{rank}" if device == "cuda" else "cpu") for _ in range(repeats)]
    if rank == 0:
        atomic_write_bytes(out, " ".join(map(str, times)).encode())
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_perf_row(profile, device) -> list[dict]:
    """Step time of 2 DDP processes at batch b vs 1 process at batch 2b (medians and minima over repeats)."""
    import torch.multiprocessing as mp

    if str(device).startswith("cuda") and torch.cuda.device_count() < 2:
        return [{"row": ROW, "model": "bundled", "error": "needs 2 GPUs (or run with --device cpu)"}]
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    repeats = max(profile.repeats // 2, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = [_run(2 * profile.batch, profile, device) for _ in range(repeats)]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "times")
            mp.start_processes(_worker, args=(_free_port(), profile, device, 2 * repeats, out), nprocs=2,
                               start_method="spawn")
            double = [float(v) for v in Path(out).read_text().split()]
        single += [_run(2 * profile.batch, profile, device) for _ in range(repeats)]
    except Exception as e:  # the bundled model may be absent in a bare checkout
        return [{"row": ROW, "model": "bundled", "error": str(e)}]
    finally:
        torch.set_num_threads(threads)
    t = {"ddp_2": {"min_s": min(double), "median_s": statistics.median(double), "repeats": len(double)},
         "single": {"min_s": min(single), "median_s": statistics.median(single), "repeats": len(single)}}
    rel = ratio(t["ddp_2"], t["single"])
    return [{"row": ROW, "model": "bundled", "batch": f"2 x {profile.batch} vs 1 x {2 * profile.batch}",
             "seq": profile.seq, "r": profile.r, "times": t, "ddp2/single": rel,
             "note": f"step time ddp2/single {rel['min']:.2f} / {rel['median']:.2f} (min / median; ideal 0.5; "
                     f"{'gloo, 1 thread per process' if device == 'cpu' else 'nccl'})"}]


EXTRA_ROWS["ddp"] = ddp_perf_row
QUICK_ONLY_WHEN_NAMED.add("ddp")  # lorakit bench perf --quick --only ddp
