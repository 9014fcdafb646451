"""E-mail notifications: the message a finished task's ``notify.email`` gets, and the built-in processor
(``taskcenter.email``) that sends it through the configured SMTP server with aiosmtplib.

The message is written when the notification is queued, so it tells the state the task reached even if the
task changes (a manual retry) or is purged before the mail goes out; the processor only adds the sender.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiosmtplib

from taskcenter.config import SmtpConfig, is_email_address
from taskcenter.errors import PermanentFailure

EMAIL_TYPE = "taskcenter.email"
"""The task type of e-mail notifications (a built-in processor: callers cannot create or change such tasks)."""
EMAIL_RETRY: dict[str, Any] = {
    "strategy": "exponential",
    "initial_delay": 30,
    "multiplier": 2.0,
    "max_delay": 1800,
    "jitter": 0.1,
    "max_attempts": 8,
}
"""Retries 30 s, 1, 2, 4, 8, 16 and 30 min apart (about an hour in all): long enough to outlast greylisting
(451 for a few minutes) and a mail server's restart, short enough that a notification still means something."""
_MAX_ERROR = 500
_MAX_SUBJECT_ID = 100


def _one_line(text: str, limit: int) -> str:
    """``text`` on one line (control characters as spaces), cut to ``limit`` characters."""
    flat = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _shown_url(url: str) -> str:
    """The URL without its query and fragment, which may carry tokens that do not belong in a mailbox."""
    parts = urlsplit(url)
    hidden = "?…" if parts.query or parts.fragment else ""
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) + hidden


def notification_email(
    task: Mapping[Any, Any], status: str, *, business_code: str, to: str, now: datetime
) -> dict[str, Any]:
    """The payload of a ``taskcenter.email`` task telling ``to`` that ``task`` reached ``status``.

    ``task`` needs ``id``, ``uuid``, ``business_id``, ``type``, ``method``, ``url``, ``attempts``,
    ``max_attempts``, ``outcome``, ``last_response`` (``status_code``) and ``last_error``; missing ones read
    as unknown. Plain text, one line per fact.
    """
    business_id = str(task["business_id"])
    last_response = task.get("last_response") or {}
    last_status = last_response.get("status_code") if isinstance(last_response, Mapping) else None
    attempts, max_attempts = task.get("attempts"), task.get("max_attempts")
    if task.get("type", "http") == "http" and task.get("url"):
        target = ("Request", f"{task.get('method') or 'POST'} {_shown_url(str(task['url']))}")
    else:
        target = ("Processor", str(task.get("type")))
    error = task.get("last_error")
    facts = [
        ("Task id", str(task["uuid"])),
        ("Row id", str(task.get("id", "–"))),
        ("Business", business_code),
        ("business_id", _one_line(business_id, 255)),
        target,
        ("Final status", status),
        ("Outcome", str(task.get("outcome") or "–")),
        ("Attempts", f"{attempts if attempts is not None else '–'} of {max_attempts or '–'}"),
        ("Last response", f"HTTP {last_status}" if last_status is not None else "none"),
        ("Last error", _one_line(str(error), _MAX_ERROR) if error else "none"),
        ("Notified at", now.isoformat().replace("+00:00", "Z")),
    ]
    width = max(len(name) for name, _ in facts) + 2
    lines = [f"A task of business system {business_code} reached a final state: {status}.", ""]
    lines += [f"{name + ':':<{width}}{value}" for name, value in facts]
    lines += [
        "",
        "taskcenter sent this message because the task's notify.email asked for it.",
    ]
    return {
        "to": to,
        "subject": f"[taskcenter] {business_code} {_one_line(business_id, _MAX_SUBJECT_ID)}: {status}",
        "text": "\n".join(lines) + "\n",
        "message_id": f"{task['uuid']}.{status}",
    }


class Mailer:
    """The ``taskcenter.email`` processor: sends a notification's payload through one SMTP server.

    One connection per message: notifications are few, and a connection held open between them would only
    time out on the server. A 5xx refusal of the recipient or of the message is final (the address or the
    content will not change); anything else — 4xx, a refused login or sender, a lost connection, TLS — raises,
    and the task is retried by its policy.
    """

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._domain = config.sender.rpartition("@")[2]

    def message(self, payload: Mapping[str, Any]) -> EmailMessage:
        """The message to send for ``payload`` (``to``, ``subject``, ``text``, ``message_id``)."""
        msg = EmailMessage()
        msg["From"] = self.config.sender
        msg["To"] = payload["to"]
        msg["Subject"] = payload["subject"]
        msg["Date"] = format_datetime(datetime.now().astimezone())
        # The same id on every attempt, so a message sent twice (an attempt cut off after the server took it)
        # can be recognised as one.
        msg["Message-ID"] = f"<{payload['message_id']}@{self._domain}>"
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies, no loops
        msg.set_content(payload["text"])
        return msg

    async def send(self, payload: Any) -> dict[str, Any]:
        """Send one notification; returns the recipient and the server's final reply."""
        if not isinstance(payload, Mapping) or not {"to", "subject", "text", "message_id"} <= payload.keys():
            raise PermanentFailure("an e-mail notification's payload needs to, subject, text and message_id")
        if not is_email_address(payload["to"]):  # a task stored before notify.email was checked this strictly
            raise PermanentFailure(f"{payload['to']!r} is not one plain e-mail address")
        cfg = self.config
        try:
            _refused, reply = await aiosmtplib.send(
                self.message(payload),
                recipients=[payload["to"]],  # exactly one, never what a To header might be parsed into
                hostname=cfg.host,
                port=cfg.port,
                username=cfg.username,
                password=cfg.password,
                use_tls=cfg.tls == "tls",
                start_tls=cfg.tls == "starttls",
                tls_context=cfg.tls_context,
                timeout=cfg.timeout_s,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            if all(r.code >= 500 for r in exc.recipients):
                raise PermanentFailure(f"recipient refused: {_replies(exc.recipients)}") from exc
            raise
        except aiosmtplib.SMTPDataError as exc:
            if exc.code >= 500:
                raise PermanentFailure(f"message refused: {exc.code} {exc.message}") from exc
            raise
        return {"to": payload["to"], "reply": reply}


def _replies(refusals: list[aiosmtplib.SMTPRecipientRefused]) -> str:
    return "; ".join(f"{r.code} {r.message}" for r in refusals)


__all__ = ["EMAIL_RETRY", "EMAIL_TYPE", "Mailer", "notification_email"]
