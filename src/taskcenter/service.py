"""The application service: the one place the REST API, the console, the CLI and the library go through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter import cursors
from taskcenter.clock import Clock
from taskcenter.clock import utcnow as utcnow  # re-exported: its old home, still imported from here
from taskcenter.crypto import SecretBox, mask_headers
from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.states import CANCELLABLE, EDITABLE, RETRYABLE_BY_HAND, TaskStatus
from taskcenter.domain.task import Attempt, Task, parse_row_id
from taskcenter.errors import (
    BusinessNotFound,
    Conflict,
    DuplicateTask,
    Forbidden,
    InvalidTransition,
    LimitExceeded,
    StorageError,
    TaskCenterError,
    TaskNotFound,
    ValidationError,
)
from taskcenter.events import EventBus
from taskcenter.intake import Defaults, RequestMemo, changed_values, new_task_row, new_uuids
from taskcenter.notifications import Notifications
from taskcenter.processors import ProcessorRegistry
from taskcenter.signals import CANCEL_CHANNEL, NOTIFY_CHANNEL, Notifier, cancel_payloads
from taskcenter.storage import tasks as task_sql
from taskcenter.storage.database import Database
from taskcenter.storage.schema import businesses


@dataclass(frozen=True, slots=True)
class Business:
    """A business system (tenant) as the service needs it."""

    pk: int
    code: str
    name: str
    status: str
    rate_limit_per_minute: int
    max_in_flight: int | None
    max_active_tasks: int
    retry: RetryPolicy | None
    allow_networks: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    deny_hosts: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Business:
        return cls(
            pk=row["id"],
            code=row["code"],
            name=row["name"],
            status=row["status"],
            rate_limit_per_minute=row["rate_limit_per_minute"],
            max_in_flight=row["max_in_flight"],
            max_active_tasks=row["max_active_tasks"],
            retry=RetryPolicy.from_dict(row["retry"]) if row["retry"] else None,
            allow_networks=tuple(row["allow_networks"] or ()),
            allow_hosts=tuple(row["allow_hosts"] or ()),
            deny_hosts=tuple(row["deny_hosts"] or ()),
        )


@dataclass(slots=True)
class _PendingCreate:
    """A prepared row waiting for the next group commit, and the future its caller awaits."""

    row: dict[str, Any]
    done: asyncio.Future[None]


#: At most this many single creates share one transaction (a batch's own limit).
GROUP_COMMIT_MAX = 1000
#: Groups of single creates written at once on PostgreSQL (SQLite has one writer: one).
GROUPS_IN_FLIGHT_POSTGRES = 2


@dataclass(slots=True)
class _ActiveCount:
    """A per-business count of live tasks, re-read from the database only when it may be near the limit."""

    value: int
    read_at: float
    added: int = 0


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
    _active: dict[int, _ActiveCount] = field(default_factory=dict, init=False)
    _pending: list[_PendingCreate] = field(default_factory=list, init=False)
    _flushers: dict[asyncio.Task[None], list[bool]] = field(default_factory=dict, init=False)
    """The running flushers, each with its mark: ``[True]`` while on its way to take a group (waiting for a
    connection), when a new create joins that group rather than starting another flusher."""
    group_commits: int = field(default=0, init=False)
    """How many transactions single creates were written in, failed ones included (fewer than creates under
    load)."""
    _notifications: Notifications = field(init=False)

    def __post_init__(self) -> None:
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

    def defaults(self, business: Business) -> Defaults:
        return Defaults(retry=business.retry or self.default_retry)

    # -- create ---------------------------------------------------------------------------------------

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

    async def _check_active_limit(self, business: Business, adding: int) -> None:
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
        await self._check_active_limit(business, 1)
        if connection is not None:
            await self.insert_prepared(connection, row)
        else:
            await self._group_commit(row)
        task = self._task_from_new_row(business, row)
        if self.events.wants("created"):
            self.events.publish("created", task.to_dict())
        return task

    async def insert_prepared(self, conn: AsyncConnection, row: dict[str, Any]) -> None:
        """Insert a prepared row on ``conn`` (see :func:`taskcenter.storage.tasks.insert_row`)."""
        channel = NOTIFY_CHANNEL if self.needs_wakeup(row) else None
        row["id"] = await conn.run_sync(task_sql.insert_row, row, notify_channel=channel)

    # -- group commit ---------------------------------------------------------------------------------
    #
    # Single creates that arrive while a group is being written wait for the next one and go in together: one
    # multi-row INSERT … ON CONFLICT DO NOTHING RETURNING (one statement, so one commit) for all of them,
    # instead of a transaction (and on SQLite a turn of the one writer connection) each. An idle server writes
    # the first create at once, so coalescing adds no wait; under load the groups grow with the backlog. Each
    # caller still gets its own outcome: its row id, DuplicateTask naming the live task, or the error of its
    # own row (a group that fails is retried one row per statement, so one bad row fails only its caller).

    async def _group_commit(self, row: dict[str, Any]) -> None:
        """Store ``row`` in the next group transaction; sets ``row["id"]`` or raises that row's error."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append(_PendingCreate(row, done))
        flushers = self._flushers
        if any(f.done() or f.get_loop() is not loop for f in flushers):
            flushers = self._flushers = {
                f: m for f, m in flushers.items() if not f.done() and f.get_loop() is loop
            }
        if len(flushers) < self._groups_in_flight() and not any(m[0] for m in flushers.values()):
            # Every flusher is writing a group already (or none runs): one more starts.
            mark = [True]
            flushers[loop.create_task(self._flush_groups(mark), name="tc-group-commit")] = mark
        # A caller cancelled before its group is taken is simply not stored (the flusher skips it); once taken,
        # its row is written with the group, as a create cancelled after its COMMIT would be.
        await done

    def _groups_in_flight(self) -> int:
        """How many groups may be written at once: one on SQLite (one writer), two on PostgreSQL, where a group
        written while the previous one is on its way halves the wait of the creates behind it."""
        return GROUPS_IN_FLIGHT_POSTGRES if self.db.is_postgres else 1

    async def _flush_groups(self, taking: list[bool]) -> None:
        """Write groups while creates wait; ``taking`` is its mark in ``_flushers``."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                taking[0] = True
                await self._store_group(None, taking)
        finally:
            taking[0] = False
            self._flushers.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            # Never leave a caller waiting (e.g. the flusher cancelled at shutdown) when no other flusher will
            # take them.
            if self._pending and not any(not f.done() and f.get_loop() is loop for f in self._flushers):
                for pending in self._pending:
                    if not pending.done.done():
                        pending.done.set_exception(StorageError("the create was not stored: shutting down"))
                self._pending.clear()

    def _take_group(self, taking: list[bool] | None) -> list[_PendingCreate]:
        """The next group: the creates waiting now (those whose caller is still there), at most one statement's
        worth. ``taking``: the flusher's mark, cleared now that it has its group."""
        if taking is not None:
            taking[0] = False
        limit = min(GROUP_COMMIT_MAX, task_sql.rows_per_statement(self.db.dialect))
        group = [p for p in self._pending[:limit] if not p.done.done()]
        del self._pending[:limit]
        return group

    async def _store_group(
        self, group: list[_PendingCreate] | None, taking: list[bool] | None = None
    ) -> None:
        """One statement for ``group`` (``None``: the creates waiting once the connection is ours); each future
        gets its row's outcome. Never raises.

        The group is taken only once the write connection is ours: on SQLite that connection is the one writer,
        which the dispatcher's claims and finishes hold in turn, and the creates that arrive while the flusher
        waits for it go in with this group instead of waiting for the next one (measured at 500 creates/s with
        the dispatcher in the process: the flusher waited 3-4 ms on average, as long as a group took to write).
        """
        outcomes: dict[int, BaseException | None] = {}
        if group is not None:
            self.group_commits += 1
        try:
            # One INSERT statement per group (groups never outgrow one, see storage.tasks.rows_per_statement):
            # atomic by itself, so no BEGIN/COMMIT around it. The lookups of duplicates that follow read
            # committed data, as they did inside a transaction (each statement its own snapshot), and a
            # PostgreSQL NOTIFY goes out when the statement commits.
            async with self.db.autocommit() as conn:
                if group is None:
                    group = self._take_group(taking)
                    if not group:
                        return
                    self.group_commits += 1
                outcomes = await self._insert_group(conn, [p.row for p in group])
        except TaskCenterError as exc:
            if group is None:  # the connection failed before a group was taken: this group meets the error
                group = self._take_group(taking)
                self.group_commits += 1
            if len(group) > 1:
                # Something in the group broke the statement: retry each row alone so that the error
                # reaches only the caller whose row caused it.
                for pending in group:
                    pending.row.pop("id", None)  # not stored
                    await self._store_group([pending])
                return
            outcomes = {0: exc}
        except asyncio.CancelledError:
            for pending in group or ():
                if not pending.done.done():
                    pending.done.set_exception(StorageError("the create was not stored: shutting down"))
            raise
        except Exception as exc:  # a bug: report it to every caller rather than leave them waiting
            if group is None:
                group = self._take_group(taking)
            outcomes = dict.fromkeys(range(len(group)), exc)
        if any(outcomes.get(n) is None and self.needs_wakeup(p.row) for n, p in enumerate(group)):
            self.notifier.wake()
        for n, pending in enumerate(group):
            if pending.done.done():
                continue
            error = outcomes.get(n)
            if error is None:
                pending.done.set_result(None)
            else:
                pending.done.set_exception(error)

    async def _insert_group(
        self, conn: AsyncConnection, rows: list[dict[str, Any]]
    ) -> dict[int, BaseException | None]:
        """Insert ``rows`` on ``conn``; sets each stored row's ``id``; returns each row's error (None: stored)."""
        # NOTIFY reaches other processes' dispatchers (a group whose only due-soon row turns out a duplicate
        # wakes them for nothing, which costs one empty claim).
        wake = self.db.is_postgres and any(self.needs_wakeup(r) for r in rows)
        stored = await task_sql.insert_many(conn, rows, notify_channel=NOTIFY_CHANNEL if wake else None)
        ids = {uuid: row_id for row_id, uuid in stored}
        outcomes: dict[int, BaseException | None] = {}
        for n, row in enumerate(rows):
            row_id = ids.get(row["uuid"])
            if row_id is not None:
                row["id"] = row_id
                outcomes[n] = None
                continue
            # ON CONFLICT skipped it: its business_id is live already (maybe by a row earlier in this group).
            existing = await task_sql.live_task_uuid(conn, row["business_pk"], row["business_id"])
            outcomes[n] = DuplicateTask(
                f"business_id {row['business_id']!r} already has a live task {existing}",
                existing_id=str(existing) if existing else None,
            )
        return outcomes

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
            await self._check_active_limit(business, len(rows))
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
                _public_new_task if public else self._task_from_new_row
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

    async def enqueue_notifications(self, finished: Sequence[tuple[Mapping[Any, Any], str]]) -> int:
        """For tasks that reached a final state, queue the notifications their ``notify`` asks for (see
        :meth:`Notifications.enqueue <taskcenter.notifications.Notifications.enqueue>`)."""
        return await self._notifications.enqueue(finished)

    async def sweep_notifications(self, *, grace_s: float = 30.0, limit: int = 100) -> int:
        """Queue the notifications a stopped process never queued (see
        :meth:`Notifications.sweep <taskcenter.notifications.Notifications.sweep>`)."""
        return await self._notifications.sweep(grace_s=grace_s, limit=limit)

    def _task_from_new_row(self, business: Business, row: Mapping[str, Any]) -> Task:
        return Task.from_row({**row, "business_code": business.code}, mask_headers)

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
        """Newest first; returns the page and the cursor of the next page (``None`` at the end)."""
        if not 1 <= limit <= 500:
            raise ValidationError("limit must be between 1 and 500", field="limit")
        if isinstance(status, str):  # a str is a Sequence[str] too: one status, not its letters
            status = [status]
        for s in status or ():
            if s not in TaskStatus.__members__.values():
                raise ValidationError(f"status {s!r} is not a task status", field="status")
        before = decode_cursor(cursor) if cursor else None
        async with self.db.read() as conn:
            rows = await task_sql.list_tasks(
                conn,
                business_pk=business.pk if business else None,
                status=status,
                host=host,
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


def _public_new_task(business: Business, row: Mapping[str, Any]) -> dict[str, Any]:
    """A task just stored from ``row``, in its public JSON form: what ``task_json`` makes of
    ``_task_from_new_row``, key for key, without building the :class:`Task` (a batch answers a thousand)."""
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


def _canonical_uuid(text: str) -> str:
    import uuid

    return str(uuid.UUID(text))


def encode_cursor(row_id: int) -> str:
    """An opaque keyset cursor."""
    return cursors.encode("t1", row_id)


def decode_cursor(cursor: str) -> int:
    """The row id behind a cursor; :class:`ValidationError` on anything else."""
    return cursors.decode_row_id("t1", cursor)
