"""`verl-prefix compare` on two small runs recorded by verl's own Tracking (file + tensorboard)."""

from __future__ import annotations

import argparse
import re

import pytest
from test_bench import assert_png

from verl_prefix import compare
from verl_prefix.compare import compare_runs, load_run, summarize

STEPS = 5


def record(tmp_path, monkeypatch, name: str, step_time: float, memory: float, reuse: bool):
    """Log STEPS steps of a run through verl.utils.tracking.Tracking; return (jsonl path, tb dir)."""
    from verl.utils.tracking import Tracking

    jsonl, tb = tmp_path / name / f"{name}.jsonl", tmp_path / name / "tensorboard"
    jsonl.parent.mkdir(parents=True)
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(jsonl))
    monkeypatch.setenv("TENSORBOARD_DIR", str(tb))
    tracker = Tracking(project_name="compare-test", experiment_name=name, default_backend=["file", "tensorboard"])
    for step in range(1, STEPS + 1):
        data = {
            "timing_s/step": step_time + 0.01 * step,
            "perf/throughput": 1000.0 / step_time,
            "perf/max_memory_allocated_gb": memory,
            "actor/pg_loss": 0.5 / step,
        }
        if reuse:
            data["actor/prefix_reuse/phase_B_peak_memory_gb"] = memory / 3
        tracker.log(data=data, step=step)
    for logger in tracker.logger.values():
        logger.finish()
    return jsonl, tb


@pytest.fixture
def runs(tmp_path, monkeypatch):
    base = record(tmp_path, monkeypatch, "baseline", step_time=4.0, memory=60.0, reuse=False)
    reuse = record(tmp_path, monkeypatch, "reuse", step_time=1.0, memory=30.0, reuse=True)
    return base, reuse


def test_jsonl_and_tensorboard_give_the_same_series(runs):
    (jsonl, tb), _ = runs
    from_file, from_tb, merged = load_run(jsonl), load_run(tb), load_run(jsonl.parent)
    assert from_file.name == "baseline"
    keys = {"timing_s/step", "perf/throughput", "perf/max_memory_allocated_gb", "actor/pg_loss"}
    assert keys <= set(from_file.series) and keys <= set(from_tb.series)
    for key in keys:
        assert [s for s, _ in from_file.series[key]] == list(range(1, STEPS + 1))
        # TensorBoard stores float32
        assert [s for s, _ in from_tb.series[key]] == list(range(1, STEPS + 1))
        assert [v for _, v in from_tb.series[key]] == pytest.approx([v for _, v in from_file.series[key]], rel=1e-6)
        assert merged.series[key] == from_file.series[key]  # the JSONL wins where both have a point


def test_compare_writes_png_and_self_contained_html(runs, tmp_path):
    (base_jsonl, _), (_, reuse_tb) = runs
    run_a, run_b = load_run(base_jsonl), load_run(reuse_tb)
    paths = compare_runs(run_a, run_b, tmp_path / "out")
    assert_png(paths.png)
    page = paths.html.read_text()
    assert "data:image/png;base64," in page and "<script" not in page and "http" not in page.split("<body>")[1]
    rows = {r.title: r for r in summarize(run_a, run_b)}
    step = rows["step time"]
    assert step.ratio == pytest.approx((1.0 + 0.03) / (4.0 + 0.03))
    assert f"{1 / step.ratio:.2f}x" in page
    assert rows["peak memory"].better == "B" and rows["throughput"].better == "B"
    assert rows["Phase-B peak memory"].mean_a is None and rows["Phase-B peak memory"].mean_b == pytest.approx(10.0)
    assert "critic loss" not in rows  # neither run has it: no panel, no row


def test_cli(runs, tmp_path, capsys):
    (base_jsonl, _), (reuse_jsonl, _) = runs
    parser = argparse.ArgumentParser()
    compare.add_parser(parser.add_subparsers())
    out = tmp_path / "cli"
    args = parser.parse_args(["compare", str(base_jsonl), str(reuse_jsonl), "--out", str(out), "--names", "A0", "B0"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| step time | `timing_s/step` |" in printed
    assert re.search(r"step-time speedup of B over A: 3\.\d\dx", printed)
    assert (out / "compare.png").exists() and (out / "compare.html").exists()


def test_errors_name_what_was_looked_for(tmp_path):
    with pytest.raises(ValueError, match="no verl metrics found; expected a file-tracker"):
        load_run(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"not": "verl"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a verl file-tracker line"):
        load_run(bad)
    other = tmp_path / "other.jsonl"
    other.write_text('{"step": 1, "data": {"something/else": 1.0}}\n')
    with pytest.raises(ValueError, match="has any of the compared metrics"):
        compare_runs(load_run(other), load_run(other), tmp_path / "o")
