from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny test models run fastest on one thread; intra-op threads on a busy 2-core machine slow them down a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 96, (3, 9), generator=g)
