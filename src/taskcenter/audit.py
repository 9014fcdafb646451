"""The audit log: who created or rotated keys, changed businesses, cancelled, retried or updated tasks, and when.

Actors are named, never keyed: ``key:<id>``, ``operator:env``, ``jwt:<code>``, ``cli:<user>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter import cursors
from taskcenter.clock import utcnow
from taskcenter.domain.task import rfc3339
from taskcenter.errors import ValidationError
from taskcenter.storage.database import Database
from taskcenter.storage.schema import audit_log, businesses

#: Every action the log records.
ACTIONS = frozenset(
    {
        "business.create",
        "business.update",
        "business.disable",
        "host.pause",
        "host.resume",
        "host.update",
        "key.create",
        "key.rotate",
        "task.cancel",
        "task.retry",
        "task.update",
    }
)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One recorded action."""

    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target: str
    business_code: str | None
    details: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the time as RFC 3339 UTC."""
        return {
            "id": self.id,
            "at": rfc3339(self.at),
            "actor": self.actor,
            "action": self.action,
            "target_type": self.target_type,
            "target": self.target,
            "business_code": self.business_code,
            "details": self.details,
        }


def encode_cursor(entry_id: int) -> str:
    """An opaque keyset cursor over the log, newest first."""
    return cursors.encode("a1", entry_id)


def decode_cursor(cursor: str) -> int:
    """The entry id behind a cursor; :class:`ValidationError` on anything this API did not hand out."""
    return cursors.decode_row_id("a1", cursor)


@dataclass
class AuditLog:
    """Writes and reads the ``audit_log`` table."""

    db: Database
    clock: Callable[[], datetime] = utcnow

    async def record(
        self,
        actor: str,
        action: str,
        target_type: str,
        target: str,
        *,
        business_pk: int | None = None,
        details: Mapping[str, Any] | None = None,
        conn: AsyncConnection | None = None,
    ) -> None:
        """Record one action; with ``conn`` it joins that transaction (so it commits with the change).

        Raises:
            ValueError: ``action`` is not one of :data:`ACTIONS` (a programming error, not user input).
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        values = {
            "at": self.clock(),
            "actor": actor[:200],
            "action": action,
            "target_type": target_type,
            "target": target[:300],
            "business_pk": business_pk,
            "details": dict(details) if details else None,
        }
        if conn is not None:
            await conn.execute(sa.insert(audit_log).values(**values))
            return
        async with self.db.write() as own:
            await own.execute(sa.insert(audit_log).values(**values))

    async def list_entries(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        business_pk: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[AuditEntry], str | None]:
        """Entries newest first, filtered; returns the page and the next page's cursor (``None`` at the end)."""
        if not 1 <= limit <= 500:
            raise ValidationError("limit must be between 1 and 500", field="limit")
        stmt = sa.select(audit_log, businesses.c.code.label("business_code")).outerjoin(
            businesses, businesses.c.id == audit_log.c.business_pk
        )
        if actor:
            stmt = stmt.where(audit_log.c.actor == actor)
        if action:
            stmt = stmt.where(audit_log.c.action == action)
        if target:
            stmt = stmt.where(audit_log.c.target == target)
        if business_pk is not None:
            stmt = stmt.where(audit_log.c.business_pk == business_pk)
        if since is not None:
            stmt = stmt.where(audit_log.c.at >= since)
        if until is not None:
            stmt = stmt.where(audit_log.c.at < until)
        if cursor:
            stmt = stmt.where(audit_log.c.id < decode_cursor(cursor))
        stmt = stmt.order_by(audit_log.c.id.desc()).limit(limit + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        entries = [
            AuditEntry(
                id=r["id"],
                at=r["at"],
                actor=r["actor"],
                action=r["action"],
                target_type=r["target_type"],
                target=r["target"],
                business_code=r["business_code"],
                details=r["details"],
            )
            for r in rows[:limit]
        ]
        return entries, encode_cursor(entries[-1].id) if len(rows) > limit else None
