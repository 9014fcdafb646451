"""The exceptions taskcenter raises. Each class's docstring is its default message.

Tree::

    TaskCenterError
    ├── ConfigError
    │   └── SecretKeyError         (crypto) TASKCENTER_SECRET_KEY cannot decrypt a stored value
    │       └── BusinessSecretError     (crypto) … a business's signing or JWT secret
    ├── ValidationError            bad input; carries the offending field
    ├── NotFound
    │   ├── TaskNotFound
    │   └── BusinessNotFound
    ├── Conflict
    │   ├── DuplicateTask          a live task already has this business_id
    │   └── InvalidTransition      the task's state does not allow the change (compare-and-set lost)
    ├── LimitExceeded              a per-business limit refuses the request
    ├── AuthError
    │   ├── Unauthenticated
    │   └── Forbidden
    ├── StorageError               wraps the database driver's error as __cause__
    │   └── SchemaOutOfDate
    ├── BlockedAddress             the SSRF guard refused a destination
    └── ProcessorError
        └── PermanentFailure       raised by a processor: fail now, no retry
"""

from __future__ import annotations

from typing import Any


class TaskCenterError(Exception):
    """taskcenter failed."""

    def __init__(self, message: str | None = None, **context: Any) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.context = context
        super().__init__(self.message)


class ConfigError(TaskCenterError):
    """The configuration is invalid."""


class ValidationError(TaskCenterError):
    """The input is invalid."""

    def __init__(self, message: str | None = None, *, field: str | None = None, **context: Any) -> None:
        super().__init__(message, field=field, **context)
        self.field = field


class NotFound(TaskCenterError):
    """Not found."""


class TaskNotFound(NotFound):
    """No such task."""


class BusinessNotFound(NotFound):
    """No such business system."""


class Conflict(TaskCenterError):
    """The request conflicts with the current state."""


class DuplicateTask(Conflict):
    """A live task with this business_id already exists."""

    def __init__(self, message: str | None = None, *, existing_id: str | None = None, **context: Any) -> None:
        super().__init__(message, existing_id=existing_id, **context)
        self.existing_id = existing_id


class InvalidTransition(Conflict):
    """The task's current status does not allow this change."""

    def __init__(
        self,
        message: str | None = None,
        *,
        current: str | None = None,
        target: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, current=current, target=target, **context)
        self.current = current
        self.target = target


class LimitExceeded(TaskCenterError):
    """A limit of this business system was reached."""

    def __init__(self, message: str | None = None, *, limit: str | None = None, **context: Any) -> None:
        super().__init__(message, limit=limit, **context)
        self.limit = limit


class AuthError(TaskCenterError):
    """Authentication or authorisation failed."""


class Unauthenticated(AuthError):
    """Missing or invalid credentials."""


class Forbidden(AuthError):
    """These credentials may not do this."""


class StorageError(TaskCenterError):
    """The database failed."""


class SchemaOutOfDate(StorageError):
    """The database schema is out of date: run `taskcenter migrate`."""


class BlockedAddress(TaskCenterError):
    """The destination address is not allowed by the SSRF guard."""


class ProcessorError(TaskCenterError):
    """A task processor failed."""


class PermanentFailure(ProcessorError):
    """The processor reported a permanent failure: the task fails without retry."""
