"""What taskcenter means: task states, retry policy, outcome classification. Standard library only, no I/O."""

from taskcenter.domain.outcome import AttemptResult, Decision, Outcome, classify, decide
from taskcenter.domain.retry import MAX_ATTEMPTS, RetryPolicy
from taskcenter.domain.states import LIVE, TERMINAL, TaskStatus, can_transition, check_transition

__all__ = [
    "LIVE",
    "MAX_ATTEMPTS",
    "TERMINAL",
    "AttemptResult",
    "Decision",
    "Outcome",
    "RetryPolicy",
    "TaskStatus",
    "can_transition",
    "check_transition",
    "classify",
    "decide",
]
