"""A dispatcher's results: each attempt's outcome decided and queued, the queue written in batches, and what a
written batch tells others: traffic control's slow-start windows, lifecycle events, notifications of finished tasks.

The dispatcher owns one. :meth:`Recorder.record` runs once per attempt (the hot path); the rest once per batch.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson

from taskcenter.config import DispatchConfig
from taskcenter.domain.outcome import AttemptResult, classify, decide
from taskcenter.domain.retry import RetryPolicy
from taskcenter.errors import StorageError, TaskCenterError
from taskcenter.events import EventBus
from taskcenter.metrics import Metrics
from taskcenter.storage import results
from taskcenter.storage.database import Database
from taskcenter.storage.traffic import TrafficControl

log = logging.getLogger("taskcenter.dispatcher")

Pending = tuple[Mapping[str, Any], int, str, str, dict[str, Any] | None, int | None]
"""What the write loop needs of a recorded attempt for events and notifications, in step with its Finished:
(row, attempt number, status, outcome, response record, duration in ms)."""
Notify = Callable[[Sequence[tuple[Mapping[Any, Any], str]]], Awaitable[int]]
"""Queues the notifications (webhook, e-mail) of tasks that reached a final state."""


class Settings(Protocol):
    """What the recorder reads of its dispatcher's settings as it uses them, not once: a test or a benchmark may
    change them once the dispatcher is built (``notify = None``, ``traffic = None``)."""

    config: DispatchConfig
    traffic: TrafficControl | None
    notify: Notify | None


@dataclass(eq=False)
class Recorder:
    """The results of one dispatcher's attempts, from decided to written; ``held`` and the rest are the
    dispatcher's own."""

    settings: Settings
    """The dispatcher's: its ``write_batch``, traffic control and notification queuing."""
    db: Database
    worker: str
    clock: Callable[[], datetime]
    rng: random.Random
    metrics: Metrics
    events: EventBus
    held: dict[int, int]
    """The dispatcher's claimed tasks not yet written back: task id -> the attempt number claimed."""
    sending: Mapping[int, object]
    """The dispatcher's tasks started (in flight), by task id: the write loop ends once none is left."""
    wake: asyncio.Event
    """Wakes the claim loop."""
    stopping: asyncio.Event
    unbuffer: Callable[[str], None]
    """Gives back the buffered tasks of a host whose circuit just opened."""
    cancelled: Callable[[Iterable[int]], None]
    """Tells the dispatcher of tasks cancelled meanwhile (read by a write on SQLite)."""
    waiting: list[results.Finished] = field(default_factory=list)
    """Recorded, not yet written, in step with :attr:`waiting_events`."""
    waiting_events: list[Pending] = field(default_factory=list)
    writing: set[int] = field(default_factory=set)
    """Task ids of results taken for a write that has not returned yet."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when there are results for the write loop to write."""
    combine: bool = False
    """On SQLite the claim loop writes the waiting results in its claim's transaction (``queue.finish_and_claim``);
    the write loop writes them only while the claim loop is parked (waiting for room or for the next due task).
    Set by ``Dispatcher.run``."""
    claim_parked: bool = True
    """Whether the claim loop is waiting (for room or for the next due task): the write loop writes meanwhile."""
    asleep_until: datetime | None = None
    """While the claim loop sleeps until the next due task: when it means to look again. A result written meanwhile
    may schedule a retry before that (its task was in flight, so not due, when the sleep began)."""
    delivered: int = 0
    """Attempts whose results were written so far (those that landed: the task was still the dispatcher's)."""
    _policies: dict[bytes | str, RetryPolicy] = field(default_factory=dict)
    _counters: dict[tuple[int, str], Any] = field(default_factory=dict)

    # -- one attempt ----------------------------------------------------------------------------------

    def policy(self, retry: Mapping[str, Any]) -> RetryPolicy:
        """Parse (and validate) each distinct stored policy once, not once per attempt."""
        # The key tells apart what the policy parser tells apart (1 from 1.0 and true, key order aside).
        # orjson costs 0.6-0.7 us here where repr(sorted(items)) cost 4-7 us, the largest share of record.
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

    def record(
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
        """Decide what an attempt means for its task and queue the result for the write loop."""
        now = self.clock()
        policy = self.policy(row["retry"])
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
        self.waiting.append(
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
        self.waiting_events.append((row, number, status, outcome, response, duration_ms))
        if self.claim_parked or not self.combine:  # else the next claim takes it (see combine)
            self.ready.set()

    def _count(self, counter: Any, label: str) -> None:
        """``counter.labels(label).inc()``, with the child looked up once per label instead of once per attempt."""
        child = self._counters.get((id(counter), label))
        if child is None:
            child = self._counters[(id(counter), label)] = counter.labels(label)
        child.inc()

    # -- writing results ------------------------------------------------------------------------------

    async def write_loop(self) -> None:
        """Write the queued results while the claim loop does not take them (see :attr:`combine`); ends once the
        dispatcher stops and nothing is left in flight or to write."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.waiting and (not self.combine or self.claim_parked):
                batch, events = self.take()
                await self.after_write(batch, events, await self.write(batch))
            if self.stopping.is_set() and not (self.sending or self.writing or self.waiting):
                return

    def take(self) -> tuple[list[results.Finished], list[Pending]]:
        """The next batch of results to write, with their events, out of the queue (into ``writing``)."""
        size = self.settings.config.write_batch
        batch, events = self.waiting[:size], self.waiting_events[:size]
        del self.waiting[:size]
        del self.waiting_events[:size]
        self.writing.update(r.task_id for r in batch)
        return batch, events

    def give_back(self, batch: list[results.Finished], events: list[Pending]) -> None:
        """Return a batch whose write failed to the front of the queue, for the write loop to retry."""
        self.waiting[:0] = batch
        self.waiting_events[:0] = events
        self.writing.difference_update(r.task_id for r in batch)
        self.ready.set()

    async def after_write(
        self, batch: list[results.Finished], events: list[Pending], written: results.Written
    ) -> None:
        """Let go of a written batch's tasks, wake the claim loop for a retry due before it looks again, and
        publish the batch's events and notifications."""
        ids = [r.task_id for r in batch]
        self.writing.difference_update(ids)
        for r in batch:
            if self.held.get(r.task_id) == r.attempt:  # else a newer claim of the task holds it now
                del self.held[r.task_id]
        self.delivered += len(written.landed)
        if self.asleep_until is not None:
            retries = [
                r.next_attempt_at for r in batch if r.status == "retrying" and r.next_attempt_at is not None
            ]
            if retries and min(retries) < self.asleep_until:
                self.wake.set()  # look again: the sleep would outlast a retry just scheduled
        if written.lost:
            log.warning("lost the lease of %d tasks before their results were written", len(written.lost))
        if self.events:
            self._publish(events, dict(written.landed))
        if self.settings.notify is not None:
            await self._notify(batch, events, dict(written.landed))

    async def write(self, batch: list[results.Finished]) -> results.Written:
        """Write a batch; on repeated failure write one by one, and give up on results that cannot be written.

        A result given up on keeps its lease until it expires; the rescue then records the attempt as interrupted
        and the task is tried again, so nothing is lost, only repeated (delivery is at least once).
        """
        for pause in (0.2, 1.0, 3.0):
            try:
                return self.written(
                    await results.finish(
                        self.db,
                        worker=self.worker,
                        now=self.clock(),
                        results=batch,
                        breakers=self.settings.traffic,
                    ),
                )
            except StorageError as exc:
                log.warning("writing %d results failed, retrying: %s", len(batch), exc)
                await asyncio.sleep(pause)
        landed: list[tuple[int, str]] = []
        lost: list[int] = []
        for result in batch:
            try:
                one = self.written(
                    await results.finish(
                        self.db,
                        worker=self.worker,
                        now=self.clock(),
                        results=[result],
                        breakers=self.settings.traffic,
                    ),
                )
            except StorageError as exc:
                log.error("giving up on the result of task %s: %s", result.task_id, exc)
                lost.append(result.task_id)
                continue
            landed += one.landed
            lost += one.lost
        return results.Written(landed, lost)

    def written(self, written: results.Written) -> results.Written:
        """Tell traffic control what a written batch answered (its slow-start windows) and log circuit changes;
        a circuit that opened takes its host's tasks out of the claimed buffer, and so do cancels the write read."""
        traffic = self.settings.traffic
        if traffic is not None and written.outcomes:
            traffic.answered(written.outcomes)
        for host, state in written.circuits.items():
            log.warning("circuit of %s is now %s", host, state)
            if state == "open":
                self.unbuffer(host)
        if written.cancelled:  # SQLite: cancelled by another process meanwhile
            self.cancelled(written.cancelled)
        return written

    async def _notify(
        self, batch: list[results.Finished], events: list[Pending], landed: dict[int, str]
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
        notify = self.settings.notify
        if finished and notify is not None:
            try:
                await notify(finished)
            except TaskCenterError as exc:
                log.warning("queuing %d notifications failed: %s", len(finished), exc)

    def _publish(self, events: list[Pending], landed: dict[int, str]) -> None:
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
