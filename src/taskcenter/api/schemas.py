"""Request and response models of the REST API: they check shapes and types and document the contract.

Meaning (URLs, schedules, limits) is checked by the services; requests reach them as plain dicts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from taskcenter.intake import DATE_TIME, SCHEDULED_AT_FORMAT

Status = Literal["pending", "processing", "retrying", "succeeded", "failed", "cancelled"]
_METHOD = r"^(GET|POST|PUT|PATCH|DELETE|HEAD|get|post|put|patch|delete|head)$"
_URL = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#]+"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RetryIn(_In):
    """A retry policy (DESIGN "Retry policy"); fields beyond the strategy's own are refused."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"strategy": "intervals", "intervals": [60, 300]}]}
    )
    strategy: Literal["exponential", "fixed", "intervals"] = "exponential"
    max_attempts: int | None = Field(None, ge=1, le=11)
    initial_delay: float | None = Field(None, ge=0)
    multiplier: float | None = Field(None, ge=1, le=100)
    max_delay: float | None = Field(None, ge=0)
    jitter: float | None = Field(None, ge=0, le=1)
    interval: float | None = Field(None, ge=0)
    intervals: list[float] | None = Field(None, max_length=10)


class NotifyIn(_In):
    """Where to report the task's final state."""

    url: str | None = Field(None, max_length=8192)
    email: str | None = Field(None, max_length=254)
    on: list[Literal["succeeded", "failed", "cancelled"]] | None = Field(None, min_length=1, max_length=3)


class _TaskFields(_In):
    method: str | None = Field(None, pattern=_METHOD)
    url: str | None = Field(None, max_length=8192, pattern=_URL, examples=["https://api.example.com/hook"])
    headers: dict[str, str] | None = Field(None, max_length=100)
    json_: Any = Field(None, alias="json", examples=[{"order": 123}])
    form: dict[str, str | int | float | bool] | None = Field(None, max_length=1000)
    body: str | None = None
    content_type: str | None = Field(None, max_length=255)
    payload: Any = None
    delay: float | None = Field(None, ge=0, description="Seconds from now until the first attempt.")
    scheduled_at: datetime | None = Field(
        None,
        strict=False,
        description="When to send: an RFC 3339 date-time with a zone (e.g. 2030-01-31T12:00:00Z); not a number.",
    )
    retry: RetryIn | None = None
    timeout: float | None = Field(
        None, gt=0, le=30, description="Whole-request timeout in seconds (at most 30)."
    )
    priority: int | None = Field(None, ge=-1000, le=1000)
    success_codes: list[int] | None = Field(None, min_length=1, max_length=100)
    retry_on: list[int] | None = Field(None, min_length=1, max_length=100)
    follow_redirects: bool | None = None
    notify: NotifyIn | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("scheduled_at", mode="before")
    @classmethod
    def _date_time_text(cls, value: Any) -> Any:
        # Lax pydantic would take a number (or a string of digits) as a Unix time: a schedule in seconds is delay.
        if value is None or (isinstance(value, str) and DATE_TIME.fullmatch(value)):
            return value
        raise ValueError(SCHEDULED_AT_FORMAT.removeprefix("scheduled_at "))

    @field_validator("scheduled_at")
    @classmethod
    def _in_range(cls, value: datetime | None) -> datetime | None:
        # Converting an extreme date with a far offset to UTC overflows; that is bad input, not a crash.
        if value is None or value.tzinfo is None:
            return value
        try:
            return value.astimezone(UTC)
        except (OverflowError, ValueError) as exc:
            raise ValueError("out of range (in UTC it falls before year 1 or after 9999)") from exc

    @field_validator("url")
    @classmethod
    def _host_fits(cls, value: str | None) -> str | None:
        if value is None or len(value) <= 253:
            return value  # the host is part of the URL: it cannot be longer (and parsing costs per item)
        try:
            host = urlsplit(value).hostname
        except ValueError:
            return value  # the service names what is wrong with it
        if host is not None and len(host) > 253:
            raise ValueError("the host name is longer than 253 characters")
        return value


class TaskCreate(_TaskFields):
    """A task to create: an HTTP request (``url`` …) or, for a registered processor, ``type`` and ``payload``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "business_id": "order-123",
                    "method": "POST",
                    "url": "https://api.example.com/hook",
                    "headers": {"Authorization": "Bearer secret"},
                    "json": {"order": 123},
                    "delay": 600,
                    "retry": {"strategy": "intervals", "intervals": [60, 300]},
                    "timeout": 10,
                    "metadata": {"order": "123"},
                }
            ]
        }
    )
    business_id: str = Field(min_length=1, max_length=255, examples=["order-123"])
    type: str | None = Field(None, min_length=1, max_length=100)


class TaskUpdate(_TaskFields):
    """Changes to a ``pending`` or ``retrying`` task; only the fields given change."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"url": "https://api.example.com/v2/hook", "delay": 60}]}
    )


class BatchCreate(_In):
    """Up to 1,000 tasks stored in one transaction; each item is checked on its own."""

    tasks: list[TaskCreate] = Field(min_length=1, max_length=1000)


class RequestOut(BaseModel):
    method: str
    url: str
    headers: dict[str, str] = Field(description="Sensitive values (Authorization, tokens…) are masked.")
    body: str | None
    content_type: str | None


class TaskOut(BaseModel):
    """A task (DESIGN "Task representation"). Times are RFC 3339 UTC."""

    id: str = Field(examples=["0b6f5d4e-7a5b-4a2e-9d1c-3f2a1b0c9d8e"])
    business_code: str
    business_id: str
    type: str
    status: Status
    request: RequestOut | None
    payload: Any
    result: Any
    retry: dict[str, Any]
    timeout: float
    priority: int
    attempts: int
    max_attempts: int
    success_codes: list[int] | None
    retry_on: list[int] | None
    follow_redirects: bool
    notify: dict[str, Any] | None
    scheduled_at: datetime | None
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    finished_at: datetime | None
    last_response: dict[str, Any] | None
    last_error: str | None
    outcome: str | None
    metadata: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime


class AttemptOut(BaseModel):
    number: int
    started_at: datetime
    duration_ms: int | None
    request: dict[str, Any] | None
    response: dict[str, Any] | None
    outcome: str
    error: str | None
    worker: str | None


class AttemptList(BaseModel):
    attempts: list[AttemptOut]


class TaskPage(BaseModel):
    tasks: list[TaskOut]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next (older) page; null at the end."
    )


class BatchItem(BaseModel):
    index: int
    status: int = Field(description="201 stored, 409 duplicate business_id, 422 invalid.")
    task: TaskOut | None = None
    error: str | None = None
    field: str | None = None
    existing_id: str | None = None


class BatchResult(BaseModel):
    created: int
    failed: int
    results: list[BatchItem]


class BusinessSettings(_In):
    name: str | None = Field(None, min_length=1, max_length=200)
    rate_limit_per_minute: int | None = Field(None, ge=1, le=1_000_000)
    max_in_flight: int | None = Field(None, ge=1, le=100_000)
    max_active_tasks: int | None = Field(None, ge=1, le=10_000_000)
    retry: RetryIn | None = None
    allow_networks: list[str] | None = Field(None, max_length=100)
    allow_hosts: list[str] | None = Field(None, max_length=100)
    deny_hosts: list[str] | None = Field(None, max_length=100)


class BusinessCreate(BusinessSettings):
    """A business system to register."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "code": "payments",
                    "name": "Payments",
                    "rate_limit_per_minute": 1000,
                    "max_in_flight": 50,
                    "max_active_tasks": 10000,
                    "allow_networks": [],
                }
            ]
        }
    )
    code: str = Field(
        min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", examples=["payments"]
    )


class BusinessUpdate(BusinessSettings):
    """Changes to a business system; only the fields given change."""

    status: Literal["active", "disabled"] | None = None


class KeyOut(BaseModel):
    id: int
    prefix: str
    name: str | None
    role: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class BusinessOut(BaseModel):
    code: str
    name: str
    status: str
    rate_limit_per_minute: int
    max_in_flight: int | None
    max_active_tasks: int
    retry: dict[str, Any] | None
    allow_networks: list[str]
    allow_hosts: list[str]
    deny_hosts: list[str]
    signing_secrets: int = Field(
        description="How many signing secrets sign requests (two during a rotation)."
    )
    created_at: datetime
    updated_at: datetime
    keys: list[KeyOut] | None = None


class BusinessList(BaseModel):
    businesses: list[BusinessOut]


class Registered(BaseModel):
    """The new business, with its first credentials: shown this once, store them now."""

    business: BusinessOut
    api_key: str = Field(examples=["tc_q3Jw…"])
    key_id: int
    signing_secret: str = Field(examples=["whsec_…"])
    jwt_secret: str


class CredentialsRotate(_In):
    """Issue a new API key; the old ones stay valid for ``grace_hours`` (default: the server's setting)."""

    grace_hours: float | None = Field(None, ge=0, le=2160)
    signing_secret: bool = False
    jwt_secret: bool = False


class Rotated(BaseModel):
    api_key: str
    key_id: int
    old_keys_expire_at: datetime
    signing_secret: str | None
    jwt_secret: str | None


class Latency(BaseModel):
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    samples: int


class HostFigures(BaseModel):
    host: str
    tasks: int
    succeeded: int
    failed: int


class ProcessorDue(BaseModel):
    """A processor task type with tasks due and not claimed yet (only a worker with its processor claims them)."""

    type: str
    due: int
    oldest_due_at: datetime


class HeldBusiness(BaseModel):
    """A business with HTTP tasks held unsent until an operator acts, and why: ``signing_secret`` (its signing
    secret cannot be decrypted with TASKCENTER_SECRET_KEY; all its HTTP tasks are held) or ``sealed_headers``
    (these tasks' own sealed header values cannot be)."""

    business_code: str
    reason: str
    tasks: int
    task_ids: list[str] = Field(description="The ids of the first (oldest) 10 of those tasks.")


class StatsOut(BaseModel):
    """Counts by status (all time); success rate, latency and hosts over the window; processor tasks due now."""

    business_code: str | None
    window_hours: float
    since: datetime
    until: datetime
    counts: dict[str, int]
    total: int
    created: int
    succeeded: int
    failed: int
    success_rate: float | None
    latency_ms: Latency
    hosts: list[HostFigures]
    processors_due: list[ProcessorDue]
    held: list[HeldBusiness]
    businesses: int | None = None


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target: str
    business_code: str | None
    details: dict[str, Any] | None


class AuditPage(BaseModel):
    entries: list[AuditEntryOut]
    next_cursor: str | None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unreachable"]
    dispatcher: Literal["running", "off"]


class Problem(BaseModel):
    """An RFC 9457 problem; ``type`` is stable and names the kind of error."""

    type: str = Field(examples=["https://taskcenter.dev/problems/validation"])
    title: str
    status: int
    detail: str
    field: str | None = Field(None, description="The offending field, dotted (e.g. retry.max_attempts).")
    existing_id: str | None = Field(None, description="On a duplicate business_id: the live task holding it.")
    limit: str | None = Field(None, description="On 429: which limit refused the request.")
