"""`verl-prefix bench` runs end to end and reports a reuse gradient equal to dense."""

import json

from verl_prefix.bench import BenchConfig, run_bench
from verl_prefix.cli import main

SMALL = dict(hidden_size=32, num_layers=2, vocab_size=128, prefix_len=24, suffix_len=6, group_size=4, groups=2)


def test_bench_result_fields():
    res = run_bench(BenchConfig(**SMALL, repeats=1, max_tokens_per_micro_batch=64))
    assert res.max_grad_rel_diff < 1e-4  # fp32
    assert res.flop_bound > 1.5
    assert res.speedup > 0 and res.efficiency == res.speedup / res.flop_bound
    assert set(res.phase_seconds) == {"A", "B", "C"}


def test_cli_bench_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--repeats", "1", "--prefix-activations", "recompute", "--json", str(out)]
    for k, v in SMALL.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "FLOP bound" in printed and "grad diff" in printed
    data = json.loads(out.read_text())
    assert data["config"]["prefix_activations"] == "recompute"
    assert data["max_grad_rel_diff"] < 1e-4
