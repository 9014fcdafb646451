"""A dispatcher's cancel handling: the tasks it holds that were cancelled leave it unsent, their leases dropped.

Told by the service in this process, by NOTIFY on PostgreSQL, or read by the heartbeat; the dispatcher owns one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from taskcenter.errors import StorageError
from taskcenter.signals import parse_cancel_payload
from taskcenter.storage import leases
from taskcenter.storage.database import Database

log = logging.getLogger("taskcenter.dispatcher")


@dataclass(eq=False)
class Cancels:
    """The cancels of the tasks one dispatcher holds; ``held``, ``sending`` and the rest are the dispatcher's own."""

    db: Database
    worker: str
    clock: Callable[[], datetime]
    held: dict[int, int]
    """The dispatcher's claimed tasks not yet written back: task id -> the attempt number claimed."""
    sending: Mapping[int, object]
    """The dispatcher's tasks started (in flight), by task id."""
    unbuffer: Callable[[Callable[[Mapping[str, Any]], bool]], list[Mapping[str, Any]]]
    """Takes the buffered (claimed, not started) tasks a test picks out of the dispatcher's buffer."""
    slot_freed: asyncio.Event
    background: set[asyncio.Task[None]]
    in_flight: set[int] = field(default_factory=set)
    """Cancelled while held and started: perhaps not sent yet (waiting for the pacer), checked just before the
    request leaves (see ``Dispatcher._attempt``)."""
    dropped: dict[int, int] = field(default_factory=dict)
    """Taken out of the buffer unsent, their leases still to be dropped (task id -> attempt number claimed; they
    stay held, heartbeated, until that is done)."""
    claiming: bool = False
    """A claim is under way: its rows reach ``held`` only when it returns."""
    early: set[int] = field(default_factory=set)
    """Cancels told while a claim was under way, of tasks not held (yet): the claim may have leased them before the
    cancel; looked at again once its batch is buffered (:meth:`catch_up`)."""

    def told(self, ids: Iterable[int]) -> None:
        """Tasks were cancelled: drop those held and not started (see ``Dispatcher.cancelled``)."""
        held, sending = self.held, self.sending
        buffered: set[int] = set()
        for task_id in ids:
            if task_id not in held:
                if self.claiming:  # perhaps in the batch being claimed: looked at again when it is buffered
                    self.early.add(task_id)
                continue
            if task_id in self.dropped:
                continue  # dropped already (a cancel is told here and by NOTIFY, and read again by the heartbeat)
            if task_id in sending:
                self.in_flight.add(task_id)
            else:  # buffered, or its attempt is done and its result not yet written (then it is not found below)
                buffered.add(task_id)
        if not buffered:
            return
        pulled = self.unbuffer(lambda r: r["id"] in buffered)
        if pulled:
            for r in pulled:
                self.dropped[r["id"]] = r["attempts"] + 1
            log.info("dropped %d cancelled tasks from the buffer, unsent", len(pulled))
            self.release_soon()
            self.slot_freed.set()  # room in the buffer for the claim loop

    def catch_up(self) -> None:
        """Look again at the cancels told while the batch just buffered was being claimed."""
        early = set(self.early)
        self.early.clear()
        self.told(early)

    def release_soon(self) -> None:
        """Drop the leases of the tasks taken out unsent, in a task of its own."""
        task = asyncio.create_task(self.release(), name="tc-release-cancelled")
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def release(self) -> None:
        """Drop the leases of cancelled tasks taken out unsent (one statement for all of them); on failure they
        stay held and heartbeated, and the heartbeat tries again."""
        dropped = dict(self.dropped)
        if not dropped:
            return
        now = self.clock()
        try:
            # A task cancelled only needs its lease dropped; one retried by hand and claimed again since (a late
            # NOTIFY) is given back due now, uncharged.
            await leases.release(
                self.db,
                worker=self.worker,
                now=now,
                deferrals=[(i, now) for i in dropped],
                claimed={i: number - 1 for i, number in dropped.items()},
            )
        except StorageError as exc:
            log.warning("dropping the leases of %d cancelled tasks failed, retrying: %s", len(dropped), exc)
            return
        for task_id, number in dropped.items():
            if self.dropped.get(task_id) == number:
                del self.dropped[task_id]
            if self.held.get(task_id) == number:
                del self.held[task_id]

    async def read(self) -> None:
        """Drop the held tasks that were cancelled without the dispatcher being told: by another process on
        SQLite (between writes of results), or while the LISTEN connection was down."""
        if not self.held:
            return
        try:
            cancelled = await leases.held_cancelled(self.db, worker=self.worker)
        except StorageError as exc:
            log.warning("reading which held tasks were cancelled failed: %s", exc)
            return
        if cancelled:
            self.told(cancelled)

    def on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        """The listener of the cancel NOTIFY channel: its payload names the cancelled tasks."""
        self.told(parse_cancel_payload(payload))
