"""`verl-prefix compare` on two small runs recorded by verl's own `Tracking` (file + tensorboard backends)."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import pytest

from verl_prefix import compare
from verl_prefix.compare import compare_runs, load_run, summarize

PROJECT = "compare-test"
STEPS = 5
KEYS = ("timing_s/step", "perf/throughput", "actor/perf/max_memory_allocated_gb", "actor/pg_loss")


def metrics(step: int, step_time: float, memory: float, reuse: bool) -> dict[str, float]:
    """What verl 0.9.1's trainer logs for these keys (plus verl-prefix's own with reuse on)."""
    data = {
        "timing_s/step": step_time + 0.01 * step,
        "perf/throughput": 1000.0 / step_time,
        "actor/perf/max_memory_allocated_gb": memory,
        "actor/pg_loss": 0.5 / step,
        "actor/pg_clipfrac": 0.1,  # logged but not compared
    }
    if reuse:
        for phase, share in zip("ABC", (0.5, 0.25, 0.5), strict=True):
            data[f"actor/prefix_reuse/phase_{phase}_peak_memory_gb"] = memory * share
        data["actor/prefix_reuse/verify_speedup"] = 3.5
        data["actor/prefix_reuse/verify_max_grad_rel_diff"] = 1e-3
    return data


def record(experiment: str, step_time: float, memory: float, reuse: bool) -> None:
    from verl.utils.tracking import Tracking

    tracker = Tracking(project_name=PROJECT, experiment_name=experiment, default_backend=["file", "tensorboard"])
    for step in range(1, STEPS + 1):
        tracker.log(data=metrics(step, step_time, memory, reuse), step=step)
    tracker.finish()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """baseline at verl's default paths (cwd-relative); reuse with both trackers pointed into one directory."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("VERL_FILE_LOGGER_PATH", "VERL_FILE_LOGGER_ROOT", "TENSORBOARD_DIR"):
            mp.delenv(var, raising=False)
        mp.chdir(root)
        record("baseline", step_time=4.0, memory=60.0, reuse=False)
        mp.setenv("VERL_FILE_LOGGER_PATH", str(root / "reuse" / "metrics.jsonl"))
        mp.setenv("TENSORBOARD_DIR", str(root / "reuse" / "tb"))
        (root / "reuse").mkdir()
        record("reuse", step_time=1.0, memory=30.0, reuse=True)
    return {
        "root": root,
        "base_jsonl": root / PROJECT / "baseline.jsonl",
        "base_tb": root / "tensorboard_log" / PROJECT / "baseline",
        "reuse_dir": root / "reuse",
    }


def test_verl_tracker_layout(runs):
    assert runs["base_jsonl"].is_file()
    assert list(runs["base_tb"].glob("events.out.tfevents.*"))
    assert (runs["reuse_dir"] / "metrics.jsonl").is_file() and list((runs["reuse_dir"] / "tb").iterdir())


def test_jsonl_tensorboard_and_merged_give_the_same_series(runs):
    from_file, from_tb = load_run(runs["base_jsonl"]), load_run(runs["base_tb"])
    assert from_file.name == from_tb.name == "baseline"
    for run in (from_file, from_tb):
        assert set(KEYS) <= set(run.series)
        for key in KEYS:
            assert [s for s, _ in run.series[key]] == list(range(1, STEPS + 1))
    for key in KEYS:  # TensorBoard keeps float32
        assert [v for _, v in from_tb.series[key]] == pytest.approx([v for _, v in from_file.series[key]], rel=1e-6)
        assert [v for _, v in from_file.series[key]] == [metrics(s, 4.0, 60.0, False)[key] for s in range(1, 6)]

    merged = load_run(runs["reuse_dir"])
    reuse_file = load_run(runs["reuse_dir"] / "metrics.jsonl")
    reuse_tb = load_run(runs["reuse_dir"] / "tb")
    assert merged.name == "reuse"
    assert set(merged.series) == set(reuse_file.series) == set(reuse_tb.series)
    assert merged.series == reuse_file.series  # the JSONL's float64 wins where both hold a point


def test_compare_writes_png_and_self_contained_html(runs, tmp_path):
    from PIL import Image

    run_a, run_b = load_run(runs["base_jsonl"]), load_run(runs["reuse_dir"])
    paths = compare_runs(run_a, run_b, tmp_path / "out", names=("dense", "prefix reuse"))
    assert paths.png == tmp_path / "out" / "compare.png" and paths.html == tmp_path / "out" / "compare.html"

    png = paths.png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(paths.png) as img:
        width, height = img.size
        assert width > 100 and height > 100
    import matplotlib.image

    assert matplotlib.image.imread(paths.png).size > 0

    rows = {r.quantity.title: r for r in summarize(run_a, run_b)}
    step = rows["step time"]
    assert step.mean_a == pytest.approx(4.03) and step.mean_b == pytest.approx(1.03)
    assert step.ratio == pytest.approx(1.03 / 4.03) and step.speedup == pytest.approx(4.03 / 1.03)
    assert rows["throughput"].better == rows["actor peak memory"].better == "B"
    assert rows["actor peak memory"].ratio == pytest.approx(0.5)
    assert rows["Phase B peak memory"].mean_a is None and rows["Phase B peak memory"].mean_b == pytest.approx(7.5)
    assert rows["verify speedup"].mean_b == pytest.approx(3.5)
    assert "critic loss" not in rows and "critic peak memory" not in rows  # neither run logged them

    page = paths.html.read_text(encoding="utf-8")
    assert f"data:image/png;base64,{base64.b64encode(png).decode('ascii')}" in page
    assert "<script" not in page and "http" not in page and "<link" not in page  # no external assets
    assert "A = dense" in page and "B = prefix reuse" in page
    assert f"{4.03 / 1.03:.2f}x" == "3.91x" and "Step-time speedup of B over A: <b>3.91x</b>" in page
    for value in ("4.03", "1.03", "0.2556", "0.5", "7.5"):
        assert f"<td>{value}</td>" in page


def test_cli_via_add_parser(runs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    compare.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["compare", str(runs["base_tb"]), str(runs["reuse_dir"]), "--out", str(out)])
    assert args.func is compare.run_cli and args.names is None
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "A = baseline" in printed and "B = reuse" in printed
    step_line = next(line for line in printed.splitlines() if line.startswith("step time"))
    assert "timing_s/step" in step_line and step_line.split()[-2] == "3.91x" and step_line.split()[-1] == "B"
    assert f"wrote {out / 'compare.png'}" in printed and f"wrote {out / 'compare.html'}" in printed
    assert (out / "compare.png").is_file() and (out / "compare.html").is_file()

    defaults = parser.parse_args(["compare", "a", "b", "--names", "x", "y"])
    assert defaults.out == "compare_out" and defaults.names == ["x", "y"]

    (tmp_path / "empty").mkdir()
    failing = parser.parse_args(["compare", str(runs["base_jsonl"]), str(tmp_path / "empty"), "--out", str(out)])
    assert failing.func(failing) == 2
    err = capsys.readouterr().err
    assert err.startswith("verl-prefix compare: error: ") and "empty: no verl metrics files" in err


def test_errors_name_the_path_and_what_was_looked_for(runs, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ValueError, match=r"empty: no verl metrics files; looked for .*\*\.jsonl.*events\.out\.tfevents"
    ):
        load_run(empty)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_run(tmp_path / "missing")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"not": "verl"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not a verl file-tracker line"):
        load_run(bad)

    other = tmp_path / "other.jsonl"
    other.write_text('{"step": 1, "data": {"something/else": 1.0, "val/flag": true, "nan": null}}\n')
    run = load_run(other)
    assert run.series == {"something/else": [(1, 1.0)]}
    with pytest.raises(
        ValueError, match=r"run B \(other\) \(.*other\.jsonl\): none of the compared metrics \(timing_s"
    ):
        compare_runs(load_run(runs["base_jsonl"]), run, tmp_path / "o")

    # the project directory holds two experiments: refused, not silently overlaid
    monkeypatch.chdir(tmp_path)
    for var in ("VERL_FILE_LOGGER_PATH", "VERL_FILE_LOGGER_ROOT", "TENSORBOARD_DIR"):
        monkeypatch.delenv(var, raising=False)
    record("one", step_time=2.0, memory=10.0, reuse=False)
    record("two", step_time=1.0, memory=10.0, reuse=True)
    for project_dir in (tmp_path / PROJECT, tmp_path / "tensorboard_log" / PROJECT, tmp_path):
        with pytest.raises(ValueError, match=r"(one|two).* and .*(one|two).* both log .* look like two runs"):
            load_run(project_dir)


def test_quantities_are_distinct_and_extendable():
    keys = [k for q in compare.QUANTITIES for k in q.keys]
    assert len(keys) == len(set(keys))
    assert len({q.title for q in compare.QUANTITIES}) == len(compare.QUANTITIES)
    assert [q.title for q in compare.QUANTITIES if q.speedup] == ["step time"]
