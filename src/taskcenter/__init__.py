"""taskcenter: reliable, scheduled, throttled delivery of outbound HTTP requests.

``import taskcenter`` stays light: the REST API and the CLI are imported only when used.
"""

from taskcenter._version import __version__
from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.task import Attempt, Task
from taskcenter.errors import (
    BlockedAddress,
    BusinessNotFound,
    Conflict,
    DuplicateTask,
    InvalidTransition,
    LimitExceeded,
    NotFound,
    PermanentFailure,
    TaskCenterError,
    TaskNotFound,
    ValidationError,
)
from taskcenter.library import TaskCenter

__all__ = [
    "Attempt",
    "BlockedAddress",
    "BusinessNotFound",
    "Conflict",
    "DuplicateTask",
    "InvalidTransition",
    "LimitExceeded",
    "NotFound",
    "PermanentFailure",
    "RetryPolicy",
    "Task",
    "TaskCenter",
    "TaskCenterError",
    "TaskNotFound",
    "ValidationError",
    "__version__",
]
