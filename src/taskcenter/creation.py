"""Creating tasks: a create request validated into a row, held to its business's active-task limit, and stored —
on the caller's connection (outbox), in a group commit, or as a batch of up to 1,000 in one statement."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.clock import Clock
from taskcenter.crypto import SecretBox, mask_headers
from taskcenter.domain.business import Business
from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.task import Task
from taskcenter.errors import Forbidden, LimitExceeded, ValidationError
from taskcenter.events import EventBus
from taskcenter.group_commit import GroupCommit
from taskcenter.intake import Defaults, RequestMemo, new_task_row, new_uuids
from taskcenter.processors import ProcessorRegistry
from taskcenter.signals import NOTIFY_CHANNEL, Notifier
from taskcenter.storage import tasks as task_sql
from taskcenter.storage.database import Database


@dataclass(slots=True)
class _ActiveCount:
    """A per-business count of live tasks, re-read from the database only when it may be near the limit."""

    value: int
    read_at: float
    added: int = 0


@dataclass
class TaskCreator:
    """Creates tasks for :class:`~taskcenter.service.TaskService`, which holds one built from its own settings."""

    db: Database
    box: SecretBox
    default_retry: RetryPolicy
    clock: Clock
    notifier: Notifier
    events: EventBus
    processors: ProcessorRegistry
    poll_interval_s: float
    email: bool
    """Whether ``notify.email`` is accepted: an SMTP server is configured (``Settings.smtp``)."""
    _active: dict[int, _ActiveCount] = field(default_factory=dict, init=False)
    groups: GroupCommit = field(init=False)
    """Where single creates are stored (:meth:`create_task` without a connection)."""

    def __post_init__(self) -> None:
        self.groups = GroupCommit(self.db, self.notifier, self.needs_wakeup)

    def defaults(self, business: Business) -> Defaults:
        """The defaults a business's tasks get: its own retry policy, else the global one."""
        return Defaults(retry=business.retry or self.default_retry)

    def prepare(
        self,
        business: Business,
        data: Mapping[str, Any],
        *,
        traceparent: str | None = None,
        now: datetime | None = None,
        task_uuid: str | None = None,
        requests: RequestMemo | None = None,
    ) -> dict[str, Any]:
        """Validate a create request into a row (no I/O): shared by every create path, sync or async.

        ``now`` (default: the clock), ``task_uuid`` (default: a new one) and ``requests`` (a memo of validated
        requests) let the items of a batch share one time, draw their UUIDs at once and validate a repeated
        target once.
        """
        if business.status != "active":
            raise Forbidden(f"business system {business.code!r} is disabled")
        defaults = self.defaults(business)
        processor = self.processors.get(data["type"]) if isinstance(data.get("type"), str) else None
        if processor is not None:
            # A processor's own retry policy and priority are its tasks' defaults.
            if processor.retry is not None:
                defaults = Defaults(retry=processor.retry)
            if "priority" not in data and processor.priority:
                data = {**data, "priority": processor.priority}
        return new_task_row(
            data,
            business_pk=business.pk,
            defaults=defaults,
            box=self.box,
            now=self.clock() if now is None else now,
            processors=self.processors.creatable(),
            email=self.email,
            traceparent=traceparent,
            task_uuid=task_uuid,
            requests=requests,
        )

    def needs_wakeup(self, row: Mapping[str, Any]) -> bool:
        """A dispatcher may be asleep past this task's due time only if it is due within one poll interval."""
        return bool((row["next_attempt_at"] - self.clock()).total_seconds() < self.poll_interval_s)

    async def check_active_limit(self, business: Business, adding: int) -> None:
        """Raise :class:`LimitExceeded` if ``adding`` more live tasks would pass the business's limit."""
        loop = asyncio.get_running_loop()
        cached = self._active.get(business.pk)
        limit = business.max_active_tasks
        fresh = cached is not None and loop.time() - cached.read_at < 2.0
        if cached is not None and fresh and cached.value + cached.added + adding <= limit * 0.9:
            cached.added += adding
            return
        async with self.db.read() as conn:
            live = await task_sql.count_live(conn, business.pk)
        self._active[business.pk] = _ActiveCount(live + adding, loop.time())
        if live + adding > limit:
            raise LimitExceeded(
                f"business system {business.code!r} has {live} active tasks; its limit max_active_tasks is {limit}",
                limit="max_active_tasks",
            )

    async def create_task(
        self,
        business: Business,
        data: Mapping[str, Any],
        *,
        traceparent: str | None = None,
        connection: AsyncConnection | None = None,
    ) -> Task:
        """Create one task. With ``connection``, the insert joins the caller's transaction (outbox)."""
        row = self.prepare(business, data, traceparent=traceparent)
        await self.check_active_limit(business, 1)
        if connection is not None:
            await self.insert_prepared(connection, row)
        else:
            await self.groups.store(row)
        task = self.task_from_new_row(business, row)
        if self.events.wants("created"):
            self.events.publish("created", task.to_dict())
        return task

    async def insert_prepared(self, conn: AsyncConnection, row: dict[str, Any]) -> None:
        """Insert a prepared row on ``conn`` (see :func:`taskcenter.storage.tasks.insert_row`)."""
        channel = NOTIFY_CHANNEL if self.needs_wakeup(row) else None
        row["id"] = await conn.run_sync(task_sql.insert_row, row, notify_channel=channel)

    async def create_tasks(
        self,
        business: Business,
        items: Sequence[Mapping[str, Any]],
        *,
        traceparent: str | None = None,
        public: bool = False,
    ) -> list[dict[str, Any]]:
        """Create up to 1,000 tasks in one transaction. Each item gets ``{"status": 201, "task": …}`` or an error.

        Invalid items and duplicates are reported per item; the valid rest is stored all together, with one
        creation time. With ``public``, each stored ``task`` is its public JSON form (DESIGN "Task
        representation", what the REST API answers) built straight from the row, rather than a :class:`Task`.
        """
        if len(items) > 1000:
            raise ValidationError("a batch holds at most 1000 tasks", field="tasks")
        results: list[dict[str, Any]] = [{} for _ in items]
        rows: list[tuple[int, dict[str, Any]]] = []
        seen: dict[str, int] = {}
        now = self.clock()
        uuids = new_uuids(len(items))
        requests: RequestMemo = {}
        for n, item in enumerate(items):
            try:
                if not isinstance(item, dict | Mapping):  # dict first: an ABC check costs more per item
                    raise ValidationError(f"tasks[{n}] must be an object", field=f"tasks[{n}]")
                row = self.prepare(
                    business, item, traceparent=traceparent, now=now, task_uuid=uuids[n], requests=requests
                )
            except ValidationError as exc:
                results[n] = {"status": 422, "error": exc.message, "field": exc.field}
                continue
            if row["business_id"] in seen:
                results[n] = {
                    "status": 409,
                    "error": f"business_id {row['business_id']!r} repeats item {seen[row['business_id']]}",
                    "field": "business_id",
                }
                continue
            seen[row["business_id"]] = n
            rows.append((n, row))
        if rows:
            await self.check_active_limit(business, len(rows))
            if public and self.db.is_postgres:
                # The public form has no row id, so the common case — every business_id new — needs no row
                # back: one statement storing all rows or, if one is live already, none (then the usual path).
                async with self.db.autocommit() as conn:
                    stored_all = await task_sql.insert_all(
                        conn, [r for _, r in rows], notify_channel=NOTIFY_CHANNEL
                    )
                if stored_all:
                    for n, row in rows:
                        results[n] = {"status": 201, "task": _public_new_task(business, row)}
                    self.notifier.wake()
                    return results
            represent: Callable[[Business, Mapping[str, Any]], Any] = (
                _public_new_task if public else self.task_from_new_row
            )
            async with self.db.write() as conn:
                # Not a 1000-row statement compiled per batch (which cost more than the insert itself): see
                # insert_many (one unnest statement on PostgreSQL, insertmanyvalues pages elsewhere).
                notify = NOTIFY_CHANNEL if self.db.is_postgres else None
                stored = await task_sql.insert_many(conn, [r for _, r in rows], notify_channel=notify)
                ids = {uuid: row_id for row_id, uuid in stored}
                for n, row in rows:
                    row_id = ids.get(row["uuid"])
                    if row_id is not None:
                        row["id"] = row_id
                        results[n] = {"status": 201, "task": represent(business, row)}
                    else:
                        existing = await task_sql.live_task_uuid(conn, business.pk, row["business_id"])
                        results[n] = {
                            "status": 409,
                            "error": f"business_id {row['business_id']!r} already has a live task {existing}",
                            "field": "business_id",
                            "existing_id": existing,
                        }
            self.notifier.wake()
        return results

    def task_from_new_row(self, business: Business, row: Mapping[str, Any]) -> Task:
        """The :class:`Task` just stored from ``row``."""
        return Task.from_row({**row, "business_code": business.code}, mask_headers)


def _public_new_task(business: Business, row: Mapping[str, Any]) -> dict[str, Any]:
    """A task just stored from ``row``, in its public JSON form: what ``task_json`` makes of
    ``task_from_new_row``, key for key, without building the :class:`Task` (a batch answers a thousand)."""
    return {
        "id": str(row["uuid"]),
        "business_code": business.code,
        "business_id": row["business_id"],
        "type": row["type"],
        "status": row["status"],
        "request": None
        if row["url"] is None
        else {
            "method": row["method"],
            "url": row["url"],
            "headers": mask_headers(row["headers"] or {}),
            "body": row["body"],
            "content_type": row["content_type"],
        },
        "payload": row["payload"],
        "result": row["result"],
        "retry": row["retry"],
        "timeout": row["timeout"],
        "priority": row["priority"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "success_codes": row["success_codes"],
        "retry_on": row["retry_on"],
        "follow_redirects": row["follow_redirects"],
        "notify": row["notify"],
        "scheduled_at": row["scheduled_at"],
        "next_attempt_at": row["next_attempt_at"] if row["status"] in ("pending", "retrying") else None,
        "last_attempt_at": row["last_attempt_at"],
        "finished_at": row["finished_at"],
        "last_response": row["last_response"],
        "last_error": row["last_error"],
        "outcome": row["outcome"],
        "metadata": row["metadata"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
