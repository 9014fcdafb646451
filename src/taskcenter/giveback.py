"""A dispatcher's give-backs: claimed tasks that go back to the queue unsent, no attempt charged — started too late
for their tokens (unless those can be spent again), refused by their signer, of a circuit that opened, or held for
sealed header values (``sealed.py``). The dispatcher owns one; nothing here runs on the success path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from taskcenter.domain.traffic import BUSINESS_HOLD_S, send_tolerance
from taskcenter.errors import StorageError
from taskcenter.storage import leases
from taskcenter.storage.database import Database
from taskcenter.storage.traffic import Spend, TrafficControl

log = logging.getLogger("taskcenter.dispatcher")


class Settings(Protocol):
    """What the give-backs read of their dispatcher's settings as they use them, not once: a benchmark may switch
    traffic control off once the dispatcher is built."""

    traffic: TrafficControl | None


@dataclass(eq=False)
class GiveBacks:
    """The claimed tasks one dispatcher gives back unsent; ``held`` and the rest are the dispatcher's own."""

    settings: Settings
    """The dispatcher's: its traffic control, which admitted the tasks that start too late."""
    db: Database
    worker: str
    clock: Callable[[], datetime]
    held: dict[int, int]
    """The dispatcher's claimed tasks not yet written back: task id -> the attempt number claimed."""
    rebuffer: Callable[[list[Mapping[str, Any]]], None]
    """Buffers tasks whose give-back failed (still leased by the dispatcher) to be sent there after all."""
    stopping: asyncio.Event
    slot_freed: asyncio.Event
    background: set[asyncio.Task[None]]
    _late: list[tuple[Mapping[str, Any], _Late | None]] = field(default_factory=list)
    """Admitted, started too late to send: to spend again or give back (see :meth:`too_late`)."""

    def too_late(
        self, row: Mapping[str, Any], spend: tuple[Spend, float] | None
    ) -> asyncio.Future[float | None] | None:
        """A task that starts later than its token allows (``send_by``, see
        ``domain.traffic.Verdict.send_within_s``): the claim's commit or the start stalled (a loaded machine, a
        long GC pause), and meanwhile the host's bucket refilled as if it had gone; another dispatcher may be
        sending that refill right now. The tasks of one stall are dealt with together, after this loop turn:

        - if every task its host's admission let go is late, nothing was admitted on the host since (its row still
          holds what that admission wrote) and its business token still allows it, its host tokens are spent
          again as of now (``TrafficControl.respend``): it goes after all, within the host's tolerance of that
          (the returned future gives the new deadline), instead of wasting its token — for a host with a burst
          of 1, a token per late task, the host's whole rate while every start is late;
        - else it is given back unsent: due now, admitted again on a token of its own, no attempt charged, the
          tasks of one stall in one statement (the future, if any, gives None). If every task of its host's
          spend goes back so (its business token ran out, or it was spent again and is late again), the tokens go
          back to the bucket first, if nothing was admitted on the host since (``TrafficControl.refund``): a loop
          too slow for the tolerance then costs the host no tokens.

        A task that waited in the dispatcher's buffer for a slot is counted from when it got the slot, not from
        its admission (``Dispatcher._start``): while every slot is busy, requests leave as answers free slots,
        which the send-time pacer spaces out, and counting that wait would give back every buffered task of a host
        slower than its rate.
        """
        traffic = self.settings.traffic
        assert traffic is not None
        traffic.deferred["late"] += 1
        late: _Late | None = None
        if spend is not None and not self.stopping.is_set():
            spend[0].late += 1
            late = _Late(spend[0], spend[1], asyncio.get_running_loop().create_future())
        self._late.append((row, late))
        if len(self._late) == 1:  # the others of the clump start in this loop turn, before this task runs
            self._in_background(self._give_back_late(), "tc-late")
        return late.deadline if late is not None and not late.spend.respent else None

    async def _give_back_late(self) -> None:
        clump, self._late = self._late, []
        traffic = self.settings.traffic
        assert traffic is not None
        now = time.monotonic()
        # The host spends whose every task is late: spent again while their business tokens allow them to go,
        # else (or if they were spent again already) refunded.
        whole = {
            late.spend for _row, late in clump if late is not None and late.spend.late == late.spend.tasks
        }
        again = {late.spend for _row, late in clump if late is not None and late.business_by > now} & whole
        respent: set[Spend] = set()
        try:
            refund = [spend for spend in whole if spend.respent or spend not in again]
            if refund:
                await traffic.refund(self.db, refund)
            if again - set(refund):
                # The tolerance counts from the time the tokens are spent again, as from an admission's.
                at, now = self.clock(), time.monotonic()
                respent = set(await traffic.respend(self.db, list(again - set(refund)), at))
        except StorageError as exc:
            log.warning("spending again or refunding the tokens of %d late tasks failed: %s", len(whole), exc)
        finally:  # whatever happened, each late task learns whether it goes (else it would keep its slot)
            back = []
            for row, late in clump:
                if late is not None and late.spend in respent:
                    tolerance = send_tolerance(traffic.host_limits(late.spend.host))
                    late.deadline.set_result(min(now + tolerance, late.business_by))
                    traffic.deferred["late_respent"] += 1
                    continue
                if late is not None and not late.deadline.done():
                    late.deadline.set_result(None)
                back.append(row)
        if back:
            await self.unsent(back, "started too late for their tokens")

    def later(self, rows: list[Mapping[str, Any]], why: str, delay_s: float = 1.0) -> None:
        """Give tasks back unsent, due again ``delay_s`` from now, in a task of its own that waits as long first
        (so that, should the give-back fail and they be tried here again, this happens at most that often)."""

        async def later() -> None:
            await asyncio.sleep(delay_s)
            await self.unsent(rows, why, delay_s=delay_s)

        self._in_background(later(), "tc-give-back")

    async def unsent(
        self,
        rows: list[Mapping[str, Any]],
        why: str,
        *,
        delay_s: float = 0.0,
        hold: tuple[str, Mapping[int, str]] | None = None,
    ) -> bool:
        """Give tasks back unsent, due again ``delay_s`` from now; or, with ``hold`` (``held_by``, and each task's
        ``last_error`` by id), held for ``BUSINESS_HOLD_S``. Returns whether they went back."""
        now = self.clock()
        try:
            if hold is None:
                due = now + timedelta(seconds=delay_s)
                deferrals = [(r["id"], due) for r in rows]
                claimed = {r["id"]: r["attempts"] for r in rows}
                await leases.release(
                    self.db, worker=self.worker, now=now, deferrals=deferrals, claimed=claimed
                )
            else:
                until = now + timedelta(seconds=BUSINESS_HOLD_S)
                await leases.hold(
                    self.db, worker=self.worker, now=now, until=until, held_by=hold[0], errors=hold[1]
                )
        except StorageError as exc:  # still leased by us: send them after all rather than strand them
            log.warning("giving back %d tasks %s failed, trying them here: %s", len(rows), why, exc)
            self.rebuffer(rows)
            return False
        for r in rows:
            if self.held.get(r["id"]) == r["attempts"] + 1:  # else claimed again since it was given back
                del self.held[r["id"]]
        self.slot_freed.set()
        return True

    def _in_background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


@dataclass(slots=True)
class _Late:
    """A late task that may be spent again (see :meth:`GiveBacks.too_late`): its host's spend, until when its
    business token allows it (``time.monotonic()``), and where its new deadline is told (``None``: given back)."""

    spend: Spend
    business_by: float
    deadline: asyncio.Future[float | None]
