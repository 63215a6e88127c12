import os
import re
import signal
from typing import Iterator

import pytest
import torch

# Without CUDA, Triton kernels (lorakit.serving.triton_bgmv) run under Triton's interpreter on CPU tensors. Triton
# reads this when its modules are first imported, so it is set here, before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny test models run fastest on one thread; intra-op threads on a busy 2-core machine slow them down a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def sigint_handler_kept(request) -> Iterator[None]:
    """A test, or the code it runs (its fixtures included), that leaves another SIGINT handler installed errors here
    by name, and the handler it found is put back: a leaked handler swallows a later in-process SIGINT (a test's,
    or a notebook user's Ctrl-C after calling lorakit).

    The baseline is whatever the session started with. A suite started in the background (``cmd &`` in a shell
    without job control, nohup) starts with SIGINT ignored (SIG_IGN, inherited), so Python installs no
    KeyboardInterrupt handler and an in-process SIGINT reaches nothing there, leak or not: a test that needs a
    real Ctrl-C sends it to a child process whose SIGINT it resets to SIG_DFL."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after != before:
        signal.signal(signal.SIGINT, signal.default_int_handler if before is None else before)
        pytest.fail(f"{request.node.nodeid} left SIGINT handled by {after!r} (it was {before!r}); restore the "
                    "handler on every exit path", pytrace=False)


@pytest.fixture
def seeded_svd(monkeypatch):
    """``svd_lowrank`` draws a random projection: reseed it before every call, in torch and in the name PEFT bound
    at import (peft/tuners/lora/layer.py ``from torch import svd_lowrank``), so PEFT and lorakit draw the same."""
    import peft.tuners.lora.layer

    original = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(0)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft.tuners.lora.layer, "svd_lowrank", seeded)


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 96, (3, 9), generator=g)


def methods_named_in(text: str, names: list[str]) -> set[str]:
    """The method names ``text`` mentions as whole words (``xlora`` is not in ``mixlora``, ``lora`` not in
    ``routed_lora``): letters and digits may not touch a name, and a longer name claims its span first."""
    text, taken, found = text.lower(), [], set()
    for name in sorted(names, key=len, reverse=True):
        for m in re.finditer(rf"(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])", text):
            if not any(a <= m.start() and m.end() <= b for a, b in taken):
                taken.append(m.span())
                found.add(name)
    return found


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """``pytest -k NAME`` with a registered method's name selects exactly that method's tests (contract cases
    ``method=NAME-…``, tests/methods/test_NAME.py, tests naming it): -k alone matches substrings, so ``-k xlora``
    would also pick MixLoRA and ``-k lora`` every LoRA-family method."""
    keyword = (config.getoption("keyword") or "").strip().lower()
    if not keyword:
        return
    import lorakit

    names = [m.name for m in lorakit.list_methods()]
    if keyword not in names:
        return
    kept = [item for item in items if keyword in methods_named_in(item.nodeid, names)]
    dropped = [item for item in items if item not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
