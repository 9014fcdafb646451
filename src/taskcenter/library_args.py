"""The library's arguments: the keyword arguments of ``TaskCenter.create_task`` as the create request the service
validates, and the checks of the arguments that never reach the service."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from taskcenter.domain.retry import RetryPolicy
from taskcenter.errors import ValidationError

#: "Not given" for arguments whose ``None`` means something (``json=None`` sends a JSON ``null``).
UNSET: Any = object()


def task_data(
    method: str | None,
    url: str | None,
    *,
    business_id: str,
    type: str | None,
    payload: Any,
    headers: Mapping[str, str] | None,
    json: Any,
    form: Mapping[str, Any] | None,
    body: str | None,
    content_type: str | None,
    delay: float | timedelta | None,
    scheduled_at: datetime | None,
    retry: RetryPolicy | Mapping[str, Any] | None,
    timeout: float | None,
    priority: int | None,
    success_codes: list[int] | None,
    retry_on: list[int] | None,
    follow_redirects: bool,
    notify: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The create request (DESIGN's JSON form) that :meth:`TaskCenter.acreate_task
    <taskcenter.library.TaskCenter.acreate_task>`'s keyword arguments describe: what was not given is left out."""
    data: dict[str, Any] = {"business_id": business_id}
    if type is not None and type != "http":
        data.update(type=type, payload=payload)
    else:
        data.update(method=method or "POST", url=url)
    optional = {
        "headers": headers,
        "form": form,
        "body": body,
        "content_type": content_type,
        "delay": delay,
        "scheduled_at": scheduled_at,
        "retry": retry,
        "timeout": timeout,
        "priority": priority,
        "success_codes": success_codes,
        "retry_on": retry_on,
        "notify": notify,
        "metadata": metadata,
    }
    data.update({k: v for k, v in optional.items() if v is not None})
    if json is not UNSET:
        data["json"] = json
    if follow_redirects:
        data["follow_redirects"] = True
    return data


def check_connection(connection: object, expected: type, twin: str) -> None:
    """A clear error for what is not a SQLAlchemy connection of the kind this call takes (an ORM session, an
    engine, the other kind), instead of an AttributeError from inside the insert."""
    if connection is not None and not isinstance(connection, expected):
        raise ValidationError(
            f"connection must be a SQLAlchemy {expected.__name__}, not {type(connection).__name__}"
            f" (for an ORM session pass session.connection(); {twin})",
            field="connection",
        )


def int_within(value: object, low: int, high: int) -> bool:
    """Whether ``value`` is an int (not a bool) from ``low`` to ``high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
