"""The dispatcher: claims due tasks, hands them to the sender or a processor, and writes results in batches.

It only orchestrates: what an outcome means lives in ``domain``, HTTP in ``sender``, SQL in ``storage.queue``,
the loops beside it in ``housekeeping``, cancels of the tasks it holds in ``cancels``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from taskcenter.cancels import Cancels
from taskcenter.config import DispatchConfig
from taskcenter.crypto import BusinessSecretError, SecretBox, SecretKeyError, mask_headers
from taskcenter.domain.outcome import AttemptResult, Outcome, classify, decide
from taskcenter.domain.request import delivery_headers
from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.traffic import BUSINESS_HOLD_S, State, pace, send_tolerance
from taskcenter.errors import PermanentFailure, StorageError, TaskCenterError
from taskcenter.events import EventBus
from taskcenter.housekeeping import Housekeeping
from taskcenter.metrics import Metrics
from taskcenter.processors import ProcessorRegistry, run_in_thread
from taskcenter.sealed import SealedHolds
from taskcenter.sender import OutboundRequest, Sender, SendResult
from taskcenter.service import utcnow
from taskcenter.signals import Notifier
from taskcenter.ssrf import GuardPolicy
from taskcenter.storage import leases, queue, results
from taskcenter.storage.database import Database
from taskcenter.storage.traffic import Spend, TrafficControl

log = logging.getLogger("taskcenter.dispatcher")
MAX_STORED_REQUEST_BODY = 65536
_NEVER = datetime.max.replace(tzinfo=UTC)

_Pending = tuple[Mapping[str, Any], int, str, str, dict[str, Any] | None, int | None]
"""What the write loop needs of a recorded attempt for events and notifications, in step with its Finished:
(row, attempt number, status, outcome, response record, duration in ms)."""


def worker_name() -> str:
    """``host:pid:random`` — unique per dispatcher process."""
    return f"{socket.gethostname()}:{os.getpid()}:{random.randbytes(3).hex()}"


@dataclass
class Dispatcher:
    """Runs the claim → send → record loop until :meth:`stop` is called."""

    db: Database
    sender: Sender
    config: DispatchConfig = field(default_factory=DispatchConfig)
    box: SecretBox = field(default_factory=SecretBox.disabled)
    processors: ProcessorRegistry = field(default_factory=ProcessorRegistry)
    events: EventBus = field(default_factory=EventBus)
    notifier: Notifier | None = None
    guard: Callable[[int], GuardPolicy | None] = lambda _pk: None
    """The SSRF policy for a business's tasks (``None``: guard off)."""
    signer: Callable[[int], Callable[[str, int, bytes], dict[str, str]] | None] = lambda _pk: None
    """Signature headers for a business's deliveries, if it has a signing secret."""
    user_agent: str = "taskcenter"
    clock: Callable[[], datetime] = utcnow
    rng: random.Random = field(default_factory=random.Random)
    name: str = field(default_factory=worker_name)
    metrics: Metrics = field(default_factory=Metrics)
    traffic: TrafficControl | None = None
    """Rate limits, in-flight caps, breakers and pauses; ``None`` sends everything due."""
    businesses: Callable[[], list[int]] = list
    """The known business pks, for the fair (round-robin) claim."""
    purge: Callable[[], Awaitable[int]] | None = None
    """Deletes finished tasks past retention; run every ``purge_interval_s`` by the housekeeping loop."""
    purge_interval_s: float = 300.0
    notify: Callable[[Sequence[tuple[Mapping[Any, Any], str]]], Awaitable[int]] | None = None
    """Queues the notifications (webhook, e-mail) of tasks that reached a final state."""
    notify_sweep: Callable[[], Awaitable[int]] | None = None
    """Queues the notifications a crash lost (a task finished, its notifications never queued); run every
    ``notify_sweep_interval_s`` by the housekeeping."""
    notify_sweep_interval_s: float = 10.0
    reload_policies: Callable[[], Awaitable[None]] | None = None
    """Reloads what ``guard`` and ``signer`` answer from, now: called when a signer refuses (a business registered
    since the last load has no signer yet), one reload shared by every task that asks while it runs."""

    def __post_init__(self) -> None:
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._results_ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._sending: dict[int, asyncio.Task[None]] = {}
        # Claimed and not yet started, per business in claim order; started round-robin across businesses (_pump).
        self._ready: dict[int, collections.deque[Mapping[str, Any]]] = {}
        self._ready_count = 0
        self._policies: dict[bytes | str, RetryPolicy] = {}
        # Claimed and not yet written back (their leases need heartbeats): task id -> the attempt number claimed.
        # A task rescued from under this dispatcher (its lease expired in a stall) and claimed again is held for
        # its new attempt; the old claim's copy is then stale (see _attempt and _after_write).
        self._held: dict[int, int] = {}
        self._counters: dict[tuple[int, str], Any] = {}
        self._pacers: dict[str, State] = {}  # per host, this dispatcher's own send-time bucket (see _pace)
        # Admitted, started too late to send: to spend again or give back (see _too_late).
        self._late: list[tuple[Mapping[str, Any], _Late | None]] = []
        self._results: list[results.Finished] = []
        self._pending_events: list[_Pending] = []
        self._writing: set[int] = set()  # task ids of results taken for a write that has not returned yet
        # On SQLite the claim loop writes the waiting results in its claim's transaction (queue.finish_and_claim);
        # the write loop writes them only while the claim loop is parked (waiting for room or for the next due task).
        self._combine = False  # set by run()
        self._background: set[asyncio.Task[None]] = set()
        self._claim_parked = True
        # While the claim loop sleeps until the next due task: when it means to look again. A result written
        # meanwhile may schedule a retry before that (its task was in flight, so not due, when the sleep began).
        self._asleep_until: datetime | None = None
        self.delivered = 0
        self._claimed_last = 0
        self._cancels = Cancels(
            db=self.db,
            worker=self.name,
            clock=self.clock,
            held=self._held,
            sending=self._sending,
            unbuffer=self._take_buffered,
            slot_freed=self._slot_freed,
            background=self._background,
        )
        # Claimed, their sealed header values do not open: given back held (see sealed.py).
        self._sealed = SealedHolds(
            box=self.box,
            give_back=lambda rows, why, hold: self._give_back_unsent(rows, why, hold=hold),
            background=self._background,
        )
        # The cancels' own sets, bound here so that the per-task checks (_attempt, _sent) cost what they did:
        # cancelled while in flight, perhaps not sent yet; taken out of the buffer unsent, leases still to drop.
        self._cancelled = self._cancels.in_flight
        self._dropped = self._cancels.dropped

    # -- lifecycle ------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the queue now (a task was created or changed)."""
        self._wake.set()

    def cancelled(self, ids: Iterable[int]) -> None:
        """Tasks were cancelled: drop those this dispatcher holds and has not started sending.

        Those in the buffer leave it at once, unsent, their leases dropped (no attempt is charged). Those already
        started may still be waiting for the pacer: ``_attempt`` looks them up just before the request leaves. A
        request already sent is recorded as usual (the result keeps the task cancelled: no further try). Costs a
        dict look-up per id, and a pass over the buffer only when it holds one of them.
        """
        self._cancels.told(ids)

    def stop(self) -> None:
        """Stop claiming; in-flight work finishes within the grace period, the rest is released."""
        self._stopping.set()
        self._wake.set()
        self._slot_freed.set()

    @property
    def stopping(self) -> bool:
        """Whether it was told to stop (or ended): it claims no more, and lets what is in flight finish."""
        return self._stopping.is_set()

    async def run(self) -> None:
        """Run until :meth:`stop`. Safe to run several dispatchers (processes) on one database."""
        if self.notifier is not None:
            self.notifier.subscribe(self.wake)
            self.notifier.subscribe_cancelled(self.cancelled)
        self._combine = not self.db.is_postgres
        # Read when scraped instead of set each time a slot frees up (a locked write per attempt).
        self.metrics.in_flight.set_function(self._in_flight)
        housekeeping = Housekeeping(
            db=self.db,
            config=self.config,
            worker=self.name,
            clock=self.clock,
            events=self.events,
            wake=self.wake,
            held=self._held,
            cancels=self._cancels,
            notify=self.notify,
            purge=self.purge,
            purge_interval_s=self.purge_interval_s,
            notify_sweep=self.notify_sweep,
            notify_sweep_interval_s=self.notify_sweep_interval_s,
        )
        helpers = [asyncio.create_task(self._write_loop(), name="tc-writer"), *housekeeping.start()]
        # The task types it claims: HTTP and its processors' (tasks of other types wait for a worker that has one).
        log.info(
            "dispatcher %s started (concurrency %d; claims task types %s)",
            self.name,
            self.config.concurrency,
            ", ".join(("http", *self.processors.types())),
        )
        try:
            await self._claim_loop()
            await self._drain()
        except Exception:
            # A bug, not a database outage (those are retried inside): say so and end, rather than leave a
            # dispatcher that claims nothing while the writer below waits for a stop that never comes.
            log.exception("dispatcher %s crashed", self.name)
            raise
        finally:
            self._stopping.set()  # the writer ends once what it holds is written
            for helper in helpers[1:]:
                helper.cancel()
            self._results_ready.set()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self.events:  # the events of the results just written, delivered within the grace period
                await self.events.drain(self.config.shutdown_grace_s)
            if self.notifier is not None:
                self.notifier.unsubscribe(self.wake)
                self.notifier.unsubscribe_cancelled(self.cancelled)
            log.info("dispatcher %s stopped", self.name)

    async def _drain(self) -> None:
        """Give in-flight sends the grace period, then release what is left unsent."""
        if self._background:  # a give-back of an opened circuit's buffer still running
            await asyncio.gather(*self._background, return_exceptions=True)
        pending = list(self._sending.values())
        if pending:
            _done, not_done = await asyncio.wait(pending, timeout=self.config.shutdown_grace_s)
            for task in not_done:
                task.cancel()
            await asyncio.gather(*not_done, return_exceptions=True)
        # Whatever was claimed but never started goes back to the queue, due now, no attempt charged.
        recorded = {r.task_id for r in self._results} | self._writing
        unsent = [i for i in self._held if i not in recorded]
        if unsent:
            with contextlib.suppress(StorageError):
                await leases.release(
                    self.db, worker=self.name, now=self.clock(), deferrals=[(i, self.clock()) for i in unsent]
                )
            for i in unsent:
                del self._held[i]

    # -- claiming -------------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        cfg = self.config
        # Claim ahead of the free slots — up to a batch, at most four times the concurrency — so the next tasks are
        # already here when slots free up and the claim's round trips overlap with sending instead of leaving slots
        # idle. A claim under load takes ~35-65 ms (a few event-loop turns per round trip), and the claim loop
        # runs one at a time: with only one concurrency's worth ahead, each claim could bring no more than had
        # finished meanwhile, and slots emptied during every claim (measured: 48-60 of 100 in flight on average;
        # two ahead: tasks/s +8 to +39 % in 4 same-minute pairs; four ahead with batches of 400: mean in flight
        # 46-49 -> 58-70 on SQLite and tasks/s -1 to +38 % there in 4 pairs, PostgreSQL within the noise;
        # docs/benchmarks.md). The buffer is started round-robin across businesses, so another business's task
        # claimed behind a backlog's waits for a slot, not for the buffer. Tasks waiting in it have taken their
        # tokens already; the send-time pacer (``_pace``) keeps them from leaving a host in a clump.
        capacity = cfg.concurrency + min(cfg.claim_batch, 4 * cfg.concurrency)
        # Claim in chunks: one statement per quarter batch of free room, not one per freed slot.
        low_water = max(1, min(cfg.claim_batch, cfg.concurrency) // 4)
        cancels = self._cancels
        self._claim_parked = False
        try:
            while not self._stopping.is_set():
                room = capacity - len(self._sending) - self._ready_count
                if room < low_water:
                    self._slot_freed.clear()
                    await self._parked(self._slot_freed.wait())
                    continue
                self._wake.clear()
                self._claimed_last = 0
                limit = min(room, cfg.claim_batch)
                cancels.claiming = True
                try:
                    rows = await self._claim(limit)
                except StorageError as exc:
                    cancels.claiming = False
                    cancels.early.clear()
                    log.warning("claim failed, retrying: %s", exc)
                    await self._parked(self._sleep(1.0))
                    continue
                cancels.claiming = False
                self._claimed(rows)
                if max(self._claimed_last, len(rows)) == limit:
                    # A full batch (even if traffic control held some back): more may be due right now.
                    continue
                # Woken meanwhile: claim again without asking when the next is due.
                if not self._wake.is_set():
                    await self._parked(self._sleep_until_due())
        finally:
            self._claim_parked = True
            self._results_ready.set()

    async def _claim(self, limit: int) -> list[Mapping[str, Any]]:
        """Claim up to ``limit`` due tasks; on SQLite, writing the waiting results in the same transaction."""
        admission = self._admit if self.traffic is not None else None
        if self._combine and self._results:
            batch, events = self._take_results()
            try:
                written, rows = await queue.finish_and_claim(
                    self.db,
                    worker=self.name,
                    now=self.clock(),
                    results=batch,
                    limit=limit,
                    lease_s=self.config.lease_s,
                    businesses=self.businesses(),
                    types=self.processors.types(),
                    admission=admission,
                    breakers=self.traffic,
                )
            except StorageError:
                self._give_back(batch, events)  # the write loop retries them (one by one if need be)
                raise
            await self._after_write(batch, events, self._written(written))
            return rows
        return await queue.claim(
            self.db,
            worker=self.name,
            now=self.clock(),
            limit=limit,
            lease_s=self.config.lease_s,
            businesses=self.businesses(),
            types=self.processors.types(),
            admission=admission,
        )

    def _claimed(self, rows: list[Mapping[str, Any]], *, count: bool = True) -> None:
        """Buffer a claimed batch (one queue per business) and start what the free slots take."""
        if count:
            self.metrics.claimed.inc(len(rows))
        for row in rows:
            self._held[row["id"]] = row["attempts"] + 1
            queued = self._ready.get(row["business_pk"])
            if queued is None:
                queued = self._ready[row["business_pk"]] = collections.deque()
            queued.append(row)
        self._ready_count += len(rows)
        if self._cancels.early:  # cancelled while this batch was being claimed
            self._cancels.catch_up()
        self._pump(fresh=True)

    async def _parked(self, waiting: Awaitable[Any]) -> None:
        """Wait with the claim loop parked: meanwhile the write loop writes the results (see ``_combine``)."""
        self._claim_parked = True
        if self._results:
            self._results_ready.set()
        try:
            await waiting
        finally:
            self._claim_parked = False

    async def _sleep_until_due(self) -> None:
        # A result written while the next due time is being read may not be in what that read saw: it wakes us too.
        self._asleep_until = _NEVER
        try:
            seconds = await self._until_next_due()
            self._asleep_until = self.clock() + timedelta(seconds=seconds)
            await self._sleep(seconds)
        finally:
            self._asleep_until = None

    def _pump(self, *, fresh: bool = False) -> None:
        """Start buffered tasks while there are free slots: one of each business's in turn, each in claim order.

        ``fresh``: the tasks started come straight from their claim (slots were free, so the buffer was empty).
        """
        limit = self.config.concurrency
        ready = self._ready
        while ready and len(self._sending) < limit and not self._stopping.is_set():
            business = next(iter(ready))
            queued = ready.pop(business)
            self._start(queued.popleft(), fresh)
            self._ready_count -= 1
            if queued:
                ready[business] = queued  # to the back of the turn

    def _in_flight(self) -> int:
        return len(self._sending)

    async def _admit(
        self, conn: Any, rows: Any, _claimed_at: datetime
    ) -> tuple[list[Mapping[Any, Any]], list[tuple[int, datetime]]]:
        self._claimed_last = len(rows)
        if self.traffic is None:
            return list(rows), []
        # Tokens are counted from now, after the claim statement (which may have waited on locks), so that the
        # time spent claiming is not counted as time the bucket was refilling.
        return await self.traffic.admit(conn, rows, self.clock())

    async def _until_next_due(self) -> float:
        try:
            due = await queue.next_due(self.db, self.processors.types())
        except StorageError:
            return 1.0
        if due is None:
            return self.config.poll_interval_s
        return min(self.config.poll_interval_s, max(0.0, (due - self.clock()).total_seconds()))

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    def _start(self, row: Mapping[str, Any], fresh: bool = False) -> None:
        task_id = row["id"]
        send_by = None
        spend: tuple[Spend, float] | None = None
        if self.traffic is not None:
            within = self.traffic.send_within.pop(task_id, None)
            if within is not None:
                # Counted from its admission when it starts straight from its claim; a task that waited in the
                # buffer for a slot is counted from now (see _too_late).
                start = within[0] if fresh else time.monotonic()
                send_by = start + within[1]
                if within[2] is not None:  # its host's spend, and until when its business token allows
                    spend = within[2], math.inf if within[3] is None else start + within[3]
        task = asyncio.create_task(self._attempt(row, send_by, spend), name=f"tc-task-{task_id}")
        self._sending[task_id] = task
        task.add_done_callback(functools.partial(self._sent, task_id))

    def _sent(self, task_id: int, task: object = None) -> None:
        if self._sending.get(task_id) is task:  # not a newer claim's attempt of the same task
            del self._sending[task_id]
            if self._cancelled:
                self._cancelled.discard(task_id)
        self._pump()
        self._slot_freed.set()

    # -- one attempt ----------------------------------------------------------------------------------

    async def _pace(self, host: str) -> None:
        """Wait, if need be, so this dispatcher's requests to ``host`` leave at no more than its rate.

        Admission already spent the shared tokens; this only spaces out requests that a stall between admission
        and sending bunched together (see ``domain.traffic.pace``). A cancellation here (shutdown) leaves the task
        unsent and unrecorded, so it is released without an attempt charged.
        """
        assert self.traffic is not None
        limits = self.traffic.host_limits(host)
        if limits.rate_per_second is None:
            return
        if len(self._pacers) > 10_000:
            self._pacers.clear()
        self._pacers[host], wait = pace(self._pacers.get(host), limits, time.monotonic())
        if wait > 0:
            self.traffic.deferred["host_pace"] += 1
            await asyncio.sleep(wait)

    def _too_late(
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

        A task that waited in this dispatcher's buffer for a slot is counted from when it got the slot, not from
        its admission: while every slot is busy, requests leave as answers free slots, which the send-time pacer
        spaces out, and counting that wait would give back every buffered task of a host slower than its rate.
        """
        assert self.traffic is not None
        self.traffic.deferred["late"] += 1
        late: _Late | None = None
        if spend is not None and not self._stopping.is_set():
            spend[0].late += 1
            late = _Late(spend[0], spend[1], asyncio.get_running_loop().create_future())
        self._late.append((row, late))
        if len(self._late) == 1:  # the others of the clump start in this loop turn, before this task runs
            task = asyncio.create_task(self._give_back_late(), name="tc-late")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return late.deadline if late is not None and not late.spend.respent else None

    async def _give_back_late(self) -> None:
        clump, self._late = self._late, []
        assert self.traffic is not None
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
                await self.traffic.refund(self.db, refund)
            if again - set(refund):
                # The tolerance counts from the time the tokens are spent again, as from an admission's.
                at, now = self.clock(), time.monotonic()
                respent = set(await self.traffic.respend(self.db, list(again - set(refund)), at))
        except StorageError as exc:
            log.warning("spending again or refunding the tokens of %d late tasks failed: %s", len(whole), exc)
        finally:  # whatever happened, each late task learns whether it goes (else it would keep its slot)
            back = []
            for row, late in clump:
                if late is not None and late.spend in respent:
                    tolerance = send_tolerance(self.traffic.host_limits(late.spend.host))
                    late.deadline.set_result(min(now + tolerance, late.business_by))
                    self.traffic.deferred["late_respent"] += 1
                    continue
                if late is not None and not late.deadline.done():
                    late.deadline.set_result(None)
                back.append(row)
        if back:
            await self._give_back_unsent(back, "started too late for their tokens")

    async def _attempt(
        self, row: Mapping[str, Any], send_by: float | None = None, spend: tuple[Spend, float] | None = None
    ) -> None:
        number = row["attempts"] + 1
        if send_by is not None and time.monotonic() > send_by:
            if self._held.get(row["id"]) != number:
                return
            respent = self._too_late(row, spend)
            send_by = await respent if respent is not None else None
            if send_by is None:
                return  # given back
            if time.monotonic() > send_by:  # late again: given back (its tokens refunded if they can be)
                self._too_late(row, spend)
                return
        if self.traffic is not None and row["type"] == "http":
            await self._pace(row["host"])
        if self._held.get(row["id"]) != number:
            return  # a stale copy: the lease expired meanwhile and the task was rescued (and maybe claimed again)
        # Cancelled while it waited for the pacer: it goes unsent, like a buffered one.
        if self._cancelled and row["id"] in self._cancelled:
            self._cancelled.discard(row["id"])
            self._dropped[row["id"]] = number
            self._cancels.release_soon()
            return
        started = self.clock()
        request_record: dict[str, Any] | None = None
        result_value: Any = None
        try:
            if row["type"] == "http":
                try:
                    outbound = self._outbound(row, number)
                except BusinessSecretError:
                    signed = await self._outbound_after_reload(row, number)
                    if signed is None:
                        # Never sent unsigned. Given back unsent; the next claim's admission holds it with its
                        # business if its signing secret cannot be decrypted.
                        self._give_back_later([row], "whose signing secret does not open")
                        return
                    outbound = signed
                except SecretKeyError:
                    self._sealed.cannot_open(row)  # never sent with a header missing or still sealed
                    return
                request_record = self._request_record(outbound)
                sent = await self.sender.send(outbound)
                attempt = AttemptResult(sent.status_code, sent.headers, sent.error_kind, sent.error)
                response = _response_record(sent)
                duration = sent.duration_ms
            else:
                attempt, result_value, duration = await self._process(row)
                response = {"result": result_value} if result_value is not None else None
        except asyncio.CancelledError:
            if row["type"] == "http" and request_record is None:
                raise  # cut off before its request was built (a reload awaited): unsent, the drain releases it
            # Shutdown cut this attempt off after the grace period: the receiver may have got it, so it counts.
            self._record(
                row, number, started,
                AttemptResult(error_kind="interrupted", error="worker shut down before the response arrived"),
                request_record, None, None, None,
            )  # fmt: skip
            raise
        except Exception as exc:  # a bug must not leave the task leased forever: record it as a failed try
            log.exception("attempt of task %s crashed", row["uuid"])
            attempt = AttemptResult(error_kind="network_error", error=f"internal error: {exc!r}"[:500])
            response, duration = None, None
        self._record(row, number, started, attempt, request_record, response, duration, result_value)

    async def _outbound_after_reload(self, row: Mapping[str, Any], number: int) -> OutboundRequest | None:
        """The request of a task whose business's signer refused, built again once the business policies are
        reloaded: the business may only be new here (registered since the last load). None if it still cannot
        be signed (its signing secret cannot be decrypted), or the reload failed."""
        if self.reload_policies is None:
            return None
        try:
            await self.reload_policies()
            return self._outbound(row, number)
        except BusinessSecretError:
            return None
        except Exception as exc:  # the database, most likely: given back, tried again shortly
            log.warning("reloading the business policies for task %s failed: %s", row["uuid"], exc)
            return None

    def _outbound(self, row: Mapping[str, Any], number: int) -> OutboundRequest:
        uuid = str(row["uuid"])
        stored = row["headers"] or {}
        headers = delivery_headers(
            self.box.open_headers(stored) if stored else stored,
            task_uuid=uuid,
            attempt=number,
            business_id=row["business_id"],
            content_type=row["content_type"],
            user_agent=self.user_agent,
            traceparent=row["traceparent"],
        )
        body = row["body"].encode() if row["body"] is not None else None
        sign = self.signer(row["business_pk"])
        if sign is not None:
            # One message id per task: Standard Webhooks receivers deduplicate retries by it.
            headers.update(sign(f"msg_{uuid}", int(time.time()), body or b""))
        return OutboundRequest(
            method=row["method"],
            url=row["url"],
            headers=headers,
            body=body,
            timeout_s=row["timeout"],
            follow_redirects=row["follow_redirects"],
            guard=self.guard(row["business_pk"]),
        )

    def _request_record(self, outbound: OutboundRequest) -> dict[str, Any]:
        body = outbound.body.decode(errors="replace") if outbound.body else None
        if body is not None and len(body) > MAX_STORED_REQUEST_BODY:
            body = body[:MAX_STORED_REQUEST_BODY]
        return {
            "method": outbound.method,
            "url": outbound.url,
            "headers": mask_headers(outbound.headers),
            "body": body,
        }

    async def _process(self, row: Mapping[str, Any]) -> tuple[AttemptResult, Any, int]:
        processor = self.processors.get(row["type"])
        t0 = time.perf_counter()
        if processor is None:
            return (
                AttemptResult(
                    error_kind="permanent_failure", error=f"no processor registered for {row['type']!r}"
                ),
                None,
                0,
            )
        try:
            if processor.is_async:
                value = await asyncio.wait_for(processor.func(row["payload"]), timeout=row["timeout"])
            else:
                value = await asyncio.wait_for(
                    run_in_thread(processor.func, row["payload"]), timeout=row["timeout"]
                )
            return AttemptResult(status_code=200), value, int((time.perf_counter() - t0) * 1000)
        except PermanentFailure as exc:
            kind, text = "permanent_failure", str(exc)
        except TimeoutError:
            kind, text = "timeout", f"processor took longer than {row['timeout']:g} s"
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this attempt was cancelled (shutdown): _attempt records it as interrupted
            # Raised by the processor itself (e.g. awaiting something cancelled): an ordinary failure, not a
            # shutdown, which would retry it at once and without end.
            kind, text = "processor_error", f"CancelledError: {exc}".rstrip(": ")
        except Exception as exc:
            kind, text = "processor_error", f"{type(exc).__name__}: {exc}"
        return AttemptResult(error_kind=kind, error=text[:2000]), None, int((time.perf_counter() - t0) * 1000)

    def _policy(self, retry: Mapping[str, Any]) -> RetryPolicy:
        """Parse (and validate) each distinct stored policy once, not once per attempt."""
        # The key tells apart what the policy parser tells apart (1 from 1.0 and true, key order aside).
        # orjson costs 0.6-0.7 us here where repr(sorted(items)) cost 4-7 us, the largest share of _record.
        try:
            key: bytes | str = orjson.dumps(retry, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # not JSON (only a hand-built row can be): fall back to its repr
            key = repr(sorted(retry.items()))
        policy = self._policies.get(key)
        if policy is None:
            if len(self._policies) > 1000:
                self._policies.clear()
            policy = self._policies[key] = RetryPolicy.from_dict(retry)
        return policy

    def _record(
        self,
        row: Mapping[str, Any],
        number: int,
        started: datetime,
        attempt: AttemptResult,
        request: dict[str, Any] | None,
        response: dict[str, Any] | None,
        duration_ms: int | None,
        result_value: Any,
    ) -> None:
        now = self.clock()
        policy = self._policy(row["retry"])
        classification = classify(attempt, row["success_codes"], row["retry_on"] or ())
        decision = decide(
            # The n-th retry of the current budget (manual retries renew the budget on top of spent attempts).
            attempt=number - (row["max_attempts"] - policy.max_attempts),
            max_attempts=policy.max_attempts,
            classification=classification,
            policy=policy,
            now=now,
            headers=attempt.headers,
            status_code=attempt.status_code,
            rng=self.rng,
        )
        # Enum .value is a property lookup (0.3 us each): read once, not at each of the five places it is used.
        status, outcome = decision.status.value, decision.outcome.value
        self._count(self.metrics.attempts, outcome)
        if duration_ms is not None:
            self.metrics.attempt_seconds.observe(duration_ms / 1000)
        if decision.finished_at is not None:
            self._count(self.metrics.finished, status)
        self._results.append(
            results.Finished(
                task_id=row["id"],
                attempt=number,
                status=status,
                outcome=outcome,
                started_at=started,
                duration_ms=duration_ms,
                next_attempt_at=decision.next_attempt_at,
                finished_at=decision.finished_at,
                request=request,
                response=response,
                error=attempt.error,
                result=result_value,
                host=row["host"],
                pause_until=now.timestamp() + decision.host_pause_s if decision.host_pause_s else None,
            )
        )
        self._pending_events.append((row, number, status, outcome, response, duration_ms))
        if self._claim_parked or not self._combine:  # else the next claim takes it (see _combine)
            self._results_ready.set()

    def _count(self, counter: Any, label: str) -> None:
        """``counter.labels(label).inc()``, with the child looked up once per label instead of once per attempt."""
        child = self._counters.get((id(counter), label))
        if child is None:
            child = self._counters[(id(counter), label)] = counter.labels(label)
        child.inc()

    # -- writing results ------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            while self._results and (not self._combine or self._claim_parked):
                batch, events = self._take_results()
                await self._after_write(batch, events, await self._write(batch))
            if self._stopping.is_set() and not (self._sending or self._writing or self._results):
                return

    def _take_results(self) -> tuple[list[results.Finished], list[_Pending]]:
        """The next batch of results to write, with their events, out of the queue (into ``_writing``)."""
        size = self.config.write_batch
        batch, events = self._results[:size], self._pending_events[:size]
        del self._results[:size]
        del self._pending_events[:size]
        self._writing.update(r.task_id for r in batch)
        return batch, events

    def _give_back(self, batch: list[results.Finished], events: list[_Pending]) -> None:
        """Return a batch whose write failed to the front of the queue, for the write loop to retry."""
        self._results[:0] = batch
        self._pending_events[:0] = events
        self._writing.difference_update(r.task_id for r in batch)
        self._results_ready.set()

    async def _after_write(
        self, batch: list[results.Finished], events: list[_Pending], written: results.Written
    ) -> None:
        ids = [r.task_id for r in batch]
        self._writing.difference_update(ids)
        for r in batch:
            if self._held.get(r.task_id) == r.attempt:  # else a newer claim of the task holds it now
                del self._held[r.task_id]
        self.delivered += len(written.landed)
        if self._asleep_until is not None:
            retries = [
                r.next_attempt_at for r in batch if r.status == "retrying" and r.next_attempt_at is not None
            ]
            if retries and min(retries) < self._asleep_until:
                self._wake.set()  # look again: the sleep would outlast a retry just scheduled
        if written.lost:
            log.warning("lost the lease of %d tasks before their results were written", len(written.lost))
        if self.events:
            self._publish(events, dict(written.landed))
        if self.notify is not None:
            await self._notify(batch, events, dict(written.landed))

    async def _write(self, batch: list[results.Finished]) -> results.Written:
        """Write a batch; on repeated failure write one by one, and give up on results that cannot be written.

        A result given up on keeps its lease until it expires; the rescue then records the attempt as interrupted
        and the task is tried again, so nothing is lost, only repeated (delivery is at least once).
        """
        for pause in (0.2, 1.0, 3.0):
            try:
                return self._written(
                    await results.finish(
                        self.db, worker=self.name, now=self.clock(), results=batch, breakers=self.traffic
                    ),
                )
            except StorageError as exc:
                log.warning("writing %d results failed, retrying: %s", len(batch), exc)
                await asyncio.sleep(pause)
        landed: list[tuple[int, str]] = []
        lost: list[int] = []
        for result in batch:
            try:
                one = self._written(
                    await results.finish(
                        self.db, worker=self.name, now=self.clock(), results=[result], breakers=self.traffic
                    ),
                )
            except StorageError as exc:
                log.error("giving up on the result of task %s: %s", result.task_id, exc)
                lost.append(result.task_id)
                continue
            landed += one.landed
            lost += one.lost
        return results.Written(landed, lost)

    def _written(self, written: results.Written) -> results.Written:
        """Tell traffic control what a written batch answered (its slow-start windows) and log circuit changes;
        a circuit that opened takes its host's tasks out of the claimed buffer, and so do cancels the write read."""
        if self.traffic is not None and written.outcomes:
            self.traffic.answered(written.outcomes)
        for host, state in written.circuits.items():
            log.warning("circuit of %s is now %s", host, state)
            if state == "open":
                self._unbuffer(host)
        if written.cancelled:  # SQLite: cancelled by another process meanwhile
            self.cancelled(written.cancelled)
        return written

    def _unbuffer(self, host: str) -> None:
        """Give back, unsent, the buffered tasks of ``host`` (its circuit just opened).

        They were admitted while the circuit was closed, and the buffer holds up to ``claim_batch`` of them: sent,
        each would go to the failing host and hold a slot until it answered or timed out. Given back due now, the
        next claim's admission holds them past the cool-down with the host's other due tasks, no attempt charged.
        (Tasks already in flight when the circuit opens are not recalled.)
        """
        pulled = self._take_buffered(lambda r: r["host"] == host)
        if pulled:
            self._give_back_later(pulled, "of an open circuit", delay_s=0.0)

    def _take_buffered(self, which: Callable[[Mapping[str, Any]], bool]) -> list[Mapping[str, Any]]:
        """Take the buffered (claimed, not started) tasks ``which`` picks out of the buffer, each business's rest
        kept in claim order."""
        pulled: list[Mapping[str, Any]] = []
        for business, queued in list(self._ready.items()):
            if any(which(r) for r in queued):
                pulled += [r for r in queued if which(r)]
                kept = collections.deque(r for r in queued if not which(r))
                if kept:
                    self._ready[business] = kept
                else:
                    del self._ready[business]
        self._ready_count -= len(pulled)
        return pulled

    def _give_back_later(self, rows: list[Mapping[str, Any]], why: str, delay_s: float = 1.0) -> None:
        """Give tasks back unsent, due again ``delay_s`` from now, in a task of its own that waits as long first
        (so that, should the give-back fail and they be tried here again, this happens at most that often)."""

        async def later() -> None:
            await asyncio.sleep(delay_s)
            await self._give_back_unsent(rows, why, delay_s=delay_s)

        task = asyncio.create_task(later(), name="tc-give-back")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _give_back_unsent(
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
                await leases.release(self.db, worker=self.name, now=now, deferrals=deferrals)
            else:
                until = now + timedelta(seconds=BUSINESS_HOLD_S)
                await leases.hold(
                    self.db, worker=self.name, now=now, until=until, held_by=hold[0], errors=hold[1]
                )
        except StorageError as exc:  # still leased by us: send them after all rather than strand them
            log.warning("giving back %d tasks %s failed, trying them here: %s", len(rows), why, exc)
            self._claimed(rows, count=False)
            return False
        for r in rows:
            if self._held.get(r["id"]) == r["attempts"] + 1:  # else claimed again since it was given back
                del self._held[r["id"]]
        self._slot_freed.set()
        return True

    async def _notify(
        self, batch: list[results.Finished], events: list[_Pending], landed: dict[int, str]
    ) -> None:
        finished = []
        errors: dict[int, str | None] | None = None
        for row, number, _status, outcome, response, _duration in events:
            final = landed.get(row["id"])
            if row["notify"] and final in ("succeeded", "failed"):
                if errors is None:  # the attempt's error is in its result; looked up only when one notifies
                    errors = {r.task_id: r.error for r in batch}
                last = {"last_response": response, "last_error": errors.get(row["id"])}
                finished.append(({**row, "attempts": number, "outcome": outcome, **last}, final))
        if finished and self.notify is not None:
            try:
                await self.notify(finished)
            except TaskCenterError as exc:
                log.warning("queuing %d notifications failed: %s", len(finished), exc)

    def _publish(self, events: list[_Pending], landed: dict[int, str]) -> None:
        """Queue the lifecycle events of a written batch; their handlers run later, never in the write loop."""
        bus = self.events
        if not (bus.wants("attempted") or bus.wants("succeeded") or bus.wants("failed")):
            return  # only created/cancelled handlers: nothing to build per task
        for row, number, _status, outcome, response, duration_ms in events:
            final = landed.get(row["id"])
            if final is None:
                continue
            # Built here, not per attempt: most processes have no listener and never need it.
            last_response = dict(response, duration_ms=duration_ms) if response is not None else None
            data = {
                "id": str(row["uuid"]),
                "business_id": row["business_id"],
                "attempt": number,
                "status": final,
                "outcome": outcome,
                "last_response": last_response,
            }
            bus.publish("attempted", data)
            if final in ("succeeded", "failed"):
                bus.publish(final, data)


@dataclass(slots=True)
class _Late:
    """A late task that may be spent again (see ``Dispatcher._too_late``): its host's spend, until when its
    business token allows it (``time.monotonic()``), and where its new deadline is told (``None``: given back)."""

    spend: Spend
    business_by: float
    deadline: asyncio.Future[float | None]


def _response_record(sent: SendResult) -> dict[str, Any] | None:
    if sent.status_code is None:
        return None
    return {
        "status_code": sent.status_code,
        "headers": sent.headers,
        "body": sent.body,
        "truncated": sent.truncated,
    }


__all__ = ["Dispatcher", "Outcome", "worker_name"]
