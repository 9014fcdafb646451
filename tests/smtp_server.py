"""A real SMTP server on loopback for taskcenter's tests (aiosmtpd on the test's own event loop).

Usage::

    async def test_x(mail_server: MailServer) -> None:       # fixture (import it in conftest.py)
        mail_server.refuse_rcpt("451 4.7.1 greylisted, try again later")   # the next RCPT answers this
        ... send to 127.0.0.1:mail_server.port ...
        [message] = await mail_server.wait_for(1)

    async with MailServer(tls=server_context, login=("user", "secret")) as server: ...   # STARTTLS, AUTH

Each RCPT answers the scripted refusals in order, then accepts. Messages that arrive are parsed
(``email.message.EmailMessage``) and kept with their envelope.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest_asyncio
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["MailServer", "ReceivedMail", "mail_server", "self_signed"]


@dataclass(frozen=True)
class ReceivedMail:
    """One message as the server took it: the envelope and the parsed message."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    @property
    def text(self) -> str:
        body = self.message.get_body(("plain",))
        text = "" if body is None else str(body.get_content())  # type: ignore[attr-defined]
        return text.replace("\r\n", "\n")  # as sent, not as the wire carries it


class _Handler:
    def __init__(self, server: MailServer) -> None:
        self.server = server

    async def handle_RCPT(
        self, _server: SMTP, _session: Session, envelope: Envelope, address: str, _options: list[str]
    ) -> str:
        self.server.rcpt_attempts += 1
        if self.server.rcpt_replies:
            return self.server.rcpt_replies.popleft()
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, _session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        parsed = message_from_bytes(raw, policy=policy.default)
        self.server.received.append(
            ReceivedMail(str(envelope.mail_from), list(envelope.rcpt_tos), parsed)  # type: ignore[arg-type]
        )
        self.server.tls_used.append(server.transport.get_extra_info("ssl_object") is not None)
        self.server.arrived.set()
        return "250 2.0.0 queued as test"


class MailServer:
    """An SMTP server on 127.0.0.1 (a free port): plain, STARTTLS (``tls``) or implicit TLS (``implicit_tls``)."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        login: tuple[str, str] | None = None,
    ) -> None:
        if login is not None and tls is None and implicit_tls is None:
            raise ValueError("aiosmtpd takes a login only over TLS")
        self.tls, self.implicit_tls, self.login = tls, implicit_tls, login
        self.received: list[ReceivedMail] = []
        self.tls_used: list[bool] = []
        self.rcpt_replies: deque[str] = deque()
        self.rcpt_attempts = 0
        self.logins: list[tuple[str, str]] = []
        self.arrived = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    def refuse_rcpt(self, *replies: str) -> None:
        """Answer the next RCPT commands with these replies (e.g. ``"451 4.7.1 try later"``), then accept."""
        self.rcpt_replies.extend(replies)

    def _authenticate(
        self, _server: SMTP, _session: Session, _envelope: Envelope, _mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        given = (data.login.decode(), data.password.decode())
        self.logins.append(given)
        return AuthResult(success=given == self.login, handled=False)  # aiosmtpd answers 535 itself

    def _protocol(self) -> SMTP:
        return SMTP(
            _Handler(self),
            hostname="mail.test",
            tls_context=self.tls,
            require_starttls=self.tls is not None,
            authenticator=self._authenticate if self.login else None,
            auth_required=self.login is not None,
            timeout=30,
        )

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0, ssl=self.implicit_tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def wait_for(self, count: int, timeout: float = 10) -> list[ReceivedMail]:
        """The first ``count`` messages, once that many arrived."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.received) < count:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"{len(self.received)} messages arrived, expected {count}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout=left)
            except TimeoutError:
                continue
        return self.received[:count]


@pytest_asyncio.fixture
async def mail_server() -> AsyncIterator[MailServer]:
    """A plain SMTP server on loopback, accepting every message."""
    async with MailServer() as server:
        yield server


def self_signed(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for ``localhost`` / 127.0.0.1, made with ``cryptography``: the server's context
    (certificate and key) and a client context that trusts exactly that certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client
