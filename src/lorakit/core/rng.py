"""Random streams of their own: several adapters trained in one batch, each drawing as it would alone.

torch's random ops (``nn.Dropout``, ``torch.randn``, ``bernoulli``...) draw from the default generators, one
stream for the process. ``RngStream`` keeps another stream's state and swaps it into the default generators
while ``drawing()`` is active, so code that knows nothing about it (a method's dropout, a procedure's noise, a
hook's ``randint``) draws from it unchanged, with the same kernels (on CUDA, the fused dropout's Philox offsets
too). A stream seeded with ``seed`` continues exactly as the default generators after ``torch.manual_seed(seed)``
would: concurrent training (``training.concurrent``) gives each job one, and each layer runs a job's random draws
for its rows inside it (``core.layer``: ``Routing.rng_streams``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class RngStream:
    """The state of torch's CPU generator (and of ``device``'s CUDA generator) for one stream of draws, as
    ``torch.manual_seed(seed)`` leaves them. ``drawing()`` makes it the default generators' state for a block and
    keeps the state the block leaves; nested blocks of other streams restore each other's states."""

    def __init__(self, seed: int, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.cuda = (torch.Generator(device=self.device).manual_seed(seed).get_state()
                     if self.device.type == "cuda" else None)

    @contextlib.contextmanager
    def drawing(self) -> Iterator["RngStream"]:
        """Random ops inside the block draw from this stream (then the default generators are as before)."""
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state(self.device) if self.cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield self
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if self.cuda is not None:
                self.cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(saved_cuda, self.device)

    def state(self) -> dict[str, torch.Tensor]:
        """``{"cpu": uint8 tensor, "cuda": uint8 tensor (CUDA streams only)}``, as ``torch.get_rng_state`` gives."""
        return {"cpu": self.cpu.clone(), **({"cuda": self.cuda.clone()} if self.cuda is not None else {})}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from ``state`` (``state()``'s keys; a missing ``"cuda"`` keeps this stream's CUDA state)."""
        self.cpu = state["cpu"].clone()
        if self.cuda is not None and "cuda" in state:
            self.cuda = state["cuda"].clone()
