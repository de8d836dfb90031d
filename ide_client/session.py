"""Async client of the IDE websocket (``/v1/ws``): one ``AsyncSession`` per
server session, surviving lost connections.

The client mirrors the documents it opened (path -> version, text) because a
restarted server forgets open documents: after resuming with the resume token
it re-opens what the server no longer has, so later edits are not rejected.
One reader task owns the socket's receiving side; everything else waits on
futures or queues that the reader fills.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import websockets
from websockets.exceptions import ConnectionClosed

from ide_client import messages as m
from ide_client.backoff import Backoff
from ide_client.urls import ws_url

if TYPE_CHECKING:
    from typing import Self  # 3.11+; annotations are not evaluated at runtime

log = logging.getLogger("dynarank.client")

# Hello failures that retrying with the same credentials cannot fix.
FATAL_CODES = {"unauthorized", "unsupported_protocol", "invalid_session_id"}
EVENT_QUEUE_MAX = 1000


class ProtocolError(Exception):
    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class ConnectionLost(Exception):
    """The socket closed while a request was waiting for its answer."""


@dataclass
class Document:
    version: int
    text: str | None  # None after range edits: the client does not re-apply them
    language: str | None = None


class Completion:
    """A streaming completion: ``async for text in c`` yields deltas; ``await c.result()``."""

    def __init__(self, session: AsyncSession, cid):
        self.id = cid
        self._session = session
        self._deltas: asyncio.Queue = asyncio.Queue()
        self._done: asyncio.Future = asyncio.get_running_loop().create_future()

    def _feed(self, msg) -> None:
        if isinstance(msg, m.CompletionDelta):
            self._deltas.put_nowait(msg.text)
            return
        if not self._done.done():
            if isinstance(msg, m.CompletionDone):
                self._done.set_result(msg)
            else:
                self._done.set_exception(msg)
                self._done.exception()  # the caller may never await it: no "never retrieved" warning
        self._deltas.put_nowait(None)

    @property
    def done(self) -> bool:
        return self._done.done()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self):
        while True:
            text = await self._deltas.get()
            if text is None:
                break
            yield text
        await self._done  # raises if the completion failed

    async def result(self, timeout: float | None = None) -> m.CompletionDone:
        return await asyncio.wait_for(asyncio.shield(self._done), timeout)

    async def cancel(self) -> None:
        """Ask the server to stop; the result then has finish_reason 'cancelled'."""
        if not self.done:
            await self._session._send(m.cancel(self.id))


class AsyncSession:
    def __init__(self, url: str, *, api_key: str | None = None, session_id: str | None = None,
                 resume_token: str | None = None, repository: dict | None = None, reconnect: bool = True,
                 backoff: Backoff | None = None, client_name: str = "dynarank-client",
                 on_event: Callable[[m.Message], None] | None = None, open_timeout: float = 10.0):
        self.url = ws_url(url)
        self.api_key = api_key
        self.session_id = session_id
        self.resume_token = resume_token
        self.repository = repository
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.client_name = client_name
        self.on_event = on_event
        self.open_timeout = open_timeout
        self.ready: m.Ready | None = None
        self.documents: dict[str, Document] = {}
        self.last_adapted: m.Adapted | None = None
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._failure: BaseException | None = None
        self._completions: dict = {}
        self._waiters: list[tuple[Callable, asyncio.Future]] = []
        self._events: asyncio.Queue = asyncio.Queue()
        self._ids = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------

    async def connect(self) -> m.Ready:
        ready = await self._handshake(retry_fresh=False)
        self._reader = asyncio.create_task(self._read_forever(), name="dynarank-reader")
        return ready

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, ConnectionClosed):
                pass  # the reader ends this way when we close
        self._fail_pending(ConnectionLost("session closed"))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def _handshake(self, retry_fresh: bool) -> m.Ready:
        ws = await websockets.connect(self.url, max_size=None, open_timeout=self.open_timeout,
                                      ping_interval=20, ping_timeout=20)
        try:
            ready = await self._hello(ws, self.session_id, self.resume_token)
        except ProtocolError as exc:
            if not (retry_fresh and exc.code == "invalid_resume_token"):
                await ws.close()
                raise
            # The server lost the session (new data dir): start a new one rather than stall the IDE.
            await ws.close()
            ws = await websockets.connect(self.url, max_size=None, open_timeout=self.open_timeout)
            ready = await self._hello(ws, None, None)
        except BaseException:
            await ws.close()
            raise
        self._ws = ws
        self.ready = ready
        self.session_id, self.resume_token = ready.session_id, ready.resume_token
        await self._replay_documents(ready)
        self._connected.set()
        return ready

    async def _hello(self, ws, session_id, resume_token) -> m.Ready:
        await ws.send(json.dumps(m.hello(api_key=self.api_key, session_id=session_id, resume_token=resume_token,
                                         repository=self.repository, client_name=self.client_name)))
        reply = m.parse(json.loads(await asyncio.wait_for(ws.recv(), self.open_timeout)))
        if isinstance(reply, m.Error):
            raise ProtocolError(reply.code, reply.message)
        if not isinstance(reply, m.Ready):
            raise ProtocolError("unexpected_message", f"expected ready, got {reply.type}")
        return reply

    async def _replay_documents(self, ready: m.Ready) -> None:
        """Bring the server's document mirror in line with ours after (re)connecting."""
        for path, doc in list(self.documents.items()):
            server_version = ready.documents.get(path)
            if server_version is None and doc.text is not None:
                await self._ws.send(json.dumps(m.open_document(path, doc.text, doc.version, doc.language)))
            elif server_version is not None and server_version < doc.version and doc.text is not None:
                await self._ws.send(json.dumps(m.edit_document(path, doc.version, text=doc.text)))
            elif server_version is not None and server_version > doc.version:
                doc.version = server_version  # another tab of the session moved it on

    async def _read_forever(self) -> None:
        attempts = 0
        while True:
            try:
                async for raw in self._ws:
                    self._dispatch(m.parse(json.loads(raw)))
            except ConnectionClosed:
                pass
            except (ValueError, TypeError) as exc:  # a garbled frame: drop the connection, resume cleanly
                log.warning("bad frame from server: %s", exc)
                await self._ws.close()
            self._connected.clear()
            if self._closing:
                return
            self._fail_pending(ConnectionLost("connection to the server was lost"))
            if not self.reconnect:
                self._failure = ConnectionLost("connection to the server was lost")
                return
            ready, attempts = await self._reconnect()
            if ready is None:
                return
            self._emit(m.Reconnected(ready, attempts))

    async def _reconnect(self) -> tuple[m.Ready | None, int]:
        attempts = 0
        for delay in self.backoff.delays():
            attempts += 1
            await asyncio.sleep(delay)
            if self._closing:
                return None, attempts
            try:
                return await self._handshake(retry_fresh=True), attempts
            except ProtocolError as exc:
                if exc.code in FATAL_CODES:
                    self._failure = exc
                    self._emit(m.Error(exc.code, exc.message))
                    return None, attempts
                log.info("reconnect attempt %d: %s", attempts, exc)
            except (OSError, ConnectionClosed, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
                log.info("reconnect attempt %d: %s", attempts, exc)
        self._failure = ConnectionLost(f"gave up reconnecting after {attempts} attempts")
        return None, attempts

    def _fail_pending(self, exc: BaseException) -> None:
        for completion in list(self._completions.values()):
            completion._feed(exc)
        self._completions.clear()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()

    # -- incoming ----------------------------------------------------------------

    def _dispatch(self, msg: m.Message) -> None:
        if isinstance(msg, (m.CompletionDelta, m.CompletionDone)):
            completion = self._completions.get(msg.id)
            if completion is not None:
                completion._feed(msg)
                if isinstance(msg, m.CompletionDone):
                    self._completions.pop(msg.id, None)
            return
        if isinstance(msg, m.Error) and msg.ref in self._completions:
            self._completions.pop(msg.ref)._feed(ProtocolError(msg.code, msg.message))
            return
        if isinstance(msg, m.Error) and msg.code == "unknown_completion" and not any(p(msg) for p, _ in self._waiters):
            return  # a cancel that crossed the completion's end
        if isinstance(msg, m.Adapted):
            self.last_adapted = msg
        for pred, fut in list(self._waiters):
            if not fut.done() and pred(msg):
                fut.set_result(msg)
        self._waiters = [(p, f) for p, f in self._waiters if not f.done()]
        if not isinstance(msg, (m.Pong, m.Ack)) and not (isinstance(msg, m.Status) and msg.id is not None):
            self._emit(msg)  # replies to our requests are not events

    def _emit(self, msg: m.Message) -> None:
        if self._events.qsize() >= EVENT_QUEUE_MAX:
            self._events.get_nowait()  # nobody is reading: keep the newest
        self._events.put_nowait(msg)
        if self.on_event is not None:
            try:
                self.on_event(msg)
            except Exception:
                log.exception("on_event callback failed")

    async def next_event(self, types: tuple[str, ...] | None = None, timeout: float | None = None) -> m.Message:
        """The next pushed message (adapted, status, error, reconnected), optionally of given types."""
        async def pick():
            while True:
                msg = await self._events.get()
                if types is None or msg.type in types:
                    return msg
        return await asyncio.wait_for(pick(), timeout)

    async def events(self) -> AsyncIterator[m.Message]:
        while True:
            yield await self.next_event()

    # -- outgoing ----------------------------------------------------------------

    async def _send(self, msg: dict, wait: float = 30.0) -> None:
        if self._failure is not None:
            raise self._failure
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), wait)
            except asyncio.TimeoutError:
                raise ConnectionLost("not connected to the server") from None
        await self._ws.send(json.dumps(msg))

    async def _send_tracked(self, msg: dict) -> None:
        # Document messages: the local mirror is already updated, so a send lost to a dropped
        # connection is replayed by the resume handshake instead of failing the caller.
        try:
            await self._send(msg)
        except ConnectionClosed:
            if not self.reconnect:
                raise

    async def _request(self, msg: dict, pred: Callable[[m.Message], bool], timeout: float) -> m.Message:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        await self._send(msg)
        reply = await asyncio.wait_for(fut, timeout)
        if isinstance(reply, m.Error):
            raise ProtocolError(reply.code, reply.message)
        return reply

    async def open(self, path: str, text: str, version: int = 1, language: str | None = None) -> None:
        self.documents[path] = Document(version, text, language)
        await self._send_tracked(m.open_document(path, text, version, language))

    async def edit(self, path: str, *, text: str | None = None, changes: list | None = None,
                   version: int | None = None) -> int:
        """Send an edit (full text or LSP range changes); returns the version used."""
        doc = self.documents.get(path)
        if doc is None:
            raise KeyError(f"{path} is not open; call open() first")
        doc.version = version if version is not None else doc.version + 1
        doc.text = text  # range changes leave the mirror unknown (None)
        await self._send_tracked(m.edit_document(path, doc.version, text=text, changes=changes))
        return doc.version

    async def close_document(self, path: str) -> None:
        self.documents.pop(path, None)
        await self._send_tracked(m.close_document(path))

    async def complete(self, *, prefix: str | None = None, suffix: str | None = None, path: str | None = None,
                       cursor=None, max_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None, stop=None, seed: int | None = None,
                       mode: str | None = None) -> Completion:
        """``mode``: "block" (the server's default), "line", or "raw" (no healing or shaping)."""
        cid = f"c{next(self._ids)}"
        completion = Completion(self, cid)
        self._completions[cid] = completion
        try:
            await self._send(m.complete(cid, prefix=prefix, suffix=suffix, path=path, cursor=cursor,
                                        max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                        stop=stop, seed=seed, mode=mode))
        except BaseException:
            self._completions.pop(cid, None)
            raise
        return completion

    async def status(self, timeout: float = 30.0) -> m.Status:
        # The reply echoes our id; pushed statuses never carry one.
        sid = f"s{next(self._ids)}"
        return await self._request(m.status(sid), lambda x: (isinstance(x, (m.Status, m.Error)) and
                                   getattr(x, "id", getattr(x, "ref", None)) == sid) or
                                   # a server from before status ids: only its replies list documents
                                   (isinstance(x, m.Status) and x.id is None and x.documents is not None), timeout)

    async def feedback(self, completion_id: str, event: str, accepted_text: str | None = None,
                       timeout: float = 30.0) -> m.Ack:
        """Tell the server what became of a completion (shown, accepted, partially_accepted, rejected).

        Raises ProtocolError (unknown_completion, duplicate_feedback, contradictory_feedback,
        invalid_feedback) when the server refuses it; a refused event changes nothing.
        """
        rid = f"f{next(self._ids)}"
        return await self._request(m.feedback(completion_id, event, accepted_text, rid),
                                   lambda x: isinstance(x, (m.Ack, m.Error)) and
                                   getattr(x, "id", getattr(x, "ref", None)) == rid, timeout)

    async def ping(self, timeout: float = 10.0) -> float:
        """Round trip time in seconds."""
        loop = asyncio.get_running_loop()
        pid = f"p{next(self._ids)}"
        t0 = loop.time()
        await self._request(m.ping(pid), lambda x: isinstance(x, m.Pong) and x.id == pid, timeout)
        return loop.time() - t0
