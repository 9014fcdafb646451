"""The declared database schema (SQLAlchemy Core). Alembic migrations must build exactly this."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out: ``timestamptz`` on PostgreSQL, ISO text on SQLite."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LIVE_SQL = "status IN ('pending', 'processing', 'retrying')"
DUE_SQL = "status IN ('pending', 'retrying')"
HELD_SQL = "held_by IS NOT NULL AND status IN ('pending', 'retrying')"
#: Due HTTP tasks, which every worker claims, and due tasks of processors, which only a worker with the type's
#: processor registered claims: indexed apart, so that neither kind's backlog is read by a claim of the other (a
#: worker without processors would otherwise step over every waiting processor task in each claim).
HTTP_DUE_SQL = f"{DUE_SQL} AND type = 'http'"
PROCESSOR_DUE_SQL = f"{DUE_SQL} AND type <> 'http'"
#: The next-due look-up's index predicate: the due tasks, and a term that always holds (``priority`` is NOT NULL)
#: but that no claim states. A partial index serves only queries whose WHERE implies its predicate, so this keeps
#: PostgreSQL's planner from reading a claim through ``ix_tasks_due_time``: with statistics from before a backlog
#: arrived (ANALYZE saw no due tasks) it did, and then sorted every due task to take a batch — a claim of 100 read
#: all 20,000 due tasks (50 ms) instead of 100 in ``ix_tasks_due_business`` (1 ms).
NEXT_DUE_SQL = f"{HTTP_DUE_SQL} AND priority IS NOT NULL"
PROCESSOR_NEXT_DUE_SQL = f"{PROCESSOR_DUE_SQL} AND priority IS NOT NULL"


#: Finished tasks whose notifications are not queued yet (``notified_at`` is set in the transaction that queues
#: them). Normally a task stays here only between its final write and that transaction; what a crash leaves here
#: the notification sweep finds. ``notify`` is JSON ``null`` for a task without one (as SQLAlchemy stores None).
UNNOTIFIED_SQL = "notified_at IS NULL AND status IN ('succeeded', 'failed', 'cancelled') AND notify <> 'null'"
UNNOTIFIED_PG_SQL = f"{UNNOTIFIED_SQL}::jsonb"
#: Tasks cancelled while a worker held them (leased), until it lets go: in flight, or claimed ahead and not sent.
#: The workers look for theirs (by ``lease_owner``) to drop the unsent ones (``storage.queue``).
CANCELLED_HELD_SQL = "status = 'cancelled' AND lease_owner IS NOT NULL"


def _partial(where: str) -> dict[str, Any]:
    clause = sa.text(where)
    return {"postgresql_where": clause, "sqlite_where": clause}


businesses = sa.Table(
    "businesses",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("code", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="active"),
    sa.Column("rate_limit_per_minute", sa.Integer, nullable=False, server_default="1000"),
    sa.Column("max_in_flight", sa.Integer, nullable=True),
    sa.Column("max_active_tasks", sa.Integer, nullable=False, server_default="10000"),
    sa.Column("retry", JSON, nullable=True),
    sa.Column("allow_networks", JSON, nullable=True),
    sa.Column("allow_hosts", JSON, nullable=True),
    sa.Column("deny_hosts", JSON, nullable=True),
    sa.Column("signing_secrets", JSON, nullable=True),  # sealed, newest first; two during a rotation
    sa.Column("jwt_secret", sa.Text, nullable=True),  # sealed
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("business_pk", sa.Integer, sa.ForeignKey("businesses.id", ondelete="CASCADE"), nullable=True),
    sa.Column("role", sa.String(16), nullable=False),  # business | operator
    sa.Column("prefix", sa.String(16), nullable=False, index=True),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Column("last_used_at", UTCDateTime, nullable=True),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", BigID, primary_key=True),
    sa.Column("uuid", sa.Uuid(as_uuid=False), nullable=False, unique=True),
    sa.Column("business_pk", sa.Integer, sa.ForeignKey("businesses.id"), nullable=False),
    sa.Column("business_id", sa.String(255), nullable=False),
    sa.Column("type", sa.String(100), nullable=False, server_default="http"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("method", sa.String(10), nullable=True),
    sa.Column("url", sa.Text, nullable=True),
    sa.Column("host", sa.String(300), nullable=True),
    sa.Column("headers", JSON, nullable=True),
    sa.Column("body", sa.Text, nullable=True),
    sa.Column("content_type", sa.String(255), nullable=True),
    sa.Column("payload", JSON, nullable=True),
    sa.Column("result", JSON, nullable=True),
    sa.Column("retry", JSON, nullable=False),
    sa.Column("attempts", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.SmallInteger, nullable=False),
    sa.Column("timeout", sa.Float, nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("success_codes", JSON, nullable=True),
    sa.Column("retry_on", JSON, nullable=True),
    sa.Column("follow_redirects", sa.Boolean, nullable=False, server_default=sa.text("false")),
    sa.Column("notify", JSON, nullable=True),
    sa.Column("metadata", JSON, nullable=True),
    sa.Column("traceparent", sa.String(64), nullable=True),
    sa.Column("scheduled_at", UTCDateTime, nullable=True),
    sa.Column("next_attempt_at", UTCDateTime, nullable=False),
    sa.Column("last_attempt_at", UTCDateTime, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("lease_owner", sa.String(100), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    sa.Column("last_response", JSON, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("outcome", sa.String(20), nullable=True),
    # The host whose traffic control put the task back unsent (a rate limit, an in-flight cap, a pause, an open
    # circuit, or its business's limits), cleared when the task is claimed again: relaxing a limit pulls these
    # tasks forward instead of leaving them at the time the old limit gave them.
    sa.Column("held_by", sa.String(300), nullable=True),
    # When the task's notifications were queued for its final state (NULL while it is live, and for a task without
    # notify once finished); a manual retry clears it.
    sa.Column("notified_at", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # The claim walks this: due HTTP tasks, highest priority first, then oldest due.
    sa.Index("ix_tasks_due", sa.text("priority DESC"), "next_attempt_at", **_partial(HTTP_DUE_SQL)),
    # The dispatcher's "when is the next HTTP task due" look-up.
    sa.Index("ix_tasks_due_time", "next_attempt_at", **_partial(NEXT_DUE_SQL)),
    sa.Index("ix_tasks_lease", "lease_expires_at", **_partial("lease_owner IS NOT NULL")),
    sa.Index("uq_tasks_live_business_id", "business_pk", "business_id", unique=True, **_partial(LIVE_SQL)),
    sa.Index("ix_tasks_business_key", "business_pk", "business_id"),
    sa.Index("ix_tasks_business_list", "business_pk", "id"),
    sa.Index("ix_tasks_business_status", "business_pk", "status", "id"),
    sa.Index("ix_tasks_status", "status", "id"),
    sa.Index("ix_tasks_host", "host", "id"),
    sa.Index("ix_tasks_created_at", "created_at"),
    # Fair claim: each business's due HTTP tasks in its own order, so one backlog cannot starve another business.
    sa.Index(
        "ix_tasks_due_business",
        "business_pk",
        sa.text("priority DESC"),
        "next_attempt_at",
        **_partial(HTTP_DUE_SQL),
    ),
    # The same for processor tasks, per type: a worker claims only the types it has a processor for.
    sa.Index(
        "ix_tasks_due_type",
        "type",
        "business_pk",
        sa.text("priority DESC"),
        "next_attempt_at",
        **_partial(PROCESSOR_DUE_SQL),
    ),
    sa.Index("ix_tasks_due_type_time", "type", "next_attempt_at", **_partial(PROCESSOR_NEXT_DUE_SQL)),
    # In-flight counts for the per-host and per-business caps.
    sa.Index("ix_tasks_processing_host", "host", **_partial("status = 'processing'")),
    sa.Index("ix_tasks_processing_business", "business_pk", **_partial("status = 'processing'")),
    # Held tasks of one host, to pull forward when its limits are relaxed, its pause lifted or its circuit closed.
    sa.Index("ix_tasks_held", "held_by", "next_attempt_at", **_partial(HELD_SQL)),
    # A worker's cancelled held tasks (see CANCELLED_HELD_SQL): nearly always empty, so nearly free to keep.
    sa.Index("ix_tasks_cancelled_held", "lease_owner", **_partial(CANCELLED_HELD_SQL)),
    # The notification sweep's look-up (see UNNOTIFIED_SQL): nearly empty, so nearly free to keep.
    sa.Index(
        "ix_tasks_unnotified",
        "finished_at",
        postgresql_where=sa.text(UNNOTIFIED_PG_SQL),
        sqlite_where=sa.text(UNNOTIFIED_SQL),
    ),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", BigID, primary_key=True),
    sa.Column("task_id", BigID, sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    sa.Column("number", sa.SmallInteger, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("duration_ms", sa.Integer, nullable=True),
    sa.Column("request", JSON, nullable=True),
    sa.Column("response", JSON, nullable=True),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("worker", sa.String(100), nullable=True),
    sa.Index("ix_attempts_task", "task_id", "number"),
    # Latency figures look at a time window of attempts.
    sa.Index("ix_attempts_started_at", "started_at"),
)

host_policies = sa.Table(
    "host_policies",
    metadata,
    sa.Column("host", sa.String(300), primary_key=True),
    sa.Column("rate_per_second", sa.Float, nullable=True),
    sa.Column("burst", sa.Integer, nullable=True),
    sa.Column("max_in_flight", sa.Integer, nullable=True),
    sa.Column("breaker_failures", sa.Integer, nullable=True),
    sa.Column("breaker_ratio", sa.Float, nullable=True),
    sa.Column("breaker_window", sa.Integer, nullable=True),
    sa.Column("breaker_cooldown", sa.Float, nullable=True),
    sa.Column("paused_until", UTCDateTime, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# Shared limiter and breaker state: one row per host / business, updated under row locks by every dispatcher.
# Times here are epoch seconds (float): the token arithmetic is the same on both backends.
host_state = sa.Table(
    "host_state",
    metadata,
    sa.Column("host", sa.String(300), primary_key=True),
    sa.Column("tokens", sa.Float, nullable=False, server_default="0"),
    sa.Column("refilled_at", sa.Float, nullable=False, server_default="0"),
    sa.Column("breaker", sa.String(10), nullable=False, server_default="closed"),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("window", sa.String(100), nullable=False, server_default=""),
    sa.Column("open_until", sa.Float, nullable=False, server_default="0"),
    sa.Column("probe_until", sa.Float, nullable=False, server_default="0"),
    sa.Column("paused_until", sa.Float, nullable=False, server_default="0"),
)

business_state = sa.Table(
    "business_state",
    metadata,
    sa.Column("business_pk", sa.Integer, primary_key=True),
    sa.Column("tokens", sa.Float, nullable=False, server_default="0"),
    sa.Column("refilled_at", sa.Float, nullable=False, server_default="0"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", BigID, primary_key=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target_type", sa.String(32), nullable=False),
    sa.Column("target", sa.String(300), nullable=False),
    sa.Column("business_pk", sa.Integer, nullable=True),
    sa.Column("details", JSON, nullable=True),
    sa.Index("ix_audit_log_at", "at"),
)
