"""``lorakit bench serve``: S-LoRA's synthetic trace and a tiny side-by-side run of every system.

Trace reference: S-LoRA ``benchmarks/trace.py`` ``generate_requests`` — adapter index floor(N·X), X ~ numpy
``power(alpha)``; Gamma inter-arrival times with shape 1/cv² and scale cv²/rate; uniform lengths.
"""

from __future__ import annotations

import numpy as np
import pytest

from lorakit.bench.serve import ServeProfile, generate_requests, run_serve_bench, serve_markdown


def test_bench_serve_trace_follows_s_lora():
    trace = generate_requests(100, 1.0, 50.0, 1.0, 200.0, (8, 512), (8, 512), seed=3)
    assert len(trace) == 10_000 and trace == generate_requests(100, 1.0, 50.0, 1.0, 200.0, (8, 512), (8, 512), seed=3)
    gaps = np.diff([0.0] + [t.arrival_s for t in trace])
    assert abs(gaps.mean() - 1 / 50.0) < 0.002  # Gamma mean = shape * scale = 1/rate
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # cv = 1
    bursty = np.diff([t.arrival_s for t in generate_requests(10, 1.0, 50.0, 4.0, 200.0, (8, 9), (8, 9), seed=3)])
    assert abs(bursty.std() / bursty.mean() - 4.0) < 0.6
    idx = np.array([t.adapter for t in trace])
    assert idx.min() >= 0 and idx.max() <= 99 and abs(idx.mean() - 49.5) < 2  # alpha = 1: uniform
    skewed = np.array([t.adapter for t in generate_requests(100, 0.1, 50.0, 1.0, 200.0, (8, 9), (8, 9), seed=3)])
    assert np.median(skewed) < 1  # alpha = 0.1: P(X < 0.01) = 0.01^0.1 ≈ 0.63
    assert all(8 <= t.input_len < 512 and 8 <= t.output_len < 512 for t in trace)


def test_bench_serve_tiny_run_all_systems():
    profile = ServeProfile(models=("bundled",), num_adapters=(2,), req_rate=3.0, duration_s=1.0, input_range=(4, 8),
                           output_range=(2, 4), max_loras=2, peft_max_n=2, timeout_s=120.0)
    result = run_serve_bench(profile, log=lambda s: None)
    row = result["rows"][0]
    assert set(row["systems"]) == {"lorakit", "merged", "peft_mixed", "peft_swap"}
    for stats in row["systems"].values():
        assert stats["requests"] == 3 and stats["throughput_rps"] > 0 and 0 <= stats["slo_attainment"] <= 1
    assert set(row["ratios"]) == {"lorakit/merged", "lorakit/peft_mixed", "lorakit/peft_swap"}
    assert "lorakit/peft_swap" in serve_markdown(result)


def test_bench_serve_graph_systems_run_and_report_their_ratios():
    """``lorakit_graphs`` / ``merged_graphs``: the engine with ``cuda_graphs=True`` (static decode steps; eager on
    the CPU), side by side with the plain engine; unknown system names are refused with the known ones."""
    import pytest

    from lorakit.core.errors import ConfigError

    profile = ServeProfile(models=("bundled",), num_adapters=(2,), req_rate=3.0, duration_s=1.0, input_range=(4, 8),
                           output_range=(2, 4), max_loras=2, timeout_s=120.0,
                           systems=("lorakit", "merged", "lorakit_graphs", "merged_graphs"))
    result = run_serve_bench(profile, log=lambda s: None)
    row = result["rows"][0]
    for stats in row["systems"].values():
        assert stats["requests"] == 3 and stats["throughput_rps"] > 0
    assert set(row["ratios"]) == {"lorakit/merged", "lorakit_graphs/merged_graphs", "lorakit_graphs/merged",
                                  "lorakit_graphs/lorakit", "merged_graphs/merged"}
    assert "lorakit_graphs/merged_graphs" in serve_markdown(result)
    with pytest.raises(ConfigError, match="lorakit_graphs"):
        ServeProfile(systems=("lorakit_graph",))


def test_bench_serve_adapters_that_cannot_fit_on_disk_are_refused_before_writing(tmp_path):
    """Was: `bench serve --num-adapters 100000000` started writing a hundred million adapter folders."""
    from lk_models import tiny_llama

    from lorakit.bench.serving import write_random_adapters
    from lorakit.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"1,000,000,000,000 random adapters of rank 16 need .* GB, but .* GB free"):
        write_random_adapters(tiny_llama(), tmp_path / "adapters", 10 ** 12)
    assert not (tmp_path / "adapters").exists()
    assert len(write_random_adapters(tiny_llama(), tmp_path / "adapters", 2)) == 2


def test_bench_serve_choices_share_the_prefill_side_by_side_with_unshared():
    """``choices`` (OpenAI's n) > 1: ``lorakit`` prefills each prompt once (Engine.submit_choices), ``lorakit_unshared``
    once per choice; both generate the same number of tokens (the same seeded choices), and the ratio is reported.
    The PEFT systems take one choice per request: asking them for more is a ConfigError naming them."""
    from lorakit.core.errors import ConfigError

    profile = ServeProfile(models=("bundled",), num_adapters=(2,), req_rate=3.0, duration_s=1.0, input_range=(4, 8),
                           output_range=(2, 4), max_loras=2, timeout_s=120.0, choices=3,
                           systems=("lorakit", "lorakit_unshared"))
    result = run_serve_bench(profile, log=lambda s: None)
    row, trace = result["rows"][0], generate_requests(2, 1.0, 3.0, 1.0, 1.0, (4, 8), (2, 4), seed=42)
    shared, unshared = row["systems"]["lorakit"], row["systems"]["lorakit_unshared"]
    prompts = sum(t.input_len for t in trace)
    assert shared["prefill_tokens"] == prompts and unshared["prefill_tokens"] == 3 * prompts
    assert shared["throughput_tok_s"] * shared["makespan_s"] == pytest.approx(
        unshared["throughput_tok_s"] * unshared["makespan_s"]) == 3 * sum(t.output_len for t in trace)
    assert set(row["ratios"]) == {"lorakit/lorakit_unshared"}
    assert "| lorakit_unshared |" in serve_markdown(result)
    with pytest.raises(ConfigError, match="choices=2 runs the engine systems only.*peft_mixed, peft_swap"):
        ServeProfile(choices=2)


def test_any_seed_the_flag_takes_draws_a_trace():
    """``--seeds`` takes 0..2**63 - 1 (cli_parser.seed_arg), but the trace seeded numpy's RandomState, which takes
    0..2**32 - 1: ``lorakit bench serve --seeds 5000000000`` failed with numpy's ValueError after building the base
    model. A seed above 2**32 - 1 now draws its own trace; the seeds below draw the one they always did (the
    RandomState(seed) draws written out here)."""
    from lorakit.cli_parser import MAX_SEED

    big = [generate_requests(4, 1.0, 5.0, 1.0, 2.0, (8, 64), (8, 64), seed=s) for s in (2**32, 2**40, MAX_SEED)]
    assert all(len(t) == 10 for t in big) and big[0] != big[1] != big[2]
    small = generate_requests(4, 1.0, 5.0, 1.0, 2.0, (8, 64), (8, 64), seed=7)
    rng = np.random.RandomState(7)
    adapters = np.minimum((rng.power(1.0, 10) * 4).astype(int), 3)
    assert [t.adapter for t in small] == adapters.tolist()
    assert [t.input_len for t in small] == rng.randint(8, 64, 10).tolist()
