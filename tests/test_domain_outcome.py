"""classify() and decide(): what an attempt's result means and what happens to the task next."""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskcenter.domain.outcome import (
    AttemptResult,
    Classification,
    Decision,
    Outcome,
    classify,
    decide,
    parse_retry_after,
)
from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.states import TRANSITIONS, TaskStatus

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def response(code: int, headers: Mapping[str, str] | None = None) -> AttemptResult:
    return AttemptResult(status_code=code, headers=headers)


# -- classify ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "outcome", "retryable"),
    [
        (200, Outcome.SUCCESS, False),
        (201, Outcome.SUCCESS, False),
        (204, Outcome.SUCCESS, False),
        (299, Outcome.SUCCESS, False),
        (301, Outcome.CLIENT_ERROR, False),
        (400, Outcome.CLIENT_ERROR, False),
        (401, Outcome.CLIENT_ERROR, False),
        (403, Outcome.CLIENT_ERROR, False),
        (404, Outcome.CLIENT_ERROR, False),
        (409, Outcome.CLIENT_ERROR, False),
        (422, Outcome.CLIENT_ERROR, False),
        (408, Outcome.CLIENT_ERROR, True),
        (425, Outcome.CLIENT_ERROR, True),
        (429, Outcome.RATE_LIMITED, True),
        (410, Outcome.STOPPED, False),
        (500, Outcome.SERVER_ERROR, True),
        (502, Outcome.SERVER_ERROR, True),
        (503, Outcome.SERVER_ERROR, True),
        (504, Outcome.SERVER_ERROR, True),
        (599, Outcome.SERVER_ERROR, True),
    ],
)
def test_status_codes_are_classified_by_the_design_rules(
    code: int, outcome: Outcome, retryable: bool
) -> None:
    assert classify(response(code)) == Classification(outcome, retryable)


@pytest.mark.parametrize(
    ("kind", "outcome", "retryable"),
    [
        ("timeout", Outcome.TIMEOUT, True),
        ("network_error", Outcome.NETWORK_ERROR, True),
        ("blocked", Outcome.BLOCKED, False),
        ("processor_error", Outcome.SERVER_ERROR, True),
        ("permanent_failure", Outcome.STOPPED, False),
    ],
)
def test_errors_without_a_response_are_classified_by_kind(
    kind: str, outcome: Outcome, retryable: bool
) -> None:
    assert classify(AttemptResult(error_kind=kind, error="boom")) == Classification(outcome, retryable)


def test_no_status_and_no_error_kind_counts_as_a_network_error() -> None:
    assert classify(AttemptResult()) == Classification(Outcome.NETWORK_ERROR, True)


def test_blocked_is_final_even_with_retry_on() -> None:
    assert classify(AttemptResult(error_kind="blocked"), retry_on=[400, 500]).retryable is False


@pytest.mark.parametrize("name", ["X-Task-Retry", "x-task-retry", "X-TASK-RETRY", "x-Task-retry"])
@pytest.mark.parametrize("value", ["stop", "STOP", "Stop", " stop "])
@pytest.mark.parametrize("code", [400, 429, 500, 503])
def test_x_task_retry_stop_stops_any_failure_whatever_the_case(name: str, value: str, code: int) -> None:
    assert classify(response(code, {name: value})) == Classification(Outcome.STOPPED, False)


@pytest.mark.parametrize("value", ["continue", "", "stopped", "no-stop"])
def test_other_x_task_retry_values_change_nothing(value: str) -> None:
    assert classify(response(503, {"X-Task-Retry": value})) == Classification(Outcome.SERVER_ERROR, True)


def test_a_success_stays_a_success_with_x_task_retry_stop() -> None:
    assert classify(response(200, {"X-Task-Retry": "stop"})).outcome is Outcome.SUCCESS


def test_410_stops_even_when_listed_in_retry_on() -> None:
    assert classify(response(410), retry_on=[410]) == Classification(Outcome.STOPPED, False)


@pytest.mark.parametrize("code", [400, 404, 409, 422])
def test_retry_on_makes_a_final_client_error_retryable(code: int) -> None:
    assert classify(response(code)).retryable is False
    assert classify(response(code), retry_on=[code]) == Classification(Outcome.CLIENT_ERROR, True)


def test_retry_on_only_affects_the_listed_codes() -> None:
    assert classify(response(404), retry_on=[409]).retryable is False


@pytest.mark.parametrize(
    ("codes", "code", "outcome"),
    [
        ([202], 202, Outcome.SUCCESS),
        ([202], 200, Outcome.CLIENT_ERROR),
        ([200, 404], 404, Outcome.SUCCESS),
        ([200, 201], 500, Outcome.SERVER_ERROR),
        ([302], 302, Outcome.SUCCESS),
    ],
)
def test_success_codes_replace_the_default_2xx(codes: Collection[int], code: int, outcome: Outcome) -> None:
    assert classify(response(code), success_codes=codes).outcome is outcome


def test_a_listed_non_success_code_that_is_not_retryable_is_final() -> None:
    assert classify(response(200), success_codes=[202]).retryable is False


@given(code=st.integers(min_value=100, max_value=599), retry_on=st.lists(st.integers(400, 599), max_size=5))
def test_classification_of_any_status_is_total_and_consistent(code: int, retry_on: list[int]) -> None:
    result = classify(response(code), retry_on=retry_on)
    assert (result.outcome is Outcome.SUCCESS) is (200 <= code <= 299)
    if result.outcome in (Outcome.SUCCESS, Outcome.STOPPED):
        assert result.retryable is False
    if code >= 500:
        assert result.retryable is True
    if 400 <= code < 500 and code not in (408, 425, 429, 410) and code not in retry_on:
        assert result == Classification(Outcome.CLIENT_ERROR, False)


# -- parse_retry_after ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (format_datetime(NOW - timedelta(hours=1), usegmt=True), 0.0),  # a date in the past means now
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("²", None),
        ("١٢", None),
        ("Mon, 32 Jan 2030 00:00:00 GMT", None),
    ],
)
def test_retry_after_parses_seconds_and_http_dates(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


@given(value=st.text())
def test_retry_after_parsing_never_raises(value: str) -> None:
    parsed = parse_retry_after(value, NOW)
    assert parsed is None or parsed >= 0


# -- decide -----------------------------------------------------------------------------------------------

FIXED = RetryPolicy.fixed(interval=30, max_attempts=3)


def decide_for(
    result: AttemptResult,
    *,
    attempt: int = 1,
    policy: RetryPolicy = FIXED,
    success_codes: Collection[int] | None = None,
    retry_on: Collection[int] = (),
) -> Decision:
    return decide(
        attempt=attempt,
        max_attempts=policy.max_attempts,
        classification=classify(result, success_codes, retry_on),
        policy=policy,
        now=NOW,
        headers=result.headers,
        status_code=result.status_code,
        rng=random.Random(1),
    )


def test_success_decides_succeeded_now() -> None:
    decision = decide_for(response(200))
    assert decision.status is TaskStatus.SUCCEEDED
    assert decision.finished_at == NOW
    assert decision.next_attempt_at is None


def test_a_retryable_failure_with_attempts_left_retries_after_the_policy_delay() -> None:
    decision = decide_for(response(500), attempt=1)
    assert decision.status is TaskStatus.RETRYING
    assert decision.next_attempt_at == NOW + timedelta(seconds=30)
    assert decision.finished_at is None
    assert decision.host_pause_s is None


def test_the_last_attempt_fails_the_task() -> None:
    decision = decide_for(response(500), attempt=3)
    assert decision.status is TaskStatus.FAILED
    assert decision.outcome is Outcome.SERVER_ERROR
    assert decision.finished_at == NOW
    assert decision.next_attempt_at is None


def test_an_interrupted_attempt_goes_again_at_once_while_the_budget_lasts() -> None:
    decision = decide_for(AttemptResult(error_kind="interrupted"), attempt=2)
    assert decision.status is TaskStatus.RETRYING and decision.next_attempt_at == NOW


def test_an_interrupted_last_attempt_fails_the_task_like_a_rescued_lease() -> None:
    """It used to stay retrying at 3/3 and the next worker sent a fourth try."""
    decision = decide_for(AttemptResult(error_kind="interrupted"), attempt=3)
    assert decision.status is TaskStatus.FAILED and decision.outcome is Outcome.INTERRUPTED
    assert decision.finished_at == NOW and decision.next_attempt_at is None


@pytest.mark.parametrize("result", [response(404), response(410), AttemptResult(error_kind="blocked")])
def test_a_final_result_fails_at_the_first_attempt(result: AttemptResult) -> None:
    assert decide_for(result, attempt=1).status is TaskStatus.FAILED


def test_one_attempt_policy_never_retries() -> None:
    decision = decide_for(AttemptResult(error_kind="timeout"), policy=RetryPolicy.none())
    assert decision.status is TaskStatus.FAILED
    assert decision.outcome is Outcome.TIMEOUT


def test_the_nth_retry_uses_the_nth_interval() -> None:
    policy = RetryPolicy.from_intervals([10, 20, 40])
    decision = decide_for(response(503), attempt=2, policy=policy)
    assert decision.next_attempt_at == NOW + timedelta(seconds=20)


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_seconds_on_429_and_503_sets_the_delay_and_pauses_the_host(code: int) -> None:
    decision = decide_for(response(code, {"Retry-After": "120"}))
    assert decision.status is TaskStatus.RETRYING
    assert decision.next_attempt_at == NOW + timedelta(seconds=120)
    assert decision.host_pause_s == 120


def test_retry_after_http_date_sets_the_delay() -> None:
    when = format_datetime(NOW + timedelta(minutes=5), usegmt=True)
    decision = decide_for(response(429, {"retry-after": when}))
    assert decision.next_attempt_at == NOW + timedelta(minutes=5)
    assert decision.host_pause_s == 300


@pytest.mark.parametrize("value", ["86400", format_datetime(NOW + timedelta(days=1), usegmt=True)])
def test_retry_after_is_capped_by_max_delay(value: str) -> None:
    policy = RetryPolicy.from_dict({"strategy": "fixed", "interval": 30, "max_attempts": 3, "max_delay": 600})
    decision = decide_for(response(503, {"Retry-After": value}), policy=policy)
    assert decision.next_attempt_at == NOW + timedelta(seconds=600)
    assert decision.host_pause_s == 600


def test_retry_after_cap_survives_the_stored_form_of_a_fixed_policy() -> None:
    """The dispatcher rebuilds the policy from its stored JSON, so max_delay must come back with it."""
    policy = RetryPolicy.from_dict({"strategy": "fixed", "interval": 30, "max_attempts": 3, "max_delay": 600})
    stored = RetryPolicy.from_dict(policy.to_dict())
    decision = decide_for(response(429, {"Retry-After": "86400"}), policy=stored)
    assert decision.host_pause_s == 600


@pytest.mark.parametrize("code", [500, 502, 504, 408])
def test_retry_after_on_other_statuses_is_ignored(code: int) -> None:
    decision = decide_for(response(code, {"Retry-After": "999"}))
    assert decision.next_attempt_at == NOW + timedelta(seconds=30)
    assert decision.host_pause_s is None


def test_unusable_retry_after_falls_back_to_the_policy() -> None:
    decision = decide_for(response(429, {"Retry-After": "later, maybe"}))
    assert decision.next_attempt_at == NOW + timedelta(seconds=30)
    assert decision.host_pause_s is None


def test_retry_after_on_the_last_attempt_still_pauses_the_host() -> None:
    decision = decide_for(response(429, {"Retry-After": "60"}), attempt=3)
    assert decision.status is TaskStatus.FAILED
    assert decision.host_pause_s == 60


def test_retry_after_with_x_task_retry_stop_fails_but_still_pauses_the_host() -> None:
    decision = decide_for(response(503, {"Retry-After": "60", "X-Task-Retry": "stop"}))
    assert decision.status is TaskStatus.FAILED
    assert decision.outcome is Outcome.STOPPED
    assert decision.host_pause_s == 60


@given(
    code=st.integers(min_value=100, max_value=599),
    retry_after=st.one_of(st.none(), st.text(max_size=40), st.integers(0, 10**7).map(str)),
    attempt=st.integers(min_value=1, max_value=11),
    max_delay=st.floats(min_value=0, max_value=7200),
    jitter=st.floats(min_value=0, max_value=1),
)
def test_decisions_are_allowed_moves_with_bounded_delays(
    code: int, retry_after: str | None, attempt: int, max_delay: float, jitter: float
) -> None:
    policy = RetryPolicy.exponential(initial_delay=1, max_delay=max_delay, jitter=jitter, max_attempts=11)
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    decision = decide(
        attempt=attempt,
        max_attempts=policy.max_attempts,
        classification=classify(response(code, headers)),
        policy=policy,
        now=NOW,
        headers=headers,
        status_code=code,
        rng=random.Random(0),
    )
    assert (TaskStatus.PROCESSING, decision.status) in TRANSITIONS
    if attempt >= policy.max_attempts:
        assert decision.status is not TaskStatus.RETRYING
    if decision.host_pause_s is not None:
        assert 0 <= decision.host_pause_s <= max_delay
    if decision.status is TaskStatus.RETRYING:
        assert decision.next_attempt_at is not None
        delay = (decision.next_attempt_at - NOW).total_seconds()
        assert 0 <= delay <= max_delay * (1 + jitter) + 1e-3
    else:
        assert decision.finished_at == NOW
