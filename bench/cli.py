"""`dynarank bench ...`: one subcommand per benchmark module (each also runs as `python -m bench.<module>`).

Each module has ``build_parser(parser)`` (adds its options, sets ``func``) and
imports torch only when it runs, so building the `dynarank` command line stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one line of help)
BENCHMARKS = {
    "replay": ("bench.replay", "replay file edits: evaluate each method before it adapts, then adapt"),
    "latency": ("bench.latency", "completion latency of a real server while sessions adapt"),
    "scale": ("bench.scale", "memory and throughput of many concurrent session adapters"),
}


def add_bench_parser(sub) -> argparse.ArgumentParser:
    """Add `bench` with its subcommands to an argparse subparsers object."""
    bench = sub.add_parser("bench", help="benchmarks that write tables and plots under docs/")
    bench_sub = bench.add_subparsers(metavar="BENCHMARK")
    for name, (module, help_text) in BENCHMARKS.items():
        try:
            build = importlib.import_module(module).build_parser
        except ImportError:  # a benchmark not written yet
            continue
        build(bench_sub.add_parser(name, help=help_text))
    return bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli")
    add_bench_parser(parser.add_subparsers(metavar="COMMAND"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
