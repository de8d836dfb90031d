"""Blocking wrapper around ``AsyncSession`` for scripts and the CLI.

The async session lives on an event loop in a daemon thread; each method hands
a coroutine to that loop and waits for its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ide_client import messages as m
from ide_client.session import AsyncSession, Completion

if TYPE_CHECKING:
    from typing import Self  # 3.11+; annotations are not evaluated at runtime


class _LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dynarank-client-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class SyncCompletion:
    def __init__(self, runner: _LoopThread, completion: Completion):
        self._runner = runner
        self._completion = completion
        self.id = completion.id

    def __iter__(self) -> Iterator[str]:
        it = self._completion.__aiter__()
        while True:
            try:
                yield self._runner.run(it.__anext__())
            except StopAsyncIteration:
                return

    def result(self, timeout: float | None = None) -> m.CompletionDone:
        return self._runner.run(self._completion.result(timeout))

    def cancel(self) -> None:
        self._runner.run(self._completion.cancel())


class Session:
    """Same methods as AsyncSession, blocking."""

    def __init__(self, url: str, **kwargs):
        self._runner = _LoopThread()

        async def make():  # the async session's queues belong to the loop thread
            return AsyncSession(url, **kwargs)

        self._session: AsyncSession = self._runner.run(make())

    def __getattr__(self, name):  # read-only state: ready, documents, session_id, resume_token...
        return getattr(self._session, name)

    def connect(self) -> m.Ready:
        return self._runner.run(self._session.connect())

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._runner.run(self._session.close(), 15)
        finally:
            self._runner.stop()

    def open(self, path: str, text: str, version: int = 1, language: str | None = None) -> None:
        self._runner.run(self._session.open(path, text, version, language))

    def edit(self, path: str, **kwargs) -> int:
        return self._runner.run(self._session.edit(path, **kwargs))

    def close_document(self, path: str) -> None:
        self._runner.run(self._session.close_document(path))

    def complete(self, **kwargs) -> SyncCompletion:
        return SyncCompletion(self._runner, self._runner.run(self._session.complete(**kwargs)))

    def status(self, timeout: float = 30.0) -> m.Status:
        return self._runner.run(self._session.status(timeout))

    def feedback(self, completion_id: str, event: str, accepted_text: str | None = None,
                 timeout: float = 30.0) -> m.Ack:
        return self._runner.run(self._session.feedback(completion_id, event, accepted_text, timeout))

    def ping(self, timeout: float = 10.0) -> float:
        return self._runner.run(self._session.ping(timeout))

    def next_event(self, types: tuple[str, ...] | None = None, timeout: float | None = None) -> m.Message:
        return self._runner.run(self._session.next_event(types, timeout))
