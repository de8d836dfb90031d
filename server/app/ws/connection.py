"""The IDE websocket ``/v1/ws`` (protocol 1; see docs/protocol.md).

One ``Connection`` per socket. Messages are checked against ``SCHEMA`` before
anything happens, so a bad message gets an ``error`` reply and changes nothing.
A ``complete`` runs as a task through the app's ``GenerationBridge`` (the same
path as HTTP: admission, errors, metrics), so this loop keeps reading and a
``cancel`` reaches the engine's cancel event at once.

The event loop never waits on a thread lock that other threads hold for real work: whatever takes a
session's locks (the document mirror, attach, rollback, the feedback book) runs in a worker thread
(``asyncio.to_thread``), so a training step or a disk write elsewhere cannot stall this loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import uuid

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from server.app.auth import AuthError, check_api_key
from server.app.deps import StateDep
from server.app.params import valid_text
from server.app.state import ServerState
from server.app.ws.protocol import (
    CLOSE_UNAUTHORIZED,
    PROTOCOL,
    complete_params,
    completion_request,
    validate,
)
from server.engines.base import GenerationRequest
from server.engines.bridge import GenerationFailed
from server.errors import ClientError
from server.json_depth import check_json_depth
from server.sessions import SESSION_PREFIX, snapshot_summary

log = logging.getLogger("dynarank.ws")

router = APIRouter()


def authenticate(settings, key: str | None) -> tuple[bool, str | None]:
    """(accepted, owner identity); the identity is what the HTTP API hands the resolver."""
    try:
        return True, check_api_key(settings, key)
    except AuthError:
        return False, None


class Connection:
    def __init__(self, websocket: WebSocket, state: ServerState):
        self.ws = websocket
        self.state = state
        self.settings = state.settings
        self.services = state.services
        self.session = None
        self.owner = None
        self.inflight: dict = {}  # completion id -> cancel event
        self._tasks: set = set()  # running completions: the loop keeps only weak references
        self.loop = None
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._listener = None
        # Session pushes waiting to be sent, newest per message type (see _push_threadsafe).
        self._push_lock = threading.Lock()
        self._pushes: dict[str, dict] = {}
        self._pusher_scheduled = False
        # Who this connection is to admission and the engine's turns (a small key, not the connection itself).
        self._client_key = ("ws", uuid.uuid4().hex)
        self._counted_owner: tuple | None = None  # (owner,) while this connection counts as one of its sessions

    # -- sending -----------------------------------------------------------------

    async def send(self, message: dict) -> None:
        if self._closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps(message))
            except Exception:  # peer gone: the receive loop notices and cleans up
                self._closed = True

    async def error(self, code: str, message: str, ref=None) -> None:
        body = {"type": "error", "code": code, "message": message}
        if ref is not None:
            body["ref"] = ref
        await self.send(body)

    def _push_threadsafe(self, message: dict) -> None:
        """Queue a session push (``adapted``, ``status``) from a worker thread; bounded by coalescing.

        At most one push per message type waits: a newer one replaces an unsent older one of its type in
        place (the client gets the latest state; a slow client may skip intermediate versions). One task
        on the loop sends them in order, so a fast trainer never piles up tasks or messages.
        """
        if self._closed or self.loop is None:
            return
        with self._push_lock:
            self._pushes[message["type"]] = message
            if self._pusher_scheduled:
                return
            self._pusher_scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._start_pusher)
        except RuntimeError:
            pass  # loop closed

    def _start_pusher(self) -> None:
        task = asyncio.ensure_future(self._drain_pushes())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_pushes(self) -> None:
        while True:
            with self._push_lock:
                if self._closed or not self._pushes:
                    self._pushes.clear()
                    self._pusher_scheduled = False
                    return
                message = self._pushes.pop(next(iter(self._pushes)))
            await self.send(message)

    # -- main loop ---------------------------------------------------------------

    async def run(self) -> None:
        await self.ws.accept()
        self.loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await self.ws.receive()
                if frame["type"] == "websocket.disconnect":
                    break
                msg = None
                try:
                    msg = self._decode(frame)
                    msg = validate(msg)
                    await self.dispatch(msg)
                except ClientError as exc:
                    ref = msg.get("id", msg.get("type")) if isinstance(msg, dict) else None
                    await self.error(exc.code, exc.message, ref if isinstance(ref, (str, int)) else None)
                    if exc.code == "unauthorized":
                        await self.ws.close(code=CLOSE_UNAUTHORIZED)
                        break
        except WebSocketDisconnect:
            pass
        finally:
            await self._cleanup()

    def _decode(self, frame) -> dict:
        limit = self.settings.max_ws_message_bytes
        if frame.get("bytes") is not None:
            data = frame["bytes"]
            if len(data) > limit:
                raise ClientError("message_too_large", f"messages are limited to {limit} bytes")
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                raise ClientError("invalid_utf8", "messages must be UTF-8 text") from None
            raise ClientError("binary_frame", "send messages as text frames, not binary")
        text = frame.get("text")
        if text is None:
            raise ClientError("invalid_message", "empty frame")
        if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
            raise ClientError("message_too_large", f"messages are limited to {limit} bytes")
        check_json_depth(text)  # before json.loads, which recurses once per level
        try:
            return json.loads(text)
        except ValueError:
            raise ClientError("invalid_json", "the message is not valid JSON") from None

    async def dispatch(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "ping":
            await self.send({"type": "pong", **({"id": msg["id"]} if "id" in msg else {})})
            return
        if kind == "hello":
            await self.hello(msg)
            return
        if self.session is None:
            raise ClientError("not_ready", "send hello first")
        handler = getattr(self, f"on_{kind}")
        await handler(msg)

    async def _cleanup(self) -> None:
        self._closed = True
        self._uncount_connection()
        for event in self.inflight.values():
            event.set()
        if self.session is not None:  # off the loop: it takes the session's and the manager's locks
            await asyncio.to_thread(self._leave)

    def _leave(self) -> None:
        with self.session.lock:
            self.session.listeners.discard(self._listener)
        self.services.sessions.detach(self.session)

    async def ack(self, msg: dict, version) -> None:
        """Acknowledge a document message only when the client asked (gave an id)."""
        if "id" in msg:
            await self.send({"type": "ack", "ref": msg["type"], "id": msg["id"], "path": msg["path"],
                             "version": version})

    # -- handlers ----------------------------------------------------------------

    async def hello(self, msg: dict) -> None:
        if self.session is not None:
            raise ClientError("already_ready", "hello was already accepted on this connection")
        if self.services is None:
            raise ClientError("model_not_loaded", "no model is loaded: sessions are unavailable")
        if msg.get("protocol", PROTOCOL) != PROTOCOL:
            raise ClientError("unsupported_protocol", f"this server speaks protocol {PROTOCOL}")
        ok, owner = authenticate(self.settings, msg.get("api_key"))
        if not ok:
            raise ClientError("unauthorized", "missing or invalid api_key")
        self._count_connection(owner)
        self.owner = owner
        self._listener = self._push_threadsafe  # one object: notify(exclude=...) compares by identity
        try:
            session, token, snap, docs = await asyncio.to_thread(self._attach, msg)
        except BaseException:
            self._uncount_connection()
            raise
        self.session = session
        summary = snapshot_summary(snap)
        await self.send({
            "type": "ready", "protocol": PROTOCOL, "session_id": session.id, "resume_token": token,
            "adapter_version": summary["version"], "ranks": summary["ranks"], "mean_rank": summary["mean_rank"],
            "model": f"{self.settings.served_name}:{SESSION_PREFIX}{session.id}", "documents": docs,
            "origin": session.origin,
        })

    def _count_connection(self, owner) -> None:
        """Count this connection against its owner's ``max_ws_connections_per_key`` (on the loop: no race)."""
        limit = self.settings.max_ws_connections_per_key
        if self.state.ws_open[owner] >= limit:
            raise ClientError("too_many_connections", f"this key already has {limit} websocket sessions open; "
                                                      "close one, or try again later")
        self.state.ws_open[owner] += 1
        self._counted_owner = (owner,)

    def _uncount_connection(self) -> None:
        if self._counted_owner is not None:
            owner, = self._counted_owner
            self.state.ws_open[owner] -= 1
            if self.state.ws_open[owner] <= 0:
                del self.state.ws_open[owner]
            self._counted_owner = None

    def _attach(self, msg: dict):
        """(session, resume token, snapshot, {path: version}) with this connection listening."""
        session, token = self.services.sessions.attach(self.owner, msg.get("session_id"), msg.get("resume_token"),
                                                       msg.get("repository"))
        with session.lock:
            session.listeners.add(self._listener)
            return session, token, session.snapshot, {p: d.version for p, d in session.docs.items()}

    async def on_open(self, msg: dict) -> None:
        language = msg.get("language")
        if language is None:
            from code_signals import detect_language

            language = detect_language(msg["path"])
        # Beyond max_document_chars or max_open_documents: document_too_large / too_many_documents, nothing opened.
        await asyncio.to_thread(self.session.open_doc, msg["path"], msg["text"], msg["version"], language,
                                self.settings.edit_quiet_s, max_chars=self.settings.max_document_chars,
                                max_documents=self.settings.max_open_documents)
        await self.ack(msg, msg["version"])

    async def on_edit(self, msg: dict) -> None:
        limit = self.settings.max_edit_changes
        if len(msg.get("changes", ())) > limit:
            raise ClientError("too_many_changes", f"an edit may carry at most {limit} changes, this one has "
                                                  f"{len(msg['changes'])}: send the full text instead")
        # Off the event loop: a long document or many changes must not stall other clients or /health,
        # nor may the session's lock, which the trainer holds while it settles edits.
        await asyncio.to_thread(self._edit, msg)
        self.services.workers.wake()
        await self.ack(msg, msg["version"])

    def _edit(self, msg: dict) -> None:
        from code_signals import CodeSignalsError, apply_range_edits

        session, path = self.session, msg["path"]
        with session.lock:
            doc = session.docs.get(path)
            if doc is None:
                raise ClientError("unknown_document", f"{path} is not open", )
            if msg["version"] <= doc.version:
                raise ClientError("stale_version", f"{path} is at version {doc.version}; edits need a higher one")
            text = doc.text
        if "text" in msg:
            new_text = msg["text"]
        else:
            try:  # outside the lock: the changes are applied to the text read above
                new_text = apply_range_edits(text, msg["changes"])
            except CodeSignalsError as exc:
                raise ClientError("invalid_range", str(exc)) from None
        with session.lock:
            doc = session.docs.get(path)
            if doc is None or doc.text is not text:  # another tab changed it meanwhile
                raise ClientError("stale_version", f"{path} changed meanwhile; resend against the new version")
            session.edit_doc(path, msg["version"], new_text, max_chars=self.settings.max_document_chars)

    async def on_close(self, msg: dict) -> None:
        version = await asyncio.to_thread(self._close, msg["path"])
        self.services.workers.wake()
        await self.ack(msg, version)

    def _close(self, path: str) -> int:
        with self.session.lock:
            if path not in self.session.docs:
                raise ClientError("unknown_document", f"{path} is not open")
            version = self.session.docs[path].version
            self.session.close_doc(path)
            return version

    async def on_status(self, msg: dict) -> None:
        status = await asyncio.to_thread(self._status)
        if "id" in msg:  # pushed statuses never carry one, so a reply is unambiguous
            status["id"] = msg["id"]
        await self.send(status)

    def _status(self) -> dict:
        with self.session.lock:
            return {**self.session.status(), "documents": {p: d.version for p, d in self.session.docs.items()}}

    async def on_rollback(self, msg: dict) -> None:
        """Serve a stored version again; this tab gets the answer (with its id), the others a push."""
        def rollback():
            _, message = self.services.sessions.rollback(self.owner, self.session.id, msg["version"],
                                                         exclude=self._listener)
            return message, self.session.status()

        message, status = await asyncio.to_thread(rollback)
        await self.send({**message, **({"id": msg["id"]} if "id" in msg else {})})
        await self.send(status)

    async def on_feedback(self, msg: dict) -> None:
        reply = await asyncio.to_thread(self.services.feedback.apply, self.owner, msg["completion_id"], msg["event"],
                                        msg.get("accepted_text"), self.session)
        if "id" in msg:
            await self.send({"type": "ack", "ref": "feedback", "id": msg["id"],
                             "completion_id": reply["completion_id"], "event": reply["event"],
                             "adapter_version": reply["adapter_version"]})

    async def on_cancel(self, msg: dict) -> None:
        event = self.inflight.get(msg["id"])
        if event is None:
            raise ClientError("unknown_completion", f"no completion {msg['id']!r} in progress")
        event.set()

    async def on_complete(self, msg: dict) -> None:
        from code_signals import CodeSignalsError, apply_range_edits

        cid = msg["id"]
        # max_tokens, temperature, top_p, stop, seed, prefix and suffix: /v1/completions' rules (server/app/params.py).
        params = complete_params(msg, self.settings.max_tokens_limit)
        if cid in self.inflight:
            raise ClientError("duplicate_id", f"completion {cid!r} is already in progress")
        prefix, suffix = params.prefix, params.suffix
        # The document's text and the adapter version this completion keeps, read once, off the loop.
        text, snap = await asyncio.to_thread(self._read, msg.get("path") if prefix is None else None)
        if "path" in msg and prefix is None:
            if text is None:
                raise ClientError("unknown_document", f"{msg['path']} is not open")
            if "cursor" in msg:
                marker = f"\x00{uuid.uuid4().hex}\x00"
                pos = {"line": msg["cursor"]["line"], "character": msg["cursor"]["character"]}
                try:  # off the event loop, like an edit
                    marked = await asyncio.to_thread(
                        apply_range_edits, text, [{"range": {"start": pos, "end": pos}, "text": marker}])
                except CodeSignalsError as exc:
                    raise ClientError("invalid_range", str(exc)) from None
                i = marked.index(marker)
                prefix, suffix = text[:i], text[i:]
            else:
                prefix = text
        # An empty prefix is fine at the start of a document (a suffix, or a cursor at 1:1 of an open one).
        if not prefix and not (suffix or ("path" in msg and "cursor" in msg)):
            raise ClientError("missing_field", "complete: give prefix, or path (+ cursor) of an open document")
        mode = msg.get("mode", "block")  # an editor shows one block at the cursor
        request = completion_request(prefix or "", suffix, params, mode, self.state.editor_prompt_tokens)
        if "path" in msg and params.prefix is None:  # the document's text: checked here, as a prefix would be
            try:
                valid_text([request.prompt, request.suffix])
            except ValueError as exc:
                raise ClientError("invalid_field", f"complete: the text of {msg['path']} at the cursor {exc}") from None
        cancel = threading.Event()
        model = f"{self.settings.served_name}:{SESSION_PREFIX}{self.session.id}"
        # Admission before anything runs, shared with HTTP: at most max_inflight_requests generations in all,
        # and at most max_ws_inflight_per_connection of this connection (its completions also take the
        # engine's turns as one client). Beyond either: error too_many_requests for this id, nothing started.
        gen = self.state.bridge.start("/v1/ws", [request], snap, model_name=model,
                                      adapter_id=self.session.adapter_name, cancel=cancel, client=self._client_key,
                                      client_limit=self.settings.max_ws_inflight_per_connection)
        self.inflight[cid] = cancel
        task = asyncio.create_task(self._generate(cid, gen, request, snap, cancel, msg.get("path")))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: gen.close())  # also if the task never ran (idempotent)

    def _read(self, path: str | None):
        """(text of the open document ``path``, or None; the published snapshot)."""
        with self.session.lock:
            doc = self.session.docs.get(path) if path is not None else None
            return (doc.text if doc is not None else None), self.session.snapshot

    async def _generate(self, cid, gen, request: GenerationRequest, snap, cancel: threading.Event,
                        path=None) -> None:
        model = gen.model_name
        parts, finish, confidence = [], None, None
        try:
            try:
                async for _, chunk in gen.chunks():
                    if chunk.text:
                        parts.append(chunk.text)
                        if not cancel.is_set():
                            await self.send({"type": "completion.delta", "id": cid, "text": chunk.text})
                    finish = chunk.finish_reason or finish
                    confidence = chunk.confidence or confidence
            finally:
                gen.close()
        except ClientError as exc:
            await self.error(exc.code, exc.message, cid)
            return
        except GenerationFailed as exc:
            log.error("completion %s failed: %s", cid, exc.__cause__ or exc)
            await self.error("generation_failed", str(exc), cid)
            return
        finally:
            self.inflight.pop(cid, None)
        if finish is None and cancel.is_set():
            finish = "cancelled"
        completion_id, version = "cmpl-" + secrets.token_hex(12), snap.version if snap is not None else 0
        book = self.session.feedback
        text = "".join(parts)

        def record() -> bool:  # the book's lock is also held while the session's metadata is written
            # The session's gate: a suggestion unlikely to be accepted is marked hidden (the client shows nothing).
            hidden = request.trim and text.strip() != "" and not book.gate.decide(confidence)
            book.record(completion_id, version=version, model=model, text=text, prompt=request.prompt,
                        path=path, confidence=confidence, hidden=hidden)
            return hidden

        hidden = await asyncio.to_thread(record)
        await self.send({
            "type": "completion.done", "id": cid, "text": text, "adapter_version": version,
            "finish_reason": finish or "stop", "completion_id": completion_id, "model": model,
            "confidence": confidence, "hidden": hidden,
        })


@router.websocket("/v1/ws")
async def websocket_endpoint(websocket: WebSocket, state: StateDep) -> None:
    await Connection(websocket, state).run()
