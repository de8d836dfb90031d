"""uvicorn's HTTP/1.1 protocol with a read deadline: a request must arrive whole, headers and body, within
``read_timeout_s`` of its first byte (the first request of a connection: of connecting), or the connection
is closed.

uvicorn has no such timeout (0.55; Kludex/uvicorn#157 lists it as open): ``timeout_keep_alive`` covers only
the idle time between two requests and is cancelled by any byte received, so a client that dribbles a
request (slowloris) holds a connection, and the file descriptor, for as long as it likes. No ASGI middleware
can help with headers: the app is called once they are complete.

The deadline counts time spent waiting on the client only: it ends when the request is complete (a long
streamed answer is not limited) or the connection upgrades to a websocket, and while uvicorn has paused
reading (back pressure: the app has not read the body yet) it is put off.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.observability.metrics import log_event


class ReadDeadlineProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` (uvicorn's default with ``uvicorn[standard]``) plus the read deadline."""

    read_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()  # the first request: from connecting (a client may connect and send nothing)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a later request on a kept-alive connection: from its first byte

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # we stopped reading, not the client: wait again
            self._arm()
            return
        log_event("read_timeout", timeout_s=self.read_timeout_s)
        self.transport.close()


def read_deadline_protocol(read_timeout_s: float) -> type[ReadDeadlineProtocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with this deadline (uvicorn builds one per connection)."""
    return type("ReadDeadlineProtocol", (ReadDeadlineProtocol,), {"read_timeout_s": read_timeout_s})
