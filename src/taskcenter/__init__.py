"""taskcenter: reliable, scheduled, throttled delivery of outbound HTTP requests.

``import taskcenter`` stays light: the REST API and the CLI are imported only when used.
"""

__version__ = "0.1.0"

from taskcenter.domain.retry import RetryPolicy  # noqa: E402
from taskcenter.domain.task import Attempt, Task  # noqa: E402
from taskcenter.errors import (  # noqa: E402
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
from taskcenter.library import TaskCenter  # noqa: E402

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
