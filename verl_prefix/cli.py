"""`verl-prefix` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .bench import BenchConfig, format_result, run_bench


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, help=f"(default: {f.default})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verl-prefix", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="dense vs shared-prefix training step on synthetic GRPO groups")
    _add_dataclass_args(bench, BenchConfig)
    bench.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = parser.parse_args(argv)

    if args.command == "bench":
        cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
        res = run_bench(cfg, progress=lambda i, n: print(f"  repeat {i}/{n}", file=sys.stderr, flush=True))
        print(format_result(res), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res.as_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
