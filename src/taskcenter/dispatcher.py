"""The dispatcher: claims due tasks, hands them to the sender or a processor, and writes results in batches.

It only orchestrates: what an outcome means lives in ``domain``, HTTP in ``sender``, a processor's attempt in
``processors``, SQL in ``storage.queue``, the loops beside it in ``housekeeping``; of the tasks it holds, the results
in ``recorder``, the cancels in ``cancels``, the give-backs of unsent ones in ``giveback`` and ``sealed``.
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

from taskcenter.cancels import Cancels
from taskcenter.config import DispatchConfig
from taskcenter.crypto import BusinessSecretError, SecretBox, SecretKeyError, mask_headers
from taskcenter.domain.outcome import AttemptResult, Outcome
from taskcenter.domain.request import delivery_headers
from taskcenter.domain.traffic import State, pace
from taskcenter.errors import StorageError
from taskcenter.events import EventBus
from taskcenter.giveback import GiveBacks
from taskcenter.housekeeping import LEASE_SURE, Housekeeping
from taskcenter.metrics import Metrics
from taskcenter.processors import ProcessorRegistry
from taskcenter.recorder import Recorder
from taskcenter.sealed import SealedHolds
from taskcenter.sender import OutboundRequest, Sender, SendResult
from taskcenter.service import utcnow
from taskcenter.signals import Notifier
from taskcenter.ssrf import GuardPolicy
from taskcenter.storage import leases, queue
from taskcenter.storage.database import Database
from taskcenter.storage.traffic import Spend, TrafficControl

log = logging.getLogger("taskcenter.dispatcher")
MAX_STORED_REQUEST_BODY = 65536
_NEVER = datetime.max.replace(tzinfo=UTC)


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
        self._stopping = asyncio.Event()
        self._sending: dict[int, asyncio.Task[None]] = {}
        # Claimed and not yet started, per business in claim order; started round-robin across businesses (_pump).
        self._ready: dict[int, collections.deque[Mapping[str, Any]]] = {}
        self._ready_count = 0
        # Claimed and not yet written back (their leases need heartbeats): task id -> the attempt number claimed.
        # A task rescued from under this dispatcher (its lease expired in a stall) and claimed again is held for
        # its new attempt; the old claim's copy is then stale (see _attempt and Recorder.after_write).
        self._held: dict[int, int] = {}
        # Claimed and not yet written back: task id -> until when (time.monotonic()) its lease is surely still this
        # dispatcher's (the claim, or the last heartbeat that renewed it, plus three quarters of a lease). A loop
        # that stalled past it (a paused VM, swapping, SIGSTOP) may have lost the task to the rescue: not sent.
        self._leased: dict[int, float] = {}
        self._lapsed_logged = -math.inf
        self._pacers: dict[str, State] = {}  # per host, this dispatcher's own send-time bucket (see _pace)
        self._background: set[asyncio.Task[None]] = set()
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
        # Claimed and not sent: given back to the queue (too late for their tokens, a signer refused, a circuit
        # opened); those whose sealed header values do not open, given back held (see sealed.py).
        self._give_backs = GiveBacks(
            settings=self,
            db=self.db,
            worker=self.name,
            clock=self.clock,
            held=self._held,
            rebuffer=functools.partial(self._claimed, count=False),
            stopping=self._stopping,
            slot_freed=self._slot_freed,
            background=self._background,
        )
        self._sealed = SealedHolds(
            box=self.box,
            give_back=lambda rows, why, hold: self._give_backs.unsent(rows, why, hold=hold),
            background=self._background,
        )
        # The attempts' results, from decided to written (see recorder.py).
        self._recorder = Recorder(
            settings=self,
            db=self.db,
            worker=self.name,
            clock=self.clock,
            rng=self.rng,
            metrics=self.metrics,
            events=self.events,
            held=self._held,
            sending=self._sending,
            wake=self._wake,
            stopping=self._stopping,
            unbuffer=self._unbuffer,
            cancelled=self.cancelled,
        )
        # Bound here so that the per-task calls and checks (_attempt, _sent) cost what they did: the recorder's
        # record; the cancels' own sets, cancelled while in flight, perhaps not sent yet, and taken out of the
        # buffer unsent, leases still to drop.
        self._record = self._recorder.record
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

    @property
    def delivered(self) -> int:
        """Attempts whose results were written so far (while the task was still this dispatcher's)."""
        return self._recorder.delivered

    async def run(self) -> None:
        """Run until :meth:`stop`. Safe to run several dispatchers (processes) on one database."""
        if self.notifier is not None:
            self.notifier.subscribe(self.wake)
            self.notifier.subscribe_cancelled(self.cancelled)
        self._recorder.combine = not self.db.is_postgres
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
            leased=self._leased,
            cancels=self._cancels,
            notify=self.notify,
            purge=self.purge,
            purge_interval_s=self.purge_interval_s,
            notify_sweep=self.notify_sweep,
            notify_sweep_interval_s=self.notify_sweep_interval_s,
        )
        helpers = [asyncio.create_task(self._recorder.write_loop(), name="tc-writer"), *housekeeping.start()]
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
            self._recorder.ready.set()
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
        recorded = {r.task_id for r in self._recorder.waiting} | self._recorder.writing
        unsent = [i for i in self._held if i not in recorded]
        if unsent:
            with contextlib.suppress(StorageError):
                await leases.release(
                    self.db,
                    worker=self.name,
                    now=self.clock(),
                    deferrals=[(i, self.clock()) for i in unsent],
                    claimed={i: self._held[i] - 1 for i in unsent},
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
        self._recorder.claim_parked = False
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
                leased = time.monotonic() + cfg.lease_s * LEASE_SURE
                try:
                    rows = await self._claim(limit)
                except StorageError as exc:
                    cancels.claiming = False
                    cancels.early.clear()
                    log.warning("claim failed, retrying: %s", exc)
                    await self._parked(self._sleep(1.0))
                    continue
                cancels.claiming = False
                self._claimed(rows, leased=leased)
                if max(self._claimed_last, len(rows)) == limit:
                    # A full batch (even if traffic control held some back): more may be due right now.
                    continue
                # Woken meanwhile: claim again without asking when the next is due.
                if not self._wake.is_set():
                    await self._parked(self._sleep_until_due())
        finally:
            self._recorder.claim_parked = True
            self._recorder.ready.set()

    async def _claim(self, limit: int) -> list[Mapping[str, Any]]:
        """Claim up to ``limit`` due tasks; on SQLite, writing the waiting results in the same transaction."""
        admission = self._admit if self.traffic is not None else None
        recorder = self._recorder
        if recorder.combine and recorder.waiting:
            batch, events = recorder.take()
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
                recorder.give_back(batch, events)  # the write loop retries them (one by one if need be)
                raise
            await recorder.after_write(batch, events, recorder.written(written))
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

    def _claimed(
        self, rows: list[Mapping[str, Any]], *, count: bool = True, leased: float | None = None
    ) -> None:
        """Buffer a claimed batch (one queue per business) and start what the free slots take.

        ``leased``: until when (``time.monotonic()``) the claim's leases are surely still this dispatcher's; None
        for tasks buffered again (a give-back failed), whose leases are as sure as they were.
        """
        if count:
            self.metrics.claimed.inc(len(rows))
        if leased is not None:
            self._leased.update(dict.fromkeys([row["id"] for row in rows], leased))
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
        """Wait with the claim loop parked: meanwhile the write loop writes the results (see ``Recorder.combine``)."""
        recorder = self._recorder
        recorder.claim_parked = True
        if recorder.waiting:
            recorder.ready.set()
        try:
            await waiting
        finally:
            recorder.claim_parked = False

    async def _sleep_until_due(self) -> None:
        # A result written while the next due time is being read may not be in what that read saw: it wakes us too.
        recorder = self._recorder
        recorder.asleep_until = _NEVER
        try:
            seconds = await self._until_next_due()
            recorder.asleep_until = self.clock() + timedelta(seconds=seconds)
            await self._sleep(seconds)
        finally:
            recorder.asleep_until = None

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

    def _unbuffer(self, host: str) -> None:
        """Give back, unsent, the buffered tasks of ``host`` (its circuit just opened).

        They were admitted while the circuit was closed, and the buffer holds up to ``claim_batch`` of them: sent,
        each would go to the failing host and hold a slot until it answered or timed out. Given back due now, the
        next claim's admission holds them past the cool-down with the host's other due tasks, no attempt charged.
        (Tasks already in flight when the circuit opens are not recalled.)
        """
        pulled = self._take_buffered(lambda r: r["host"] == host)
        if pulled:
            self._give_backs.later(pulled, "of an open circuit", delay_s=0.0)

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
                # buffer for a slot is counted from now (see GiveBacks.too_late).
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

    async def _attempt(
        self, row: Mapping[str, Any], send_by: float | None = None, spend: tuple[Spend, float] | None = None
    ) -> None:
        number = row["attempts"] + 1
        if send_by is not None and time.monotonic() > send_by:
            if self._held.get(row["id"]) != number:
                return
            respent = self._give_backs.too_late(row, spend)
            send_by = await respent if respent is not None else None
            if send_by is None:
                return  # given back
            if time.monotonic() > send_by:  # late again: given back (its tokens refunded if they can be)
                self._give_backs.too_late(row, spend)
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
        if time.monotonic() > self._leased.get(row["id"], math.inf):
            self._lease_lapsed(row)
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
                        self._give_backs.later([row], "whose signing secret does not open")
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
                attempt, result_value, duration = await self.processors.attempt(row)
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

    def _lease_lapsed(self, row: Mapping[str, Any]) -> None:
        """A task whose lease may have run out unrenewed (the loop stalled past it, or the heartbeat failed for
        most of a lease): the rescue may have recorded its attempt interrupted, another worker may be sending it, a
        cancel may have ended it. Given back unsent instead (if it is still this dispatcher's: the give-back, like
        every write, is guarded by the lease), at most once a second should that fail."""
        now = time.monotonic()
        if now - self._lapsed_logged > 10.0:
            self._lapsed_logged = now
            log.warning(
                "dispatcher %s: leases not renewed in time (a stall, or the heartbeat failing): tasks claimed "
                "before are given back unsent",
                self.name,
            )
        self._give_backs.later([row], "whose lease may have lapsed")

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
