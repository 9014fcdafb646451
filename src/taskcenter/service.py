"""The application service: the one place the REST API, the console, the CLI and the library go through."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter import cursors
from taskcenter.clock import Clock
from taskcenter.clock import utcnow as utcnow  # re-exported: its old home, still imported from here
from taskcenter.creation import TaskCreator
from taskcenter.crypto import SecretBox, mask_headers
from taskcenter.domain.business import Business as Business  # re-exported: its old home, imported from here
from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.states import CANCELLABLE, EDITABLE, RETRYABLE_BY_HAND, TaskStatus
from taskcenter.domain.task import Attempt, Task, parse_row_id
from taskcenter.errors import (
    BusinessNotFound,
    Conflict,
    DuplicateTask,
    InvalidTransition,
    TaskCenterError,
    TaskNotFound,
    ValidationError,
)
from taskcenter.events import EventBus
from taskcenter.intake import Defaults, RequestMemo, changed_values, host_filter
from taskcenter.notifications import Notifications
from taskcenter.processors import ProcessorRegistry
from taskcenter.signals import CANCEL_CHANNEL, NOTIFY_CHANNEL, Notifier, cancel_payloads
from taskcenter.storage import tasks as task_sql
from taskcenter.storage.database import Database
from taskcenter.storage.schema import businesses


@dataclass
class TaskService:
    """Create, read, change, cancel and retry tasks, scoped to a business system."""

    db: Database
    box: SecretBox = field(default_factory=SecretBox.disabled)
    default_retry: RetryPolicy = field(default_factory=RetryPolicy)
    clock: Clock = utcnow
    notifier: Notifier = field(default_factory=Notifier)
    events: EventBus = field(default_factory=EventBus)
    processors: ProcessorRegistry = field(default_factory=ProcessorRegistry)
    poll_interval_s: float = 5.0
    email: bool = False
    """Whether ``notify.email`` is accepted: an SMTP server is configured (``Settings.smtp``)."""
    _businesses: dict[str, Business] = field(default_factory=dict, init=False)
    _creation: TaskCreator = field(init=False)
    _notifications: Notifications = field(init=False)

    def __post_init__(self) -> None:
        self._creation = TaskCreator(
            db=self.db,
            box=self.box,
            default_retry=self.default_retry,
            clock=self.clock,
            notifier=self.notifier,
            events=self.events,
            processors=self.processors,
            poll_interval_s=self.poll_interval_s,
            email=self.email,
        )
        self._notifications = Notifications(
            db=self.db,
            box=self.box,
            default_retry=self.default_retry,
            clock=self.clock,
            wake=self.notifier.wake,
            cached_codes=lambda: ((b.pk, b.code) for b in self._businesses.values()),
        )

    # -- businesses -----------------------------------------------------------------------------------

    async def business(self, code: str, *, refresh: bool = False) -> Business:
        """A business by code (cached); raises :class:`BusinessNotFound`."""
        if not refresh and code in self._businesses:
            return self._businesses[code]
        async with self.db.read() as conn:
            row = (
                (await conn.execute(sa.select(businesses).where(businesses.c.code == code)))
                .mappings()
                .first()
            )
        if row is None:
            raise BusinessNotFound(f"no business system {code!r}", code=code)
        found = Business.from_row(row)
        self._businesses[code] = found
        return found

    def forget_business(self, code: str) -> None:
        """Drop a cached business after it changed."""
        self._businesses.pop(code, None)

    async def ensure_business(self, code: str, name: str | None = None, **limits: Any) -> Business:
        """The business ``code``, registered if it does not exist (library mode); ``limits`` are columns such as
        ``rate_limit_per_minute`` used only when registering."""
        try:
            return await self.business(code)
        except BusinessNotFound:
            now = self.clock()
            async with self.db.write() as conn:
                exists = (
                    await conn.execute(sa.select(businesses.c.id).where(businesses.c.code == code))
                ).scalar()
                if exists is None:
                    await conn.execute(
                        sa.insert(businesses).values(
                            code=code, name=name or code, created_at=now, updated_at=now, **limits
                        )
                    )
            return await self.business(code, refresh=True)

    # -- create (creation.py) -------------------------------------------------------------------------

    def defaults(self, business: Business) -> Defaults:
        """The defaults a business's tasks get: its own retry policy, else the global one."""
        return self._creation.defaults(business)

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
        """Validate a create request into a row (no I/O); see :meth:`TaskCreator.prepare
        <taskcenter.creation.TaskCreator.prepare>`."""
        return self._creation.prepare(
            business, data, traceparent=traceparent, now=now, task_uuid=task_uuid, requests=requests
        )

    def needs_wakeup(self, row: Mapping[str, Any]) -> bool:
        """A dispatcher may be asleep past this task's due time only if it is due within one poll interval."""
        return self._creation.needs_wakeup(row)

    async def create_task(
        self,
        business: Business,
        data: Mapping[str, Any],
        *,
        traceparent: str | None = None,
        connection: AsyncConnection | None = None,
    ) -> Task:
        """Create one task. With ``connection``, the insert joins the caller's transaction (outbox)."""
        return await self._creation.create_task(
            business, data, traceparent=traceparent, connection=connection
        )

    async def insert_prepared(self, conn: AsyncConnection, row: dict[str, Any]) -> None:
        """Insert a prepared row on ``conn`` (see :func:`taskcenter.storage.tasks.insert_row`)."""
        await self._creation.insert_prepared(conn, row)

    async def create_tasks(
        self,
        business: Business,
        items: Sequence[Mapping[str, Any]],
        *,
        traceparent: str | None = None,
        public: bool = False,
    ) -> list[dict[str, Any]]:
        """Create up to 1,000 tasks in one transaction; see :meth:`TaskCreator.create_tasks
        <taskcenter.creation.TaskCreator.create_tasks>`."""
        return await self._creation.create_tasks(business, items, traceparent=traceparent, public=public)

    @property
    def group_commits(self) -> int:
        """How many transactions single creates were written in, failed ones included (fewer than creates under
        load)."""
        return self._creation.groups.commits

    async def _check_active_limit(self, business: Business, adding: int) -> None:
        await self._creation.check_active_limit(business, adding)

    def _task_from_new_row(self, business: Business, row: Mapping[str, Any]) -> Task:
        return self._creation.task_from_new_row(business, row)

    async def enqueue_notifications(self, finished: Sequence[tuple[Mapping[Any, Any], str]]) -> int:
        """For tasks that reached a final state, queue the notifications their ``notify`` asks for (see
        :meth:`Notifications.enqueue <taskcenter.notifications.Notifications.enqueue>`)."""
        return await self._notifications.enqueue(finished)

    async def sweep_notifications(self, *, grace_s: float = 30.0, limit: int = 100) -> int:
        """Queue the notifications a stopped process never queued (see
        :meth:`Notifications.sweep <taskcenter.notifications.Notifications.sweep>`)."""
        return await self._notifications.sweep(grace_s=grace_s, limit=limit)

    # -- read -----------------------------------------------------------------------------------------

    async def _row(self, conn: AsyncConnection, business: Business | None, ref: str | int) -> sa.RowMapping:
        pk = business.pk if business else None
        row = None
        text = str(ref).strip()
        if text.isdigit():  # any digits: those that are no row id (², ١, too many) name no task
            row_id = parse_row_id(text)
            if row_id is not None:
                row = await task_sql.get(conn, row_id=row_id, business_pk=pk)
        elif len(text) <= 40:
            try:
                row = await task_sql.get(conn, uuid=_canonical_uuid(text), business_pk=pk)
            except ValueError:
                row = None
        if row is None:
            raise TaskNotFound(f"no task {text!r}", ref=text)
        return row

    def _task(self, row: Mapping[Any, Any]) -> Task:
        return Task.from_row(row, self._masked)

    def _masked(self, stored: Mapping[str, str]) -> dict[str, str]:
        """Stored headers as shown: opened first so masks keep the scheme (``Bearer ***``), as attempts show them.

        A value the configured keys cannot open is shown fully masked rather than failing the read.
        """
        try:
            return mask_headers(self.box.open_headers(stored))
        except TaskCenterError:
            return mask_headers(stored)

    async def get_task(self, business: Business | None, ref: str | int) -> Task:
        """One task by UUID or numeric id; another business's task is :class:`TaskNotFound`."""
        async with self.db.read() as conn:
            return self._task(await self._row(conn, business, ref))

    async def get_by_business_id(self, business: Business, business_id: str) -> Task:
        async with self.db.read() as conn:
            row = await task_sql.get_by_business_id(conn, business.pk, business_id)
        if row is None:
            raise TaskNotFound(f"no task with business_id {business_id!r}", business_id=business_id)
        return self._task(row)

    async def attempts(self, business: Business | None, ref: str | int) -> list[Attempt]:
        async with self.db.read() as conn:
            row = await self._row(conn, business, ref)
            return [Attempt.from_row(a) for a in await task_sql.list_attempts(conn, row["id"])]

    async def list_tasks(
        self,
        business: Business | None,
        *,
        status: Sequence[str] | None = None,
        host: str | None = None,
        business_id: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[Task], str | None]:
        """Newest first; returns the page and the cursor of the next page (``None`` at the end).

        ``host`` is ``host:port`` for one target or a host name for every port of it (:func:`host_filter`).
        """
        if not 1 <= limit <= 500:
            raise ValidationError("limit must be between 1 and 500", field="limit")
        if isinstance(status, str):  # a str is a Sequence[str] too: one status, not its letters
            status = [status]
        for s in status or ():
            if s not in TaskStatus.__members__.values():
                raise ValidationError(f"status {s!r} is not a task status", field="status")
        before = decode_cursor(cursor) if cursor else None
        target, exact = host_filter(host) if host is not None else (None, True)
        async with self.db.read() as conn:
            rows = await task_sql.list_tasks(
                conn,
                business_pk=business.pk if business else None,
                status=status,
                host=target,
                any_port=not exact,
                business_id=business_id,
                created_after=created_after,
                created_before=created_before,
                before_id=before,
                limit=limit + 1,
            )
        page = [self._task(r) for r in rows[:limit]]
        return page, encode_cursor(rows[limit - 1]["id"]) if len(rows) > limit else None

    # -- change ---------------------------------------------------------------------------------------

    async def update_task(self, business: Business, ref: str | int, data: Mapping[str, Any]) -> Task:
        """Change a ``pending`` or ``retrying`` task; any other state is :class:`InvalidTransition` (409)."""
        async with self.db.write() as conn:
            row = await self._row(conn, business, ref)
            if row["status"] not in EDITABLE:
                raise InvalidTransition(
                    f"a {row['status']} task cannot be changed (only pending or retrying)",
                    current=row["status"],
                    target="updated",
                )
            values = changed_values(
                data, row, defaults=self.defaults(business), box=self.box, now=self.clock(), email=self.email
            )
            if not await task_sql.change(conn, row["id"], expected=sorted(EDITABLE), values=values):
                raise InvalidTransition(
                    "the task changed state meanwhile; read it again", current=row["status"]
                )
            if "next_attempt_at" in values and self.db.is_postgres:
                await conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))
            updated = await self._row(conn, business, row["id"])
        self.notifier.wake()
        return self._task(updated)

    async def cancel(self, business: Business | None, ref: str | int) -> Task:
        """Cancel a task that has not finished. A worker holding it unsent drops it (no request, no attempt); an
        attempt already in flight is still recorded, with no further try."""
        [task] = await self.cancel_many(business, [ref])
        return task

    async def cancel_many(self, business: Business | None, refs: Sequence[str | int]) -> list[Task]:
        """Cancel several tasks in one transaction: all of them, or (on the first that cannot be) none.

        The workers that hold some of them are told once for the lot: in this process directly, in others by
        NOTIFY on :data:`CANCEL_CHANNEL` (PostgreSQL), in as few payloads as fit.
        """
        now = self.clock()
        rows: list[sa.RowMapping] = []
        tasks: list[Task] = []
        held: list[int] = []
        async with self.db.write() as conn:
            for ref in refs:
                row = await self._row(conn, business, ref)
                if row["status"] not in CANCELLABLE:
                    raise InvalidTransition(
                        f"a {row['status']} task cannot be cancelled",
                        current=row["status"],
                        target="cancelled",
                    )
                values = {"status": "cancelled", "finished_at": now, "updated_at": now}
                if not await task_sql.change(conn, row["id"], expected=sorted(CANCELLABLE), values=values):
                    raise InvalidTransition(
                        "the task finished meanwhile", current=row["status"], target="cancelled"
                    )
                done = await self._row(conn, business, row["id"])
                # Read after the change, so a claim that raced the read above is seen: it is leased now.
                if done["lease_owner"] is not None:
                    held.append(row["id"])
                rows.append(row)
                tasks.append(self._task(done))
            if held and self.db.is_postgres:
                for payload in cancel_payloads(held):  # delivered at commit, so a rollback tells nobody
                    await conn.execute(sa.select(sa.func.pg_notify(CANCEL_CHANNEL, payload)))
        if held:
            self.notifier.cancelled(held)
        notifying = [(row, "cancelled") for row in rows if row["notify"]]
        if notifying:
            await self.enqueue_notifications(notifying)
        if self.events.wants("cancelled"):
            for task in tasks:
                self.events.publish("cancelled", task.to_dict())
        return tasks

    async def retry(self, business: Business | None, ref: str | int) -> Task:
        """Send a ``failed`` or ``cancelled`` task again now, with a renewed attempt budget."""
        now = self.clock()
        async with self.db.write() as conn:
            row = await self._row(conn, business, ref)
            if row["status"] not in RETRYABLE_BY_HAND:
                raise InvalidTransition(
                    f"a {row['status']} task cannot be retried (only failed or cancelled)",
                    current=row["status"],
                    target="pending",
                )
            if row["lease_owner"] is not None:
                raise Conflict("the task's last attempt is still in flight; retry it in a moment")
            live = await task_sql.live_task_uuid(conn, row["business_pk"], row["business_id"])
            if live is not None:
                raise DuplicateTask(
                    f"business_id {row['business_id']!r} already has a live task {live}",
                    existing_id=str(live),
                )
            policy = RetryPolicy.from_dict(row["retry"])
            values = {
                "status": "pending",
                # Attempt numbers keep counting up; the budget is renewed on top of what was spent.
                "max_attempts": row["attempts"] + policy.max_attempts,
                "next_attempt_at": now,
                "finished_at": None,
                "notified_at": None,  # its next final state notifies again
                "updated_at": now,
            }
            if not await task_sql.change(conn, row["id"], expected=sorted(RETRYABLE_BY_HAND), values=values):
                raise InvalidTransition(
                    "the task changed state meanwhile", current=row["status"], target="pending"
                )
            if self.db.is_postgres:
                await conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))
            task = self._task(await self._row(conn, business, row["id"]))
        self.notifier.wake()
        return task

    # -- bulk work (CLI) -------------------------------------------------------------------------------

    async def purge(
        self, *, older_than_s: float, batch: int = 1000, progress: Callable[[int], None] | None = None
    ) -> int:
        """Delete finished tasks (and their attempts) that finished more than ``older_than_s`` ago, in batches."""
        before = self.clock() - timedelta(seconds=older_than_s)
        total = 0
        while True:
            async with self.db.write() as conn:
                n = await task_sql.purge_finished(conn, before=before, limit=batch)
            total += n
            if progress is not None:
                progress(n)
            if n < batch:
                return total

    async def count_purgeable(self, *, older_than_s: float) -> int:
        async with self.db.read() as conn:
            return await task_sql.count_finished(conn, before=self.clock() - timedelta(seconds=older_than_s))

    async def retry_matching(
        self,
        *,
        status: Sequence[str],
        business: Business | None = None,
        host: str | None = None,
        since: datetime | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[int, int]:
        """Manually retry every task matching the filters (failed or cancelled). Returns (retried, skipped)."""
        if not set(status) <= RETRYABLE_BY_HAND:
            raise ValidationError("only failed or cancelled tasks can be retried", field="status")
        retried = skipped = 0
        cursor: str | None = None
        while True:
            page, cursor = await self.list_tasks(
                business, status=status, host=host, created_after=since, cursor=cursor, limit=500
            )
            for task in page:
                try:
                    await self.retry(None, task.row_id)
                    retried += 1
                except Conflict:  # e.g. its business_id is live again, or it changed meanwhile
                    skipped += 1
                if progress is not None:
                    progress(retried, skipped)
            if cursor is None:
                return retried, skipped


def _canonical_uuid(text: str) -> str:
    import uuid

    return str(uuid.UUID(text))


def encode_cursor(row_id: int) -> str:
    """An opaque keyset cursor."""
    return cursors.encode("t1", row_id)


def decode_cursor(cursor: str) -> int:
    """The row id behind a cursor; :class:`ValidationError` on anything else."""
    return cursors.decode_row_id("t1", cursor)
