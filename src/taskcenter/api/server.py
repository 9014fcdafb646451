"""The uvicorn configuration ``taskcenter serve`` runs the API with: a request uvicorn cannot parse is answered
with problem+json like every other error, not uvicorn's plain text; and a request's head has a size limit."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from taskcenter.api.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

#: The most a request's head (request line and headers) may take. uvicorn's httptools parser has no limit of its
#: own; 64 KiB is eight times nginx's default header buffer and holds any real Authorization header or JWT.
MAX_HEAD_BYTES = 64 * 1024
#: How long the rest of a refused request is read (and dropped) before the connection closes.
_LINGER_S = 2.0
_HEAD_TOO_LARGE = orjson.dumps(
    {
        "type": PROBLEM_BASE + "header-too-large",
        "title": "Request header fields too large",
        "status": 431,
        "detail": "the request line and headers are larger than 64 KiB",
    }
)
_TIMED_OUT = orjson.dumps(
    {
        "type": PROBLEM_BASE + "request-timeout",
        "title": "Request timeout",
        "status": 408,
        "detail": "the request did not arrive whole within 60 s",
    }
)
_MALFORMED = orjson.dumps(
    {
        "type": PROBLEM_BASE + "bad-request",
        "title": "Bad request",
        "status": 400,
        "detail": "the request is not valid HTTP/1.1 (request line, headers or chunked body)",
    }
)


class ProblemHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (what its ``http="auto"`` picks when httptools is installed, as here).

    uvicorn has no option for the answer to a request its parser refuses — a bad request line, a malformed
    header, broken chunked encoding — and answers it in plain text before the application sees anything. So
    this overrides the one method that writes it, ``send_400_response``: not a documented hook, but the same
    name and signature since uvicorn 0.11; ``tests/test_api_server.py`` checks it is still called. It writes
    what uvicorn writes (its default headers — ``date``, ``server`` — then close), with a problem+json body.

    It also bounds a request's head at :data:`MAX_HEAD_BYTES` (431, then close), which the parser would buffer
    to any size: the bytes received while a head is incomplete — from its first byte (``on_message_begin``) to
    ``on_headers_complete`` — are counted (a body never is), and a complete head is measured.
    """

    read_timeout_s = 60.0
    """How long a request may take to arrive whole (head and body), from its first byte, or from the opening
    of a connection for its first request: then 408 and close. uvicorn has no such limit, so a client that
    stalls (half a head, half its declared body, nothing at all) held the connection and the handler waiting
    for the body for ever. Idle keep-alive connections between requests are uvicorn's (5 s)."""

    _head_open = False
    _head_bytes = 0
    _too_large = False
    _answered = False
    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]  # uvicorn annotates it as Transport
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def on_message_complete(self) -> None:
        self._stop_read_timer()
        super().on_message_complete()

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or self._answered:
            return
        if (self.cycle is None and not self._head_open) or (
            self.cycle is not None and self.cycle.response_started
        ):
            # Not a byte of a request (nothing to answer), or the application has answered already.
            self.transport.close()
            return
        # A handler waiting for the body gets a disconnect when the connection closes, after the answer.
        self._answer(b"HTTP/1.1 408 Request Timeout\r\n", _TIMED_OUT)

    def data_received(self, data: bytes) -> None:
        if self._answered:  # the rest of a refused request, read only so that the answer is not reset away
            return
        super().data_received(data)
        if not self._head_open or self.transport.is_closing():
            self._head_bytes = 0
            return
        self._head_bytes += len(data)  # after feeding: the parser now holds this much of an unfinished head
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_open = False
            self._answer(b"HTTP/1.1 431 Request Header Fields Too Large\r\n", _HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        if self._read_timer is None:  # the next request on a kept-alive connection
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def on_headers_complete(self) -> None:
        self._head_open = False
        # A head that arrived in one read was never counted: measure it. Raising here makes the parser fail
        # the request, and uvicorn calls send_400_response, which answers 431 instead.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            self._too_large = True
            raise ValueError("request head too large")
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._answer(b"HTTP/1.1 431 Request Header Fields Too Large\r\n", _HEAD_TOO_LARGE)
        else:
            self._answer(b"HTTP/1.1 400 Bad Request\r\n", _MALFORMED)

    def _answer(self, status_line: bytes, body: bytes) -> None:
        head = [status_line]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: " + PROBLEM_MEDIA_TYPE.encode() + b"\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        # Closing with the client's bytes still unread would reset the connection, and a client still sending
        # (a head past the limit) could lose the answer: say we are done writing, read and drop what still
        # comes for a moment, then close.
        self._answered = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


def uvicorn_config(app: Any, *, host: str, port: int, **options: Any) -> uvicorn.Config:
    """A ``uvicorn.Config`` for the API: our logging, no access log, no lifespan, :class:`ProblemHttpProtocol`."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=ProblemHttpProtocol,
        log_config=None,
        access_log=False,
        lifespan="off",
        **options,
    )
