"""core.rng.RngStream: a stream of its own continues exactly as torch's default generators after manual_seed."""

from __future__ import annotations

import pytest
import torch

from lorakit.core.rng import RngStream


def _draws():
    """Dropout (a bernoulli mask inside F.dropout) and randn: what methods and procedures draw."""
    return torch.nn.functional.dropout(torch.ones(3, 5), 0.5), torch.randn(4)


def test_stream_draws_as_manual_seed_and_leaves_the_default_generators_alone():
    stream = RngStream(11)
    torch.manual_seed(0)
    outside = torch.get_rng_state()
    with stream.drawing():
        first = _draws()
    assert torch.equal(torch.get_rng_state(), outside)  # the default generators are as before the block
    other = RngStream(12)
    with stream.drawing():  # the stream continues where it stopped, also around another stream's block
        with other.drawing():
            _draws()
        second = _draws()
    torch.manual_seed(11)  # reference: one generator seeded with 11, drawing the same ops in the same order
    expected = [_draws(), _draws()]
    for got, want in zip((first, second), expected):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_state_round_trip():
    stream = RngStream(3)
    with stream.drawing():
        _draws()
    saved = stream.state()
    with stream.drawing():
        after = _draws()
    copy = RngStream(99)
    copy.load_state(saved)
    with copy.drawing():
        again = _draws()
    assert all(torch.equal(a, b) for a, b in zip(after, again))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_draws_as_manual_seed():
    """On CUDA, F.dropout is the fused Philox kernel (not bernoulli_): the stream swaps the device generator's
    (seed, offset) state, so the kernel alone draws the same masks."""
    stream = RngStream(5, "cuda")
    ones = torch.ones(64, 33, device="cuda")
    with stream.drawing():
        got = [torch.nn.functional.dropout(ones, 0.3), torch.randn(7, device="cuda")]
    torch.manual_seed(5)
    want = [torch.nn.functional.dropout(ones, 0.3), torch.randn(7, device="cuda")]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
