"""The HTTP sender: one outbound request in, one SendResult out, over pooled keep-alive connections.

It never raises for a failed request: failures come back classified 'timeout', 'network_error' or 'blocked'.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from aiohttp import (
    ClientConnectorCertificateError,
    ClientConnectorDNSError,
    ClientConnectorError,
    ClientError,
    ClientPayloadError,
    ClientResponse,
    ClientSession,
    ClientSSLError,
    ClientTimeout,
    DummyCookieJar,
    InvalidURL,
    NonHttpUrlClientError,
    ServerDisconnectedError,
    TCPConnector,
)
from aiohttp.abc import AbstractResolver
from yarl import URL

from taskcenter.errors import BlockedAddress, ConfigError, ValidationError
from taskcenter.ssrf import GuardedResolver, GuardPolicy, check_url

__all__ = [
    "MAX_RESPONSE_BYTES",
    "METHODS",
    "ErrorKind",
    "HttpConfig",
    "OutboundRequest",
    "SendResult",
    "Sender",
]

ErrorKind = Literal["timeout", "network_error", "blocked"]
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"})
MAX_RESPONSE_BYTES = 1 << 20
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Callers set exactly the headers they want; aiohttp would otherwise add Accept, Accept-Encoding and, for raw
# bytes, Content-Type: application/octet-stream.
_SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "Content-Type"})
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding", "transfer-encoding"})
_HTTP_SCHEMES = frozenset({"http", "https"})
_TIMEOUT_CACHE_SIZE = 64
# Parsed URLs kept (Sender._parse). A URL may be 8 KiB long, so at most ~20 MiB; most traffic goes to a few URLs.
_URL_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """How the sender talks HTTP. Validated when built."""

    connect_timeout_s: float = 10.0
    """Limit on establishing a TCP (and TLS) connection."""
    max_response_bytes: int = 65536
    """Response body kept up to this many bytes (at most 1 MiB); the rest is dropped and flagged truncated."""
    pool_size: int = 100
    """Connections kept per connection pool (one pool per distinct guard policy)."""
    user_agent: str = "taskcenter"
    """User-Agent sent unless the request sets its own; the edge passes 'taskcenter/<version>'."""
    max_redirects: int = 10
    """Redirects followed at most, for requests that follow redirects."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_response_bytes <= MAX_RESPONSE_BYTES:
            raise ConfigError(f"max_response_bytes must be within 0..{MAX_RESPONSE_BYTES}")
        if self.connect_timeout_s <= 0:
            raise ConfigError("connect_timeout_s must be positive")
        if self.pool_size < 1:
            raise ConfigError("pool_size must be at least 1")
        if self.max_redirects < 0:
            raise ConfigError("max_redirects must not be negative")


@dataclass(frozen=True, slots=True)
class OutboundRequest:
    """One HTTP request to send, exactly as it should go out."""

    method: str
    """One of GET POST PUT PATCH DELETE HEAD (upper case)."""
    url: str
    headers: Mapping[str, str]
    """Sent as given; the sender adds only User-Agent (when absent) and the transport headers."""
    body: bytes | None
    timeout_s: float
    """Limit on the whole exchange, redirects and body read included."""
    follow_redirects: bool = False
    guard: GuardPolicy | None = None
    """SSRF policy; None (or a disabled policy) means no guard."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValidationError(f"unsupported method {self.method!r}", field="method")
        if not self.timeout_s > 0:
            raise ValidationError("timeout must be positive", field="timeout")


@dataclass(frozen=True, slots=True)
class SendResult:
    """What came of a request.

    Classify by ``error_kind`` first: when it is set the exchange failed, although ``status_code`` may still
    hold the status of a response whose body then broke off. ``error`` without ``error_kind`` means a
    response arrived but a redirect was not followed (too many, or to a non-HTTP URL).
    """

    status_code: int | None
    headers: dict[str, str]
    """Response headers as the server spelled them; repeated headers joined with ', '."""
    body: str
    truncated: bool
    duration_ms: int
    error: str | None
    error_kind: ErrorKind | None
    final_url: str
    """The URL of the last request made (differs from the request's after redirects)."""

    def header(self, name: str) -> str | None:
        """A response header by case-insensitive name, or None."""
        name = name.lower()
        for key, value in self.headers.items():
            if key.lower() == name:
                return value
        return None


class Sender:
    """Sends OutboundRequests over pooled keep-alive connections.

    One aiohttp session (and connection pool) per distinct guard policy, because the SSRF check lives in the
    pool's resolver; plus one for unguarded requests.
    """

    def __init__(
        self, config: HttpConfig, resolver_factory: Callable[[], AbstractResolver] | None = None
    ) -> None:
        """Prepare a sender; sessions open on ``start`` or first use.

        Args:
            config: HTTP settings.
            resolver_factory: makes the DNS resolver of each pool (the guard wraps it); default aiohttp's.
        """
        self._config = config
        self._resolver_factory = resolver_factory
        self._sessions: dict[GuardPolicy | None, ClientSession] = {}
        self._resolvers: list[AbstractResolver] = []
        self._timeouts: dict[float, ClientTimeout] = {}
        self._urls: dict[str, tuple[URL, str]] = {}
        self._closed = False

    async def start(self) -> None:
        """Open the unguarded pool (guarded pools open on first use)."""
        self._session_for(None)

    async def close(self) -> None:
        """Close every pool; in-flight requests fail."""
        self._closed = True
        sessions, self._sessions = self._sessions, {}
        resolvers, self._resolvers = self._resolvers, []
        for session in sessions.values():
            await session.close()
        for resolver in resolvers:
            await resolver.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _session_for(self, guard: GuardPolicy | None) -> ClientSession:
        if self._closed:
            raise RuntimeError("Sender is closed")
        session = self._sessions.get(guard)
        if session is None:
            inner = self._resolver_factory() if self._resolver_factory is not None else None
            resolver = GuardedResolver(guard, inner) if guard is not None else inner
            if resolver is not None:
                self._resolvers.append(resolver)
            connector = TCPConnector(limit=self._config.pool_size, resolver=resolver, use_dns_cache=True)
            session = ClientSession(
                connector=connector,
                headers={"User-Agent": self._config.user_agent},
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                cookie_jar=DummyCookieJar(),  # one business's cookies must never reach another's requests
                trust_env=False,
            )
            self._sessions[guard] = session
        return session

    def _parse(self, text: str) -> tuple[URL, str]:
        """``URL(text)`` and its string form, kept per distinct URL.

        Most tasks go to a few webhook URLs; parsing and printing each request's URL cost ~1.3 us of the ~30 us
        the sender spends around aiohttp per request. A URL that does not parse raises ValueError, uncached.
        """
        entry = self._urls.get(text)
        if entry is None:
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.clear()
            url = URL(text)
            entry = self._urls[text] = (url, str(url))
        return entry

    def _timeout(self, total_s: float) -> ClientTimeout:
        timeout = self._timeouts.get(total_s)
        if timeout is None:
            if len(self._timeouts) >= _TIMEOUT_CACHE_SIZE:
                self._timeouts.clear()
            timeout = ClientTimeout(total=total_s, sock_connect=self._config.connect_timeout_s)
            self._timeouts[total_s] = timeout
        return timeout

    async def send(self, request: OutboundRequest) -> SendResult:
        """Send ``request``, following redirects if it asks, and read the response body up to the cap.

        Never raises for a failed request (refused, reset, timed out, blocked, malformed URL).

        Raises:
            RuntimeError: the sender is closed.
        """
        guard = request.guard if request.guard is not None and request.guard.enabled else None
        session = self._session_for(guard)
        cap = self._config.max_response_bytes
        method, headers, body = request.method, request.headers, request.body
        url: URL | str = request.url
        status: int | None = None
        redirects = 0
        started = time.perf_counter()
        deadline = started + request.timeout_s
        timeout = self._timeout(request.timeout_s)
        try:
            parsed, final_url = self._parse(request.url)
            if guard is not None:
                check_url(request.url, guard, parsed=parsed)
            url = parsed
            while True:
                status = None
                async with session.request(
                    method, url, headers=headers, data=body, allow_redirects=False, timeout=timeout
                ) as resp:
                    status = resp.status
                    location = resp.headers.get("Location") if request.follow_redirects else None
                    raw, truncated = await _read_body(resp, cap)
                    if location is None or status not in _REDIRECTS:
                        return _result(resp, raw, truncated, started, None, final_url)
                    if redirects >= self._config.max_redirects:
                        error = f"too many redirects (max {self._config.max_redirects})"
                        return _result(resp, raw, truncated, started, error, final_url)
                    try:
                        target = url.join(URL(location))
                    except ValueError:
                        target = None
                    if target is None or target.scheme not in _HTTP_SCHEMES or not target.raw_host:
                        error = f"redirect not followed: unsupported location {location!r}"
                        return _result(resp, raw, truncated, started, error, final_url)
                previous, url = url, target
                final_url = str(url)
                if guard is not None:
                    check_url(url, guard)
                if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
                    method, body = "GET", None
                    headers = {k: v for k, v in headers.items() if k.lower() not in _BODY_HEADERS}
                if _origin_changed(previous, url):
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                redirects += 1
                timeout = ClientTimeout(
                    total=max(deadline - time.perf_counter(), 0.001),
                    sock_connect=self._config.connect_timeout_s,
                )
        except BlockedAddress as exc:
            return _failure(None, started, exc.message, "blocked", url)
        except TimeoutError as exc:
            return _failure(status, started, _describe_timeout(exc, request.timeout_s), "timeout", url)
        except (ClientError, OSError, ValueError) as exc:
            blocked = _blocked_cause(exc)
            if blocked is not None:
                return _failure(None, started, blocked.message, "blocked", url)
            if isinstance(exc, ClientConnectorError) and isinstance(exc.os_error, TimeoutError):
                return _failure(status, started, f"connect timed out: {exc.host}:{exc.port}", "timeout", url)
            return _failure(status, started, _describe(exc), "network_error", url)


async def _read_body(resp: ClientResponse, cap: int) -> tuple[bytes, bool]:
    """Read at most ``cap`` bytes of the body; True when more was there (the connection is then dropped)."""
    content = resp.content
    data = await content.read(cap + 1)
    if data and not content.at_eof() and len(data) <= cap:
        buffer = bytearray(data)
        while len(buffer) <= cap:
            chunk = await content.read(cap + 1 - len(buffer))
            if not chunk:
                break
            buffer += chunk
        data = bytes(buffer)
    if len(data) > cap:
        resp.close()  # unread rest: this connection cannot be reused
        return data[:cap], True
    return data, False


def _decode(resp: ClientResponse, raw: bytes) -> str:
    if not raw:
        return ""
    try:
        text = raw.decode(resp.charset or "utf-8", "replace")
    except LookupError:  # unknown charset named by the server
        text = raw.decode("utf-8", "replace")
    # PostgreSQL's jsonb holds no U+0000 (the result could not be written, and the task was sent again): a NUL
    # is shown as U+FFFD, like the bytes that do not decode.
    return text.replace("\x00", "\ufffd")


def _response_headers(resp: ClientResponse) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in resp.headers.items():
        previous = headers.get(key)
        headers[key] = value if previous is None else f"{previous}, {value}"
    return headers


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _result(
    resp: ClientResponse, raw: bytes, truncated: bool, started: float, error: str | None, final_url: str
) -> SendResult:
    return SendResult(
        status_code=resp.status,
        headers=_response_headers(resp),
        body=_decode(resp, raw),
        truncated=truncated,
        duration_ms=_elapsed_ms(started),
        error=error,
        error_kind=None,
        final_url=final_url,
    )


def _failure(status: int | None, started: float, error: str, kind: ErrorKind, url: URL | str) -> SendResult:
    return SendResult(
        status_code=status,
        headers={},
        body="",
        truncated=False,
        duration_ms=_elapsed_ms(started),
        error=error,
        error_kind=kind,
        final_url=str(url),
    )


def _origin_changed(old: URL, new: URL) -> bool:
    """Whether credentials must be dropped: another origin, except an http->https upgrade of the same host."""
    if old.host == new.host and old.port == new.port and old.scheme == new.scheme:
        return False
    upgrade = (
        old.host == new.host
        and old.scheme == "http"
        and new.scheme == "https"
        and old.port in (80, None)
        and new.port in (443, None)
    )
    return not upgrade


def _blocked_cause(exc: BaseException) -> BlockedAddress | None:
    """The guard's refusal behind an error aiohttp may have wrapped around it."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return None
        if isinstance(current, BlockedAddress):
            return current
        current = current.__cause__ or current.__context__
    return None


def _describe_timeout(exc: TimeoutError, total_s: float) -> str:
    text = str(exc)
    return f"timed out: {text}" if text else f"timed out after {total_s:g} s"


def _os_reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def _describe(exc: BaseException) -> str:
    """A short readable account of a network failure."""
    if isinstance(exc, ClientConnectorDNSError):
        return f"DNS lookup failed: {exc.host} ({_os_reason(exc.os_error)})"
    if isinstance(exc, ClientConnectorCertificateError):
        return f"TLS certificate error: {exc.host}:{exc.port}: {exc.certificate_error}"
    if isinstance(exc, ClientSSLError):
        return f"TLS error: {exc.host}:{exc.port}: {_os_reason(exc.os_error)}"
    if isinstance(exc, ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return f"connection refused: {exc.host}:{exc.port}"
        return f"cannot connect to {exc.host}:{exc.port}: {_os_reason(exc.os_error)}"
    if isinstance(exc, ServerDisconnectedError):
        return "server closed the connection without a response"
    if isinstance(exc, ClientPayloadError):
        return f"response body broken off: {exc}"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, NonHttpUrlClientError):
        return f"not an HTTP URL: {exc}"
    if isinstance(exc, InvalidURL):
        return f"invalid URL: {exc}"
    if isinstance(exc, ValueError):
        return f"invalid request: {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
