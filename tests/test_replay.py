"""`verl-prefix replay`: a 5-step CPU trace trains dense and reuse copies to the same weights."""

import json

import pytest
import torch
from test_bench import assert_png

from verl_prefix.cli import main
from verl_prefix.replay import ReplayConfig, generate_trace, load_trace, run_replay, save_trace

CFG = dict(steps=5, hidden_size=32, num_layers=2, vocab_size=128, prompt_len=40, max_response=12)


def test_replay_fp64_tracks_dense_step_by_step():
    cfg = ReplayConfig(**CFG, dtype="float64", max_tokens_per_micro_batch=96)
    result = run_replay(generate_trace(cfg), cfg)
    assert [r.step for r in result.steps] == list(range(5))
    for r in result.steps:
        # step 0 starts from identical weights; later steps carry the (tiny) parameter drift
        assert r.loss_reuse == pytest.approx(r.loss_dense, rel=1e-9 if r.step == 0 else 1e-6)
        # HF computes RMSNorm and the router in fp32 even in fp64 (transformers' own choice): ~1e-7, not 1e-15
        assert r.grad_rel_diff < 1e-5
        assert r.param_drift < 1e-3
    # the trace is off-policy after step 0 (old log-probs from the initial weights): losses move
    assert len({round(r.loss_dense, 9) for r in result.steps}) == 5


def test_trace_round_trip_and_cli(tmp_path, capsys):
    cfg = ReplayConfig(**CFG)
    trace_file, out, png = tmp_path / "trace.pt", tmp_path / "replay.json", tmp_path / "replay.png"
    save_trace(generate_trace(cfg), trace_file)
    trace = load_trace(trace_file)
    assert len(trace["steps"]) == 5
    step = trace["steps"][0]
    lengths = zip(step["advantages"], step["input_ids"], step["response_start"], strict=True)
    assert all(len(a) == len(r) - s for a, r, s in lengths)

    args = ["replay", "--trace", str(trace_file), "--json", str(out), "--plot", str(png), "--quiet"]
    for k, v in CFG.items():
        if k != "steps":
            args += ["--" + k.replace("_", "-"), str(v)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "max grad rel diff" in printed
    doc = json.loads(out.read_text())
    assert doc["schema"] == "verl-prefix/replay/1" and len(doc["steps"]) == 5
    assert all(s["grad_rel_diff"] < 1e-3 for s in doc["steps"])  # fp32
    assert_png(png)


def test_bad_traces_name_the_problem(tmp_path):
    cfg = ReplayConfig(**CFG)
    trace = generate_trace(cfg)
    path = tmp_path / "t.pt"

    torch.save({"steps": trace["steps"]}, path)
    with pytest.raises(ValueError, match="not a verl-prefix trace"):
        load_trace(path)

    bad = {**trace, "steps": [dict(trace["steps"][0])]}
    del bad["steps"][0]["old_log_probs"]
    torch.save(bad, path)
    with pytest.raises(ValueError, match="lacks \\['old_log_probs'\\]"):
        load_trace(path)

    bad = {**trace, "steps": [dict(trace["steps"][0])]}
    bad["steps"][0]["advantages"] = [a[:-1] for a in bad["steps"][0]["advantages"]]
    torch.save(bad, path)
    with pytest.raises(ValueError, match="one value per response token"):
        load_trace(path)

    with pytest.raises(ValueError, match="--vocab-size"):
        run_replay(trace, ReplayConfig(**{**CFG, "vocab_size": 16}))


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--steps", "0"], "--steps=0 must be >= 1"),
        (["--min-response", "-2"], "--min-response=-2 must be >= 1"),
        (["--min-response", "9", "--max-response", "4"], "--min-response=9 is above --max-response=4"),
        (["--dtype", "float8"], "--dtype='float8'"),
        (["--trace", "/no/such/trace.pt"], "no such file"),
        (["--attention", "xformers"], "replay.attention='xformers'"),
    ],
)
def test_cli_replay_bad_values_are_one_line_errors(flags, named, capsys):
    assert main(["replay", *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("verl-prefix replay: error:") and named in err and err.count("\n") == 1


def test_cli_replay_steps_takes_the_first_steps_of_a_trace(tmp_path, capsys):
    trace_file = tmp_path / "trace.pt"
    save_trace(generate_trace(ReplayConfig(**CFG)), trace_file)
    args = ["replay", "--trace", str(trace_file), "--quiet"]
    for k, v in CFG.items():
        if k != "steps":
            args += ["--" + k.replace("_", "-"), str(v)]
    assert main([*args, "--steps", "2", "--json", str(tmp_path / "r.json")]) == 0
    assert len(json.loads((tmp_path / "r.json").read_text())["steps"]) == 2
    assert main([*args, "--steps", "9"]) == 2
    assert "--steps=9 but" in capsys.readouterr().err
