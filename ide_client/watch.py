"""``dynarank-client watch PATH``: every saved change becomes an edit.

The texts of the repository's source files are read once at start, so the
first save of a file can be sent as open(old text) + edit(new text): the server
then trains on that first change instead of taking it as the baseline. Files
created later start from an empty baseline.

Every change is checked against the privacy rules (code_signals.privacy) before
it is sent: a file they refuse, at start or after any later save (a secret pasted
in, a new .gitignore line), is never sent, and is closed on the server if open.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import watchfiles

from code_signals.privacy import PrivacyFilter
from ide_client import messages as m
from ide_client.context import Context
from ide_client.display import format_event, format_ready, line_delta, stamp
from ide_client.repo import is_source, repository_info, source_files


class Watcher:
    def __init__(self, ctx: Context, root: Path, out=sys.stdout):
        self.ctx = ctx
        self.root = Path(root).resolve()
        self.out = out
        self.known: dict[str, str] = {}  # last text we told the server (or read at start)
        self.privacy = PrivacyFilter(self.root)
        self.refused: dict[str, str] = {}  # path -> reason last reported, so each refusal is said once
        self.session = None

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _on_event(self, msg: m.Message) -> None:
        line = format_event(msg)
        if line:
            self.say(line)
        if isinstance(msg, m.Reconnected):
            self.ctx.remember(self.session)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        self.known = dict(source_files(self.root))
        self.session = self.ctx.session(repository_info(self.root), on_event=self._on_event)
        prior_id, prior_token = self.session.session_id, self.session.resume_token
        ready = await self.ctx.connect(self.session)
        resumed = ready.session_id == prior_id if prior_id else bool(prior_token and self.session.resume_token)
        self.say(f"watching {self.root} ({len(self.known)} source files) -> {self.ctx.server}")
        self.say(format_ready(ready, resumed=resumed))
        try:
            async for changes in watchfiles.awatch(self.root, stop_event=stop, debounce=300, step=50,
                                                   watch_filter=self._wanted, recursive=True):
                for change, path in sorted(changes, key=lambda c: c[1]):
                    await self.handle(change, Path(path))
        finally:
            await self.session.close()

    def _wanted(self, change, path: str) -> bool:
        try:
            rel = Path(path).resolve().relative_to(self.root)
        except ValueError:
            return False
        if not is_source(rel):
            return False
        # Content is checked in handle; a refused file still open on the server goes there to be closed.
        return self.privacy.path_reason(rel) is None or (self.session is not None
                                                          and rel.as_posix() in self.session.documents)

    async def handle(self, change, path: Path) -> None:
        rel = path.resolve().relative_to(self.root).as_posix()
        docs = self.session.documents
        if change == watchfiles.Change.deleted or not path.exists():
            self.known.pop(rel, None)
            if rel in docs:
                await self.session.close_document(rel)
                self.say(f"{stamp()}  close     {rel}")
            return
        text, why = self.privacy.read(rel)
        if why is not None:
            if rel in docs:  # it was allowed before: the server must not keep (or train on) it any longer
                await self.session.close_document(rel)
            if self.refused.get(rel) != why:
                self.say(f"{stamp()}  not sent  {rel} ({why})")
            self.refused[rel] = why
            return
        self.refused.pop(rel, None)
        before = docs[rel].text if rel in docs else self.known.get(rel, "")
        if rel in docs and text == before:
            return  # touched, not changed
        if rel not in docs:
            if text == before and rel in self.known:
                return
            await self.session.open(rel, before, version=1)
        version = await self.session.edit(rel, text=text)
        self.known[rel] = text
        self.say(f"{stamp()}  edit      {rel} v{version} ({line_delta(before, text)})")


def run_watch(ctx: Context, root: Path, out=sys.stdout) -> int:
    watcher = Watcher(ctx, root, out)

    async def watch_until_stopped():
        stop = asyncio.Event()
        # SIGTERM (service managers, CI) stops it as Ctrl-C does: a job started in the
        # background has SIGINT ignored, so Ctrl-C alone would leave no clean way to stop it.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await watcher.run(stop)

    try:
        asyncio.run(watch_until_stopped())
    except KeyboardInterrupt:
        pass
    print(f"stopped; session saved in {ctx.state.path}", file=out, flush=True)
    return 0
