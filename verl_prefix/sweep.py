"""Sweeps of `run_bench` over a grid, and their table, JSON file and plot."""

from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from .bench import BenchConfig, BenchResult, build_model, run_bench

SWEEP_FIELDS = ("prefix_len", "suffix_len", "group_size", "attention", "prefix_activations", "prefix_tree")
JSON_SCHEMA_ID = "verl-prefix/bench/1"

_POINT = {
    "type": "object",
    "required": [
        "config",
        "dense_seconds",
        "reuse_seconds",
        "speedup",
        "flop_bound",
        "efficiency",
        "max_grad_rel_diff",
        "phase_seconds",
        "phase_peak_memory_bytes",
        "dense_peak_memory_bytes",
        "idle_memory_bytes",
        "phase_B_memory_saving",
        "capacity",
    ],
    "properties": {
        "config": {
            "type": "object",
            "required": [f.name for f in dataclasses.fields(BenchConfig)],
        },
        "dense_seconds": {"type": "number", "exclusiveMinimum": 0},
        "reuse_seconds": {"type": "number", "exclusiveMinimum": 0},
        # every timed repeat (seconds); `noisy`: a side's slowest repeat over 1.25x its fastest
        "dense_times": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
        "reuse_times": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
        "noisy": {"type": "boolean"},
        "speedup": {"type": "number", "exclusiveMinimum": 0},
        "flop_bound": {"type": "number", "minimum": 1},
        "efficiency": {"type": "number", "exclusiveMinimum": 0},
        "max_grad_rel_diff": {"type": "number", "minimum": 0},
        "phase_seconds": {
            "type": "object",
            "required": ["A", "B", "C"],
            "additionalProperties": {"type": "number", "minimum": 0},
        },
        "phase_peak_memory_bytes": {
            "type": "object",
            "required": ["A", "B", "C"],
            "additionalProperties": {"type": ["integer", "null"]},
        },
        "dense_peak_memory_bytes": {"type": ["integer", "null"]},
        "idle_memory_bytes": {"type": ["integer", "null"]},
        "phase_B_memory_saving": {"type": ["number", "null"]},
        "capacity": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": [
                        "budget_bytes",
                        "dense_rows",
                        "reuse_rows",
                        "dense_tokens",
                        "reuse_tokens",
                        "ratio",
                        "capped",
                    ],
                },
            ]
        },
    },
}

JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": JSON_SCHEMA_ID,
    "type": "object",
    "required": ["schema", "environment", "results"],
    "properties": {
        "schema": {"const": JSON_SCHEMA_ID},
        "environment": {
            "type": "object",
            "required": ["date", "device", "torch", "transformers", "python"],
        },
        "results": {"type": "array", "minItems": 1, "items": _POINT},
    },
}


def grid(base: BenchConfig, values: dict[str, Sequence]) -> list[BenchConfig]:
    """Every combination of `values` (field -> list) over `base`, in row-major order."""
    for name in values:
        if name not in SWEEP_FIELDS:
            raise ValueError(f"cannot sweep {name!r}; sweepable fields are {SWEEP_FIELDS}.")
    names = list(values)
    return [
        dataclasses.replace(base, **dict(zip(names, combo, strict=True)))
        for combo in itertools.product(*(values[n] for n in names))
    ]


def run_sweep(configs: Sequence[BenchConfig], progress: bool = True) -> list[BenchResult]:
    """Run every point on one model (built once, long enough for the longest point)."""
    if not configs:
        raise ValueError("the sweep has no points.")
    longest = max(c.row_len for c in configs)
    model = build_model(configs[0], longest)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(configs), desc="bench", unit="point", file=sys.stderr)
    results = []
    for cfg in configs:
        if bar is not None:
            tree = " tree" if cfg.prefix_tree else ""
            bar.set_postfix_str(f"P={cfg.prefix_len} S={cfg.suffix_len} G={cfg.group_size} {cfg.attention}{tree}")
        results.append(run_bench(cfg, model=model))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return results


def environment(device: str) -> dict:
    """Where and when the figures were taken."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.machine()})"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join(["verl-prefix", *sys.argv[1:]]) if sys.argv else "",
    }


def to_json(results: Sequence[BenchResult]) -> dict:
    """The document `--json` writes (validates against JSON_SCHEMA)."""
    return {
        "schema": JSON_SCHEMA_ID,
        "environment": environment(results[0].config.device),
        "results": [r.as_dict() for r in results],
    }


def write_json(results: Sequence[BenchResult], path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_json(results), indent=2))


def _mib(v: int | None) -> str:
    return f"{v / 2**20:.0f}" if v is not None else "-"


def _ms(median: float, times: Sequence[float]) -> str:
    if not times:
        return f"{median * 1e3:.1f}"
    return f"{median * 1e3:.1f} ({min(times) * 1e3:.0f}-{max(times) * 1e3:.0f})"


def format_table(results: Sequence[BenchResult]) -> str:
    """One line per point: the figures docs/benchmarks.md records."""
    head = (
        "| system | P | turns | S | G | tree | attention | activations | dense ms | reuse ms | speedup | bound | eff. "
        "| grad diff | dense MiB | A / B / C MiB | B saving | capacity | verl stock ms | verl reuse ms | engines |"
    )
    # ms columns: median (min-max of the repeats); a trailing * marks a noisy point
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        c, m = r.config, r.phase_peak_memory_bytes
        saving = f"{r.phase_B_memory_saving:.0%}" if r.phase_B_memory_saving is not None else "-"
        cap = f"{r.capacity.ratio:.2f}x" if r.capacity is not None else "-"
        e = r.engine
        engine = (
            f"{_ms(e.stock_seconds, e.stock_times)} | {_ms(e.reuse_seconds, e.reuse_times)} "
            f"| {e.speedup:.2f}x (eff. {e.efficiency:.2f})"
            if e is not None
            else "- | - | -"
        )
        lines.append(
            f"| {c.system_len} | {c.prefix_len} | {f'{c.turns - 1}x{c.turn_len}' if c.turns > 1 else '-'} "
            f"| {c.suffix_len} | {c.group_size} | {c.prefix_tree} "
            f"| {c.attention} | {c.prefix_activations} "
            f"| {_ms(r.dense_seconds, r.dense_times)} | {_ms(r.reuse_seconds, r.reuse_times)} "
            f"| {r.speedup:.2f}x{'*' if r.noisy else ''} | {r.flop_bound:.2f}x "
            f"| {r.efficiency:.2f} | {r.max_grad_rel_diff:.1e} | {_mib(r.dense_peak_memory_bytes)} "
            f"| {_mib(m.get('A'))} / {_mib(m.get('B'))} / {_mib(m.get('C'))} | {saving} | {cap} | {engine} |"
        )
    return "\n".join(lines)


def plot(results: Sequence[BenchResult], path: str | Path) -> None:
    """Four panels: speedup vs FLOP bound, efficiency per point, Phase-B memory saving, capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"P{r.config.prefix_len} S{r.config.suffix_len} G{r.config.group_size}" for r in results]
    x = range(len(results))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)

    ax = axes[0][0]
    bounds = [r.flop_bound for r in results]
    points = ax.scatter(bounds, [r.speedup for r in results], c=[r.config.group_size for r in results], cmap="viridis")
    fig.colorbar(points, ax=ax, label="group size G")
    top = max(max(bounds), max(r.speedup for r in results)) * 1.05
    ax.plot([1, top], [1, top], "k--", lw=1, label="speedup = bound")
    ax.plot([1, top], [0.8, 0.8 * top], "r:", lw=1, label="0.8 x bound")
    ax.set(xlabel="FLOP bound (x)", ylabel="measured speedup (x)", title="speedup vs FLOP bound")
    ax.legend()

    ax = axes[0][1]
    ax.bar(x, [r.efficiency for r in results])
    ax.axhline(0.8, color="r", ls=":", lw=1)
    ax.set(ylabel="speedup / bound", title="efficiency")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=6)

    ax = axes[1][0]
    ax.bar(x, [100 * (r.phase_B_memory_saving or 0.0) for r in results])
    ax.set(ylabel="% under dense (above idle)", title="Phase-B peak memory saving")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=6)

    ax = axes[1][1]
    caps = [r.capacity for r in results]
    if any(c is not None for c in caps):
        ax.bar([i - 0.2 for i in x], [c.dense_tokens if c else 0 for c in caps], width=0.4, label="dense")
        ax.bar([i + 0.2 for i in x], [c.reuse_tokens if c else 0 for c in caps], width=0.4, label="reuse")
        ax.set(ylabel="tokens in one step at the budget", title="capacity frontier")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "capacity not measured (--capacity)", ha="center", va="center")
        ax.set(title="capacity frontier")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=6)
    fig.savefig(path, dpi=110)
    plt.close(fig)
