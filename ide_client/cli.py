"""``dynarank-client``: the command line over ide_client (watch, complete, finetune, status).

Every failure ends the command with one line on stderr and exit status 2; the
common ones (no server, a refused key, an unknown session) say how to fix them
(``cli_errors.py``). ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from ide_client.cli_errors import explain
from ide_client.context import Context
from ide_client.http_api import APIError
from ide_client.repo import find_root
from ide_client.session import ConnectionLost, ProtocolError
from ide_client.urls import DEFAULT_SERVER

CURSOR_NOTE = ("Positions are 1-based: FILE:1:1 is the first character of the file, columns count characters "
               "(the Python library's cursor=(line, character) is 0-based, as in LSP).")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("DYNARANK_SERVER", DEFAULT_SERVER),
                        help="server URL (env DYNARANK_SERVER; default %(default)s)")
    common.add_argument("--api-key", default=os.environ.get("DYNARANK_API_KEY"),
                        help="API key (env DYNARANK_API_KEY)")
    common.add_argument("--session", help="join this session id instead of the saved one")
    common.add_argument("--resume", metavar="TOKEN", help="resume token of the session to join")
    common.add_argument("--new-session", action="store_true", help="ignore the saved session; start a new one")
    common.add_argument("--state-file", type=Path,
                        help="where the session is remembered (default: <repo>/.dynarank/client.json, "
                             "else ~/.config/dynarank/client.json)")
    common.add_argument("-v", "--verbose", action="store_true", help="log reconnect attempts")

    parser = argparse.ArgumentParser(prog="dynarank-client", description="Talk to a dynarank server.",
                                     epilog=CURSOR_NOTE)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", parents=[common], help="send every saved change in a repository as an edit")
    w.add_argument("path", type=Path, nargs="?", default=Path("."))
    c = sub.add_parser("complete", parents=[common], help="print a completion at FILE:LINE:COL (1-based)",
                       description="Print a completion at FILE:LINE:COL from the session's adapter.",
                       epilog=CURSOR_NOTE)
    c.add_argument("location", metavar="FILE:LINE:COL",
                   help="where to complete; 1-based line and column (the end of a line is its length + 1)")
    c.add_argument("--max-tokens", type=int, default=32)
    verdict = c.add_mutually_exclusive_group()
    verdict.add_argument("--accept", action="store_const", const="accepted", dest="feedback",
                         help="record the completion as accepted (the server may train on it once it is in the file)")
    verdict.add_argument("--reject", action="store_const", const="rejected", dest="feedback",
                         help="record the completion as rejected (never trained on)")
    f = sub.add_parser("finetune", parents=[common], help="fine-tune an adapter on a repository")
    f.add_argument("path", type=Path, nargs="?", default=Path("."))
    f.add_argument("--name", help="adapter name (default: the directory's name)")
    f.add_argument("--steps", type=int)
    f.add_argument("--epochs", type=int)
    f.add_argument("--rank-policy")
    f.add_argument("--learning-rate", type=float)
    f.add_argument("--upload", action="store_true", help="send the files even if the server could read the path")
    s = sub.add_parser("status", parents=[common], help="show the server and the saved session")
    s.add_argument("path", type=Path, nargs="?", default=Path("."))
    return parser


def make_context(args) -> Context:
    target = getattr(args, "path", None) or Path(getattr(args, "location", ".").rsplit(":", 2)[0])
    root = find_root(target)
    return Context(server=args.server, api_key=args.api_key, session_id=args.session, resume_token=args.resume,
                   new_session=args.new_session, state_path=args.state_file, repo_root=root)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    ctx = make_context(args)
    try:
        if args.command == "watch":
            from ide_client.watch import run_watch

            return run_watch(ctx, find_root(args.path) if args.path == Path(".") else args.path)
        if args.command == "complete":
            from ide_client.oneshot import run_complete

            return run_complete(ctx, args.location, args.max_tokens, feedback=args.feedback)
        if args.command == "finetune":
            from ide_client.finetune import run_finetune

            return run_finetune(ctx, args.path, name=args.name, steps=args.steps, epochs=args.epochs,
                                policy=args.rank_policy, lr=args.learning_rate, upload=args.upload)
        from ide_client.oneshot import run_status

        return run_status(ctx)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last stop: a user sees one line, never a traceback
        message = explain(exc, ctx.server, ctx.api_key)
        if message is None:
            known = isinstance(exc, (ProtocolError, APIError, ConnectionLost, ValueError, OSError))
            message = str(exc) if known else f"unexpected error: {exc!r} (run with -v for the traceback)"
        if args.verbose:
            traceback.print_exc()
        print("dynarank-client: " + " ".join(message.split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
