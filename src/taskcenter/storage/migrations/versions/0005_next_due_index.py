"""ix_tasks_due_time: a predicate no claim implies, so the claim is never planned through it

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 16:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

DUE = "status IN ('pending', 'retrying')"
NEXT_DUE = f"{DUE} AND priority IS NOT NULL"


def _due_time(where: str) -> None:
    op.drop_index("ix_tasks_due_time", table_name="tasks")
    op.create_index(
        "ix_tasks_due_time",
        "tasks",
        ["next_attempt_at"],
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    _due_time(NEXT_DUE)


def downgrade() -> None:
    _due_time(DUE)
