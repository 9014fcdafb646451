"""Properties of the pure traffic-control arithmetic: token buckets, in-flight caps, circuit breakers, pauses."""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from taskcenter.domain.traffic import (
    BUSINESS_HOLD_S,
    MAX_BREAKER_WINDOW,
    Candidate,
    Limits,
    State,
    Verdict,
    Window,
    admit,
    negligible,
    pace,
    record,
    refill,
    refunded,
    relaxed,
    respent,
    send_tolerance,
)

FRESH = State(tokens=0.0, refilled_at=0.0)
"""A state row as first inserted: refilled at the epoch, so its first refill fills the bucket."""
OPEN_BUSINESS = Limits()
"""No business limit: these tests look at one host at a time."""
HOST_OUTCOMES = [
    "success",
    "server_error",
    "timeout",
    "network_error",
    "client_error",
    "rate_limited",
    "stopped",
]
FAILURES = {"server_error", "timeout", "network_error"}

rates = st.floats(min_value=0.1, max_value=500.0, allow_nan=False, allow_infinity=False)
bursts = st.integers(min_value=1, max_value=50)


def admit_one_host(
    count: int, state: State, limits: Limits, now: float, busy: int = 0, promised: str | None = None
) -> tuple[dict[int, Verdict], State]:
    """Admit ``count`` candidates of host ``h`` (one business, no business limit)."""
    verdicts, hosts, _ = admit(
        [Candidate(i, "h:80", 1, promised) for i in range(count)],
        hosts={"h:80": (state, limits, busy)},
        businesses={1: (FRESH, OPEN_BUSINESS, 0)},
        now=now,
    )
    return verdicts, hosts["h:80"]


def admitted(verdicts: dict[int, Verdict]) -> int:
    return sum(1 for v in verdicts.values() if v.defer_until is None)


# -- token bucket -----------------------------------------------------------------------------------------


@given(
    rate=rates,
    burst=bursts,
    tokens=st.floats(min_value=0.0, max_value=1e6),
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=5.0), st.integers(min_value=0, max_value=60)),
        max_size=40,
    ),
)
def test_tokens_never_exceed_the_bucket_capacity_nor_go_negative(
    rate: float, burst: int, tokens: float, steps: list[tuple[float, int]]
) -> None:
    """Even a stored state with more tokens than a (since lowered) capacity is cut back on the next refill.

    "Negative" up to rounding: a token short by less than a thousandth counts as whole and is owed back."""
    limits = Limits(rate_per_second=rate, burst=burst)
    state, now = State(tokens=tokens, refilled_at=100.0), 100.0
    for gap, count in steps:
        now += gap
        _, state = admit_one_host(count, state, limits, now)
        assert -1e-3 <= state.tokens <= limits.capacity == burst


@settings(max_examples=300, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=0.5), st.integers(min_value=0, max_value=40)),
        min_size=1,
        max_size=60,
    ),
)
def test_admissions_in_any_window_stay_within_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    limits = Limits(rate_per_second=rate, burst=burst)
    state, now = FRESH, 1000.0
    times: list[float] = []
    for gap, count in steps:
        now += gap
        verdicts, state = admit_one_host(count, state, limits, now)
        times += [now] * admitted(verdicts)
    moments = sorted(set(times))  # times is already sorted: admissions happen as the clock moves on
    for i, start in enumerate(moments):
        for end in moments[i:]:
            in_window = bisect.bisect_right(times, end) - bisect.bisect_left(times, start)
            assert in_window <= burst + rate * (end - start) + 1e-3


@settings(max_examples=500, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    steps=st.lists(
        st.tuples(
            # time passing, in tokens' worth: often whole tokens, where a late send meets the next token exactly
            st.one_of(
                st.integers(min_value=0, max_value=12).map(float), st.floats(min_value=0.0, max_value=12.0)
            ),
            st.integers(min_value=0, max_value=40),
        ),
        min_size=1,
        max_size=60,
    ),
    lateness=st.lists(
        st.one_of(st.sampled_from([0.0, 1.0]), st.floats(min_value=0.0, max_value=1.0)),
        min_size=1,
        max_size=50,
    ),
)
# The tight cases: a full bucket's burst sent as late as allowed, meeting the next token sent at once.
@example(rate=1.0, burst=1, steps=[(0.0, 1), (1.0, 1)], lateness=[1.0, 0.0])
@example(rate=50.0, burst=10, steps=[(0.0, 10), (1.0, 1)], lateness=[1.0] * 10 + [0.0])
def test_sends_within_their_allowance_stay_within_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[tuple[float, int]], lateness: list[float]
) -> None:
    """However each admitted request's send is delayed, as long as it leaves within its ``send_within_s`` of its
    admission, no window of sends holds more than the bucket allows (what a late send spends, the bucket had
    room to keep), but for the tolerance's worth of the rate."""
    limits = Limits(rate_per_second=rate, burst=burst)
    state, now = FRESH, 1000.0
    sends: list[float] = []
    for tokens_worth, count in steps:
        now += tokens_worth / rate
        verdicts, state = admit_one_host(count, state, limits, now)
        for v in verdicts.values():
            if v.defer_until is None:
                assert v.send_within_s is not None
                sends.append(now + v.send_within_s * lateness[len(sends) % len(lateness)])
    sends.sort()
    for i, start in enumerate(sends):
        for end in sends[i:]:
            in_window = bisect.bisect_right(sends, end) - i
            # A token short by up to a thousandth counts as whole (see _WHOLE_TOKEN), and times are floats.
            slack = rate * send_tolerance(limits) + 1e-3 * in_window + 1e-6
            assert in_window <= burst + rate * (end - start) + slack


@settings(max_examples=500, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    steps=st.lists(
        st.tuples(
            st.one_of(
                st.integers(min_value=0, max_value=12).map(float), st.floats(min_value=0.0, max_value=12.0)
            ),
            st.integers(min_value=0, max_value=40),
            # None: the step's sends leave within their allowance; else all of them start this many tokens'
            # worth after their admission, too late, and are spent again then (if no admission came between);
            # if the flag is set, they are late again after that, and go back with their tokens refunded
            st.one_of(st.none(), st.tuples(st.floats(min_value=0.0, max_value=12.0), st.booleans())),
        ),
        min_size=1,
        max_size=60,
    ),
    lateness=st.lists(
        st.one_of(st.sampled_from([0.0, 1.0]), st.floats(min_value=0.0, max_value=1.0)),
        min_size=1,
        max_size=50,
    ),
)
# The tight cases: spent again just before the next admission, which meets the next token at once.
@example(rate=5.0, burst=1, steps=[(0.0, 1, (0.9, False)), (1.2, 1, None)], lateness=[0.0])
@example(rate=5.0, burst=1, steps=[(0.0, 1, (0.9, False)), (1.2, 1, None)], lateness=[1.0, 0.0])
@example(rate=50.0, burst=10, steps=[(0.0, 10, (3.0, False)), (15.6, 10, None)], lateness=[0.0])
@example(rate=5.0, burst=1, steps=[(0.0, 1, None), (1.0, 1, (0.5, True)), (1.3, 1, None)], lateness=[0.0])
def test_sends_spent_again_when_late_stay_within_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[tuple[float, int, tuple[float, bool] | None]], lateness: list[float]
) -> None:
    """Requests that start too late for their tokens are spent again when they start (``respent``) if no admission
    came in between, and leave within the tolerance of that; else they are given back unsent. Late again after
    that, they go back with their tokens refunded (``refunded``). Either way no window of sends holds more than the
    bucket allows but for the tolerance's worth of the rate, as for sends on time."""
    limits = Limits(rate_per_second=rate, burst=burst)
    tolerance = send_tolerance(limits)
    state, now = FRESH, 1000.0
    sends: list[float] = []
    for k, (tokens_worth, count, late) in enumerate(steps):
        now += tokens_worth / rate
        verdicts, state = admit_one_host(count, state, limits, now)
        go = [v for v in verdicts.values() if v.defer_until is None]
        if late is None:
            for v in go:
                assert v.send_within_s is not None
                sends.append(now + v.send_within_s * lateness[len(sends) % len(lateness)])
            continue
        late_s, again = late
        started = now + max(v.send_within_s or 0.0 for v in go) + late_s / rate if go else now
        following = now + steps[k + 1][0] / rate if k + 1 < len(steps) else math.inf
        if started > following:
            continue  # the next admission wrote the bucket first: they go back unsent
        state = respent(state, limits, started, len(go))
        if again:
            state = refunded(state, len(go))
            continue
        sends += [started + tolerance * lateness[len(sends) % len(lateness)] for _ in go]
    sends.sort()
    for i, start in enumerate(sends):
        for end in sends[i:]:
            in_window = bisect.bisect_right(sends, end) - i
            slack = rate * tolerance + 1e-3 * in_window + 1e-6
            assert in_window <= burst + rate * (end - start) + slack


def test_a_token_from_a_full_bucket_must_leave_at_once_one_from_a_low_bucket_may_wait() -> None:
    """Spent from a full bucket, a late send would add the refill it waited through to the next burst; each
    token below full allows one token's time."""
    limits = Limits(rate_per_second=10, burst=5)
    tolerance = send_tolerance(limits)
    assert tolerance == pytest.approx(0.05)
    verdicts, state = admit_one_host(5, FRESH, limits, 100.0)
    within = [verdicts[i].send_within_s for i in range(5)]
    assert within == pytest.approx(
        [0.0 + tolerance, 0.1 + tolerance, 0.2 + tolerance, 0.3 + tolerance, 0.4 + tolerance]
    )
    verdicts, _ = admit_one_host(1, state, limits, 100.1)  # one token earned back: the bucket is near empty
    assert verdicts[0].send_within_s == pytest.approx(0.4 + tolerance)


def test_the_tolerance_is_a_tenth_of_a_bucket_but_at_least_50_ms() -> None:
    assert send_tolerance(Limits(rate_per_second=50, burst=10)) == pytest.approx(0.05)
    assert send_tolerance(Limits(rate_per_second=1000, burst=1000)) == pytest.approx(0.1)
    assert send_tolerance(Limits(rate_per_second=1, burst=30)) == pytest.approx(3.0)


def test_the_smaller_allowance_of_host_and_business_applies() -> None:
    """A task that goes on a token of both buckets may leave only as late as the stricter one allows."""
    host = Limits(rate_per_second=10, burst=5)  # full: the first token must go within its tolerance
    business = Limits(rate_per_second=1, burst=2)  # full too, but a tenth of its bucket is 0.2 s
    verdicts, _, _ = admit(
        [Candidate(1, "h:80", 7)],
        hosts={"h:80": (FRESH, host, 0)},
        businesses={7: (FRESH, business, 0)},
        now=100.0,
    )
    assert verdicts[1].send_within_s == pytest.approx(send_tolerance(host))


def test_a_task_without_a_rate_limit_may_leave_any_time() -> None:
    verdicts, _ = admit_one_host(3, FRESH, Limits(), 100.0)
    assert {v.send_within_s for v in verdicts.values()} == {None}


@settings(max_examples=300, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=0.5),  # real time passing
            st.floats(min_value=0.0, max_value=1.0),  # how stale this dispatcher's clock reading is
            st.integers(min_value=0, max_value=40),
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_stale_clock_readings_never_earn_the_same_seconds_twice(
    rate: float, burst: int, steps: list[tuple[float, float, int]]
) -> None:
    """In a cluster a dispatcher may admit with a ``now`` older than the last refill (it waited for the row lock).

    However the readings interleave, everything admitted up to real time ``r`` fits in burst + rate × elapsed.
    """
    limits = Limits(rate_per_second=rate, burst=burst)
    start = real = 1000.0
    state = refill(FRESH, limits, start)
    total = 0
    for gap, staleness, count in steps:
        real += gap
        verdicts, state = admit_one_host(count, state, limits, max(start, real - staleness))
        total += admitted(verdicts)
        assert total <= burst + rate * (real - start) + 1e-3


def test_a_reading_older_than_the_last_refill_earns_nothing() -> None:
    limits = Limits(rate_per_second=10, burst=1)
    state = State(tokens=0.0, refilled_at=10.0)
    verdicts, state = admit_one_host(1, state, limits, now=9.0)
    assert admitted(verdicts) == 0
    assert state.refilled_at == 10.0
    verdicts, _ = admit_one_host(1, state, limits, now=10.05)  # half a token since 10.0
    assert admitted(verdicts) == 0


@given(rate=rates, burst=st.integers(min_value=-3, max_value=0))
def test_a_burst_below_one_still_lets_one_request_per_token_through(rate: float, burst: int) -> None:
    """A policy with burst 0 is a bucket of one, not a host that can never be called."""
    limits = Limits(rate_per_second=rate, burst=burst)
    verdicts, _ = admit_one_host(3, FRESH, limits, now=1000.0)
    assert admitted(verdicts) == 1


@given(
    rate=rates,
    burst=bursts,
    count=st.integers(min_value=1, max_value=200),
    now=st.floats(min_value=1e3, max_value=1e9),
)
def test_held_tasks_come_back_in_the_future_spread_at_the_rate(
    rate: float, burst: int, count: int, now: float
) -> None:
    limits = Limits(rate_per_second=rate, burst=burst)
    verdicts, state = admit_one_host(count, State(tokens=0.0, refilled_at=now), limits, now)
    held = sorted(v.defer_until for v in verdicts.values() if v.defer_until is not None)
    assert len(held) == count  # an empty bucket admits nothing
    assert all(math.isfinite(t) and t > now for t in held)
    # The n-th held task is due when the n-th token will have been earned: a backlog returns at the rate.
    for n, due in enumerate(held, start=1):
        assert due - now == pytest.approx(n / rate, abs=1e-3)
    assert state.booked_until == pytest.approx(held[-1], abs=1e-3)
    assert {v.reason for v in verdicts.values()} == {"host_rate"}


@given(
    rate=rates,
    burst=bursts,
    batches=st.lists(st.integers(min_value=1, max_value=30), min_size=2, max_size=8),
    gap=st.floats(min_value=0.0, max_value=0.05),
)
def test_held_tasks_of_successive_batches_are_promised_successive_tokens(
    rate: float, burst: int, batches: list[int], gap: float
) -> None:
    """Batch after batch, no token is promised twice: the backlog is spread once, not re-queued for the same
    next few tokens by every claim."""
    limits = Limits(rate_per_second=rate, burst=burst)
    state, now = FRESH, 1000.0
    due: list[float] = []
    for count in batches:
        verdicts, state = admit_one_host(count, state, limits, now)
        due += [v.defer_until for v in verdicts.values() if v.defer_until is not None]
        now += gap
    due.sort()
    assert all(b - a >= 1 / rate - 1e-6 for a, b in itertools.pairwise(due))


@settings(max_examples=200, deadline=None)
@given(rate=rates, burst=bursts, count=st.integers(min_value=1, max_value=120))
def test_a_held_task_that_comes_back_when_due_finds_its_token(rate: float, burst: int, count: int) -> None:
    """Held tasks returning at their due times, in order, are each let through: none is held twice."""
    limits = Limits(rate_per_second=rate, burst=burst)
    verdicts, state = admit_one_host(count, FRESH, limits, now=1000.0)
    returning = sorted((v.defer_until, n) for n, v in verdicts.items() if v.defer_until is not None)
    assert admitted(verdicts) + len(returning) == count
    for due, _task in returning:
        again, state = admit_one_host(1, state, limits, now=due, promised="host")
        assert admitted(again) == 1, f"held again at {due}"


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=200.0),
    count=st.integers(min_value=2, max_value=60),
    lateness=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=60, max_size=60),
)
def test_a_promised_task_whose_token_is_late_waits_only_for_that_token(
    rate: float, count: int, lateness: list[float]
) -> None:
    """With a bucket of one, every late send delays the next token: the promised task waits the difference,
    never the whole backlog again (which would send it round the claim loop, and to the back)."""
    limits = Limits(rate_per_second=rate, burst=1)
    verdicts, state = admit_one_host(count, FRESH, limits, now=1000.0)
    horizon = state.booked_until
    for (due, _task), late in zip(
        sorted((v.defer_until, n) for n, v in verdicts.items() if v.defer_until is not None),
        lateness,
        strict=False,
    ):
        now = due + late / rate  # the dispatcher got to it a fraction of a token late
        again, state = admit_one_host(1, state, limits, now=now, promised="host")
        while admitted(again) == 0:
            [wait] = again.values()
            assert wait.defer_until is not None and wait.defer_until - now <= 1 / rate + 1e-3
            now = wait.defer_until
            again, state = admit_one_host(1, state, limits, now=now, promised="host")
        assert state.booked_until == horizon  # nobody was booked anew


def test_a_lapsed_promise_is_forgotten() -> None:
    limits = Limits(rate_per_second=10.0, burst=1)
    stale = State(tokens=0.0, refilled_at=1000.0, booked_until=900.0)
    verdicts, state = admit_one_host(1, stale, limits, now=1000.0)
    [held] = verdicts.values()
    assert held.defer_until == pytest.approx(1000.1, abs=1e-3)
    assert state.booked_until == pytest.approx(1000.1, abs=1e-6)


def test_no_rate_means_no_bucket() -> None:
    verdicts, _ = admit_one_host(500, FRESH, Limits(), now=1000.0)
    assert admitted(verdicts) == 500


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_a_rate_of_zero_or_less_means_no_rate_limit(rate: float) -> None:
    """As for the host_rate_per_second setting; it never stalls a host or divides by zero."""
    limits = Limits(rate_per_second=rate, burst=1)
    assert limits.rate_per_second is None
    verdicts, _ = admit_one_host(50, FRESH, limits, now=1000.0)
    assert admitted(verdicts) == 50


def test_business_bucket_holds_tasks_the_host_would_let_through() -> None:
    business = Limits(rate_per_second=2.0, burst=2)
    verdicts, _, businesses = admit(
        [Candidate(i, "h:80", 7) for i in range(5)],
        hosts={"h:80": (FRESH, Limits(), 0)},
        businesses={7: (FRESH, business, 0)},
        now=1000.0,
    )
    assert admitted(verdicts) == 2
    assert Counter(v.reason for v in verdicts.values() if v.defer_until) == {"business_rate": 3}
    assert businesses[7].tokens == 0.0


def test_a_task_held_by_its_business_does_not_spend_a_host_token() -> None:
    host = Limits(rate_per_second=1.0, burst=5)
    verdicts, hosts, _ = admit(
        [Candidate(i, "h:80", 7) for i in range(5)],
        hosts={"h:80": (FRESH, host, 0)},
        businesses={7: (FRESH, Limits(rate_per_second=1.0, burst=1), 0)},
        now=1000.0,
    )
    assert admitted(verdicts) == 1
    assert hosts["h:80"].tokens == 4.0


def test_a_held_business_sends_no_http_task_and_spends_no_token_while_its_processor_tasks_go() -> None:
    """A business held whole (its signing secret cannot be decrypted) sends nothing unsigned; processor tasks,
    which are not signed, still go; another business's tasks are not affected."""
    host = Limits(rate_per_second=10.0, burst=10)
    held = Limits(rate_per_second=10.0, burst=10, held="signing_secret")
    verdicts, hosts, businesses = admit(
        [
            Candidate(1, "h:80", 7),
            Candidate(2, "h:80", 7),
            Candidate(3, "processor:x", 7),
            Candidate(4, "h:80", 8),
        ],
        hosts={"h:80": (FRESH, host, 0), "processor:x": (FRESH, Limits(), 0)},
        businesses={7: (FRESH, held, 0), 8: (FRESH, Limits(), 0)},
        now=1000.0,
    )
    assert verdicts[1] == verdicts[2] == Verdict(1000.0 + BUSINESS_HOLD_S, "signing_secret")
    # Both go on a token from a full bucket (business 7's, h:80's): no delay allowed beyond the send tolerance.
    tolerance = send_tolerance(held)
    assert verdicts[3] == Verdict(None, send_within_s=tolerance, business_within_s=tolerance)
    assert verdicts[4] == Verdict(None, send_within_s=send_tolerance(host))
    assert hosts["h:80"].tokens == 9.0 and businesses[7].tokens == 9.0  # only the processor task spent one


def test_lifting_a_business_hold_is_relaxing_its_limits() -> None:
    held = Limits(rate_per_second=1.0, held="signing_secret")
    assert relaxed(held, Limits(rate_per_second=1.0), now=1000.0)
    assert not relaxed(Limits(rate_per_second=1.0), held, now=1000.0)
    assert not relaxed(held, held, now=1000.0)


# -- in-flight caps -----------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    tasks=st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([1, 2, 3])), max_size=80),
    host_caps=st.dictionaries(st.sampled_from("abc"), st.integers(min_value=1, max_value=10)),
    biz_caps=st.dictionaries(st.sampled_from([1, 2, 3]), st.integers(min_value=1, max_value=10)),
    busy=st.integers(min_value=0, max_value=12),
)
def test_in_flight_caps_of_hosts_and_businesses_are_never_exceeded(
    tasks: list[tuple[str, int]], host_caps: dict[str, int], biz_caps: dict[int, int], busy: int
) -> None:
    """``busy`` requests are already in flight elsewhere for every host and business."""
    candidates = [Candidate(n, host, biz) for n, (host, biz) in enumerate(tasks)]
    verdicts, _, _ = admit(
        candidates,
        hosts={h: (FRESH, Limits(max_in_flight=host_caps.get(h)), busy) for h in "abc"},
        businesses={b: (FRESH, Limits(max_in_flight=biz_caps.get(b)), busy) for b in (1, 2, 3)},
        now=1000.0,
    )
    going = [c for c in candidates if verdicts[c.task_id].defer_until is None]
    for host, n in Counter(c.host for c in going).items():
        assert busy + n <= host_caps.get(host, math.inf)
    for biz, n in Counter(c.business for c in going).items():
        assert busy + n <= biz_caps.get(biz, math.inf)
    # Nothing is held without a cap being full.
    for c in candidates:
        v = verdicts[c.task_id]
        if v.reason == "host_in_flight":
            assert busy + sum(1 for g in going if g.host == c.host) >= host_caps[c.host]
        if v.reason == "business_in_flight":
            assert busy + sum(1 for g in going if g.business == c.business) >= biz_caps[c.business]


# -- circuit breaker -----------------------------------------------------------------------------------------


def fold(outcomes: Sequence[str], limits: Limits, state: State = FRESH, now: float = 1000.0) -> list[State]:
    """Record outcomes one at a time; the state after each."""
    states = []
    for outcome in outcomes:
        state = record(state, limits, [outcome], now)
        states.append(state)
    return states


@given(
    outcomes=st.lists(st.sampled_from(HOST_OUTCOMES), max_size=60),
    threshold=st.integers(min_value=1, max_value=8),
)
def test_breaker_opens_exactly_when_the_consecutive_failures_reach_the_threshold(
    outcomes: list[str], threshold: int
) -> None:
    limits = Limits(breaker_failures=threshold, breaker_cooldown_s=30.0)
    run = 0
    for outcome, state in zip(outcomes, fold(outcomes, limits), strict=True):
        run = run + 1 if outcome in FAILURES else 0
        assert (state.breaker == "open") == (run >= threshold)
        if state.breaker == "open":
            assert state.open_until == 1030.0
            break


def test_five_consecutive_failures_open_the_breaker_by_default() -> None:
    states = fold(["server_error"] * 4 + ["success"] + ["timeout"] * 4 + ["network_error"], Limits())
    assert [s.breaker for s in states] == ["closed"] * 9 + ["open"]


@given(
    outcomes=st.lists(st.sampled_from(["success", "server_error"]), max_size=80),
    window=st.integers(min_value=2, max_value=20),
    ratio=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
)
def test_breaker_opens_when_the_failure_share_of_a_full_window_reaches_the_ratio(
    outcomes: list[str], window: int, ratio: float
) -> None:
    limits = Limits(breaker_failures=1000, breaker_ratio=ratio, breaker_window=window)
    seen: list[bool] = []
    for outcome, state in zip(outcomes, fold(outcomes, limits), strict=True):
        seen.append(outcome == "server_error")
        last = seen[-window:]
        should = seen[-1] and len(last) == window and sum(last) / window >= ratio
        assert (state.breaker == "open") == should
        if should:
            break


def test_ratio_rule_opens_without_consecutive_failures() -> None:
    limits = Limits(breaker_failures=5, breaker_ratio=0.5, breaker_window=10)
    states = fold(["success", "server_error"] * 5, limits)
    assert max(s.failures for s in states) == 1
    assert states[-1].breaker == "open"


@given(window=st.integers(min_value=-5, max_value=1000))
def test_breaker_window_is_kept_within_what_the_state_row_stores(window: int) -> None:
    limits = Limits(breaker_failures=10_000, breaker_ratio=0.9, breaker_window=window)
    state = fold(["success"] * 150 + ["server_error"] * 150, limits)[-1]
    assert 1 <= len(state.window) <= MAX_BREAKER_WINDOW
    assert state.breaker == "open"  # a window of any size fills up and can trip


@pytest.mark.parametrize("outcome", ["blocked", "interrupted"])
def test_outcomes_that_never_reached_the_host_leave_the_breaker_alone(outcome: str) -> None:
    """A request the SSRF guard refused, or one cut off by a shutdown, says nothing about the host's health."""
    four = fold(["server_error"] * 4, Limits())[-1]
    after = record(four, Limits(), [outcome, "server_error"], 1000.0)
    assert after.breaker == "open"
    probing = State(tokens=1.0, refilled_at=1000.0, breaker="half_open", probe_until=1060.0)
    assert record(probing, Limits(), [outcome], 1001.0) == probing


def opened(now: float = 1000.0, cooldown: float = 30.0) -> tuple[State, Limits]:
    limits = Limits(breaker_failures=2, breaker_cooldown_s=cooldown)
    return fold(["server_error"] * 2, limits, now=now)[-1], limits


def test_open_breaker_defers_every_task_to_the_end_of_the_cooldown() -> None:
    state, limits = opened()
    verdicts, after = admit_one_host(5, state, limits, now=1010.0)
    assert set(verdicts.values()) == {Verdict(1030.0, "circuit_open")}
    assert after.breaker == "open"


@given(count=st.integers(min_value=1, max_value=30), late=st.floats(min_value=0.0, max_value=1e4))
def test_after_the_cooldown_exactly_one_probe_goes_through(count: int, late: float) -> None:
    state, limits = opened()
    verdicts, after = admit_one_host(count, state, limits, now=1030.0 + late)
    assert admitted(verdicts) == 1
    assert after.breaker == "half_open"
    held = [v for v in verdicts.values() if v.defer_until is not None]
    assert all(v.reason == "circuit_half_open" for v in held)
    # Still one probe while it is in flight, in this batch or the next.
    again, _ = admit_one_host(count, after, limits, now=1031.0 + late)
    assert admitted(again) == 0


def test_a_probe_that_never_answered_is_replaced_by_exactly_one_new_probe() -> None:
    state, limits = opened()
    _, probing = admit_one_host(1, state, limits, now=1030.0)
    lost = probing.probe_until  # the probe's worker died: no result ever comes
    verdicts, after = admit_one_host(5, probing, limits, now=lost + 1.0)
    assert admitted(verdicts) == 1
    assert after.breaker == "half_open" and after.probe_until > lost + 1.0


def test_probe_success_closes_the_breaker() -> None:
    state, limits = opened()
    _, probing = admit_one_host(1, state, limits, now=1030.0)
    closed = record(probing, limits, ["success"], 1030.2)
    assert (closed.breaker, closed.failures, closed.window) == ("closed", 0, ())
    verdicts, _ = admit_one_host(10, closed, limits, now=1030.3)
    assert admitted(verdicts) == 10


def test_probe_failure_opens_the_breaker_for_another_cooldown() -> None:
    state, limits = opened()
    _, probing = admit_one_host(1, state, limits, now=1030.0)
    reopened = record(probing, limits, ["timeout"], 1035.0)
    assert reopened.breaker == "open" and reopened.open_until == 1065.0
    verdicts, _ = admit_one_host(3, reopened, limits, now=1040.0)
    assert set(verdicts.values()) == {Verdict(1065.0, "circuit_open")}


def test_processor_tasks_are_not_held_by_a_breaker() -> None:
    state, limits = opened()
    verdicts, _, _ = admit(
        [Candidate(1, "processor:resize", 1)],
        hosts={"processor:resize": (state, limits, 0)},
        businesses={1: (FRESH, OPEN_BUSINESS, 0)},
        now=1001.0,
    )
    assert admitted(verdicts) == 1


# -- pauses -------------------------------------------------------------------------------------------------


@given(pauses=st.lists(st.floats(min_value=0.0, max_value=2000.0), min_size=1, max_size=10))
def test_retry_after_pause_only_ever_extends(pauses: list[float]) -> None:
    state = FRESH
    for pause in pauses:
        state = record(state, Limits(), ["rate_limited"], 1000.0, pause)
    assert state.paused_until == max(pauses)


@given(
    pause=st.floats(min_value=1000.001, max_value=5000.0),
    now=st.floats(min_value=0.0, max_value=1000.0),
    count=st.integers(min_value=1, max_value=20),
)
def test_paused_host_defers_every_task_to_the_end_of_the_pause(pause: float, now: float, count: int) -> None:
    paused = record(FRESH, Limits(), ["rate_limited"], 999.0, pause)
    verdicts, _ = admit_one_host(count, paused, Limits(rate_per_second=10.0), now=min(now, pause - 0.001))
    assert set(verdicts.values()) == {Verdict(pause, "host_paused")}


def test_operator_pause_from_the_policy_holds_the_host_too() -> None:
    limits = Limits(paused_until=2000.0)
    verdicts, _ = admit_one_host(3, FRESH, limits, now=1500.0)
    assert set(verdicts.values()) == {Verdict(2000.0, "host_paused")}
    verdicts, _ = admit_one_host(3, FRESH, limits, now=2000.0)
    assert admitted(verdicts) == 3


def test_pause_over_lets_tasks_through_at_the_rate() -> None:
    limits = Limits(rate_per_second=1.0, burst=2)
    paused = record(refill(FRESH, limits, 1000.0), limits, ["rate_limited"], 1000.0, 1002.0)
    verdicts, _ = admit_one_host(5, paused, limits, now=1002.0)
    assert admitted(verdicts) == 2


# -- send-time pacing -------------------------------------------------------------------------------------


def test_pace_lets_a_full_bucket_go_then_spaces_requests_by_the_rate() -> None:
    limits = Limits(rate_per_second=10, burst=5)
    state, waits = None, []
    for _ in range(8):
        state, wait = pace(state, limits, 100.0)
        waits.append(round(wait, 3))
    # Five leave at once; each later one waits for its own token, queued behind the ones already waiting.
    assert waits == [0.0] * 5 + [0.1, 0.2, 0.3]


def test_pace_after_a_stall_bounds_every_window_from_the_first_send() -> None:
    """Tasks admitted on time but sent after a 0.4 s stall must not leave as one clump of 5 + 4."""
    limits = Limits(rate_per_second=10, burst=5)
    state = None
    leave = []
    for _ in range(9):  # the burst plus the four held tasks that fell due during the stall
        state, wait = pace(state, limits, 0.4)
        leave.append(0.4 + wait)
    assert sum(1 for t in leave if t < 0.4 + 1.0) <= 15
    assert leave[5:] == pytest.approx([0.5, 0.6, 0.7, 0.8], abs=1e-3)


def test_pace_never_binds_while_sends_follow_the_rate() -> None:
    limits = Limits(rate_per_second=10, burst=1)
    state = None
    for i in range(20):
        state, wait = pace(state, limits, 1.0 + i * 0.1)
        assert wait == 0.0


def test_pace_without_a_rate_never_waits() -> None:
    state = None
    for _ in range(1000):
        state, wait = pace(state, Limits(), 5.0)
        assert wait == 0.0


# -- relaxing limits, negligible writes, slow-host windows ---------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (Limits(rate_per_second=1), Limits(rate_per_second=100), True),
        (Limits(rate_per_second=1), Limits(), True),  # no rate limit at all
        (Limits(rate_per_second=10, burst=1), Limits(rate_per_second=10, burst=20), True),
        (Limits(max_in_flight=3), Limits(max_in_flight=30), True),
        (Limits(max_in_flight=3), Limits(), True),
        (Limits(paused_until=2000.0), Limits(paused_until=1500.0), True),
        (Limits(paused_until=2000.0), Limits(), True),
        (Limits(rate_per_second=100), Limits(rate_per_second=1), False),
        (Limits(), Limits(rate_per_second=1), False),
        (Limits(max_in_flight=30), Limits(max_in_flight=3), False),
        (Limits(), Limits(paused_until=2000.0), False),
        (Limits(paused_until=900.0), Limits(), False),  # that pause was over anyway
        (Limits(breaker_failures=5), Limits(breaker_failures=3), False),
    ],
)
def test_relaxed_means_the_new_limits_let_through_something_the_old_held(
    old: Limits, new: Limits, expected: bool
) -> None:
    assert relaxed(old, new, now=1000.0) is expected


def test_a_bucket_that_earns_back_its_spending_within_a_millisecond_need_not_be_written() -> None:
    generous = Limits(rate_per_second=1_000_000, burst=1_000_000)
    stored = State(tokens=5.0, refilled_at=10.0)
    _, after = admit_one_host(100, stored, generous, now=20.0)
    assert after != stored and negligible(stored, after, generous)


@pytest.mark.parametrize("rate", [1.0, 50.0, 999.0])
def test_a_bucket_a_batch_can_empty_is_always_written(rate: float) -> None:
    limits = Limits(rate_per_second=rate, burst=1000)
    stored = State(tokens=0.0, refilled_at=0.0)
    _, after = admit_one_host(1, stored, limits, now=100.0)
    assert not negligible(stored, after, limits)


def test_a_changed_breaker_is_always_written() -> None:
    generous = Limits(rate_per_second=1_000_000, burst=1_000_000)
    stored = State(tokens=1_000_000.0, refilled_at=10.0, breaker="open", open_until=15.0)
    _, after = admit_one_host(1, stored, generous, now=20.0)  # the probe: half-open now
    assert after.breaker == "half_open" and not negligible(stored, after, generous)


def test_no_rate_means_no_state_to_write() -> None:
    stored = State(tokens=0.0, refilled_at=10.0)
    _, after = admit_one_host(50, stored, Limits(), now=20.0)
    assert after == stored


@given(room=st.integers(min_value=-5, max_value=20), count=st.integers(min_value=1, max_value=60))
def test_a_host_window_lets_through_its_room_and_holds_the_rest_spaced_out(room: int, count: int) -> None:
    verdicts, _, _ = admit(
        [Candidate(i, "slow:80", 1) for i in range(count)],
        hosts={"slow:80": (FRESH, Limits(), 0)},
        businesses={1: (FRESH, OPEN_BUSINESS, 0)},
        now=100.0,
        windows={"slow:80": Window(room=room, spacing_s=0.2)},
    )
    assert admitted(verdicts) == min(count, max(0, room))
    held = sorted(v.defer_until for v in verdicts.values() if v.defer_until is not None)
    assert all(v.reason == "host_window" for v in verdicts.values() if v.defer_until is not None)
    assert held == pytest.approx([100.0 + 0.2 * (k + 1) for k in range(len(held))])


def test_a_window_binds_only_its_own_host() -> None:
    verdicts, _, _ = admit(
        [Candidate(i, "slow:80" if i % 2 else "fast:80", 1) for i in range(20)],
        hosts={"slow:80": (FRESH, Limits(), 0), "fast:80": (FRESH, Limits(), 0)},
        businesses={1: (FRESH, OPEN_BUSINESS, 0)},
        now=100.0,
        windows={"slow:80": Window(room=2, spacing_s=0.1)},
    )
    assert sum(v.defer_until is None for i, v in verdicts.items() if i % 2 == 0) == 10
    assert sum(v.defer_until is None for i, v in verdicts.items() if i % 2) == 2


def test_half_open_holds_the_others_for_a_cooldown_not_a_second() -> None:
    """A closing circuit pulls its held tasks forward, so they need not circle the claim loop every second."""
    state, limits = opened(now=1000.0, cooldown=30.0)
    verdicts, probing = admit_one_host(5, state, limits, now=1031.0)
    assert admitted(verdicts) == 1 and probing.breaker == "half_open"
    later, _ = admit_one_host(5, probing, limits, now=1032.0)
    assert {v.reason for v in later.values()} == {"circuit_half_open"}
    # One cool-down from now (the probe's own deadline, 60 s after it went, is later still).
    assert [v.defer_until for v in later.values()] == [pytest.approx(1032.0 + 30.0)] * 5
