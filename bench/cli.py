"""`dynarank bench ...`: one subcommand per benchmark module (each also runs as `python -m bench.<module>`).

Each module has ``build_parser(parser)`` (adds its options, sets ``func``) and
imports torch only when it runs, so building the `dynarank` command line stays fast.
`dynarank` finds ``add_bench_parser`` through the ``bench`` entry point of the
``dynarank.commands`` group (pyproject.toml); the server never imports bench.
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
    "infill": ("bench.infill", "fill-in-the-middle on real files: raw vs healed and shaped, and the confidence gate"),
    "context": ("bench.context", "the editor's prompt budget: seconds and quality of line completions per budget"),
    "keystrokes": ("bench.keystrokes", "the prefix cache while a user types: seconds per completion with and without"),
    "soak": ("bench.soak", "a bounded load run: websocket sessions replay real edits and ask for completions"),
    "stall": ("bench.stall", "what one client can do to others: /health stalls from heavy messages, a completion flood"),
    "engine-speed": ("bench.engine_speed", "decode/prefill tokens/s and quality per base-weight precision, vs llama.cpp"),
}


def add_bench_parser(sub) -> argparse.ArgumentParser:
    """Add `bench` with its subcommands to an argparse subparsers object."""
    bench = sub.add_parser("bench", help="benchmarks that write tables and plots under docs/")
    _add_benchmarks(bench.add_subparsers(metavar="BENCHMARK"))
    return bench


def _add_benchmarks(sub) -> None:
    for name, (module, help_text) in BENCHMARKS.items():
        try:
            build = importlib.import_module(module).build_parser
        except ModuleNotFoundError as exc:
            if exc.name == module:  # a benchmark not written yet
                continue
            _add_broken(sub, name, module, exc)
        except Exception as exc:  # noqa: BLE001 - reported when the benchmark is run
            _add_broken(sub, name, module, exc)
        else:
            build(sub.add_parser(name, help=help_text))


def _add_broken(sub, name: str, module: str, exc: Exception) -> None:
    """A benchmark whose module fails to import still gets its subcommand, which reports why."""
    def fail(args) -> int:
        print(f"error: benchmark {name!r} ({module}) failed to import: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    # Accepts any arguments (even --help: no option prefix can match) to report the failure.
    p = sub.add_parser(name, help=f"(failed to import: {type(exc).__name__})", add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs="*")
    p.set_defaults(func=fail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli", description="dynarank benchmarks")
    _add_benchmarks(parser.add_subparsers(metavar="BENCHMARK"))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
