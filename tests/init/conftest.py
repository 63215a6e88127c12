import pytest
import torch


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
