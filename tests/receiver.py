"""A real, scriptable HTTP receiver on loopback for taskcenter's tests, plus a fake DNS resolver.

Usage::

    async def test_x(receiver: Receiver) -> None:            # fixture (import it in conftest.py)
        receiver.script("/hook", Reply(status=503, headers={"Retry-After": "2"}), Reply.json({"ok": True}))
        ... send to receiver.url("/hook") ...
        [first, second] = await receiver.wait_for(2, "/hook")

    async with Receiver() as r: ...                          # or standalone

Each path answers its scripted replies in order, then its default (``set_default``), then the receiver's
default (200, empty body). Names can be pointed at the receiver without real DNS through ``StaticResolver``.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import pytest_asyncio
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

__all__ = ["Receiver", "RecordedRequest", "Reply", "StaticResolver", "receiver"]

_FILLER = b"x" * 65536


@dataclass(frozen=True)
class Reply:
    """One scripted answer: build it from the fields or a classmethod (``Reply.json``, ``Reply.redirect``)."""

    status: int = 200
    body: bytes | str = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    """Wait this long after the request arrived before answering (headers included)."""
    hold: asyncio.Event | None = None
    """Answer only once this event is set (after ``delay_s``): lets a test keep requests in flight."""
    chunk_size: int = 0
    """With ``trickle_s``: send the body in chunks of this many bytes."""
    trickle_s: float = 0.0
    """Pause between body chunks (a slow body). Headers go out at once, with the full Content-Length."""
    oversized_bytes: int = 0
    """Send this many filler bytes as the body instead of ``body``."""
    drop: bool = False
    """Close the connection without answering anything."""

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
        """A JSON body with Content-Type application/json."""
        return cls(
            status=status,
            body=jsonlib.dumps(data),
            headers={"Content-Type": "application/json", **(headers or {})},
        )

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Reply:
        """A redirect; ``location`` goes into the Location header as given (a path or an absolute URL)."""
        return cls(status=status, headers={"Location": location})

    @classmethod
    def dropped(cls, delay_s: float = 0.0) -> Reply:
        """Close the connection without answering."""
        return cls(drop=True, delay_s=delay_s)

    @classmethod
    def oversized(cls, size: int, status: int = 200) -> Reply:
        """A body of ``size`` filler bytes (b'x'), streamed."""
        return cls(status=status, oversized_bytes=size)

    @classmethod
    def slow(cls, body: bytes | str, chunk_size: int = 1, interval_s: float = 0.05) -> Reply:
        """A body trickled out ``chunk_size`` bytes every ``interval_s`` seconds."""
        return cls(body=body, chunk_size=chunk_size, trickle_s=interval_s)

    @classmethod
    def delayed(cls, delay_s: float, status: int = 200, body: bytes | str = b"") -> Reply:
        """An answer sent only after ``delay_s`` seconds."""
        return cls(status=status, body=body, delay_s=delay_s)


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the receiver got it."""

    method: str
    path: str
    query_string: str
    query: MultiDictProxy[str]
    headers: CIMultiDictProxy[str]
    """Case-insensitive: ``req.headers["user-agent"]``."""
    raw_headers: tuple[tuple[str, str], ...]
    """Names as the client spelled them, in order."""
    body: bytes
    remote: str | None
    """The client's address."""
    client_port: int | None
    """The client's port: equal across requests that reused one keep-alive connection."""
    arrived_monotonic: float
    """time.monotonic() when the request (headers) arrived."""
    arrived_at: float
    """time.time() when the request (headers) arrived."""

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode()

    def json(self) -> Any:
        """The body parsed as JSON."""
        return jsonlib.loads(self.body)


class StaticResolver(AbstractResolver):
    """A fake DNS resolver: names map to fixed addresses; unknown names fail like a real NXDOMAIN.

    ``lookups`` records every name asked for. No packet leaves the machine.
    """

    def __init__(self, hosts: Mapping[str, Iterable[str]]) -> None:
        self.hosts = {name: list(addresses) for name, addresses in hosts.items()}
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        addresses = self.hosts.get(host.rstrip("."))
        if not addresses:
            raise OSError(socket.EAI_NONAME, f"Name or service not known: {host}")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class Receiver:
    """A real aiohttp server on loopback that records requests and answers as scripted."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, default: Reply | None = None) -> None:
        """Prepare (``start`` or ``async with`` opens it). ``port`` 0 picks a free one."""
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        """Requests being answered right now."""
        self.max_in_flight = 0
        """Highest ``in_flight`` seen since the last ``clear``."""
        self._default = default or Reply()
        self._scripts: dict[str, deque[Reply]] = {}
        self._path_defaults: dict[str, Reply] = {}
        self._arrival = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        """Stop serving; requests still held are cut off."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """``http://host:port`` with no trailing slash."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, path: str = "/") -> str:
        """The absolute URL of ``path`` (which may carry a query string) on this receiver."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def script(self, path: str, *replies: Reply) -> Self:
        """Queue ``replies`` for ``path``; each request takes the next one. Chainable."""
        self._scripts.setdefault(path, deque()).extend(replies)
        return self

    def set_default(self, reply: Reply, path: str | None = None) -> Self:
        """The answer once the script is used up: for ``path``, or for every path when None. Chainable."""
        if path is None:
            self._default = reply
        else:
            self._path_defaults[path] = reply
        return self

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """The recorded requests to ``path`` (query string ignored), oldest first."""
        return [r for r in self.requests if r.path == path]

    async def wait_for(
        self, count: int, path: str | None = None, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests (to ``path``, or to any path) have arrived and return them.

        Raises:
            TimeoutError: fewer arrived within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            got = self.requests if path is None else self.requests_for(path)
            if len(got) >= count:
                return list(got)
            arrival = self._arrival
            remaining = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0)):
                    await arrival.wait()
            except TimeoutError:
                where = "" if path is None else f" to {path}"
                raise TimeoutError(
                    f"waited {timeout}s for {count} request(s){where}, got {len(got)}"
                ) from None

    def clear(self) -> None:
        """Forget the recorded requests (scripts and defaults stay)."""
        self.requests.clear()
        self.max_in_flight = self.in_flight

    def reset(self) -> None:
        """Forget requests, scripts and defaults."""
        self.clear()
        self._scripts.clear()
        self._path_defaults.clear()
        self._default = Reply()

    def _next_reply(self, path: str) -> Reply:
        queue = self._scripts.get(path)
        if queue:
            return queue.popleft()
        return self._path_defaults.get(path, self._default)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived_monotonic, arrived_at = time.monotonic(), time.time()
        body = await request.read()
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query_string=request.query_string,
                query=MultiDictProxy(MultiDict(request.query)),
                headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                raw_headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers),
                body=body,
                remote=request.remote,
                client_port=_peer_port(request),
                arrived_monotonic=arrived_monotonic,
                arrived_at=arrived_at,
            )
        )
        arrival, self._arrival = self._arrival, asyncio.Event()
        arrival.set()
        reply = self._next_reply(request.path)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, reply)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.hold is not None:
            await reply.hold.wait()
        if reply.drop:
            if request.transport is not None:
                request.transport.close()
            return web.Response()  # never reaches the client: the transport is gone
        body = reply.body.encode() if isinstance(reply.body, str) else reply.body
        if not reply.oversized_bytes and not reply.trickle_s:
            return web.Response(status=reply.status, body=body, headers=reply.headers)
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        response.content_length = reply.oversized_bytes or len(body)
        try:
            await response.prepare(request)
            if reply.oversized_bytes:
                remaining = reply.oversized_bytes
                while remaining > 0:
                    await response.write(_FILLER[: min(remaining, len(_FILLER))])
                    remaining -= len(_FILLER)
            else:
                step = reply.chunk_size or len(body) or 1
                for start in range(0, len(body), step):
                    if start:
                        await asyncio.sleep(reply.trickle_s)
                    await response.write(body[start : start + step])
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client hung up (it had read enough): nothing left to do
        return response


def _peer_port(request: web.Request) -> int | None:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    return int(peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else None


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A started Receiver on 127.0.0.1, closed after the test."""
    async with Receiver() as r:
        yield r
