"""E-mail notifications, the message and its sending: a real SMTP server (aiosmtpd) on loopback, plain,
STARTTLS and implicit TLS with a self-signed certificate, SMTP AUTH; and the SMTP settings."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from taskcenter.config import Settings, SmtpConfig, load_settings
from taskcenter.errors import PermanentFailure, ValidationError
from taskcenter.mail import EMAIL_TYPE, Mailer, notification_email
from taskcenter.processors import ProcessorRegistry
from tests.smtp_server import MailServer, self_signed

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
TASK: dict[str, Any] = {
    "id": 42,
    "uuid": "6f1c2a9e-0000-4000-8000-000000000042",
    "business_id": "order-123",
    "type": "http",
    "method": "POST",
    "url": "https://api.example.com/hook?token=s3cret#frag",
    "attempts": 5,
    "max_attempts": 5,
    "outcome": "server_error",
    "last_response": {"status_code": 503, "body": "down"},
    "last_error": None,
}


def payload(**task: Any) -> dict[str, Any]:
    return notification_email(
        {**TASK, **task}, "failed", business_code="payments", to="ops@example.com", now=NOW
    )


def config(port: int, **kwargs: Any) -> SmtpConfig:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": port, "tls": "none", "sender": "tc@example.org"}
    values.update(kwargs)
    return SmtpConfig(**values)


# -- the message --------------------------------------------------------------------------------------


def test_the_message_tells_the_task_its_final_state_and_last_answer() -> None:
    mail = payload()
    assert mail["to"] == "ops@example.com"
    assert mail["subject"] == "[taskcenter] payments order-123: failed"
    lines = mail["text"].splitlines()
    assert lines[0] == "A task of business system payments reached a final state: failed."
    facts = dict(line.split(":", 1) for line in lines[2:13])
    assert {k: v.strip() for k, v in facts.items()} == {
        "Task id": TASK["uuid"],
        "Row id": "42",
        "Business": "payments",
        "business_id": "order-123",
        "Request": "POST https://api.example.com/hook?…",
        "Final status": "failed",
        "Outcome": "server_error",
        "Attempts": "5 of 5",
        "Last response": "HTTP 503",
        "Last error": "none",
        "Notified at": "2030-01-02T03:04:05Z",
    }
    assert "s3cret" not in mail["text"], "the URL's query may hold a token: it stays out of a mailbox"
    assert mail["message_id"] == f"{TASK['uuid']}.failed"


def test_a_processor_task_and_an_error_are_told_on_one_line() -> None:
    mail = payload(type="resize", url=None, method=None, last_response=None, last_error="boom\r\nBcc: x@y")
    assert "Processor:" in mail["text"] and "resize" in mail["text"]
    assert "Last response: none" in mail["text"]
    assert "boom  Bcc: x@y" in mail["text"], "an error's line breaks become spaces"


# -- sending ------------------------------------------------------------------------------------------


async def test_a_notification_arrives_with_recipient_sender_subject_and_body() -> None:
    async with MailServer() as server:
        result = await Mailer(config(server.port)).send(payload())
        [mail] = await server.wait_for(1)
    assert result["to"] == "ops@example.com" and result["reply"].startswith("2.0.0 queued")
    assert (mail.mail_from, mail.rcpt_tos) == ("tc@example.org", ["ops@example.com"])
    msg = mail.message
    assert (msg["From"], msg["To"]) == ("tc@example.org", "ops@example.com")
    assert msg["Subject"] == "[taskcenter] payments order-123: failed"
    assert msg["Message-ID"] == f"<{TASK['uuid']}.failed@example.org>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "text/plain"
    assert mail.text == payload()["text"]


async def test_a_temporary_refusal_raises_for_a_retry_and_a_permanent_one_fails_the_task() -> None:
    async with MailServer() as server:
        server.refuse_rcpt("451 4.7.1 greylisted, try again later")
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):  # an ordinary processor error: retried
            await Mailer(config(server.port)).send(payload())
        server.refuse_rcpt("550 5.1.1 no such mailbox")
        with pytest.raises(PermanentFailure, match=r"recipient refused: 550 5\.1\.1 no such mailbox"):
            await Mailer(config(server.port)).send(payload())
        await Mailer(config(server.port)).send(payload())
        assert len(await server.wait_for(1)) == 1


async def test_an_unreachable_server_raises_for_a_retry(unused_tcp_port: int) -> None:
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await Mailer(config(unused_tcp_port, timeout_s=2)).send(payload())


async def test_a_payload_that_is_no_notification_fails_at_once() -> None:
    with pytest.raises(PermanentFailure):
        await Mailer(config(25)).send({"to": "a@b.example"})


@pytest.mark.parametrize("to", ["a@b.example, c@d.example", "Ops <ops@example.com>", "nobody"])
async def test_a_recipient_that_is_not_one_plain_address_is_never_sent_to(to: str) -> None:
    """notify.email was checked less strictly before e-mail was sent; a task stored then must not reach a list."""
    async with MailServer() as server:
        with pytest.raises(PermanentFailure, match="not one plain e-mail address"):
            await Mailer(config(server.port)).send({**payload(), "to": to})
    assert server.received == [] and server.rcpt_attempts == 0


async def test_starttls_with_a_self_signed_certificate_and_login(tmp_path: Path) -> None:
    server_tls, client_tls = self_signed(tmp_path)
    async with MailServer(tls=server_tls, login=("mailer", "pw")) as server:
        cfg = config(server.port, tls="starttls", username="mailer", password="pw", tls_context=client_tls)
        await Mailer(cfg).send(payload())
        [mail] = await server.wait_for(1)
    assert mail.rcpt_tos == ["ops@example.com"]
    assert server.tls_used == [True] and server.logins == [("mailer", "pw")]


async def test_starttls_refuses_a_certificate_it_does_not_trust(tmp_path: Path) -> None:
    server_tls, _client_tls = self_signed(tmp_path)
    async with MailServer(tls=server_tls) as server:
        with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError)):  # retried, never sent in the clear
            await Mailer(config(server.port, tls="starttls")).send(payload())
    assert server.received == []


async def test_starttls_mode_never_sends_in_the_clear_to_a_server_without_it() -> None:
    async with MailServer() as server:
        with pytest.raises(aiosmtplib.SMTPException, match="STARTTLS"):
            await Mailer(config(server.port, tls="starttls")).send(payload())
    assert server.received == []


async def test_implicit_tls(tmp_path: Path) -> None:
    server_tls, client_tls = self_signed(tmp_path)
    async with MailServer(implicit_tls=server_tls) as server:
        await Mailer(config(server.port, tls="tls", tls_context=client_tls)).send(payload())
        [mail] = await server.wait_for(1)
    assert mail.rcpt_tos == ["ops@example.com"] and server.tls_used == [True]


async def test_a_refused_login_raises_for_a_retry(tmp_path: Path) -> None:
    server_tls, client_tls = self_signed(tmp_path)
    async with MailServer(tls=server_tls, login=("mailer", "pw")) as server:
        cfg = config(server.port, tls="starttls", username="mailer", password="wrong", tls_context=client_tls)
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await Mailer(cfg).send(payload())
    assert server.received == []


# -- the processor registry ---------------------------------------------------------------------------


def test_callers_cannot_register_or_create_taskcenter_types() -> None:
    registry = ProcessorRegistry()
    with pytest.raises(ValidationError):
        registry.register(EMAIL_TYPE, lambda p: p)
    with pytest.raises(ValidationError):
        registry.register("custom", lambda p: p, builtin=True)
    registry.register(EMAIL_TYPE, lambda p: p, builtin=True)
    registry.register("resize", lambda p: p)
    assert registry.names() == {EMAIL_TYPE, "resize"}, "what a worker can run"
    assert registry.creatable() == {"resize"}, "what a caller may create"


# -- settings -----------------------------------------------------------------------------------------


def test_no_smtp_host_means_no_email_notifications() -> None:
    assert Settings().smtp() is None


@pytest.mark.parametrize(("tls", "port"), [("none", 25), ("starttls", 587), ("tls", 465), ("STARTTLS", 587)])
def test_the_port_defaults_from_the_tls_mode(tls: str, port: int) -> None:
    smtp = Settings(smtp_host="mail.example.org", smtp_from="tc@example.org", smtp_tls=tls).smtp()
    assert smtp is not None and smtp.port == port and smtp.tls == tls.lower()


def test_the_smtp_settings_come_from_the_environment_and_the_password_never_shows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKCENTER_SMTP_HOST", "mail.example.org")
    monkeypatch.setenv("TASKCENTER_SMTP_PORT", "2525")
    monkeypatch.setenv("TASKCENTER_SMTP_FROM", "tc@example.org")
    monkeypatch.setenv("TASKCENTER_SMTP_USERNAME", "mailer")
    monkeypatch.setenv("TASKCENTER_SMTP_PASSWORD", "hunter2")
    monkeypatch.setenv("TASKCENTER_SMTP_TIMEOUT_S", "5")
    settings = load_settings()
    smtp = settings.smtp()
    assert smtp is not None
    assert (smtp.host, smtp.port, smtp.tls, smtp.sender, smtp.username, smtp.password, smtp.timeout_s) == (
        "mail.example.org", 2525, "starttls", "tc@example.org", "mailer", "hunter2", 5.0,
    )  # fmt: skip
    assert settings.masked()["smtp_password"] == "***"
    assert "hunter2" not in repr(settings) + repr(smtp) + str(settings.masked())


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"smtp_host": "mail.example.org"}, "smtp_from"),
        ({"smtp_host": "mail.example.org", "smtp_from": "Ops <ops@example.org>"}, "smtp_from"),
        (
            {"smtp_host": "mail.example.org", "smtp_from": "a@b.example", "smtp_username": "u"},
            "smtp_password",
        ),
        ({"smtp_password": "p"}, "smtp_password"),
        ({"smtp_tls": "ssl"}, "smtp_tls"),
        ({"smtp_timeout_s": 60}, "smtp_timeout_s"),
        ({"smtp_host": "mail.example.org\r\nX: y", "smtp_from": "a@b.example"}, "smtp_host"),
    ],
)
def test_incomplete_or_bad_smtp_settings_name_the_setting(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        load_settings(**values)
    assert caught.value.field == field
