"""Terminal-state notifications: the webhook and e-mail tasks that a task's ``notify`` asks for once it reaches a
final state, queued in the write that records it, or later by the sweep if the process died in between."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.crypto import SecretBox
from taskcenter.domain.retry import RetryPolicy
from taskcenter.intake import Defaults, new_task_row
from taskcenter.mail import EMAIL_RETRY, EMAIL_TYPE, notification_email
from taskcenter.signals import NOTIFY_CHANNEL
from taskcenter.storage import tasks as task_sql
from taskcenter.storage.database import Database
from taskcenter.storage.schema import businesses


@dataclass(eq=False)
class Notifications:
    """Queues the notification tasks of finished tasks; the service owns one (``TaskService.enqueue_notifications``
    and ``sweep_notifications``)."""

    db: Database
    box: SecretBox
    default_retry: RetryPolicy
    clock: Callable[[], datetime]
    wake: Callable[[], None]
    """Tells this process's dispatchers that notifications were queued."""
    cached_codes: Callable[[], Iterable[tuple[int, str]]]
    """The (pk, code) of the businesses the service has cached, read before asking the database."""

    async def enqueue(self, finished: Sequence[tuple[Mapping[Any, Any], str]]) -> int:
        """For tasks that reached a final state, queue the notifications their ``notify`` asks for: a webhook to
        ``notify.url`` and an e-mail to ``notify.email``; and mark each task notified in the same transaction.

        Each notification is itself a task of the same business (same retries, traffic control; the webhook
        signed like any delivery, the e-mail a ``taskcenter.email`` task sent by a worker with an SMTP server),
        keyed ``notify:<task uuid>:<status>`` (the e-mail ``…:email``) so that it is created once. Notification
        tasks carry no ``notify`` of their own, so a notification never notifies. A task whose final write
        landed but whose notifications were never queued (the process died in between) keeps ``notified_at``
        NULL, and :meth:`sweep` queues them later. Returns how many notifications were queued.
        ``finished`` rows need ``id``, ``uuid``, ``business_pk``, ``business_id``, ``notify``, ``attempts`` and
        ``outcome``; an e-mail also tells ``type``, ``method``, ``url``, ``max_attempts``, ``last_response``
        and ``last_error`` where the row has them.
        """
        now = self.clock()
        rows = await self._rows(finished, now)
        ids = [task["id"] for task, _ in finished if task.get("notify")]
        if not rows and not ids:
            return 0
        async with self.db.write() as conn:
            queued = await self._queue(conn, rows, ids, now)
        if queued:
            self.wake()
        return queued

    async def sweep(self, *, grace_s: float = 30.0, limit: int = 100) -> int:
        """Queue the notifications of tasks that finished more than ``grace_s`` ago and were never notified (their
        process died between the final write and :meth:`enqueue`). Returns how many were queued."""
        now = self.clock()
        before = now - timedelta(seconds=grace_s)
        # Nearly always nothing: look first without the write lock (SQLite's one writer) or row locks.
        async with self.db.read() as conn:
            if not await task_sql.unnotified(conn, finished_before=before, limit=1, lock=False):
                return 0
        async with self.db.write() as conn:
            lost = await task_sql.unnotified(conn, finished_before=before, limit=limit)
            if not lost:
                return 0
            rows = await self._rows([(t, t["status"]) for t in lost], now)
            queued = await self._queue(conn, rows, [t["id"] for t in lost], now)
        if queued:
            self.wake()
        return queued

    async def _queue(
        self, conn: AsyncConnection, rows: list[dict[str, Any]], ids: list[int], now: datetime
    ) -> int:
        stored = (await conn.execute(task_sql.insert_statement(self.db.dialect, rows))).all() if rows else []
        await task_sql.mark_notified(conn, ids, now=now)
        if stored and self.db.is_postgres:
            await conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))
        return len(stored)

    async def _rows(
        self, finished: Sequence[tuple[Mapping[Any, Any], str]], now: datetime
    ) -> list[dict[str, Any]]:
        """The notification tasks to insert for ``finished`` (see :meth:`enqueue`)."""
        wanted = [
            (task, status, notify)
            for task, status in finished
            if (notify := task.get("notify")) and status in notify.get("on", ())
        ]
        if not wanted:
            return []
        codes = await self._codes({t["business_pk"] for t, _, n in wanted if n.get("email")})
        rows = []
        for task, status, notify in wanted:
            key = f"notify:{task['uuid']}:{status}"
            if notify.get("url"):
                event = {
                    "type": f"task.{status}",
                    "task": {
                        "id": str(task["uuid"]),
                        "business_id": task["business_id"],
                        "status": status,
                        "attempts": task.get("attempts"),
                        "outcome": task.get("outcome"),
                    },
                    "timestamp": now.isoformat().replace("+00:00", "Z"),
                }
                data = {
                    "business_id": key,
                    "url": notify["url"],
                    "json": event,
                    "retry": {"strategy": "exponential", "initial_delay": 5, "max_attempts": 6},
                    "metadata": {"notification_for": str(task["uuid"])},
                }
                rows.append(self._row(task, data, now))
            if notify.get("email"):
                code = codes.get(task["business_pk"], str(task["business_pk"]))
                payload = notification_email(task, status, business_code=code, to=notify["email"], now=now)
                data = {
                    "business_id": f"{key}:email",
                    "type": EMAIL_TYPE,
                    "payload": payload,
                    "retry": EMAIL_RETRY,
                    "metadata": {"notification_for": str(task["uuid"])},
                }
                rows.append(self._row(task, data, now, processors=frozenset({EMAIL_TYPE})))
        return rows

    def _row(
        self,
        task: Mapping[Any, Any],
        data: Mapping[str, Any],
        now: datetime,
        processors: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        return new_task_row(
            data,
            business_pk=task["business_pk"],
            defaults=Defaults(self.default_retry),
            box=self.box,
            now=now,
            processors=processors,
        )

    async def _codes(self, pks: set[int]) -> dict[int, str]:
        """The codes of these businesses (one read, only when an e-mail needs them)."""
        if not pks:
            return {}
        known = {pk: code for pk, code in self.cached_codes() if pk in pks}
        if len(known) < len(pks):
            async with self.db.read() as conn:
                query = sa.select(businesses.c.id, businesses.c.code).where(businesses.c.id.in_(sorted(pks)))
                known.update({pk: code for pk, code in (await conn.execute(query)).all()})
        return known
