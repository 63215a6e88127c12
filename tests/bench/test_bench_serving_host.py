"""``python -m lorakit.bench.serving --host-overhead``: the measurement runs end to end on a tiny model and leaves
the kernel registry as it found it (no timing asserts: numbers live in benchmarks/serving_host_overhead.md)."""

from __future__ import annotations

from lorakit.bench.serving import main, run_host_overhead
from lorakit.serving import bank as bank_mod


def test_host_overhead_reports_every_variant_per_bank():
    before = dict(bank_mod._KERNELS)
    res = run_host_overhead(n=2, batch=4, layers=1, repeats=1, rounds=1, profile=500)
    assert res["config"]["banks"] == 7  # one layer x seven linears
    assert res["config"]["layer_calls"] == 6  # every linear but down_proj takes hidden-size inputs
    for prefix in ("", "cpu_"):
        assert set(res[prefix + "us_per_forward"]) == {"base", "bank_kernel", "bank_kernel_reuse", "bank_torch"}
        assert set(res[prefix + "us_per_bank"]) == {"bank_kernel", "bank_kernel_reuse", "bank_torch", "layer_calls"}
        assert all(v > 0 for v in res[prefix + "us_per_forward"].values())
    assert "_plan" in res["profile"]  # the banks ran the kernel path under the profiler
    assert bank_mod._KERNELS == before


def test_host_overhead_cli_writes_json(tmp_path, capsys):
    import json

    out = tmp_path / "ho.json"
    main(["--host-overhead", "--n", "2", "--batch", "2", "--repeats", "1", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text())["config"]["tokens"] == 1
    assert '"us_per_bank"' in capsys.readouterr().out
