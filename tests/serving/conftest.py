"""Shared builders for the serving tests: random PEFT-format LoRA folders for tiny models, reference outputs."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.serving.kv_cache import PagedKVCache
from lk_models import tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(directory: Path, seed: int, factory=tiny_llama, **config) -> Path:
    """Save a LoRA with random non-zero A and B (so every adapter changes the output) into ``directory``."""
    model = factory()
    config.setdefault("target_modules", ALL)
    lk.add_adapter(model, lk.LoraConfig(init_lora_weights=False, **config), "a")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lk.save_adapter(model, directory, "a")
    return directory


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of 2..13 random token ids in [3, 96) (tiny_llama's vocabulary, above its special ids)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def kv_budget(model, blocks: int, block_size: int = 4) -> int:
    """The fp32 KV cache budget that holds exactly ``blocks`` blocks of ``model``: k and v of every layer for
    ``blocks * block_size`` token slots plus the scratch slot (``PagedKVCache``'s documented storage)."""
    layers, kv_heads, head_dim = PagedKVCache.geometry(model.config)
    return (blocks * block_size + 1) * 2 * layers * kv_heads * head_dim * 4


@pytest.fixture(scope="module")
def ranked_adapters(tmp_path_factory):
    """(root, name -> folder) of four random LoRAs for tiny_llama, a0..a3 of ranks 2, 5, 8, 11 (mixed ranks in one
    batch), all targets; the engine and static-decode tests share it."""
    root = tmp_path_factory.mktemp("ranked_adapters")
    return root, {f"a{i}": make_adapter(root / f"a{i}", seed=10 + i, r=2 + 3 * i) for i in range(4)}


def reference_model(dirs: dict[str, Path], factory=tiny_llama):
    """The base model with every adapter attached the ordinary way (per-adapter modules)."""
    model = factory()
    for name, d in dirs.items():
        lk.load_adapter(model, d, name)
    return model


def per_row(model, ids: torch.Tensor, rows, **kw) -> torch.Tensor:
    """Each row run alone with its adapter active (None = adapters disabled)."""
    outs = []
    for i, name in enumerate(rows):
        if name is None:
            with lk.disable_adapters(model):
                outs.append(model(input_ids=ids[i:i + 1], **kw).logits)
        else:
            lk.set_adapter(model, name)
            outs.append(model(input_ids=ids[i:i + 1], **kw).logits)
    return torch.cat(outs)


class LiveServer:
    """uvicorn serving ``app`` on a free port of 127.0.0.1 in a thread. Idle keep-alive connections stay open
    (uvicorn closes them after 5 s by default; a client reusing one at that instant gets "server disconnected",
    which the load tests, run with retries off, would count as an error)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = _uvicorn().Server(_uvicorn().Config(app, log_level="warning", lifespan="on",
                                                            timeout_keep_alive=600))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def start_cli_server(args: list[str], stderr_path: Path, env: dict | None = None, timeout: float = 120.0,
                     forked: bool = True):
    """``lorakit serve ARGS --port P`` in a process of its own on a free port, once /health answers: (process, base
    url). ``forked``: a child of a forkserver that has imported lorakit once (``lk_forked``: seconds saved per
    server); else ``python -m lorakit.cli`` as a user starts it. ``env``: its environment (default: this one's). Its
    stderr goes to ``stderr_path``; a process that exits or does not come up in ``timeout`` seconds fails the test
    with the end of that file."""
    import os
    import subprocess

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["serve", *args, "--port", str(port)]
    if forked:
        from lk_forked import Child

        proc = Child.cli(argv, dict(os.environ if env is None else env), os.devnull, str(stderr_path))
    else:
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                                    stderr=err)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.terminate()
            proc.wait(timeout=30)
            pytest.fail(f"lorakit serve did not come up: {Path(stderr_path).read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def _uvicorn():
    import uvicorn
    return uvicorn


@pytest.fixture(scope="session")
def sh():
    """These helpers, as a fixture (tests import nothing from conftest under --import-mode=importlib)."""
    return sys.modules[__name__]
