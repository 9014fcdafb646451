"""Group commit: single creates that arrive while a group is being written wait for the next one and go in
together, in one statement (so one commit), each caller still getting its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.errors import DuplicateTask, StorageError, TaskCenterError
from taskcenter.signals import NOTIFY_CHANNEL, Notifier
from taskcenter.storage import tasks as task_sql
from taskcenter.storage.database import Database


@dataclass(slots=True)
class _PendingCreate:
    """A prepared row waiting for the next group commit, and the future its caller awaits."""

    row: dict[str, Any]
    done: asyncio.Future[None]


#: At most this many single creates share one transaction (a batch's own limit).
GROUP_COMMIT_MAX = 1000
#: Groups of single creates written at once on PostgreSQL (SQLite has one writer: one).
GROUPS_IN_FLIGHT_POSTGRES = 2


@dataclass
class GroupCommit:
    """Stores single creates in shared transactions.

    One multi-row INSERT … ON CONFLICT DO NOTHING RETURNING (one statement, so one commit) for all the creates
    waiting, instead of a transaction (and on SQLite a turn of the one writer connection) each. An idle server
    writes the first create at once, so coalescing adds no wait; under load the groups grow with the backlog.
    Each caller still gets its own outcome: its row id, DuplicateTask naming the live task, or the error of its
    own row (a group that fails is retried one row per statement, so one bad row fails only its caller).
    """

    db: Database
    notifier: Notifier
    needs_wakeup: Callable[[Mapping[str, Any]], bool]
    """Whether a stored row falls due soon enough that a sleeping dispatcher must be woken."""
    _pending: list[_PendingCreate] = field(default_factory=list, init=False)
    _flushers: dict[asyncio.Task[None], list[bool]] = field(default_factory=dict, init=False)
    """The running flushers, each with its mark: ``[True]`` while on its way to take a group (waiting for a
    connection), when a new create joins that group rather than starting another flusher."""
    commits: int = field(default=0, init=False)
    """How many transactions single creates were written in, failed ones included (fewer than creates under
    load)."""

    async def store(self, row: dict[str, Any]) -> None:
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
            self.commits += 1
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
                    self.commits += 1
                outcomes = await self._insert_group(conn, [p.row for p in group])
        except TaskCenterError as exc:
            if group is None:  # the connection failed before a group was taken: this group meets the error
                group = self._take_group(taking)
                self.commits += 1
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
