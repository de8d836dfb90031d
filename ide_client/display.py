"""How the CLI prints protocol events: one line each, greppable, time-stamped."""

from __future__ import annotations

import time

from ide_client import messages as m

MAX_LISTED_RANKS = 24


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def format_ranks(ranks: dict[str, int]) -> str:
    values = list(ranks.values())
    if not values:
        return "-"
    if len(values) <= MAX_LISTED_RANKS:
        return " ".join(str(v) for v in values)
    ordered = sorted(values)
    return f"min {ordered[0]} median {ordered[len(ordered) // 2]} max {ordered[-1]} ({len(values)} modules)"


def format_event(msg: m.Message) -> str | None:
    if isinstance(msg, m.Adapted):
        return (f"{stamp()}  adapted   v{msg.version:<4} loss {msg.loss:.4f}  mean rank {msg.mean_rank:.2f}  "
                f"ranks [{format_ranks(msg.ranks)}]")
    if isinstance(msg, m.Status):
        return f"{stamp()}  status    v{msg.version:<4} queue {msg.queue_depth}  dropped {msg.dropped}"
    if isinstance(msg, m.Dropped):
        return (f"{stamp()}  dropped   {msg.count} example(s): the server is not keeping up "
                f"(queue {msg.queue_depth}/{msg.max_queue}, {msg.dropped} dropped in all)")
    if isinstance(msg, m.RolledBack):
        return f"{stamp()}  rollback  v{msg.version} serves v{msg.restored_version} again"
    if isinstance(msg, m.Error):
        return f"{stamp()}  error     {msg.code}: {msg.message}" + (f" (re {msg.ref})" if msg.ref is not None else "")
    if isinstance(msg, m.Reconnected):
        r = msg.ready
        return (f"{stamp()}  resumed   session {r.session_id} at v{r.adapter_version} "
                f"after {msg.attempts} attempt(s)")
    return None


def format_ready(ready: m.Ready, resumed: bool) -> str:
    how = "resumed" if resumed else "new"
    origin = f", from repository adapter {ready.origin}" if ready.origin else ""
    return (f"session {ready.session_id} ({how}{origin})  adapter v{ready.adapter_version}  "
            f"mean rank {ready.mean_rank:.2f}  model {ready.model}")


def line_delta(before: str, after: str) -> str:
    a, b = before.count("\n"), after.count("\n")
    return f"{len(after) - len(before):+d} chars, {b - a:+d} lines"
