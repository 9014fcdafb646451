"""Due indexes by task type: HTTP tasks' and processor tasks' apart, so a worker claims only what it can run

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

DUE = "status IN ('pending', 'retrying')"
HTTP_DUE = f"{DUE} AND type = 'http'"
PROCESSOR_DUE = f"{DUE} AND type <> 'http'"
ALWAYS = "priority IS NOT NULL"  # the term no claim states (see schema.NEXT_DUE_SQL)


def _index(name: str, columns: list[str | sa.TextClause], where: str) -> None:
    op.create_index(name, "tasks", columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where))


def _http_due(due: str) -> None:
    """(Re)build the claim's and the next-due look-up's indexes of HTTP tasks over ``due``."""
    for name in ("ix_tasks_due", "ix_tasks_due_business", "ix_tasks_due_time"):
        op.drop_index(name, table_name="tasks")
    _index("ix_tasks_due", [sa.text("priority DESC"), "next_attempt_at"], due)
    _index("ix_tasks_due_business", ["business_pk", sa.text("priority DESC"), "next_attempt_at"], due)
    _index("ix_tasks_due_time", ["next_attempt_at"], f"{due} AND {ALWAYS}")


def upgrade() -> None:
    _http_due(HTTP_DUE)
    _index(
        "ix_tasks_due_type",
        ["type", "business_pk", sa.text("priority DESC"), "next_attempt_at"],
        PROCESSOR_DUE,
    )
    _index("ix_tasks_due_type_time", ["type", "next_attempt_at"], f"{PROCESSOR_DUE} AND {ALWAYS}")


def downgrade() -> None:
    op.drop_index("ix_tasks_due_type_time", table_name="tasks")
    op.drop_index("ix_tasks_due_type", table_name="tasks")
    _http_due(DUE)
