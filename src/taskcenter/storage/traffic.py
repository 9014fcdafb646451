"""Traffic control against the shared state in the database: admission of a claimed batch, the host breakers'
bookkeeping of a written one, this dispatcher's slow-start windows per host, and the tokens of late starts.

Rows of ``host_state`` and ``business_state`` are read ``FOR UPDATE`` inside the claim (or result) transaction
(``storage.traffic_state``), so every dispatcher of a cluster takes tokens from the same buckets and sees the same
breakers; the tasks it holds back are moved in bulk by ``storage.holds``.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.domain.traffic import HOST_FAILURES as _FAILURES
from taskcenter.domain.traffic import (
    NOT_EVIDENCE,
    Candidate,
    Limits,
    State,
    Window,
    admit,
    negligible,
    record,
    refunded,
    respent,
)
from taskcenter.storage.database import Database
from taskcenter.storage.holds import BUSINESS_HOLDS, HostHolds, put_back_held_businesses
from taskcenter.storage.traffic_state import (
    REFUND_HOST,
    RESPEND_HOST,
    UPDATE_BUSINESS,
    UPDATE_HOST,
    host_params,
    lock_states,
)

#: Which bucket a task held for a token was promised one of (see ``Candidate.promised``).
_PROMISES = {"host_rate": "host", "business_rate": "business"}
_MAX_PROMISES = 10_000
#: A request this dispatcher admitted is counted in flight until its timeout and this long more (then its result
#: was lost: another worker took its lease over).
_FLIGHT_GRACE_S = 10.0


@dataclass(eq=False, slots=True)
class Spend:
    """The host tokens one admission spent: what it wrote to the host's row, and on how many tasks.

    If every one of those tasks starts too late for its token, and the row still holds what this admission wrote
    (nothing was admitted on the host since, by any dispatcher), they may be spent again as they start instead of
    given back (see ``domain.traffic.respent``)."""

    host: str
    tokens: float
    refilled_at: float
    tasks: int
    late: int = 0
    """Of the tasks, those that started too late (the dispatcher counts them)."""
    respent: bool = False
    """Spent again once already: tasks late again after that are given back, the tokens refunded if they can be."""


def _keep_promises(booked: dict[Any, float], states: Mapping[Any, State], now: float) -> None:
    """Remember the tokens promised to held tasks; forget promises that have lapsed."""
    for key, state in states.items():
        if state.booked_until > now:
            booked[key] = state.booked_until
        else:
            booked.pop(key, None)


def _forget_changed(limits: Mapping[Any, Limits], seen: dict[Any, Limits], booked: dict[Any, float]) -> None:
    """Drop the token promises of buckets whose limits changed: they were spaced by the old rate."""
    for key, lim in limits.items():
        if seen.get(key) != lim:
            if key in seen:
                booked.pop(key, None)
            seen[key] = lim
    if len(seen) > _MAX_PROMISES:
        seen.clear()


@dataclass
class TrafficControl:
    """Admission and breaker bookkeeping against the shared state. Limits come from cached policies."""

    host_limits: Callable[[str], Limits]
    business_limits: Callable[[int], Limits]
    known_hosts: set[str] = field(default_factory=set)
    known_businesses: set[int] = field(default_factory=set)
    clean_hosts: set[str] = field(default_factory=set)
    """Hosts last seen closed, unpaused, without failures: an all-success batch for them needs no write."""
    deferred: Counter[str] = field(default_factory=Counter)
    booked_hosts: dict[str, float] = field(default_factory=dict)
    """Per host, the last token this dispatcher promised to a held task (see ``domain.traffic.book``)."""
    booked_businesses: dict[int, float] = field(default_factory=dict)
    send_within: dict[int, tuple[float, float, Spend | None, float | None]] = field(default_factory=dict)
    """Tasks admitted on a token, until they start: when they were admitted (``time.monotonic()``), how long
    after that they may still leave (``domain.traffic.Verdict.send_within_s``), the host :class:`Spend` that
    let them go (``None`` if the host has no rate limit, or its row was not written) and how long the business's
    token allows (``Verdict.business_within_s``). The dispatcher takes each out as it starts the task; a task that
    starts too late is spent again (:meth:`respend`) or given back instead of sent."""
    promised: dict[int, tuple[str, float]] = field(default_factory=dict)
    """Tasks this dispatcher held for a token: which bucket (``host``/``business``) and when it is due."""
    slow_window: int = 10
    """Requests this dispatcher starts at once to a host that has not answered it yet, or whose oldest request
    has waited ``slow_after_s`` for its answer, to begin with: each answer that is not a host failure widens
    the window by one (so a healthy host's window doubles every round trip), each failure halves it, never below
    this. It binds only while other hosts want slots too. 0 turns it off. A host whose every request times out
    therefore holds a few of the dispatcher's slots, not all of them."""
    slow_after_s: float = 0.1
    on_close: Callable[[list[str]], Coroutine[Any, Any, None]] | None = None
    """Pulls forward the tasks held back for these hosts (see ``storage.holds.release_held``): when a circuit this
    dispatcher recorded closes, or a host it held tasks of for never answering well answers well. Called after the
    transaction, in a task of its own."""
    _seen_hosts: dict[str, Limits] = field(default_factory=dict)
    _seen_businesses: dict[int, Limits] = field(default_factory=dict)
    _flight: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    """Per host, this dispatcher's requests in flight: (admitted at, given up on at), oldest first."""
    _window: dict[str, float] = field(default_factory=dict)
    _answered_well: set[str] = field(default_factory=set)
    """Hosts that gave this dispatcher an answer that was not a failure."""
    _parked: set[str] = field(default_factory=set)
    """Hosts whose window held tasks until well after their oldest request's deadline (see ``_windows``)."""
    _seen_at: dict[str, float] = field(default_factory=dict)
    """When each host last had tasks in a claimed batch."""
    _holds: HostHolds = field(default_factory=HostHolds)
    """The hosts whose due tasks this dispatcher moved past a hold (see ``storage.holds``)."""

    async def admit(
        self, conn: AsyncConnection, rows: Sequence[Mapping[Any, Any]], now: datetime
    ) -> tuple[list[Mapping[Any, Any]], list[tuple[int, datetime]]]:
        """Split a just-claimed batch into tasks that go now and deferrals ``(task id, due again at)``."""
        if not rows:
            return [], []
        entered = time.monotonic()
        hosts = {r["host"] for r in rows}
        bizs = {r["business_pk"] for r in rows}
        host_lim = {h: self.host_limits(h) for h in hosts}
        biz_lim = {b: self.business_limits(b) for b in bizs}
        _forget_changed(host_lim, self._seen_hosts, self.booked_hosts)
        _forget_changed(biz_lim, self._seen_businesses, self.booked_businesses)
        # In flight elsewhere = processing now minus this batch (which the claim just marked processing).
        capped_h = any(host_lim[h].max_in_flight is not None for h in hosts)
        capped_b = any(biz_lim[b].max_in_flight is not None for b in bizs)
        h_states, b_states, busy_h, busy_b = await lock_states(
            conn,
            hosts,
            bizs,
            known_hosts=self.known_hosts,
            known_businesses=self.known_businesses,
            count_hosts=capped_h,
            count_bizs=capped_b,
        )
        # Decide as of now, not as of when the claim began: under contention the wait for these row locks is
        # the longest part of a claim, and tokens spent "in the past" would let the next dispatcher spend the
        # same seconds again (two bursts back to back at the receiver).
        decided = time.monotonic()
        ts = now.timestamp() + (decided - entered)
        claimed_h = Counter(r["host"] for r in rows)
        claimed_b = Counter(r["business_pk"] for r in rows)
        booked_h = {h: replace(h_states[h], booked_until=self.booked_hosts.get(h, 0.0)) for h in hosts}
        booked_b = {b: replace(b_states[b], booked_until=self.booked_businesses.get(b, 0.0)) for b in bizs}
        verdicts, new_h, new_b = admit(
            [Candidate(r["id"], r["host"], r["business_pk"], self._promise(r["id"])) for r in rows],
            hosts={h: (booked_h[h], host_lim[h], max(0, busy_h[h] - claimed_h[h])) for h in hosts},
            businesses={b: (booked_b[b], biz_lim[b], max(0, busy_b[b] - claimed_b[b])) for b in bizs},
            now=ts,
            windows=self._windows(hosts, ts),
        )
        _keep_promises(self.booked_hosts, new_h, ts)
        _keep_promises(self.booked_businesses, new_b, ts)
        changed_h = [
            host_params(h, s)
            for h, s in new_h.items()
            if s != booked_h[h] and not negligible(booked_h[h], s, host_lim[h])
        ]
        if changed_h:
            await conn.execute(UPDATE_HOST, changed_h)
        changed_b = [
            {"b_pk": b, "v_tokens": s.tokens, "v_refilled_at": s.refilled_at}
            for b, s in new_b.items()
            if s != booked_b[b] and not negligible(booked_b[b], s, biz_lim[b])
        ]
        if changed_b:
            await conn.execute(UPDATE_BUSINESS, changed_b)
        for h, s in new_h.items():
            if s.breaker == "closed" and s.failures == 0 and s.paused_until <= ts:
                self.clean_hosts.add(h)
            else:
                self.clean_hosts.discard(h)
        if len(self.send_within) > _MAX_PROMISES:
            # Tasks admitted and then never started (given back unsent, or left at shutdown) never come back.
            self.send_within = {i: w for i, w in self.send_within.items() if w[0] > decided - 60.0}
        # Per host whose row this admission wrote: the tokens it spent there, for the tasks that may start late.
        spends = {
            p["b_host"]: Spend(p["b_host"], p["v_tokens"], p["v_refilled_at"], 0)
            for p in changed_h
            if host_lim[p["b_host"]].rate_per_second is not None
        }
        # A business whose spend was not written (negligible) is owed no deadline should its tokens be spent
        # again: the row never held that spend, and a late request overstates it no more than one on time did.
        written_b = {p["b_pk"] for p in changed_b} if changed_b else set()
        go = []
        for r in rows:
            v = verdicts[r["id"]]
            if v.defer_until is None:
                go.append(r)
                if v.send_within_s is not None:
                    spend = spends.get(r["host"]) if spends else None
                    if spend is not None:
                        spend.tasks += 1
                    business = v.business_within_s if r["business_pk"] in written_b else None
                    self.send_within[r["id"]] = (decided, v.send_within_s, spend, business)
        if self.slow_window:
            for r in go:
                if not r["host"].startswith("processor:"):
                    self._flight.setdefault(r["host"], deque()).append(
                        (ts, ts + r["timeout"] + _FLIGHT_GRACE_S)
                    )
        later = []
        held: dict[str, list[int]] = {}
        for r in rows:
            v = verdicts[r["id"]]
            if v.reason in BUSINESS_HOLDS:
                self.deferred[v.reason] += 1
                held.setdefault(v.reason, []).append(r["id"])
            elif v.defer_until is not None:
                self.deferred[v.reason or "deferred"] += 1
                later.append((r["id"], datetime.fromtimestamp(v.defer_until, UTC)))
                if v.reason in _PROMISES:
                    self.promised[r["id"]] = (_PROMISES[v.reason], v.defer_until)
        if len(self.promised) > _MAX_PROMISES:
            # Tasks another dispatcher took (or that were cancelled) never come back here: drop lapsed promises.
            self.promised = {i: p for i, p in self.promised.items() if p[1] > ts - 60.0}
        if held:
            await put_back_held_businesses(conn, held, ts, now)
        self._holds.hold_rest(conn.engine, rows, verdicts, ts)
        return go, later

    async def respend(self, db: Database, spends: Sequence[Spend], now: datetime) -> list[Spend]:
        """Spend again, as of ``now``, the host tokens of admissions whose tasks all started too late for them;
        those whose row no longer holds what the admission wrote are left as they are. Returns the spends done.

        The bucket is left as if they were admitted now (see ``domain.traffic.respent``): nothing was admitted on
        the host since, so no request left on the refill they waited through, and the late tasks may go now instead
        of wasting their tokens (for a host with a burst of 1, a token each) and going round the queue. One
        statement per spend, in one transaction: this runs only for tasks that started late.
        """
        ts = now.timestamp()
        done = []
        async with db.write() as conn:
            for spend in spends:
                moved = respent(
                    State(spend.tokens, spend.refilled_at), self.host_limits(spend.host), ts, spend.tasks
                )
                if moved.refilled_at <= spend.refilled_at:
                    continue  # the clock went back, or the host lost its rate limit: the row would not tell
                params = {
                    "b_host": spend.host,
                    "b_tokens": spend.tokens,
                    "b_refilled_at": spend.refilled_at,
                    "v_tokens": moved.tokens,
                    "v_refilled_at": moved.refilled_at,
                }
                if (await conn.execute(RESPEND_HOST, params)).rowcount == 1:
                    spend.tokens, spend.refilled_at = moved.tokens, moved.refilled_at
                    spend.late, spend.respent = 0, True
                    done.append(spend)
        return done

    async def refund(self, db: Database, spends: Sequence[Spend]) -> list[Spend]:
        """Give back to their hosts' buckets the tokens of spends whose tasks, spent again (:meth:`respend`), all
        started too late again and go back to the queue unsent; those whose row no longer holds what the spending
        again wrote are left as they are. Returns the spends refunded.

        Nothing left on those tokens, and nothing was admitted on the host since: the bucket then holds what it
        held before the admission, which is no more than it would hold had the tasks never been admitted (that
        would have kept the refill the spending again forfeited).
        """
        done = []
        async with db.write() as conn:
            for spend in spends:
                back = refunded(State(spend.tokens, spend.refilled_at), spend.tasks)
                params = {
                    "b_host": spend.host,
                    "b_tokens": spend.tokens,
                    "b_refilled_at": spend.refilled_at,
                    "v_tokens": back.tokens,
                }
                if (await conn.execute(REFUND_HOST, params)).rowcount == 1:
                    spend.tokens = back.tokens
                    spend.tasks = 0  # nothing of it is left to refund or spend again
                    done.append(spend)
        return done

    def _promise(self, task_id: int) -> str | None:
        """The bucket this dispatcher promised the task a token of, if it did (the promise is used up)."""
        promise = self.promised.pop(task_id, None)
        return promise[0] if promise is not None else None

    def _windows(self, hosts: Iterable[str], now: float) -> dict[str, Window]:
        """The hosts whose oldest request in flight is slow to answer, with the room their window leaves.

        Only while other hosts want slots too (claimed in the last second): alone, a host may take them all.
        """
        windows: dict[str, Window] = {}
        hosts = set(hosts)
        for h in hosts:
            self._seen_at[h] = now
        if len(hosts) < 2 and not any(t > now - 1.0 for h, t in self._seen_at.items() if h not in hosts):
            return windows
        if len(self._seen_at) > _MAX_PROMISES:
            self._seen_at = {h: t for h, t in self._seen_at.items() if t > now - 1.0}
        for h in hosts:
            flight = self._flight.get(h)
            if not flight:
                continue
            while flight and flight[0][1] < now:  # its result was lost (a lease taken over): stop counting it
                flight.popleft()
            age = now - flight[0][0] if flight else 0.0
            # A host that has not answered this dispatcher yet is on probation too (like TCP's slow start):
            # otherwise a host that never answers takes every slot that frees up before its first timeout.
            if age > self.slow_after_s or h not in self._window:
                size = self._window.get(h, float(self.slow_window))
                window = Window(room=int(size) - len(flight), spacing_s=max(age, 0.05) / size)
                if window.room <= 0 and age > self.slow_after_s and h not in self._answered_well and flight:
                    # Slow and never answered well: hold the rest until its oldest request's deadline and one
                    # cool-down more (by then its circuit is open if it keeps failing), instead of bringing them
                    # back to the claim loop again and again. Its first good answer pulls them forward.
                    deadline = flight[0][1] - _FLIGHT_GRACE_S
                    window = replace(window, not_before=deadline + self.host_limits(h).breaker_cooldown_s)
                    self._parked.add(h)
                windows[h] = window
        return windows

    def answered(self, outcomes: Mapping[str, Sequence[str]]) -> None:
        """Fold this dispatcher's answered requests (a written batch's outcomes, per host) into its windows."""
        if not self.slow_window:
            return
        for h, outs in outcomes.items():
            flight = self._flight.get(h)
            if flight is None:
                continue
            size = self._window.get(h, float(self.slow_window))
            for outcome in outs:
                if flight:
                    flight.popleft()
                if outcome in _FAILURES:
                    size = max(float(self.slow_window), size / 2)
                elif outcome not in NOT_EVIDENCE:
                    size = min(size + 1, 100_000.0)
                    self._answered_well.add(h)
            self._window[h] = size
            if h in self._parked and h in self._answered_well:
                self._parked.discard(h)
                self._holds.ended(h)
                self._holds.release_later(self.on_close, [h])
                # Again a second later: a claim that parked more of them just before this answer may not have
                # committed yet, and the first release misses what it cannot see (those would wait out the
                # deadline and a cool-down: 2 of 24 sick-host benchmark rounds took 34 s instead of ~10).
                self._holds.release_later(self.on_close, [h], delay_s=1.0)
            if not flight:
                del self._flight[h]
        if len(self._window) > _MAX_PROMISES:
            self._window = {h: w for h, w in self._window.items() if h in self._flight}
            self._answered_well &= self._window.keys()

    def needs_record(self, outcomes: Mapping[str, Sequence[str]], pauses: Mapping[str, float]) -> bool:
        """Whether a written batch changes any breaker or pause."""
        return any(
            h in pauses or h not in self.clean_hosts or any(o in _FAILURES for o in outs)
            for h, outs in outcomes.items()
            if not h.startswith("processor:")
        )

    async def record(
        self,
        conn: AsyncConnection,
        outcomes: Mapping[str, Sequence[str]],
        pauses: Mapping[str, float],
        now: datetime,
    ) -> dict[str, str]:
        """Fold a written batch's outcomes into the host breakers; returns hosts whose breaker changed state."""
        hosts = {
            h
            for h, outs in outcomes.items()
            if not h.startswith("processor:")
            and (h in pauses or h not in self.clean_hosts or any(o in _FAILURES for o in outs))
        }
        if not hosts:
            return {}
        ts = now.timestamp()
        states, _, _, _ = await lock_states(
            conn, hosts, set(), known_hosts=self.known_hosts, known_businesses=self.known_businesses
        )
        changes: dict[str, str] = {}
        params = []
        for h in sorted(hosts):
            before = states[h]
            after = record(before, self.host_limits(h), outcomes.get(h, ()), ts, pauses.get(h, 0.0))
            if after.breaker != before.breaker:
                changes[h] = after.breaker
            if after != before:
                params.append(host_params(h, after))
            if after.breaker == "closed" and after.failures == 0 and after.paused_until <= ts:
                self.clean_hosts.add(h)
            else:
                self.clean_hosts.discard(h)
        if params:
            await conn.execute(UPDATE_HOST, params)
        closed = [h for h, breaker in changes.items() if breaker == "closed"]
        if closed:
            for h in closed:
                self._holds.ended(h)
            self._holds.release_later(self.on_close, closed)
        return changes
