"""Traffic control arithmetic: token buckets, circuit breakers, and the admission of a claimed batch.

Pure: the state comes in as values, the new state and the decisions go out. The SQL layer persists the state under
row locks, which is what makes one limit hold across every dispatcher of a cluster.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

#: Outcomes that count against a host's health. Client errors mean the host is alive and answering.
HOST_FAILURES = frozenset({"server_error", "timeout", "network_error"})
#: Outcomes that say nothing about the host: the guard refused before any packet left, or the attempt was cut off.
NOT_EVIDENCE = frozenset({"blocked", "interrupted"})
#: Most recent outcomes a breaker's failure-ratio window holds (the stored window is a string of this length).
MAX_BREAKER_WINDOW = 100
#: A held task is due this long after its token: it then finds a whole token, not 0.99999 of one.
_SLOT_SLACK_S = 1e-4
#: What counts as a whole token. Epoch seconds carry ~2e-7 s of rounding, i.e. 2e-4 of a token at 1,000/s;
#: the shortfall stays in the bucket as a debt, so the long-run rate is unchanged.
_WHOLE_TOKEN = 1 - 1e-3
#: The least lateness tolerated beyond what a token allows (see :func:`send_tolerance`).
SEND_TOLERANCE_S = 0.05
#: The longest a task waits for a token before it is looked at again: as far ahead as a task may be scheduled.
#: A rate above 0 may still be tiny (1e-300/s): its next token is further off than any time can be written.
MAX_TOKEN_WAIT_S = 366 * 86_400.0
#: How long a task of a held business (``Limits.held``) waits before it is looked at again. Its cause needs an
#: operator, and lifting it pulls the business's held tasks forward at once (see :func:`relaxed`): this is only
#: the backstop, and the claim meets each held task once per hold, not once per batch.
BUSINESS_HOLD_S = 3600.0
#: The ``held_by`` of a task held on its own, as long, because TASKCENTER_SECRET_KEY cannot open one of its sealed
#: header values (no host key looks so): a dispatcher that starts with the key back, or new headers, let it go.
SEALED_HEADERS_HOLD = "task:sealed_headers"


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one host (from its policy, else the defaults) or one business. ``None`` means unlimited.

    A rate of 0 or less means no rate limit, as in the ``host_rate_per_second`` setting.
    """

    rate_per_second: float | None = None
    burst: int | None = None
    max_in_flight: int | None = None
    breaker_failures: int = 5
    breaker_ratio: float | None = None
    breaker_window: int = 20
    breaker_cooldown_s: float = 30.0
    paused_until: float = 0.0
    """An operator's pause of the host (epoch seconds), on top of any ``Retry-After`` pause in the state."""
    held: str | None = None
    """A business's: why none of its HTTP tasks may go, whatever its tokens (the reason names the hold), e.g.
    ``signing_secret`` — its signing secret cannot be decrypted, so its requests could only leave unsigned. Its
    tasks wait :data:`BUSINESS_HOLD_S`, unless the hold is lifted first."""

    def __post_init__(self) -> None:
        if self.rate_per_second is not None and not self.rate_per_second > 0:
            object.__setattr__(self, "rate_per_second", None)

    @property
    def capacity(self) -> float:
        if self.rate_per_second is None:
            return math.inf
        # Below one token nothing could ever be admitted: a burst of 0 means "no burst", a bucket of one.
        return max(1.0, float(self.burst if self.burst is not None else self.rate_per_second))


@dataclass(frozen=True, slots=True)
class State:
    """The shared state of one host or business, as stored (but ``booked_until``). Times are epoch seconds."""

    tokens: float
    refilled_at: float
    breaker: str = "closed"  # closed | open | half_open
    failures: int = 0  # consecutive
    window: tuple[bool, ...] = ()  # recent outcomes, True = failure, newest last
    open_until: float = 0.0
    probe_until: float = 0.0  # a half-open probe is in flight until then
    paused_until: float = 0.0
    booked_until: float = 0.0
    """The last token already promised to a held task. Each dispatcher keeps its own, in memory."""


def refill(state: State, limits: Limits, now: float) -> State:
    """Add the tokens earned since the last refill, up to the bucket's capacity.

    ``refilled_at`` never moves back: a dispatcher whose clock reading predates the last refill (it waited for
    the row lock while another dispatcher refilled) earns nothing, instead of earning the same seconds twice.
    """
    if limits.rate_per_second is None:
        # Nothing to count: the state stays as it is (and needs no write). Should a rate be set later, the
        # bucket starts full, as a new host's does.
        return state
    at = max(now, state.refilled_at)
    earned = (at - state.refilled_at) * limits.rate_per_second
    return _with_tokens(state, min(limits.capacity, state.tokens + earned), at)


def _with_tokens(s: State, tokens: float, refilled_at: float) -> State:
    """``replace(s, tokens=…, refilled_at=…)``, without its cost (admission does this per host and claim)."""
    return State(tokens, refilled_at, s.breaker, s.failures, s.window, s.open_until, s.probe_until,
                 s.paused_until, s.booked_until)  # fmt: skip


#: A bucket that earns back within this long what a batch spent is not written back (see :func:`negligible`).
NEGLIGIBLE_S = 1e-3


def negligible(stored: State, after: State, limits: Limits) -> bool:
    """Whether ``after`` need not be written over ``stored``: only the tokens changed, and the bucket earns back
    within :data:`NEGLIGIBLE_S` what was spent (it was full, and the rate is at least 1,000 per second per token
    spent). Left unwritten, the stored row overstates the bucket by at most that millisecond's worth of the rate
    (lost spending older than that would have been earned back anyway). Rates below 1,000/s are always written.
    Saves a write per claim for hosts and businesses whose generous limits do not bind.
    """
    rate = limits.rate_per_second
    if rate is None or after.tokens + rate * NEGLIGIBLE_S < limits.capacity:
        return False
    return _with_tokens(after, stored.tokens, stored.refilled_at) == stored


def send_tolerance(limits: Limits) -> float:
    """How much later than its token allows (see ``Verdict.send_within_s``) an admitted request may still leave:
    the claim's commit and the start of the send take some milliseconds (under load on PostgreSQL up to ~30 ms
    at the 99th percentile, ~60 ms at most, measured from the decision to the start). The larger of
    :data:`SEND_TOLERANCE_S` and a tenth of a full bucket's time, so a window at the receiver may hold, beyond
    ``rate x window + burst``, at most the larger of 50 ms of the rate and a tenth of the burst (2.5 requests at
    50/s with a burst of 10; a generous bucket's tasks waiting a little for their start are not given back).
    """
    rate = limits.rate_per_second
    return max(SEND_TOLERANCE_S, 0.1 * limits.capacity / rate) if rate is not None else math.inf


def next_token_at(state: State, limits: Limits, now: float, position: int) -> float:
    """When the ``position``-th (1-based) request waiting behind the current tokens may go."""
    rate = limits.rate_per_second or math.inf
    missing = position - state.tokens
    return now + min(max(0.0, missing) / rate, MAX_TOKEN_WAIT_S)


def book(state: State, limits: Limits, now: float) -> State:
    """Promise a held task the first token nobody was promised yet: it is due at ``booked_until``.

    Tokens are promised one after the other, across claimed batches, so a backlog of N held tasks comes back
    one token apart over N / rate seconds instead of every batch queueing for the same next few tokens (which
    sends the whole backlog round the claim loop again and again). A promise in the past has lapsed.
    """
    rate = limits.rate_per_second
    if rate is None:
        return state
    slot = max(next_token_at(state, limits, now, 1), state.booked_until + 1.0 / rate)
    return replace(state, booked_until=min(slot, now + MAX_TOKEN_WAIT_S))


def pace(state: State | None, limits: Limits, now: float) -> tuple[State, float]:
    """A dispatcher's own last check as a request leaves: how long to wait so its sends keep the host's rate.

    Admission spends the shared bucket's tokens when a task is claimed; the request leaves a little later. When
    that delay grows (the event loop or the claim's commit stalls), tasks admitted on time leave in a clump,
    together with the held ones that fall due meanwhile, and the receiver sees more than the rate allows. This
    local bucket of the same size replays the rate at the moment of sending: it never binds while sends follow
    their admission, and after a stall it spaces the clump out again. ``None`` starts a full bucket. Waiting
    requests queue up as debt (tokens below zero), so each one waits for its own token.
    """
    rate = limits.rate_per_second
    if rate is None:
        return State(tokens=0.0, refilled_at=now), 0.0
    state = State(tokens=limits.capacity, refilled_at=now) if state is None else refill(state, limits, now)
    wait = min(max(0.0, (_WHOLE_TOKEN - state.tokens) / rate), MAX_TOKEN_WAIT_S)
    return replace(state, tokens=state.tokens - 1), wait


@dataclass(frozen=True, slots=True)
class Verdict:
    """For one task: go now (``defer_until is None``), or wait until then. ``reason`` names what held it."""

    defer_until: float | None
    reason: str | None = None
    send_within_s: float | None = None
    """For a task that goes on a token: how long after admission it may leave and keep the receiver within
    ``rate x window + burst``. Leaving later is spending a token the bucket no longer holds: while it waits,
    the bucket refills as if it had gone, and another dispatcher may send that refill as a burst beside it.
    A token spent from a full bucket allows no delay (the refill while it waits is the surplus); each token
    below full allows one token's time more, so a backlog's tasks (spent from a near-empty bucket) may leave
    up to ``(burst - 1) / rate`` late; :func:`send_tolerance` more for the latency of the claim and the start.
    The smaller of the host's and the business's. ``None``: neither bucket limits the rate."""
    business_within_s: float | None = None
    """The business bucket's own part of ``send_within_s`` (``None``: the business has no rate limit). A task
    whose host token is spent again later (see :func:`respent`) still owes its business token this deadline."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A claimed task asking to go: its host key and business."""

    task_id: int
    host: str
    business: int
    promised: str | None = None
    """``"host"`` or ``"business"``: this dispatcher held the task earlier and promised it a token of that
    bucket. If the token is not quite there yet (the previous one went out late) it waits for the next one,
    keeping its place, instead of queueing behind every promise made since (with a bucket of one, that token
    would otherwise be lost)."""


@dataclass(frozen=True, slots=True)
class Window:
    """How many more requests this dispatcher may start to a slow host now, and how far apart to hold the rest.

    A dispatcher gives a host whose requests are slow to answer only a few of its slots (see
    ``storage.traffic.TrafficControl``), so a host that times out cannot take the slots other hosts need.
    """

    room: int
    spacing_s: float
    not_before: float = 0.0
    """Held tasks wait at least until then (a host that has not answered well yet: see TrafficControl)."""


def admit(
    candidates: Sequence[Candidate],
    *,
    hosts: Mapping[str, tuple[State, Limits, int]],
    businesses: Mapping[int, tuple[State, Limits, int]],
    now: float,
    windows: Mapping[str, Window] | None = None,
) -> tuple[dict[int, Verdict], dict[str, State], dict[int, State]]:
    """Decide which claimed tasks go now. ``hosts``/``businesses`` give (state, limits, in flight elsewhere).

    A task goes only if its host is not paused, its breaker lets it through, and both its host and its business
    have a token and an in-flight slot (and its host has room in this dispatcher's ``windows``, if it has one).
    Held tasks get the earliest time worth looking again, spread out by the rate so a backlog comes back at the
    pace it can be sent, not all at once (see :func:`book`).
    """
    room = {h: w.room for h, w in (windows or {}).items()}
    window_held: Counter[str] = Counter()
    host_state = {h: refill(s, lim, now) for h, (s, lim, _n) in hosts.items()}
    biz_state = {b: refill(s, lim, now) for b, (s, lim, _n) in businesses.items()}
    # Tokens spent in this batch, applied to the states once at the end (not one new State per task).
    host_spent: Counter[str] = Counter()
    biz_spent: Counter[int] = Counter()
    host_busy = {h: n for h, (_s, _l, n) in hosts.items()}
    biz_busy = {b: n for b, (_s, _l, n) in businesses.items()}
    gated_hosts = {h for h in hosts if not h.startswith("processor:")}
    verdicts: dict[int, Verdict] = {}
    # One promised task per bucket and batch may wait for the very next token; if more of them are short,
    # the schedule has slipped (tokens were lost while the dispatcher was late) and they queue up again.
    next_token_host: set[str] = set()
    next_token_biz: set[int] = set()
    for c in candidates:
        hs, hl = host_state[c.host], hosts[c.host][1]
        bs, bl = biz_state[c.business], businesses[c.business][1]
        if bl.held is not None and c.host in gated_hosts:  # processor tasks are not signed: they may go
            verdicts[c.task_id] = Verdict(now + BUSINESS_HOLD_S, bl.held)
            continue
        held = _host_gate(hs, hl, now) if c.host in gated_hosts else None
        if held is not None:
            verdicts[c.task_id] = held
            continue
        if hl.max_in_flight is not None and host_busy[c.host] >= hl.max_in_flight:
            verdicts[c.task_id] = Verdict(now + 0.05, "host_in_flight")
            continue
        if bl.max_in_flight is not None and biz_busy[c.business] >= bl.max_in_flight:
            verdicts[c.task_id] = Verdict(now + 0.05, "business_in_flight")
            continue
        if c.host in room and room[c.host] <= 0:
            window_held[c.host] += 1
            w = windows[c.host] if windows else Window(0, 0.0)
            verdicts[c.task_id] = Verdict(
                max(now, w.not_before) + w.spacing_s * window_held[c.host], "host_window"
            )
            continue
        if hl.rate_per_second is not None and hs.tokens - host_spent[c.host] < _WHOLE_TOKEN:
            host_state[c.host], due = _wait_for_token(
                hs, hl, host_spent, c.host, c.promised == "host", next_token_host, now
            )
            verdicts[c.task_id] = Verdict(due + _SLOT_SLACK_S, "host_rate")
            continue
        if bl.rate_per_second is not None and bs.tokens - biz_spent[c.business] < _WHOLE_TOKEN:
            biz_state[c.business], due = _wait_for_token(
                bs, bl, biz_spent, c.business, c.promised == "business", next_token_biz, now
            )
            verdicts[c.task_id] = Verdict(due + _SLOT_SLACK_S, "business_rate")
            continue
        within: float | None = None
        slack: float | None = None
        if hl.rate_per_second is not None:
            within = _send_within(hs.tokens - host_spent[c.host], hl, hl.rate_per_second)
            host_spent[c.host] += 1
        if bl.rate_per_second is not None:
            slack = _send_within(bs.tokens - biz_spent[c.business], bl, bl.rate_per_second)
            within = slack if within is None else min(within, slack)
            biz_spent[c.business] += 1
        if hs.breaker != "closed":  # cool-down over, or the last probe never answered: this task is the probe
            host_state[c.host] = replace(hs, breaker="half_open", probe_until=now + 60.0)
        host_busy[c.host] += 1
        biz_busy[c.business] += 1
        if c.host in room:
            room[c.host] -= 1
        verdicts[c.task_id] = Verdict(None) if within is None else Verdict(None, None, within, slack)
    for h in list(host_spent):
        host_state[h] = _spend(host_state[h], host_spent, h)
    for b in list(biz_spent):
        biz_state[b] = _spend(biz_state[b], biz_spent, b)
    return verdicts, host_state, biz_state


def respent(state: State, limits: Limits, now: float, spent: int) -> State:
    """The bucket as if the ``spent`` tokens its last admission spent were spent at ``now`` instead: refilled to
    ``now``, but to no more than ``burst - spent``.

    For requests that started too late for their tokens (see ``Verdict.send_within_s``), and only while nothing
    has been admitted on the bucket since (the stored state is still the one that admission left, ``k - spent``
    tokens). No request has then gone out on the refill they waited through, and the bucket holds exactly what it
    would hold had they been admitted at ``now``: ``min(burst, k + earned) - spent``. They may leave within the
    tolerance of ``now`` (:func:`send_tolerance`; the rest of their allowance is not renewed), their tokens used
    instead of wasted. With a burst of 1 the refill is forfeited whole: the token is spent from a full bucket again.
    """
    refilled = refill(state, limits, now)
    return _with_tokens(refilled, min(refilled.tokens, limits.capacity - spent), refilled.refilled_at)


def refunded(state: State, spent: int) -> State:
    """The bucket with the ``spent`` tokens of its last admission (or of :func:`respent`) given back: what it held
    before them. For requests that went back to the queue unsent, and only while nothing has been admitted on the
    bucket since: it then holds no more than it would had they never been admitted (that bucket would also have
    kept any refill :func:`respent` forfeited)."""
    return _with_tokens(state, state.tokens + spent, state.refilled_at)


def _send_within(tokens: float, limits: Limits, rate: float) -> float:
    """How long a request that spends one of ``tokens`` may still leave (see ``Verdict.send_within_s``)."""
    return max(0.0, (limits.capacity - tokens) / rate) + send_tolerance(limits)


def _wait_for_token(
    state: State,
    limits: Limits,
    spent: Counter[Any],
    key: Any,
    promised: bool,
    next_token_taken: set[Any],
    now: float,
) -> tuple[State, float]:
    """A task short of a token of this bucket: the new state and when it is due.

    A task this dispatcher promised a token earlier waits for the very next one (one such task per bucket and
    batch, tracked in ``next_token_taken``); any other is promised the first token nobody was promised yet.
    """
    state = _spend(state, spent, key)
    if promised and key not in next_token_taken:
        next_token_taken.add(key)
        return state, next_token_at(state, limits, now, 1)
    state = book(state, limits, now)
    return state, state.booked_until


def _spend(state: State, spent: Counter[Any], key: Any) -> State:
    """The state with the tokens counted in ``spent[key]`` taken out (and the count reset)."""
    n = spent.pop(key, 0)
    return _with_tokens(state, state.tokens - n, state.refilled_at) if n else state


def relaxed(old: Limits, new: Limits, now: float) -> bool:
    """Whether ``new`` lets through something ``old`` held back: a higher rate or burst, a higher (or no)
    in-flight cap, a pause that ends sooner, a business hold lifted."""

    def raised(before: float | None, after: float | None) -> bool:
        return before is not None and (after is None or after > before)

    return (
        raised(old.rate_per_second, new.rate_per_second)
        or (new.rate_per_second is not None and new.capacity > old.capacity)
        or raised(old.max_in_flight, new.max_in_flight)
        or (old.paused_until > now and new.paused_until < old.paused_until)
        or (old.held is not None and new.held is None)
    )


def _host_gate(state: State, limits: Limits, now: float) -> Verdict | None:
    paused = max(state.paused_until, limits.paused_until)
    if paused > now:
        return Verdict(paused, "host_paused")
    if state.breaker == "open" and state.open_until > now:
        return Verdict(state.open_until, "circuit_open")
    if state.breaker == "half_open" and state.probe_until > now:
        # One probe at a time. The others wait for its answer: a success pulls them forward as it closes the
        # circuit (see storage.holds.release_held), a failure opens it for another cool-down, so they need not
        # look again before one cool-down (or the probe's deadline) is over.
        return Verdict(min(state.probe_until, now + limits.breaker_cooldown_s), "circuit_half_open")
    return None


def record(
    state: State, limits: Limits, outcomes: Sequence[str], now: float, pause_until: float = 0.0
) -> State:
    """Fold a host's attempt outcomes (oldest first) into its breaker; ``pause_until`` from ``Retry-After``."""
    size = _window_size(limits)
    for outcome in outcomes:
        if outcome in NOT_EVIDENCE:
            continue
        failed = outcome in HOST_FAILURES
        window = (*state.window, failed)[-size:]
        failures = state.failures + 1 if failed else 0
        state = replace(state, window=window, failures=failures)
        if state.breaker == "half_open":
            state = (
                _opened(state, limits, now)
                if failed
                else replace(state, breaker="closed", failures=0, window=())
            )
        elif state.breaker == "closed" and failed and _should_open(state, limits):
            state = _opened(state, limits, now)
    if pause_until > state.paused_until:
        state = replace(state, paused_until=pause_until)
    return state


def _should_open(state: State, limits: Limits) -> bool:
    if state.failures >= limits.breaker_failures:
        return True
    if limits.breaker_ratio is None or len(state.window) < _window_size(limits):
        return False
    return sum(state.window) / len(state.window) >= limits.breaker_ratio


def _window_size(limits: Limits) -> int:
    # A policy's window outside 1..MAX_BREAKER_WINDOW would never fill (or, at 0, never be trimmed).
    return max(1, min(limits.breaker_window, MAX_BREAKER_WINDOW))


def _opened(state: State, limits: Limits, now: float) -> State:
    return replace(state, breaker="open", open_until=now + limits.breaker_cooldown_s, probe_until=0.0)
