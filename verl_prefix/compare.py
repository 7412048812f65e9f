"""`verl-prefix compare RUN_A RUN_B`: two verl runs' metrics side by side, as PNG and HTML.

A run is what verl's trackers wrote: the `file` tracker's JSONL (one `{"step": s, "data": {...}}`
per line; `$VERL_FILE_LOGGER_PATH`, else `<VERL_FILE_LOGGER_ROOT or .>/<project>/<experiment>.jsonl`)
and/or the `tensorboard` tracker's event files (`$TENSORBOARD_DIR`, else
`tensorboard_log/<project>/<experiment>/`). RUN may be a JSONL file, an event file or a directory
holding either or both (JSONL wins where both have a key at a step).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Quantity:
    """One panel: the first of `keys` a run has is plotted; `lower_is_better` orients the ratio."""

    title: str
    keys: tuple[str, ...]
    unit: str
    lower_is_better: bool


QUANTITIES: tuple[Quantity, ...] = (
    Quantity("step time", ("timing_s/step", "perf/time_per_step"), "s", True),
    Quantity("throughput", ("perf/throughput",), "tokens/s/GPU", False),
    Quantity("peak memory", ("perf/max_memory_allocated_gb",), "GiB", True),
    Quantity("Phase-B peak memory", ("actor/prefix_reuse/phase_B_peak_memory_gb",), "GiB", True),
    Quantity("actor loss", ("actor/pg_loss",), "", True),
    Quantity("critic loss", ("critic/vf_loss",), "", True),
    Quantity("reuse speedup (verify)", ("actor/prefix_reuse/verify_speedup",), "x", False),
    Quantity("grad rel diff (verify)", ("actor/prefix_reuse/verify_max_grad_rel_diff",), "", True),
)


@dataclass
class Run:
    name: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)] by step

    def values(self, quantity: Quantity) -> tuple[str, list[tuple[int, float]]] | None:
        for key in quantity.keys:
            if self.series.get(key):
                return key, self.series[key]
        return None


def _read_jsonl(path: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step, data = int(record["step"]), record["data"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a verl file-tracker line ({{'step': s, 'data': {{...}}}}): {e}") from e
        for key, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, {})[step] = float(value)
    return out


def _read_events(path: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: float(e.value) for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read every numeric metric of one run (see the module docstring for what a RUN is)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory.")
    if path.is_file():
        jsonl = [path] if path.suffix == ".jsonl" else []
        events = [path] if "tfevents" in path.name else []
    else:
        jsonl = sorted(path.rglob("*.jsonl"))
        events = sorted(path.rglob("events.out.tfevents.*"))
    if not jsonl and not events:
        raise ValueError(
            f"{path}: no verl metrics found; expected a file-tracker *.jsonl (trainer.logger includes 'file') "
            "or TensorBoard events.out.tfevents.* (trainer.logger includes 'tensorboard')."
        )
    merged: dict[str, dict[int, float]] = {}
    event_sources = [path] if path.is_file() else sorted({p.parent for p in events})  # one reader per directory
    for source in [*(_read_events(p) for p in event_sources if events), *map(_read_jsonl, jsonl)]:
        for key, points in source.items():
            merged.setdefault(key, {}).update(points)  # later sources (JSONL) win
    series = {key: sorted(points.items()) for key, points in merged.items()}
    return Run(name=name or (path.stem if path.is_file() else path.name), series=series)


@dataclass
class Summary:
    title: str
    key: str
    unit: str
    mean_a: float | None
    mean_b: float | None
    ratio: float | None  # mean_b / mean_a
    better: str  # "A", "B" or ""


def summarize(run_a: Run, run_b: Run) -> list[Summary]:
    """Per quantity either run has: the mean over steps of each run and B / A."""
    rows = []
    for q in QUANTITIES:
        a, b = run_a.values(q), run_b.values(q)
        if a is None and b is None:
            continue
        mean_a = statistics.fmean(v for _, v in a[1]) if a else None
        mean_b = statistics.fmean(v for _, v in b[1]) if b else None
        ratio = mean_b / mean_a if mean_a and mean_b is not None else None
        better = ""
        if mean_a is not None and mean_b is not None and mean_a != mean_b:
            better = "B" if (mean_b < mean_a) == q.lower_is_better else "A"
        rows.append(Summary(q.title, (a or b)[0], q.unit, mean_a, mean_b, ratio, better))
    return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def format_summary(run_a: Run, run_b: Run, rows: list[Summary]) -> str:
    lines = [f"| quantity | key | {run_a.name} (A) | {run_b.name} (B) | B / A | better |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.title} | `{r.key}` | {_fmt(r.mean_a)} | {_fmt(r.mean_b)} | {_fmt(r.ratio)} | {r.better} |")
    step = next((r for r in rows if r.title == "step time" and r.ratio), None)
    if step is not None:
        lines.append(f"step-time speedup of B over A: {1 / step.ratio:.2f}x")
    return "\n".join(lines)


@dataclass
class ComparePaths:
    png: Path
    html: Path


def compare_runs(run_a: Run, run_b: Run, out_dir: str | Path) -> ComparePaths:
    """Write `compare.png` (one panel per quantity, both runs) and a self-contained `compare.html`."""
    rows = summarize(run_a, run_b)
    if not rows:
        known = sorted({k for q in QUANTITIES for k in q.keys})
        raise ValueError(f"neither {run_a.name!r} nor {run_b.name!r} has any of the compared metrics {known}.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels = [q for q in QUANTITIES if run_a.values(q) or run_b.values(q)]
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False, constrained_layout=True)
    for ax, q in zip(axes.flat, panels, strict=False):
        for run, style in ((run_a, "o-"), (run_b, "s--")):
            found = run.values(q)
            if found:
                steps, values = zip(*found[1], strict=True)
                ax.plot(steps, values, style, ms=3, label=run.name)
        ax.set(title=q.title, xlabel="step", ylabel=q.unit)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    png = out / "compare.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)

    encoded = base64.b64encode(png.read_bytes()).decode("ascii")
    table = "".join(
        f"<tr><td>{html.escape(r.title)}</td><td><code>{html.escape(r.key)}</code></td><td>{_fmt(r.mean_a)}</td>"
        f"<td>{_fmt(r.mean_b)}</td><td>{_fmt(r.ratio)}</td><td>{r.better}</td></tr>"
        for r in rows
    )
    step = next((r for r in rows if r.title == "step time" and r.ratio), None)
    speedup = f"<p>Step-time speedup of B over A: <b>{1 / step.ratio:.2f}x</b></p>" if step else ""
    a, b = html.escape(run_a.name), html.escape(run_b.name)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>verl-prefix compare: {a} vs {b}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>{a} (A) vs {b} (B)</h1>{speedup}
<table><tr><th>quantity</th><th>key</th><th>A mean</th><th>B mean</th><th>B / A</th><th>better</th></tr>{table}</table>
<p>Means over all logged steps.</p>
<img alt="metrics of both runs by step" src="data:image/png;base64,{encoded}">
</body></html>
"""
    page_path = out / "compare.html"
    page_path.write_text(page)
    return ComparePaths(png=png, html=page_path)


def run_cli(args: argparse.Namespace) -> int:
    names = args.names or [None, None]
    run_a, run_b = load_run(args.run_a, names[0]), load_run(args.run_b, names[1])
    paths = compare_runs(run_a, run_b, args.out)
    print(format_summary(run_a, run_b, summarize(run_a, run_b)))
    print(f"wrote {paths.png}\nwrote {paths.html}")
    return 0


def add_parser(subparsers) -> None:
    """The `compare` subcommand of `verl-prefix`."""
    p = subparsers.add_parser(
        "compare", help="two verl runs (file-tracker JSONL / TensorBoard logs) side by side as PNG and HTML"
    )
    p.add_argument("run_a", metavar="RUN_A", help="baseline run: a *.jsonl, an event file, or a directory")
    p.add_argument("run_b", metavar="RUN_B", help="the run to compare with it")
    p.add_argument("--out", default="compare_out", help="output directory (default: compare_out)")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="labels for the two runs")
    p.set_defaults(func=run_cli)
