"""Task states and the one table of transitions allowed between them."""

from __future__ import annotations

import enum

from taskcenter.errors import InvalidTransition


class TaskStatus(enum.StrEnum):
    """Where a task is in its life."""

    PENDING = "pending"
    PROCESSING = "processing"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = TaskStatus

#: Every allowed (from, to) pair. The SQL layer enforces the same pairs with compare-and-set.
TRANSITIONS: frozenset[tuple[TaskStatus, TaskStatus]] = frozenset(
    {
        (S.PENDING, S.PROCESSING),  # claimed by a dispatcher
        (S.RETRYING, S.PROCESSING),
        (S.PROCESSING, S.SUCCEEDED),
        (S.PROCESSING, S.RETRYING),  # retryable failure, interrupted lease, or deferred by traffic control
        (S.PROCESSING, S.PENDING),  # released unsent on shutdown or deferral before the first attempt
        (S.PROCESSING, S.FAILED),
        (S.PROCESSING, S.CANCELLED),  # cancelled while in flight: the attempt is recorded, no further try
        (S.PENDING, S.CANCELLED),
        (S.RETRYING, S.CANCELLED),
        (S.PENDING, S.FAILED),  # e.g. refused at claim time (blocked, unknown processor)
        (S.RETRYING, S.FAILED),
        (S.FAILED, S.PENDING),  # manual retry renews the attempt budget
        (S.CANCELLED, S.PENDING),
    }
)

#: States from which a task can still be sent; only these count as "live" for business_id uniqueness.
LIVE: frozenset[TaskStatus] = frozenset({S.PENDING, S.PROCESSING, S.RETRYING})
TERMINAL: frozenset[TaskStatus] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
#: States in which the task's request and schedule may be changed.
EDITABLE: frozenset[TaskStatus] = frozenset({S.PENDING, S.RETRYING})
CANCELLABLE: frozenset[TaskStatus] = frozenset({S.PENDING, S.RETRYING, S.PROCESSING})
RETRYABLE_BY_HAND: frozenset[TaskStatus] = frozenset({S.FAILED, S.CANCELLED})


def can_transition(current: TaskStatus | str, target: TaskStatus | str) -> bool:
    """Whether the transition table allows ``current`` → ``target``."""
    return (TaskStatus(current), TaskStatus(target)) in TRANSITIONS


def check_transition(current: TaskStatus | str, target: TaskStatus | str) -> None:
    """Raise :class:`InvalidTransition` unless ``current`` → ``target`` is allowed."""
    if not can_transition(current, target):
        raise InvalidTransition(
            f"a {current} task cannot become {target}", current=str(current), target=str(target)
        )


def sources_of(target: TaskStatus) -> frozenset[TaskStatus]:
    """All states from which ``target`` can be reached: the ``WHERE status IN (...)`` of a compare-and-set."""
    return frozenset(a for a, b in TRANSITIONS if b == target)
