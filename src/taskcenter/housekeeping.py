"""A dispatcher's housekeeping: the loops beside claim → send → record that rescue expired leases, purge, sweep for
lost notifications, keep the held tasks' leases alive and, on PostgreSQL, LISTEN for new and cancelled tasks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from taskcenter.cancels import Cancels
from taskcenter.config import DispatchConfig
from taskcenter.errors import StorageError, TaskCenterError
from taskcenter.events import EventBus
from taskcenter.signals import CANCEL_CHANNEL, NOTIFY_CHANNEL
from taskcenter.storage import leases
from taskcenter.storage.database import Database

#: The share of a lease, from the claim or the heartbeat that renewed it, that a dispatcher counts as surely its
#: own (``time.monotonic()``); the rest allows for the database's clock and the rescuers'.
LEASE_SURE = 0.75

log = logging.getLogger("taskcenter.dispatcher")


@dataclass(eq=False)
class Housekeeping:
    """The housekeeping loops of one dispatcher, started by :meth:`start` and cancelled when it stops."""

    db: Database
    config: DispatchConfig
    worker: str
    clock: Callable[[], datetime]
    events: EventBus
    wake: Callable[[], None]
    """Tells the dispatcher to look at the queue now."""
    held: Mapping[int, int]
    """The dispatcher's claimed tasks not yet written back, whose leases the heartbeat extends."""
    leased: dict[int, float]
    """Until when (``time.monotonic()``) each claimed task's lease is surely still the dispatcher's: pushed on by
    each heartbeat that began before it ran out, pruned of the tasks no longer held."""
    cancels: Cancels
    notify: Callable[[Sequence[tuple[Mapping[Any, Any], str]]], Awaitable[int]] | None
    purge: Callable[[], Awaitable[int]] | None
    purge_interval_s: float
    notify_sweep: Callable[[], Awaitable[int]] | None
    notify_sweep_interval_s: float

    def start(self) -> list[asyncio.Task[None]]:
        """Start the loops (LISTEN only on PostgreSQL)."""
        loops = [
            asyncio.create_task(self._rescue_loop(), name="tc-rescue"),
            asyncio.create_task(self._heartbeat_loop(), name="tc-heartbeat"),
            asyncio.create_task(self._purge_loop(), name="tc-purge"),
            asyncio.create_task(self._sweep_loop(), name="tc-notify-sweep"),
        ]
        if self.db.is_postgres:
            loops.append(asyncio.create_task(self._listen_loop(), name="tc-listen"))
        return loops

    async def _rescue_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.rescue_interval_s)
            try:
                rescued = await leases.rescue(self.db, now=self.clock())
            except StorageError as exc:
                log.warning("lease rescue failed: %s", exc)
                continue
            if rescued:
                log.warning("rescued %d tasks whose lease expired", len(rescued))
                self.wake()
                if self.notify is not None or self.events.wants("failed"):
                    await self._rescued_failures(rescued)

    async def _rescued_failures(self, rescued: list[int]) -> None:
        """Tasks the rescue failed (a lost worker's attempt was their last allowed one) end like any other failure:
        their ``notify`` webhook is queued and ``failed`` listeners are called."""
        try:
            rows = await leases.failed_by_rescue(self.db, rescued)
        except StorageError as exc:
            log.warning("reading the tasks the lease rescue failed: %s", exc)
            return
        finished = [(row, "failed") for row in rows if row["notify"]]
        if finished and self.notify is not None:
            try:
                await self.notify(finished)
            except TaskCenterError as exc:
                log.warning("queuing %d notifications failed: %s", len(finished), exc)
        if self.events.wants("failed"):
            for row in rows:
                data = {
                    "id": str(row["uuid"]),
                    "business_id": row["business_id"],
                    "attempt": row["attempts"],
                    "status": "failed",
                    "outcome": row["outcome"],
                    "last_response": None,
                }
                self.events.publish("failed", data)

    async def _purge_loop(self) -> None:
        while self.purge is not None:
            await asyncio.sleep(self.purge_interval_s)
            try:
                purged = await self.purge()
            except TaskCenterError as exc:
                log.warning("retention purge failed: %s", exc)
                continue
            if purged:
                log.info("purged %d finished tasks past retention", purged)

    async def _sweep_loop(self) -> None:
        while self.notify_sweep is not None:
            await asyncio.sleep(self.notify_sweep_interval_s)
            try:
                queued = await self.notify_sweep()
            except TaskCenterError as exc:
                log.warning("sweeping for lost notifications failed: %s", exc)
                continue
            if queued:
                log.warning("queued %d notifications that a stopped process had not queued", queued)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_s / 4)
            if not self.held:
                self.leased.clear()
                continue
            ids = list(self.held)
            began = time.monotonic()
            try:
                await leases.extend_leases(
                    self.db,
                    worker=self.worker,
                    ids=ids,
                    until=self.clock() + timedelta(seconds=self.config.lease_s),
                )
            except StorageError as exc:
                log.warning("lease heartbeat failed: %s", exc)
            else:
                self._renewed(ids, began)
            if self.cancels.dropped:
                await self.cancels.release()
            await self.cancels.read()

    def _renewed(self, ids: list[int], began: float) -> None:
        """The heartbeat that began at ``began`` (``time.monotonic()``) extended the leases of ``ids`` still held
        by the dispatcher. Those surely its own then (a rescue may have taken the others during a stall) are surely
        its own for three quarters of a lease more; the tasks no longer held are forgotten."""
        leased, held = self.leased, self.held
        renewed = began + self.config.lease_s * LEASE_SURE
        for i in ids:
            until = leased.get(i)
            if until is not None and until >= began:
                leased[i] = max(until, renewed)
        for i in [i for i in leased if i not in held]:
            del leased[i]

    async def _listen_loop(self) -> None:
        """LISTEN on PostgreSQL so tasks created by other processes wake the dispatcher at once, and tasks they
        cancel leave its buffer unsent."""
        import asyncpg

        dsn = sa.make_url(self.db.url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(dsn)
                await conn.add_listener(NOTIFY_CHANNEL, lambda *_args: self.wake())
                await conn.add_listener(CANCEL_CHANNEL, self.cancels.on_notify)
                # Cancels made while it was not listening (starting, reconnecting) are read instead.
                await self.cancels.read()
                closed = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set_event, closed))
                await closed.wait()
                self.wake()  # notifications may have been missed while reconnecting
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("LISTEN connection failed, polling meanwhile: %s", exc)
                await asyncio.sleep(2)
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()


def _set_event(event: asyncio.Event, *_args: object) -> None:
    event.set()
