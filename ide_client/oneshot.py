"""The one-shot commands: ``complete FILE:LINE:COL`` and ``status``.

Positions on the command line are 1-based (line 1, column 1 is the start of
the file, as compilers print them) and columns count characters; the Python
library's cursor is 0-based (LSP: line, UTF-16 character).
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from code_signals.privacy import PrivacyFilter
from ide_client.context import Context
from ide_client.display import format_ranks
from ide_client.http_api import APIError
from ide_client.repo import repository_info

_EOL = re.compile(r"\r\n|\r|\n")


def parse_location(spec: str) -> tuple[Path, int, int]:
    """FILE:LINE:COL (1-based, like compiler messages) -> (path, line, column) 0-based."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"expected FILE:LINE:COL (1-based), got {spec!r}")
    line, col = int(parts[1]), int(parts[2])
    if line < 1 or col < 1:
        raise ValueError(f"LINE and COL start at 1, got {spec!r}")
    return Path(parts[0]), line - 1, col - 1


def split_at(text: str, line: int, col: int) -> tuple[str, str]:
    """(text before, text after) the 0-based line and column; out of range: ValueError with the valid range.

    The end of a line (column = its length + 1, 1-based) is a position; a text that ends
    with a line break has an empty last line.
    """
    starts = [0] + [m.end() for m in _EOL.finditer(text)]
    if line >= len(starts):
        raise ValueError(f"line {line + 1} is past the end of the file: lines are 1-{len(starts)}")
    end = starts[line + 1] if line + 1 < len(starts) else len(text)
    length = len(_EOL.sub("", text[starts[line]:end]))
    if col > length:
        raise ValueError(f"column {col + 1} is past the end of line {line + 1}: columns are 1-{length + 1}")
    offset = starts[line] + col
    return text[:offset], text[offset:]


def read_source(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def privacy_reason(repo_root: Path | None, path: Path, text: str) -> str | None:
    """Why the shared privacy rules keep this file on the machine (.gitignore, secrets...), or None."""
    path = path.resolve()
    if repo_root is not None and path.is_relative_to(repo_root.resolve()):
        return PrivacyFilter(repo_root).reason(path.relative_to(repo_root.resolve()).as_posix(), text)
    return PrivacyFilter().reason(path.name, text)  # outside a repository: its name and text only


async def _complete(ctx: Context, spec: str, max_tokens: int, out, err, feedback: str | None = None) -> int:
    path, line, col = parse_location(spec)
    text = read_source(path)
    why = privacy_reason(ctx.repo_root, path, text)
    if why is not None:
        raise ValueError(f"{path}: not sent to the server ({why}); see docs/privacy.md")
    try:
        prefix, suffix = split_at(text, line, col)
    except ValueError as exc:
        raise ValueError(f"{spec}: {exc}") from None
    if not prefix and not suffix:
        raise ValueError("the file is empty: nothing to complete from")
    # prefix/suffix rather than open+cursor: the document mirror belongs to editors (watch, VS Code)
    # sharing this session, and a one-shot open/close would disturb their versions.
    session = ctx.session(repository_info(ctx.repo_root) if ctx.repo_root else None, reconnect=False)
    ready = await ctx.connect(session)
    try:
        completion = await session.complete(prefix=prefix, suffix=suffix or None, max_tokens=max_tokens)
        # (an empty prefix is fine with a suffix: completing at line 1, column 1)
        async for piece in completion:
            out.write(piece)
            out.flush()
        done = await completion.result()
        out.write("\n")
        note = ""
        if feedback is not None and done.completion_id:
            await session.feedback(done.completion_id, feedback)
            note = f", recorded {feedback}"
        print(f"[session {ready.session_id}, adapter v{done.adapter_version}, {done.finish_reason}, "
              f"{done.completion_id}{note}]", file=err)
    finally:
        await session.close()
    return 0


def run_complete(ctx: Context, spec: str, max_tokens: int, out=sys.stdout, err=sys.stderr,
                 feedback: str | None = None) -> int:
    return asyncio.run(_complete(ctx, spec, max_tokens, out, err, feedback))


async def _status(ctx: Context, out) -> int:
    sid, token = ctx.credentials()
    with ctx.api() as api:
        models = [row["id"] for row in api.models()]
        print(f"server   {ctx.server}  models: {', '.join(models)}", file=out)
        if not (sid or token):
            print("session  none saved (watch or complete starts one)", file=out)
            return 0
        session = ctx.session(reconnect=False)
        ready = await ctx.connect(session)
        try:
            status = await session.status()
        finally:
            await session.close()
        try:
            info = api.session(ready.session_id)
        except APIError:
            info = {}
    print(f"session  {ready.session_id}  adapter v{status.version}  mean rank {info.get('mean_rank', ready.mean_rank):.2f}"
          f"  model {ready.model}", file=out)
    loss = info.get("last_loss")
    print(f"training steps {info.get('steps', '?')}  last loss {'-' if loss is None else f'{loss:.4f}'}  "
          f"queue {status.queue_depth}  dropped {status.dropped}", file=out)
    print(f"ranks    [{format_ranks(info.get('ranks') or ready.ranks)}]", file=out)
    docs = status.documents or {}
    print(f"open     {len(docs)} document(s)" + "".join(f"\n  {p} v{v}" for p, v in sorted(docs.items())), file=out)
    return 0


def run_status(ctx: Context, out=sys.stdout) -> int:
    return asyncio.run(_status(ctx, out))
