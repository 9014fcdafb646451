"""Turn a create (or update) request into a validated task row; the one place task input is checked."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from taskcenter.config import is_email_address
from taskcenter.crypto import SecretBox
from taskcenter.domain.request import (
    MAX_TIMEOUT_S,
    RequestSpec,
    build_request,
    encode_body,
    target_host,
    validate_timeout,
    validate_url,
)
from taskcenter.domain.retry import MAX_ATTEMPTS, RetryPolicy
from taskcenter.domain.traffic import SEALED_HEADERS_HOLD
from taskcenter.errors import ValidationError
from taskcenter.processors import is_builtin
from taskcenter.ssrf import host_problem

MAX_DELAY_S = 366 * 24 * 3600
MAX_METADATA_BYTES = 16 * 1024
MAX_PAYLOAD_BYTES = 1 << 20
PRIORITY_RANGE = (-1000, 1000)
NOTIFY_EVENTS = frozenset({"succeeded", "failed", "cancelled"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?([Zz]|[+-]\d{2}:\d{2})?")
"""The shape of ``scheduled_at`` as text: an RFC 3339 date-time (seconds optional); the zone is checked apart,
to say that it is missing. A bare number (a Unix time?) and ISO 8601's other forms (20300102T120000Z, week
dates) are refused: ``delay`` is the schedule in seconds."""
SCHEDULED_AT_FORMAT = (
    "scheduled_at must be an RFC 3339 date-time with a time zone, e.g. 2030-01-31T12:00:00Z "
    "(for a number of seconds from now, use delay)"
)
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
#: A NUL character in orjson's output: ``\u0000`` after an even number of backslashes (``\\u0000`` is a
#: backslash and the text ``u0000``). PostgreSQL's text and jsonb cannot hold one.
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
CREATE_FIELDS = frozenset(
    {
        "business_id", "type", "payload", "method", "url", "headers", "json", "form", "body", "content_type",
        "delay", "scheduled_at", "retry", "timeout", "priority", "success_codes", "retry_on",
        "follow_redirects", "notify", "metadata",
    }
)  # fmt: skip
UPDATE_FIELDS = frozenset(
    {
        "method", "url", "headers", "json", "form", "body", "content_type", "retry", "timeout", "priority",
        "delay", "scheduled_at", "payload", "success_codes", "retry_on", "follow_redirects", "notify", "metadata",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Defaults:
    """What a task gets when it says nothing: the business's policy, else the global one."""

    retry: RetryPolicy
    max_timeout_s: float = MAX_TIMEOUT_S
    timeout_s: float = 30.0


def _int_list(value: Any, field: str, lo: int, hi: int) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or len(value) > 100:
        raise ValidationError(f"{field} must be a non-empty list of status codes", field=field)
    for code in value:
        if isinstance(code, bool) or not isinstance(code, int) or not lo <= code <= hi:
            raise ValidationError(f"{field} must hold status codes between {lo} and {hi}", field=field)
    return sorted(set(value))


def _json_object(value: Any, field: str, limit: int) -> Any:
    if value is None:
        return None
    try:
        dumped = orjson.dumps(value)
    except TypeError as exc:
        if "64-bit" in str(exc):  # kept as JSON and answered back, where such an integer cannot go exactly
            raise ValidationError(
                f"{field} holds an integer beyond 64 bits, which cannot be kept exactly; send it as a string",
                field=field,
            ) from exc
        raise ValidationError(f"{field} is not JSON-serialisable: {exc}", field=field) from exc
    if len(dumped) > limit:
        raise ValidationError(f"{field} is larger than {limit} bytes", field=field)
    if _JSON_NUL.search(dumped):
        raise ValidationError(
            f"{field} contains a NUL character (\\u0000), which cannot be stored", field=field
        )
    return value


def _when(data: Mapping[str, Any], now: datetime) -> tuple[datetime, datetime | None]:
    """(next_attempt_at, scheduled_at) from ``delay`` or ``scheduled_at``."""
    delay, at = data.get("delay"), data.get("scheduled_at")
    if delay is not None and at is not None:
        raise ValidationError("give delay or scheduled_at, not both", field="delay")
    if delay is not None:
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= MAX_DELAY_S:
            raise ValidationError(f"delay must be seconds between 0 and {MAX_DELAY_S}", field="delay")
        when = now + timedelta(seconds=delay)
        return when, when if delay else None
    if at is not None:
        if isinstance(at, str):
            if DATE_TIME.fullmatch(at) is None:
                raise ValidationError(SCHEDULED_AT_FORMAT, field="scheduled_at")
            try:
                at = datetime.fromisoformat(at.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError as exc:  # e.g. month 13
                raise ValidationError(SCHEDULED_AT_FORMAT, field="scheduled_at") from exc
        if not isinstance(at, datetime):
            raise ValidationError(SCHEDULED_AT_FORMAT, field="scheduled_at")
        if at.tzinfo is None:  # not taken as UTC: a local time sent without its zone would be off by hours
            raise ValidationError(
                "scheduled_at needs a time zone (e.g. 2030-01-31T12:00:00Z or +01:00)", field="scheduled_at"
            )
        try:
            at = at.astimezone(UTC)
        except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+01:00 has no UTC form
            raise ValidationError(
                "scheduled_at is out of range (in UTC it falls before year 1 or after 9999)",
                field="scheduled_at",
            ) from exc
        if at - now > timedelta(seconds=MAX_DELAY_S):
            raise ValidationError("scheduled_at is more than a year ahead", field="scheduled_at")
        return max(at, now), at
    return now, None


def _notify(value: Any, email: bool) -> dict[str, Any] | None:
    """A validated ``notify``; ``email``: whether an SMTP server is configured to send ``notify.email``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError("notify must be an object with url and on", field="notify")
    unknown = set(value) - {"url", "on", "email"}
    if unknown:
        raise ValidationError(f"notify.{sorted(unknown)[0]} is not a known field", field="notify")
    out: dict[str, Any] = {}
    if value.get("url") is not None:
        out["url"] = validate_url(value["url"], field="notify.url")
        _check_host(target_host(out["url"]), "notify.url")
    if value.get("email") is not None:
        address = value["email"]
        if not is_email_address(address):
            raise ValidationError(
                "notify.email must be one e-mail address (local@domain, no name or list)",
                field="notify.email",
            )
        if not email:
            # Refused now rather than accepted and never sent: the caller can still use notify.url.
            raise ValidationError(
                "notify.email needs an SMTP server, and none is configured (smtp_host); use notify.url",
                field="notify.email",
            )
        out["email"] = address
    if not out:
        raise ValidationError("notify needs a url or an email", field="notify")
    on = value.get("on", ["succeeded", "failed"])
    # Each entry checked on its own: set(on) would raise TypeError on an unhashable one.
    if not isinstance(on, list) or not on or not all(isinstance(e, str) and e in NOTIFY_EVENTS for e in on):
        raise ValidationError(
            f"notify.on must list some of {', '.join(sorted(NOTIFY_EVENTS))}", field="notify.on"
        )
    out["on"] = sorted(set(on))
    return out


def _business_id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 255:
        raise ValidationError("business_id must be a string of 1 to 255 characters", field="business_id")
    if _CONTROL.search(value):
        raise ValidationError("business_id contains control characters", field="business_id")
    return value


def _retry(value: Any, defaults: Defaults) -> RetryPolicy:
    if value is None:
        return defaults.retry
    if isinstance(value, RetryPolicy):
        return value
    return RetryPolicy.from_dict(value)


def new_uuids(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs as strings, drawn at once: one ``os.urandom`` call and string slicing,
    about a third of the CPU of ``str(uuid.uuid4())`` each (which builds a ``UUID`` object per value)."""
    raw = os.urandom(16 * count).hex()
    # Version nibble 4; variant bits 10 (the nibble's two high bits), as uuid.uuid4() sets them.
    return [
        f"{raw[i : i + 8]}-{raw[i + 8 : i + 12]}-4{raw[i + 13 : i + 16]}-"
        f"{_VARIANT[int(raw[i + 16], 16) & 3]}{raw[i + 17 : i + 20]}-{raw[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


_VARIANT = "89ab"


#: Per batch: the outbound requests already validated, by (method, url, headers, content_type). The items of a
#: batch mostly target one endpoint, and validating a URL and headers costs several times what encoding a
#: body does; an item that repeats them only has its body encoded.
RequestMemo = dict[tuple[Any, ...], RequestSpec]


def _request(data: Mapping[str, Any], memo: RequestMemo | None) -> tuple[RequestSpec, str | None, str | None]:
    """:func:`build_request` for an http task's fields, as (the request, its encoded body, its content type):
    on a memo hit the request is the memoised one (its method, URL, host and headers hold) with this item's own
    body encoded."""
    method, url, headers = data.get("method", "POST"), data.get("url"), data.get("headers")
    content_type = data.get("content_type")
    has_json = "json" in data and data["json"] is not None
    known = key = None
    if memo is not None:
        try:
            key = (method, url, None if headers is None else tuple(headers.items()), content_type)
            known = memo.get(key)
        except (AttributeError, TypeError):  # headers that are no mapping, or unhashable values: no memo
            key = None
    if known is None:
        spec = build_request(method, url, headers, json_body=data.get("json"), has_json=has_json,
                             form=data.get("form"), body=data.get("body"), content_type=content_type)  # fmt: skip
        _check_host(spec.host, "url")
        if key is not None and memo is not None:
            memo[key] = spec
        return spec, spec.body, spec.content_type
    # Method, URL and headers passed build_request with these very values; what is left of its checks is the
    # body's, in the same order (encode_body, then no body on GET or HEAD).
    text, ctype = encode_body(json_body=data.get("json"), has_json=has_json, form=data.get("form"),
                              body=data.get("body"), content_type=content_type)  # fmt: skip
    if text is not None and known.method in ("GET", "HEAD"):
        raise ValidationError(f"a {known.method} request cannot carry a body", field="method")
    return known, text, ctype


def _check_host(target: str, field: str) -> None:
    """Refuse a URL whose host no request can reach (``https://./``, ``http://-/``, ``http://999.1.1.1/``);
    ``target`` is its ``host:port`` (:func:`~taskcenter.domain.request.target_host`)."""
    host = target.rpartition(":")[0]
    problem = host_problem(host[1:-1] if host.startswith("[") else host)
    if problem is not None:
        raise ValidationError(f"{field}: {problem}", field=field)


_HOST_FILTER_HELP = (
    "host must be host or host:port as tasks carry it: api.example.com (every port), api.example.com:443, "
    "[2001:db8::1]:8443, or processor:<type>"
)


def host_filter(value: Any) -> tuple[str, bool]:
    """Read a task list's ``host`` filter: ``(host:port, True)`` names one target exactly, ``(host, False)``
    every port of one host (``api.example.com`` finds tasks to ``api.example.com:443``, ``:80`` and ``:8443``).

    Case does not matter, an IPv6 address may come with or without brackets, and ``processor:<type>`` names a
    processor task type's tasks (as the stats list them). Stored hosts are compared as they are, so an IPv6
    address must be spelled as its tasks' URLs spell it.

    Raises:
        ValidationError: naming ``host`` when no task can carry it: empty, spaces, a URL, a bad port or name.
    """
    if not isinstance(value, str):
        raise ValidationError(f"{_HOST_FILTER_HELP}; got {type(value).__name__}", field="host")
    if value.startswith("processor:") and len(value) > len("processor:") and not _CONTROL.search(value):
        return value, True
    if "://" in value:
        try:
            target = target_host(validate_url(value, "host"))
        except ValidationError:
            raise ValidationError(f"{_HOST_FILTER_HELP}, not a URL", field="host") from None
        name = target.rpartition(":")[0]
        raise ValidationError(
            f"host must be host or host:port, not a URL: give {target} (or {name} for every port)",
            field="host",
        )
    text = value.lower()
    name, port = text, None
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":") or ":" not in name:
            name = ""  # refused below
        port = rest[1:] if rest else None
    elif text.count(":") == 1:  # more colons without brackets: a bare IPv6 address, every port
        name, _, port = text.partition(":")
    if port is not None:
        # At most 5 digits before int(): a port of thousands of them is past int()'s limit (a ValueError).
        if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
            raise ValidationError(f"{_HOST_FILTER_HELP}; got {value[:80]!r}", field="host")
        port = str(int(port))
    if not name or host_problem(name) is not None:
        raise ValidationError(f"{_HOST_FILTER_HELP}; got {value[:80]!r}", field="host")
    host = f"[{name}]" if ":" in name else name
    return (f"{host}:{port}", True) if port is not None else (host, False)


def _check_fields(data: Mapping[str, Any], allowed: frozenset[str]) -> None:
    if allowed.issuperset(data):
        return
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValidationError(f"{unknown[0]} is not a known field", field=unknown[0])


def new_task_row(
    data: Mapping[str, Any],
    *,
    business_pk: int,
    defaults: Defaults,
    box: SecretBox,
    now: datetime,
    processors: frozenset[str] = frozenset(),
    email: bool = False,
    traceparent: str | None = None,
    task_uuid: str | None = None,
    requests: RequestMemo | None = None,
) -> dict[str, Any]:
    """Validate a create request and build the row to insert. Raises :class:`ValidationError` naming the field.

    ``task_uuid`` is the new task's UUID (see :func:`new_uuids`); by default a new one. ``requests``: a memo
    shared by the items of one batch (see :data:`RequestMemo`). ``processors``: the task types that may be
    created; ``email``: whether ``notify.email`` can be sent (an SMTP server is configured).
    """
    _check_fields(data, CREATE_FIELDS)
    task_type = data.get("type") or "http"
    if not isinstance(task_type, str) or len(task_type) > 100:
        raise ValidationError("type must be a string", field="type")
    retry = _retry(data.get("retry"), defaults)
    next_at, scheduled = _when(data, now)
    priority = data.get("priority", 0)
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not (PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1])
    ):
        raise ValidationError(
            f"priority must be an integer from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}", field="priority"
        )
    timeout = data.get("timeout")
    timeout_s = (
        defaults.timeout_s if timeout is None else validate_timeout(timeout, cap=defaults.max_timeout_s)
    )
    follow = data.get("follow_redirects", False)
    if not isinstance(follow, bool):
        raise ValidationError("follow_redirects must be true or false", field="follow_redirects")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValidationError("metadata must be an object", field="metadata")
    if traceparent is not None and not _TRACEPARENT.match(traceparent):
        traceparent = (
            None  # a malformed header from the caller starts a new trace rather than failing the create
        )
    row: dict[str, Any] = {
        "uuid": str(uuid.uuid4()) if task_uuid is None else task_uuid,
        "business_pk": business_pk,
        "business_id": _business_id(data.get("business_id")),
        "type": task_type,
        "status": "pending",
        "method": None,
        "url": None,
        "host": None,
        "headers": None,
        "body": None,
        "content_type": None,
        "payload": None,
        "result": None,
        "retry": retry.to_dict(),
        "attempts": 0,
        "max_attempts": retry.max_attempts,
        "timeout": timeout_s,
        "priority": priority,
        "success_codes": _int_list(data.get("success_codes"), "success_codes", 100, 599),
        "retry_on": _int_list(data.get("retry_on"), "retry_on", 400, 599),
        "follow_redirects": follow,
        "notify": _notify(data.get("notify"), email),
        "metadata": _json_object(metadata, "metadata", MAX_METADATA_BYTES),
        "traceparent": traceparent,
        "scheduled_at": scheduled,
        "next_attempt_at": next_at,
        "last_attempt_at": None,
        "finished_at": None,
        "last_response": None,
        "last_error": None,
        "outcome": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "created_at": now,
        "updated_at": now,
    }
    if task_type == "http":
        if "payload" in data and data["payload"] is not None:
            raise ValidationError(
                "payload is for processor tasks; an http task sends json, form or body", field="payload"
            )
        if data.get("url") is None:
            raise ValidationError("url is required", field="url")
        target, body, content_type = _request(data, requests)
        row.update(
            method=target.method,
            url=target.url,
            host=target.host,
            headers=box.seal_headers(target.headers),
            body=body,
            content_type=content_type,
        )
    else:
        if task_type not in processors:
            if is_builtin(task_type):
                raise ValidationError(
                    f"type {task_type!r} is taskcenter's own and cannot be created", field="type"
                )
            raise ValidationError(f"type {task_type!r} has no registered processor", field="type")
        for name in ("url", "json", "form", "body", "headers"):
            if data.get(name) is not None:
                raise ValidationError(
                    f"{name} is for http tasks; a {task_type} task takes payload", field=name
                )
        row["payload"] = _json_object(data.get("payload"), "payload", MAX_PAYLOAD_BYTES)
        row["host"] = f"processor:{task_type}"
    return row


def changed_values(
    data: Mapping[str, Any],
    current: Mapping[Any, Any],
    *,
    defaults: Defaults,
    box: SecretBox,
    now: datetime,
    email: bool = False,
) -> dict[str, Any]:
    """Validate a PATCH and return the column values to change (only for pending or retrying tasks)."""
    _check_fields(data, UPDATE_FIELDS)
    if is_builtin(current["type"]):
        # taskcenter wrote it (an e-mail notification): changing its payload would send any text anywhere.
        raise ValidationError(f"a {current['type']} task cannot be changed; cancel it instead", field="type")
    values: dict[str, Any] = {"updated_at": now}
    if current["type"] == "http" and {
        "method",
        "url",
        "headers",
        "json",
        "form",
        "body",
        "content_type",
    } & set(data):
        has_body = bool({"json", "form", "body"} & set(data))
        spec = build_request(
            data.get("method", current["method"]),
            data.get("url", current["url"]),
            data["headers"] if "headers" in data else box.open_headers(current["headers"] or {}),
            json_body=data.get("json"),
            has_json="json" in data and data["json"] is not None,
            form=data.get("form"),
            body=data.get("body") if has_body else current["body"],
            content_type=data.get("content_type", None if has_body else current["content_type"]),
        )
        _check_host(spec.host, "url")
        values.update(
            method=spec.method,
            url=spec.url,
            host=spec.host,
            headers=box.seal_headers(spec.headers),
            body=spec.body,
            content_type=spec.content_type,
        )
    elif current["type"] != "http" and {"method", "url", "headers", "json", "form", "body"} & set(data):
        raise ValidationError("a processor task has no HTTP request to change", field="url")
    if "payload" in data:
        if current["type"] == "http":
            raise ValidationError("payload is for processor tasks", field="payload")
        values["payload"] = _json_object(data["payload"], "payload", MAX_PAYLOAD_BYTES)
    if "retry" in data:
        retry = _retry(data["retry"], defaults)
        if retry.max_attempts <= current["attempts"] and current["attempts"] > 0:
            raise ValidationError(
                f"retry allows {retry.max_attempts} attempts but the task already made {current['attempts']}",
                field="retry.max_attempts",
            )
        values.update(retry=retry.to_dict(), max_attempts=retry.max_attempts)
    if "timeout" in data:
        values["timeout"] = validate_timeout(data["timeout"], cap=defaults.max_timeout_s)
    if "priority" in data:
        p = data["priority"]
        if isinstance(p, bool) or not isinstance(p, int) or not PRIORITY_RANGE[0] <= p <= PRIORITY_RANGE[1]:
            raise ValidationError("priority must be an integer from -1000 to 1000", field="priority")
        values["priority"] = p
    if "delay" in data or "scheduled_at" in data:
        next_at, scheduled = _when(data, now)
        values.update(next_attempt_at=next_at, scheduled_at=scheduled)
    elif "headers" in data and current["held_by"] == SEALED_HEADERS_HOLD:
        # Held because its sealed header values did not open: the new ones are sealed with today's key.
        values.update(next_attempt_at=now, held_by=None)
    if "success_codes" in data:
        values["success_codes"] = _int_list(data["success_codes"], "success_codes", 100, 599)
    if "retry_on" in data:
        values["retry_on"] = _int_list(data["retry_on"], "retry_on", 400, 599)
    if "follow_redirects" in data:
        if not isinstance(data["follow_redirects"], bool):
            raise ValidationError("follow_redirects must be true or false", field="follow_redirects")
        values["follow_redirects"] = data["follow_redirects"]
    if "notify" in data:
        values["notify"] = _notify(data["notify"], email)
    if "metadata" in data:
        if data["metadata"] is not None and not isinstance(data["metadata"], Mapping):
            raise ValidationError("metadata must be an object", field="metadata")
        values["metadata"] = _json_object(data["metadata"], "metadata", MAX_METADATA_BYTES)
    if len(values) == 1:
        raise ValidationError("nothing to change", field="body")
    return values


__all__ = [
    "CREATE_FIELDS",
    "MAX_ATTEMPTS",
    "UPDATE_FIELDS",
    "Defaults",
    "RequestMemo",
    "changed_values",
    "new_task_row",
    "new_uuids",
]
