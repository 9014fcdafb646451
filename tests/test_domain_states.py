"""The six task states and the one transition table, checked pair by pair and by a hypothesis state machine."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from taskcenter.domain.outcome import AttemptResult, classify, decide
from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.states import (
    CANCELLABLE,
    EDITABLE,
    LIVE,
    RETRYABLE_BY_HAND,
    TERMINAL,
    TRANSITIONS,
    TaskStatus,
    can_transition,
    check_transition,
    sources_of,
)
from taskcenter.errors import Conflict, InvalidTransition

S = TaskStatus
ALL_PAIRS = list(itertools.product(TaskStatus, repeat=2))

#: DESIGN "Task states", written out by hand: the table must be exactly this.
DESIGNED = {
    (S.PENDING, S.PROCESSING),
    (S.RETRYING, S.PROCESSING),
    (S.PROCESSING, S.SUCCEEDED),
    (S.PROCESSING, S.RETRYING),
    (S.PROCESSING, S.PENDING),
    (S.PROCESSING, S.FAILED),
    (S.PROCESSING, S.CANCELLED),
    (S.PENDING, S.CANCELLED),
    (S.RETRYING, S.CANCELLED),
    (S.PENDING, S.FAILED),
    (S.RETRYING, S.FAILED),
    (S.FAILED, S.PENDING),
    (S.CANCELLED, S.PENDING),
}


def test_there_are_six_states() -> None:
    assert {s.value for s in TaskStatus} == {
        "pending",
        "processing",
        "retrying",
        "succeeded",
        "failed",
        "cancelled",
    }


def test_transition_table_is_the_designed_one() -> None:
    assert set(TRANSITIONS) == DESIGNED


def test_live_and_terminal_partition_the_states() -> None:
    assert set(TaskStatus) == LIVE | TERMINAL
    assert not LIVE & TERMINAL


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_can_transition_agrees_with_the_table(current: TaskStatus, target: TaskStatus) -> None:
    assert can_transition(current, target) is ((current, target) in TRANSITIONS)
    assert can_transition(current.value, target.value) is ((current, target) in TRANSITIONS)


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_check_transition_raises_exactly_on_pairs_outside_the_table(
    current: TaskStatus, target: TaskStatus
) -> None:
    if (current, target) in TRANSITIONS:
        check_transition(current, target)
        return
    with pytest.raises(InvalidTransition) as caught:
        check_transition(current, target)
    assert (caught.value.current, caught.value.target) == (current.value, target.value)


def test_invalid_transition_is_a_conflict() -> None:
    with pytest.raises(Conflict):
        check_transition("succeeded", "pending")


def test_no_state_transitions_to_itself() -> None:
    assert all(a != b for a, b in TRANSITIONS)


def test_succeeded_is_final() -> None:
    assert not any(a is S.SUCCEEDED for a, _ in TRANSITIONS)


def test_terminal_states_leave_only_by_manual_retry_to_pending() -> None:
    leaving = {(a, b) for a, b in TRANSITIONS if a in TERMINAL}
    assert leaving == {(s, S.PENDING) for s in RETRYABLE_BY_HAND}


def test_only_a_claim_enters_processing() -> None:
    assert sources_of(S.PROCESSING) == {S.PENDING, S.RETRYING}


def test_succeeded_is_reached_only_from_processing() -> None:
    """A task succeeds only through an attempt."""
    assert sources_of(S.SUCCEEDED) == {S.PROCESSING}


@pytest.mark.parametrize("target", list(TaskStatus))
def test_sources_of_is_the_where_clause_of_the_table(target: TaskStatus) -> None:
    assert sources_of(target) == {a for a, b in TRANSITIONS if b == target}


def test_cancellable_states_are_those_that_may_become_cancelled() -> None:
    assert sources_of(S.CANCELLED) == CANCELLABLE


def test_manual_retry_states_are_those_that_may_return_to_pending_unsent() -> None:
    assert {a for a in sources_of(S.PENDING) if a is not S.PROCESSING} == RETRYABLE_BY_HAND


def test_editable_states_are_the_waiting_ones() -> None:
    assert {S.PENDING, S.RETRYING} == EDITABLE
    assert EDITABLE < LIVE


def test_every_state_is_reachable_from_pending() -> None:
    seen, frontier = {S.PENDING}, [S.PENDING]
    while frontier:
        current = frontier.pop()
        for a, b in TRANSITIONS:
            if a == current and b not in seen:
                seen.add(b)
                frontier.append(b)
    assert seen == set(TaskStatus)


def test_an_unknown_state_name_is_refused() -> None:
    with pytest.raises(ValueError, match="nonsense"):
        can_transition("nonsense", "pending")


# -- state machine ----------------------------------------------------------------------------------------

NOW = datetime(2030, 1, 1, tzinfo=UTC)

attempt_results = st.one_of(
    st.builds(
        AttemptResult,
        status_code=st.sampled_from([200, 201, 204, 301, 400, 404, 408, 409, 410, 425, 429, 500, 503]),
        headers=st.sampled_from([None, {"X-Task-Retry": "stop"}, {"Retry-After": "5"}]),
    ),
    st.builds(
        AttemptResult,
        error_kind=st.sampled_from(
            ["timeout", "network_error", "blocked", "processor_error", "permanent_failure"]
        ),
    ),
)


class TaskLifecycle(RuleBasedStateMachine):
    """Drives one task through random claims, attempts, cancels, releases and manual retries.

    Every move is asked of the transition table first; moves the table refuses must raise and leave the task
    unchanged. The attempt rule goes through classify/decide, so their decisions must always be allowed moves.
    """

    status: TaskStatus
    policy: RetryPolicy
    attempts: int
    budget: int
    ever_succeeded: bool

    @initialize(
        policy=st.sampled_from([RetryPolicy.none(), RetryPolicy.fixed(1, 3), RetryPolicy.exponential()])
    )
    def created(self, policy: RetryPolicy) -> None:
        self.status = S.PENDING
        self.policy = policy
        self.attempts = 0
        self.budget = policy.max_attempts  # the max_attempts column: spent + renewed budget
        self.ever_succeeded = False

    def _move(self, target: TaskStatus) -> bool:
        """Apply ``target`` if the table allows it, checking check_transition agrees; return whether it moved."""
        allowed = (self.status, target) in TRANSITIONS
        assert can_transition(self.status, target) is allowed
        if not allowed:
            with pytest.raises(InvalidTransition):
                check_transition(self.status, target)
            return False
        check_transition(self.status, target)
        if self.status in TERMINAL:
            assert target is S.PENDING, "a terminal task left other than by manual retry"
            assert self.status is not S.SUCCEEDED
            self.budget = self.attempts + self.policy.max_attempts
        self.status = target
        return True

    @rule(goal=st.sampled_from(TaskStatus))
    def any_move(self, goal: TaskStatus) -> None:
        before = self.status
        if not self._move(goal):
            assert self.status is before

    @precondition(lambda self: self.status in (S.PENDING, S.RETRYING))
    @rule()
    def claim(self) -> None:
        assert self._move(S.PROCESSING)

    @precondition(lambda self: self.status is S.PROCESSING and self.attempts < self.budget)
    @rule(result=attempt_results)
    def attempt(self, result: AttemptResult) -> None:
        self.attempts += 1
        number_in_budget = self.attempts - (self.budget - self.policy.max_attempts)
        decision = decide(
            attempt=number_in_budget,
            max_attempts=self.policy.max_attempts,
            classification=classify(result),
            policy=self.policy,
            now=NOW,
            headers=result.headers,
            status_code=result.status_code,
        )
        assert decision.status in (S.SUCCEEDED, S.RETRYING, S.FAILED)
        assert self._move(decision.status), f"decide chose a move the table refuses: {decision.status}"
        if decision.status is S.RETRYING:
            assert self.attempts < self.budget, "a retry was scheduled with no attempt left"
            assert decision.next_attempt_at is not None and decision.next_attempt_at >= NOW
            assert decision.finished_at is None
        else:
            assert decision.finished_at == NOW

    @precondition(lambda self: self.status is S.PROCESSING)
    @rule()
    def release_unsent(self) -> None:
        assert self._move(S.PENDING if self.attempts == 0 else S.RETRYING)

    @rule()
    def cancel(self) -> None:
        cancellable = self.status in CANCELLABLE
        assert self._move(S.CANCELLED) is cancellable

    @precondition(lambda self: self.status in TERMINAL)
    @rule()
    def manual_retry(self) -> None:
        retryable = self.status in RETRYABLE_BY_HAND
        assert self._move(S.PENDING) is retryable

    @invariant()
    def succeeded_stays_succeeded(self) -> None:
        if self.ever_succeeded:
            assert self.status is S.SUCCEEDED
        self.ever_succeeded = self.status is S.SUCCEEDED

    @invariant()
    def attempts_stay_within_the_budget(self) -> None:
        assert self.attempts <= self.budget
        assert self.budget - self.attempts <= self.policy.max_attempts


TaskLifecycle.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_task_lifecycle = TaskLifecycle.TestCase
