"""`verl-prefix bench`: single points, sweeps, the JSON document, the plot and the capacity search."""

import json

import jsonschema
import pytest
import torch

from verl_prefix.bench import BenchConfig, _most_rows, run_bench
from verl_prefix.cli import main
from verl_prefix.random_models import SHAPES, shaped_config
from verl_prefix.sweep import JSON_SCHEMA, grid

SMALL = dict(hidden_size=32, num_layers=2, vocab_size=128, prefix_len=24, suffix_len=6, group_size=4, groups=2)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def small_args(**overrides) -> list[str]:
    args = []
    for k, v in {**SMALL, "repeats": 1, "max_tokens_per_micro_batch": 64, **overrides}.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def assert_png(path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_bench_result_fields():
    res = run_bench(BenchConfig(**SMALL, repeats=1, max_tokens_per_micro_batch=64))
    assert res.max_grad_rel_diff < 1e-4  # fp32
    assert res.flop_bound > 1.5
    assert res.speedup > 0 and res.efficiency == res.speedup / res.flop_bound
    assert set(res.phase_seconds) == {"A", "B", "C"}
    assert res.dense_peak_memory_bytes is not None and res.idle_memory_bytes is not None
    assert res.capacity is None


def test_forward_only_point_compares_log_probs():
    res = run_bench(BenchConfig(**SMALL, repeats=1, max_tokens_per_micro_batch=64, forward_only=True))
    assert res.max_grad_rel_diff < 1e-5  # log-probs, fp32
    assert res.flop_bound > 1.5 and res.phase_seconds == {}


@pytest.mark.parametrize("forward_only", [False, True])
def test_engine_peer_is_verl_stock_engine_on_the_same_mini_batch(forward_only):
    """--engine: verl's stock FSDP engine and verl-prefix's engine, same mini-batch, agree (fp32)."""
    cfg = BenchConfig(**SMALL, repeats=1, max_tokens_per_micro_batch=64, engine=True, forward_only=forward_only)
    cfg.check()
    res = run_bench(cfg)
    assert res.engine is not None and res.engine.max_rel_diff < 1e-5
    assert len(res.engine.stock_times) == len(res.engine.reuse_times) == 1
    assert res.engine.flop_bound == res.flop_bound


def test_tree_workload_shares_the_system_prompt_once():
    """--system-len: every group's prompt starts with it; the prefix tree (the default) runs it once
    per batch, which the FLOP bound credits (a larger bound than one prefix per group,
    --prefix-tree false) and the gradient still equals dense."""
    # the system prompt over 2 groups saves 300 x (2 - 1) tokens, over the default min_node_saving
    small = dict(SMALL, repeats=1, max_tokens_per_micro_batch=400, system_len=300)
    one_level = run_bench(BenchConfig(**small, prefix_tree=False))
    tree = run_bench(BenchConfig(**small))
    assert one_level.max_grad_rel_diff < 1e-4 and tree.max_grad_rel_diff < 1e-4  # fp32
    assert tree.flop_bound > one_level.flop_bound > 1.5


def test_agent_turns_are_shared_by_their_branches():
    """--turns 3: the group's rows share turn 1, then two branches share turn 2; the tree runs each
    once (one-level reuse shares the prompt only), the gradient still equals dense."""
    small = dict(SMALL, repeats=1, group_size=8, max_tokens_per_micro_batch=128, turns=3, turn_len=40)
    one_level = run_bench(BenchConfig(**small, prefix_tree=False))
    tree = run_bench(BenchConfig(**small))
    assert one_level.max_grad_rel_diff < 1e-4 and tree.max_grad_rel_diff < 1e-4  # fp32
    assert tree.flop_bound > 1.5 * one_level.flop_bound


def test_sequence_parallel_point_runs_both_sides_on_the_group():
    """--sequence-parallel 2: two gloo ranks, verl's collectives; reuse and dense (nothing shared) at
    sp=2 agree with each other (group-mean gradients, fp32)."""
    cfg = BenchConfig(**SMALL, repeats=1, max_tokens_per_micro_batch=64, sequence_parallel=2)
    cfg.check()
    res = run_bench(cfg)
    sp = res.sequence_parallel
    assert sp is not None and sp.size == 2 and sp.max_grad_rel_diff < 1e-5
    assert len(sp.dense_times) == len(sp.reuse_times) == 1
    assert sp.flop_bound > 1.5 and sp.efficiency == sp.speedup / sp.flop_bound


def test_cli_bench_single_point_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *small_args(prefix_activations="recompute"), "--quiet", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "FLOP bound" in printed and "grad diff" in printed
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, JSON_SCHEMA)
    (point,) = doc["results"]
    assert point["config"]["prefix_activations"] == "recompute"
    assert point["max_grad_rel_diff"] < 1e-4


def test_cli_bench_sweep_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = small_args(group_size="2,4", prefix_activations="keep,offload", capacity="true", max_capacity_rows=8)
    assert main(["bench", *args, "--quiet", "--json", str(out), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert table.count("| 24 | - | 6 |") == 4  # one table line per point (P, no shared turns, S)
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, JSON_SCHEMA)
    points = [(p["config"]["group_size"], p["config"]["prefix_activations"]) for p in doc["results"]]
    assert points == [(2, "keep"), (2, "offload"), (4, "keep"), (4, "offload")]
    for p in doc["results"]:
        assert p["max_grad_rel_diff"] < 1e-4
        cap = p["capacity"]
        assert 0 <= cap["dense_rows"] <= 8 and 0 <= cap["reuse_rows"] <= 8
        assert cap["dense_tokens"] == cap["dense_rows"] * (24 + 6)
    assert_png(png)


def test_schema_rejects_a_point_without_speedup(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", *small_args(), "--quiet", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    del doc["results"][0]["speedup"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, JSON_SCHEMA)


def test_grid_is_the_product_and_rejects_unknown_fields():
    configs = grid(BenchConfig(), {"prefix_len": [256, 512], "suffix_len": [32, 64, 128], "group_size": [8]})
    assert [(c.prefix_len, c.suffix_len) for c in configs] == [
        (256, 32),
        (256, 64),
        (256, 128),
        (512, 32),
        (512, 64),
        (512, 128),
    ]
    with pytest.raises(ValueError, match="cannot sweep 'hidden_size'"):
        grid(BenchConfig(), {"hidden_size": [1, 2]})


@pytest.mark.parametrize("limit,threshold", [(256, 37), (256, 1), (256, 0), (16, 100), (16, 16), (5, 3)])
def test_capacity_search_finds_the_largest_fitting_row_count(limit, threshold):
    calls = []

    def fits(n: int) -> bool:
        calls.append(n)
        assert 1 <= n <= limit
        return n <= threshold

    rows, capped = _most_rows(fits, limit)
    assert rows == min(threshold, limit)
    assert capped == (threshold >= limit)
    assert len(calls) <= 2 * limit.bit_length() + 1  # doubling then bisection


@pytest.mark.parametrize("name", SHAPES)
def test_shipped_shapes_build_without_download(name):
    config = shaped_config(name, num_layers=1, min_positions=20000)
    assert config.num_hidden_layers == 1 and config.max_position_embeddings >= 20000
    assert config.hidden_size >= 2048 and config.vocab_size > 100000
    with pytest.raises(ValueError, match="model='nope' is unknown"):
        shaped_config("nope")


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--attention", "sdpa,flex"], "--attention=flex"),  # flex cannot train on CPU
        (["--attention", "eager"], "--attention=eager"),
        (["--prefix-activations", "swap"], "--prefix-activations=swap"),
        (["--max-tokens-per-micro-batch", "16"], "raise it to at least 64"),
        (["--prefix-len", "0"], "--prefix-len=0 must be >= 1"),
        (["--device", "cuda"], "--device=cuda but this torch"),
        (["--model", "qwen3-8b"], "weights and gradients alone need 61.0 GiB"),
        (["--engine", "true", "--dtype", "float64"], "--engine true with --dtype=float64"),
        (["--sequence-parallel", "0"], "--sequence-parallel=0 must be >= 1"),
    ],
)
def test_cli_bench_rejects_a_bad_point_before_running_any(flags, named, capsys):
    if "cuda" in flags and torch.cuda.is_available() or "qwen3-8b" in flags and _free_gib() > 61:
        pytest.skip("this machine can run it")
    assert main(["bench", *flags, "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing measured
    assert captured.err.startswith("verl-prefix bench: error:") and named in captured.err
    assert captured.err.count("\n") == 1  # one line, no traceback


def _free_gib() -> float:
    from verl_prefix.core.memory import available_bytes

    return (available_bytes(torch.device("cpu")) or 0) / 2**30


@pytest.mark.parametrize(
    "flags,named", [(["--dense-logits", "none"], "--dense-logits"), (["--model", "qwen9"], "--model")]
)
def test_cli_bench_lists_the_choices(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *flags, "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {named}: invalid choice" in err and "choose from" in err


def test_cli_help_lists_meanings_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "{auto,merged,sdpa,flex,flash_attn}" in out and "shared prompt tokens per group" in out
