import pytest
import torch


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 96, (3, 9), generator=g)
