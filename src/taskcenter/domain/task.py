"""The public representation of a task and of an attempt (DESIGN "Task representation")."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

#: Row ids are BIGINT: 18 decimal digits always fit (19 may not), and every id this service hands out has fewer.
_ROW_ID_DIGITS = 18


def parse_row_id(text: str) -> int | None:
    """``text`` as a row id (a task's, an audit entry's), or None when it is not one: only ASCII digits count
    (``int()`` also reads other scripts' digits, so ``١`` was row 1), and at most 18 of them, so a longer number
    never reaches the database driver (an overflow there was a 500) or ``int()``'s own digit limit."""
    if not text.isascii() or not text.isdigit() or len(text) > _ROW_ID_DIGITS:
        return None
    return int(text)


def rfc3339(value: datetime | None) -> str | None:
    """``2026-11-26T06:13:58.123456Z`` for an aware UTC datetime."""
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Task:
    """A task as users see it. Sensitive header values are already masked."""

    id: str
    row_id: int
    business_code: str
    business_id: str
    type: str
    status: str
    request: dict[str, Any] | None
    payload: Any
    result: Any
    retry: dict[str, Any]
    timeout: float
    priority: int
    attempts: int
    max_attempts: int
    success_codes: list[int] | None
    retry_on: list[int] | None
    follow_redirects: bool
    notify: dict[str, Any] | None
    scheduled_at: datetime | None
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    finished_at: datetime | None
    last_response: dict[str, Any] | None
    last_error: str | None
    outcome: str | None
    metadata: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[Any, Any], mask: Callable[[Mapping[str, str]], dict[str, str]]) -> Task:
        """Build from a joined ``tasks`` + ``businesses.code`` row; ``mask`` hides sensitive headers."""
        request = None
        if row["url"] is not None:
            request = {
                "method": row["method"],
                "url": row["url"],
                "headers": mask(row["headers"] or {}),
                "body": row["body"],
                "content_type": row["content_type"],
            }
        status = row["status"]
        return cls(
            id=str(row["uuid"]),
            row_id=row["id"],
            business_code=row["business_code"],
            business_id=row["business_id"],
            type=row["type"],
            status=status,
            request=request,
            payload=row["payload"],
            result=row["result"],
            retry=row["retry"],
            timeout=row["timeout"],
            priority=row["priority"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            success_codes=row["success_codes"],
            retry_on=row["retry_on"],
            follow_redirects=row["follow_redirects"],
            notify=row["notify"],
            scheduled_at=row["scheduled_at"],
            next_attempt_at=row["next_attempt_at"] if status in ("pending", "retrying") else None,
            last_attempt_at=row["last_attempt_at"],
            finished_at=row["finished_at"],
            last_response=row["last_response"],
            last_error=row["last_error"],
            outcome=row["outcome"],
            metadata=row["metadata"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, times as RFC 3339 UTC strings."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = rfc3339(value)
        return out


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at sending a task."""

    number: int
    started_at: datetime
    duration_ms: int | None
    request: dict[str, Any] | None
    response: dict[str, Any] | None
    outcome: str
    error: str | None
    worker: str | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Attempt:
        return cls(
            number=row["number"],
            started_at=row["started_at"],
            duration_ms=row["duration_ms"],
            request=row["request"],
            response=row["response"],
            outcome=row["outcome"],
            error=row["error"],
            worker=row["worker"],
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["started_at"] = rfc3339(self.started_at)
        return out
