"""RetryPolicy: the delay arithmetic of each strategy (property-based), the attempt cap, validation, JSON form."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskcenter.domain.retry import MAX_ATTEMPTS, MAX_DELAY_S, RetryPolicy
from taskcenter.errors import ValidationError

seconds = st.floats(min_value=0, max_value=MAX_DELAY_S, allow_nan=False)
counts = st.integers(min_value=1, max_value=MAX_ATTEMPTS)
retry_numbers = st.integers(min_value=1, max_value=MAX_ATTEMPTS - 1)

exponential_policies = st.builds(
    RetryPolicy.exponential,
    initial_delay=seconds,
    multiplier=st.floats(min_value=1, max_value=100, allow_nan=False),
    max_delay=seconds,
    jitter=st.floats(min_value=0, max_value=1, allow_nan=False),
    max_attempts=counts,
)
fixed_policies = st.builds(
    lambda interval, max_attempts, max_delay: RetryPolicy.from_dict(
        {"strategy": "fixed", "interval": interval, "max_attempts": max_attempts, "max_delay": max_delay}
    ),
    seconds,
    counts,
    seconds,
)
interval_policies = st.builds(
    lambda intervals, max_delay: RetryPolicy.from_dict(
        {"strategy": "intervals", "intervals": intervals, "max_delay": max_delay}
    ),
    st.lists(seconds, max_size=MAX_ATTEMPTS - 1),
    seconds,
)
any_policy = st.one_of(exponential_policies, fixed_policies, interval_policies)


# -- exponential ------------------------------------------------------------------------------------------


@given(policy=exponential_policies, n=retry_numbers)
def test_exponential_base_delay_is_capped_geometric_growth(policy: RetryPolicy, n: int) -> None:
    """Before jitter: min(max_delay, initial_delay * multiplier^(n-1))."""
    expected = min(policy.max_delay, policy.initial_delay * policy.multiplier ** (n - 1))
    assert policy.base_delay(n) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(policy=exponential_policies, n=retry_numbers, seed=st.integers())
def test_exponential_delay_stays_within_the_jitter_band(policy: RetryPolicy, n: int, seed: int) -> None:
    base = policy.base_delay(n)
    delay = policy.delay(n, random.Random(seed))
    assert base * (1 - policy.jitter) - 1e-9 <= delay <= base * (1 + policy.jitter) + 1e-9


@given(policy=exponential_policies, n=st.integers(min_value=1, max_value=10**9))
def test_exponential_delay_never_exceeds_the_cap_or_overflows_for_any_retry_number(
    policy: RetryPolicy, n: int
) -> None:
    base = policy.base_delay(n)
    assert 0 <= base <= policy.max_delay
    assert math.isfinite(policy.delay(n, random.Random(0)))


def test_exponential_delay_of_a_zero_initial_delay_stays_zero_for_huge_retry_numbers() -> None:
    policy = RetryPolicy.exponential(initial_delay=0, multiplier=100, max_delay=60)
    assert policy.base_delay(10**6) == 0


def test_exponential_without_jitter_is_exact() -> None:
    policy = RetryPolicy.exponential(initial_delay=1, multiplier=2, max_delay=10, jitter=0, max_attempts=11)
    assert [policy.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_jitter_uses_the_injected_random_source() -> None:
    policy = RetryPolicy.exponential(initial_delay=10, jitter=0.5)
    assert policy.delay(1, random.Random(7)) == policy.delay(1, random.Random(7))
    spread = {policy.delay(1, random.Random(seed)) for seed in range(20)}
    assert len(spread) > 1


# -- fixed and intervals ----------------------------------------------------------------------------------


@given(policy=fixed_policies, n=st.integers(min_value=1, max_value=1000), seed=st.integers())
def test_fixed_delay_is_the_interval_every_time_without_jitter(
    policy: RetryPolicy, n: int, seed: int
) -> None:
    assert policy.delay(n, random.Random(seed)) == policy.interval


@given(data=st.data(), intervals=st.lists(seconds, min_size=1, max_size=MAX_ATTEMPTS - 1))
def test_intervals_delay_is_the_nth_entry(data: st.DataObject, intervals: list[float]) -> None:
    policy = RetryPolicy.from_intervals(intervals)
    n = data.draw(st.integers(min_value=1, max_value=len(intervals)))
    assert policy.delay(n) == intervals[n - 1]


@given(intervals=st.lists(seconds, max_size=MAX_ATTEMPTS - 1))
def test_intervals_give_one_attempt_more_than_entries(intervals: list[float]) -> None:
    assert RetryPolicy.from_intervals(intervals).max_attempts == len(intervals) + 1


def test_empty_intervals_mean_one_attempt_only() -> None:
    assert RetryPolicy.from_intervals([]).max_attempts == 1
    assert RetryPolicy.none().max_attempts == 1


def test_design_examples_parse() -> None:
    """The three JSON examples of DESIGN "Retry policy"."""
    exp = RetryPolicy.from_dict(
        {
            "strategy": "exponential",
            "initial_delay": 1,
            "multiplier": 2.0,
            "max_delay": 3600,
            "jitter": 0.1,
            "max_attempts": 5,
        }
    )
    fixed = RetryPolicy.from_dict({"strategy": "fixed", "interval": 60, "max_attempts": 4})
    listed = RetryPolicy.from_dict({"strategy": "intervals", "intervals": [60, 300, 1800, 7200]})
    assert (exp.max_attempts, fixed.max_attempts, listed.max_attempts) == (5, 4, 5)
    assert fixed.delay(3) == 60
    assert listed.delay(2) == 300


# -- at most 10 retries -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: RetryPolicy(max_attempts=MAX_ATTEMPTS + 1),
        lambda: RetryPolicy.exponential(max_attempts=MAX_ATTEMPTS + 1),
        lambda: RetryPolicy.fixed(interval=1, max_attempts=MAX_ATTEMPTS + 1),
        lambda: RetryPolicy.from_dict({"max_attempts": MAX_ATTEMPTS + 1}),
        lambda: RetryPolicy.from_dict({"strategy": "fixed", "max_attempts": MAX_ATTEMPTS + 1}),
        lambda: RetryPolicy(
            strategy="intervals", intervals=(1.0,) * MAX_ATTEMPTS, max_attempts=MAX_ATTEMPTS + 1
        ),
    ],
    ids=["direct", "exponential", "fixed", "from_dict", "from_dict-fixed", "direct-intervals"],
)
def test_more_than_eleven_attempts_are_refused_everywhere(build: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        build()
    assert caught.value.field == "retry.max_attempts"


def test_more_than_ten_intervals_are_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        RetryPolicy.from_intervals([1] * MAX_ATTEMPTS)
    assert caught.value.field == "retry.intervals"


def test_eleven_attempts_are_allowed() -> None:
    assert MAX_ATTEMPTS == 11
    assert RetryPolicy.exponential(max_attempts=11).max_attempts == 11
    assert RetryPolicy.from_intervals([1] * 10).max_attempts == 11


# -- JSON form --------------------------------------------------------------------------------------------


@given(policy=any_policy)
def test_to_dict_from_dict_round_trip(policy: RetryPolicy) -> None:
    assert RetryPolicy.from_dict(policy.to_dict()) == policy


@given(policy=any_policy)
def test_to_dict_survives_a_json_round_trip(policy: RetryPolicy) -> None:
    assert RetryPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def test_to_dict_holds_only_the_fields_of_its_strategy() -> None:
    assert set(RetryPolicy.fixed().to_dict()) == {"strategy", "interval", "max_attempts", "max_delay"}
    assert set(RetryPolicy.from_intervals([1]).to_dict()) == {
        "strategy",
        "intervals",
        "max_attempts",
        "max_delay",
    }
    assert "interval" not in RetryPolicy.exponential().to_dict()


def test_max_delay_of_a_fixed_policy_survives_storage() -> None:
    """max_delay caps Retry-After for every strategy, so the stored form must keep it."""
    policy = RetryPolicy.from_dict({"strategy": "fixed", "interval": 5, "max_delay": 120})
    assert RetryPolicy.from_dict(policy.to_dict()).max_delay == 120


def test_from_dict_defaults_to_exponential() -> None:
    assert RetryPolicy.from_dict({}) == RetryPolicy()


# -- validation names the field ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"strategy": "linear"}, "retry.strategy"),
        ({"strategy": ["fixed"]}, "retry.strategy"),
        ({"strategy": None}, "retry.strategy"),
        ({"initial_delay": -1}, "retry.initial_delay"),
        ({"initial_delay": "1"}, "retry.initial_delay"),
        ({"initial_delay": float("nan")}, "retry.initial_delay"),
        ({"multiplier": 0.5}, "retry.multiplier"),
        ({"multiplier": 101}, "retry.multiplier"),
        ({"jitter": 1.5}, "retry.jitter"),
        ({"jitter": True}, "retry.jitter"),
        ({"max_delay": float("inf")}, "retry.max_delay"),
        ({"max_delay": MAX_DELAY_S + 1}, "retry.max_delay"),
        ({"max_attempts": 0}, "retry.max_attempts"),
        ({"max_attempts": True}, "retry.max_attempts"),
        ({"max_attempts": 2.5}, "retry.max_attempts"),
        ({"max_attempts": "3"}, "retry.max_attempts"),
        ({"interval": 5}, "retry.interval"),  # not a field of exponential
        ({"strategy": "fixed", "interval": -1}, "retry.interval"),
        ({"strategy": "fixed", "multiplier": 2}, "retry.multiplier"),
        ({"strategy": "intervals", "intervals": "60,300"}, "retry.intervals"),
        ({"strategy": "intervals", "intervals": [60, "x"]}, "retry.intervals[1]"),
        ({"strategy": "intervals", "intervals": [-1]}, "retry.intervals[0]"),
        ({"strategy": "intervals", "intervals": [60], "max_attempts": 5}, "retry.max_attempts"),
        ({"strategy": "intervals", "jitter": 0.1}, "retry.jitter"),
    ],
)
def test_invalid_policy_raises_validation_error_naming_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        RetryPolicy.from_dict(data)
    assert caught.value.field == field
    assert field in caught.value.message


def test_a_policy_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        RetryPolicy.from_dict([1, 2])  # type: ignore[arg-type]
    assert caught.value.field == "retry"


def test_field_prefix_is_the_callers() -> None:
    with pytest.raises(ValidationError) as caught:
        RetryPolicy.from_dict({"jitter": 2}, field_="business.retry")
    assert caught.value.field == "business.retry.jitter"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial_delay": -1.0}, "retry.initial_delay"),
        ({"multiplier": 0.0}, "retry.multiplier"),
        ({"strategy": "fixed", "interval": -5.0}, "retry.interval"),
        ({"jitter": 2.0}, "retry.jitter"),
        ({"max_delay": -1.0}, "retry.max_delay"),
        ({"strategy": "intervals", "intervals": (-1.0,), "max_attempts": 2}, "retry.intervals[0]"),
        ({"strategy": "intervals", "intervals": (1.0,), "max_attempts": 3}, "retry.max_attempts"),
        ({"strategy": "sometimes"}, "retry.strategy"),
    ],
)
def test_a_policy_built_directly_is_validated_too(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        RetryPolicy(**kwargs)
    assert caught.value.field == field


def test_retry_numbers_start_at_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        RetryPolicy().delay(0)


def test_policy_is_immutable() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_attempts = 3  # type: ignore[misc]


@pytest.mark.parametrize("key", ["max_delay", "initial_delay", "interval"])
def test_a_delay_past_thirty_days_is_refused_in_seconds_a_reader_can_read(key: str) -> None:
    """The bound read ``between 0 and 2.592e+06``."""
    strategy = "fixed" if key == "interval" else "exponential"
    with pytest.raises(ValidationError) as info:
        RetryPolicy.from_dict({"strategy": strategy, key: 99_999_999})
    assert info.value.message == f"retry.{key} must be between 0 and 2592000 seconds (30 days)"
    with pytest.raises(ValidationError) as info:
        RetryPolicy.from_dict({"strategy": "intervals", "intervals": [60, 99_999_999]})
    assert info.value.message == "retry.intervals[1] must be between 0 and 2592000 seconds (30 days)"
