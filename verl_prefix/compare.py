"""`verl-prefix compare RUN_A RUN_B`: two verl runs' metrics side by side, as a PNG and a self-contained HTML page.

A run is what verl's trackers (`trainer.logger`) wrote:
- `file`: JSON lines `{"step": <int>, "data": {<key>: <value>, ...}}`, one per `Tracking.log` call, in
  `$VERL_FILE_LOGGER_PATH`, else `<$VERL_FILE_LOGGER_ROOT or .>/<project_name>/<experiment_name>.jsonl`;
- `tensorboard`: scalar event files `events.out.tfevents.*` in `$TENSORBOARD_DIR`, else
  `tensorboard_log/<project_name>/<experiment_name>/`.
RUN is a `*.jsonl` file, an event file, or a directory searched recursively for both. They are merged: the
JSONL value wins where both hold a key at a step (TensorBoard keeps float32); two files of one kind (or two
event directories) holding the same key at the same step are two runs, and refused.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

Series = dict[str, list[tuple[int, float]]]


@dataclass(frozen=True)
class Quantity:
    """One panel and table row: the first of `keys` a run logged is used for that run."""

    title: str
    keys: tuple[str, ...]
    unit: str = ""
    lower_is_better: bool | None = True  # None: no "better" verdict (a loss should match, not drop)
    speedup: bool = False  # also report A / B as "speedup of B over A"


# Keys as they reach verl 0.9.1's trackers: the trainer's timing/throughput metrics are logged as is; the
# engine workers' metrics (memory, losses, prefix_reuse/*) get the role prefix from `rename_dict(..., "actor/")`.
QUANTITIES: tuple[Quantity, ...] = (
    Quantity("step time", ("timing_s/step", "perf/time_per_step"), "s", speedup=True),
    Quantity("throughput", ("perf/throughput",), "tokens/s/GPU", lower_is_better=False),
    # a reuse run resets CUDA's peak per phase; its lifetime peak is prefix_reuse/max_memory_allocated_gb
    Quantity(
        "actor peak memory",
        (
            "actor/prefix_reuse/max_memory_allocated_gb",
            "actor/perf/max_memory_allocated_gb",
            "perf/max_memory_allocated_gb",
        ),
        "GiB",
    ),
    Quantity(
        "critic peak memory",
        ("critic/prefix_reuse/max_memory_allocated_gb", "critic/perf/max_memory_allocated_gb"),
        "GiB",
    ),
    Quantity("Phase A peak memory", ("actor/prefix_reuse/phase_A_peak_memory_gb",), "GiB"),
    Quantity("Phase B peak memory", ("actor/prefix_reuse/phase_B_peak_memory_gb",), "GiB"),
    Quantity("Phase C peak memory", ("actor/prefix_reuse/phase_C_peak_memory_gb",), "GiB"),
    Quantity("actor loss", ("actor/pg_loss",), lower_is_better=None),
    Quantity("critic loss", ("critic/vf_loss",), lower_is_better=None),
    Quantity("verify speedup", ("actor/prefix_reuse/verify_speedup",), "x", lower_is_better=False),
    Quantity("verify grad rel diff", ("actor/prefix_reuse/verify_max_grad_rel_diff",)),
)


@dataclass
class Run:
    """One run's numeric metrics: key -> [(step, value)] sorted by step."""

    name: str
    series: Series = field(default_factory=dict)
    path: Path | None = None  # where it was read from, for error messages

    def find(self, quantity: Quantity) -> tuple[str, list[tuple[int, float]]] | None:
        """(key, points) of the first of the quantity's keys this run logged, else None."""
        for key in quantity.keys:
            if self.series.get(key):
                return key, self.series[key]
        return None


@dataclass(frozen=True)
class ComparePaths:
    """The two files `compare_runs` wrote."""

    png: Path
    html: Path


@dataclass(frozen=True)
class Row:
    """Summary of one quantity: the mean over logged steps of each run (None where a run lacks it)."""

    quantity: Quantity
    key: str
    mean_a: float | None
    mean_b: float | None

    @property
    def ratio(self) -> float | None:
        """B / A."""
        if self.mean_a is None or self.mean_b is None or self.mean_a == 0:
            return None
        return self.mean_b / self.mean_a

    @property
    def speedup(self) -> float | None:
        """A / B, for quantities marked `speedup` (step time)."""
        if not self.quantity.speedup or self.mean_a is None or not self.mean_b:
            return None
        return self.mean_a / self.mean_b

    @property
    def better(self) -> str:
        """Which run did better (A or B) by `lower_is_better`; empty without a verdict, a value or a difference."""
        if self.quantity.lower_is_better is None or self.mean_a is None or self.mean_b is None:
            return ""
        if math.isclose(self.mean_a, self.mean_b, rel_tol=1e-6):  # TensorBoard's float32 vs the JSONL's float64
            return ""
        return "B" if (self.mean_b < self.mean_a) == self.quantity.lower_is_better else "A"


def _read_jsonl(path: Path) -> Series:
    points: dict[str, dict[int, float]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step, data = int(record["step"]), dict(record["data"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f'{path}:{lineno}: not a verl file-tracker line {{"step": ..., "data": {{...}}}}: {e}'
            ) from e
        for key, value in data.items():
            # verl's orjson writes NaN as null and numpy arrays as lists; a metric is a number
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                points.setdefault(key, {})[step] = float(value)
    return {key: sorted(by_step.items()) for key, by_step in points.items()}


def _read_events(path: Path) -> Series:
    """Scalars of one event file, or of every event file in one directory (what EventAccumulator reads)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point, not a sample
    acc.Reload()
    return {tag: sorted({e.step: float(e.value) for e in acc.Scalars(tag)}.items()) for tag in acc.Tags()["scalars"]}


def _merge(parts: Sequence[tuple[Path, Series]], into: dict[str, dict[int, float]]) -> None:
    """Add same-kind sources; two of them logging one key at one step are two runs, not parts of one."""
    owner: dict[tuple[str, int], Path] = {}
    for source, series in parts:
        for key, points in series.items():
            for step, value in points:
                other = owner.setdefault((key, step), source)
                if other != source:
                    raise ValueError(
                        f"{other} and {source} both log {key!r} at step {step}: they look like two runs; "
                        "point RUN at one run's file or directory."
                    )
                into.setdefault(key, {})[step] = value


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read every numeric metric of the run at `path` (see the module docstring); named after the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        jsonl = [path] if path.suffix == ".jsonl" else []
        event_sources = [path] if path.name.startswith("events.out.tfevents.") else []
    else:
        jsonl = sorted(path.rglob("*.jsonl"))
        event_sources = sorted({p.parent for p in path.rglob("events.out.tfevents.*")})
    if not jsonl and not event_sources:
        raise ValueError(
            f"{path}: no verl metrics files; looked for the file tracker's *.jsonl and TensorBoard's "
            "events.out.tfevents.* (trainer.logger must include 'file' or 'tensorboard')."
        )
    merged: dict[str, dict[int, float]] = {}
    _merge([(p, _read_events(p)) for p in event_sources], merged)
    from_jsonl: dict[str, dict[int, float]] = {}
    _merge([(p, _read_jsonl(p)) for p in jsonl], from_jsonl)
    for key, points in from_jsonl.items():
        merged.setdefault(key, {}).update(points)
    series = {key: sorted(points.items()) for key, points in merged.items()}
    return Run(name=name or (path.stem if path.is_file() else path.name), series=series, path=path)


def summarize(run_a: Run, run_b: Run) -> list[Row]:
    """One row per quantity that either run logged, in `QUANTITIES` order."""
    rows = []
    for q in QUANTITIES:
        a, b = run_a.find(q), run_b.find(q)
        if a is None and b is None:
            continue
        mean_a = statistics.fmean(v for _, v in a[1]) if a else None
        mean_b = statistics.fmean(v for _, v in b[1]) if b else None
        found = a or b
        assert found is not None
        rows.append(Row(q, found[0], mean_a, mean_b))
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4g}"


def _fmt_speedup(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _header(names: Sequence[str]) -> tuple[str, ...]:
    return ("quantity", "key", f"A = {names[0]}", f"B = {names[1]}", "B / A", "speedup A / B", "better")


def _cells(row: Row) -> tuple[str, ...]:
    q = row.quantity
    title = f"{q.title} ({q.unit})" if q.unit else q.title
    return (title, row.key, _fmt(row.mean_a), _fmt(row.mean_b), _fmt(row.ratio), _fmt_speedup(row.speedup), row.better)


def format_table(rows: Sequence[Row], names: Sequence[str]) -> str:
    """The summary as aligned plain text, with A and B named."""
    lines = [_header(names), *(_cells(r) for r in rows)]
    widths = [max(len(cell) for cell in column) for column in zip(*lines, strict=True)]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text) + "\n(means over all logged steps)"


def _check_has_metrics(run: Run, label: str) -> None:
    if any(run.find(q) for q in QUANTITIES):
        return
    wanted = ", ".join(k for q in QUANTITIES for k in q.keys)
    has = ", ".join(sorted(run.series)[:8]) or "no numeric metrics"
    more = ", ..." if len(run.series) > 8 else ""
    raise ValueError(
        f"run {label} ({run.path or run.name}): none of the compared metrics ({wanted}); it has: {has}{more}"
    )


def _plot(rows: Sequence[Row], runs: Sequence[Run], names: Sequence[str]) -> bytes:
    # A bare Figure on an Agg canvas: no pyplot global state, no display, whatever backend is active.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(rows))
    nrows = -(-len(rows) // cols)
    fig = Figure(figsize=(5 * cols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, row in zip(axes, rows, strict=False):
        # fixed colours: a run keeps its colour in panels the other run lacks
        for run, label, style, color in zip(runs, names, ("o-", "s--"), ("C0", "C1"), strict=True):
            found = run.find(row.quantity)
            if found:
                steps, values = zip(*found[1], strict=True)
                ax.plot(steps, values, style, color=color, markersize=3, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{row.quantity.title}\n{row.key}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(row.quantity.unit)
        ax.legend(fontsize=8)
    for ax in axes[len(rows) :]:
        ax.set_axis_off()
    fig.suptitle(f"A = {names[0]}  vs  B = {names[1]}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _page(rows: Sequence[Row], names: Sequence[str], png: bytes) -> str:
    a, b = (html.escape(n) for n in names)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _header(names))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    step = next((r for r in rows if r.speedup is not None), None)
    lead = f"<p>Step-time speedup of B over A: <b>{_fmt_speedup(step.speedup)}</b></p>" if step else ""
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>verl-prefix compare: {a} vs {b}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th:nth-child(-n+2),td:nth-child(-n+2){{text-align:left}}
img{{max-width:100%}}</style></head>
<body><h1>A = {a} vs B = {b}</h1>{lead}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p>Means over all logged steps. B / A below 1 means B logged less; speedup is A / B of the step time.</p>
<img alt="each quantity by step, both runs" src="data:image/png;base64,{image}">
</body></html>
"""


def compare_runs(run_a: Run, run_b: Run, out_dir: str | Path, names: Sequence[str] | None = None) -> ComparePaths:
    """Write `compare.png` (one panel per quantity, both runs) and a self-contained `compare.html` in `out_dir`."""
    labels = tuple(names) if names else (run_a.name, run_b.name)
    if len(labels) != 2:
        raise ValueError(f"names: expected two labels (A, B), got {labels!r}")
    _check_has_metrics(run_a, f"A ({labels[0]})")
    _check_has_metrics(run_b, f"B ({labels[1]})")
    rows = summarize(run_a, run_b)
    png = _plot(rows, (run_a, run_b), labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = ComparePaths(png=out / "compare.png", html=out / "compare.html")
    paths.png.write_bytes(png)
    paths.html.write_text(_page(rows, labels, png), encoding="utf-8")
    return paths


def run_cli(args: argparse.Namespace) -> int:
    """`verl-prefix compare`: print the summary table and the two output paths; 2 on unreadable runs."""
    try:
        run_a, run_b = load_run(args.run_a), load_run(args.run_b)
        names = tuple(args.names) if args.names else (run_a.name, run_b.name)
        paths = compare_runs(run_a, run_b, args.out, names)
    except (ValueError, FileNotFoundError) as e:
        # the message already names the path and what was looked for; a traceback adds nothing
        print(f"verl-prefix compare: error: {e}", file=sys.stderr)
        return 2
    print(format_table(summarize(run_a, run_b), names))
    print(f"wrote {paths.png}\nwrote {paths.html}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand to `verl-prefix`'s subparsers."""
    parser = subparsers.add_parser(
        "compare",
        help="two verl runs (file-tracker JSONL and/or TensorBoard logs) side by side as PNG + HTML",
        description="RUN is a file-tracker *.jsonl, a TensorBoard event file, or a directory holding either or both.",
    )
    parser.add_argument("run_a", metavar="RUN_A", help="the baseline run")
    parser.add_argument("run_b", metavar="RUN_B", help="the run to compare with it")
    parser.add_argument("--out", default="compare_out", help="output directory (default: compare_out)")
    parser.add_argument("--names", nargs=2, metavar=("A", "B"), help="labels for the two runs (default: path names)")
    parser.set_defaults(func=run_cli)
