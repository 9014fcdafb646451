"""tasks.notified_at: notifications queued in one transaction with their mark, so a sweep finds the ones a crash lost

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from taskcenter.storage.schema import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UNNOTIFIED = "notified_at IS NULL AND status IN ('succeeded', 'failed', 'cancelled') AND notify <> 'null'"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column("tasks", sa.Column("notified_at", UTCDateTime(), nullable=True))
    where = f"{UNNOTIFIED}::jsonb" if dialect == "postgresql" else UNNOTIFIED
    # Tasks that finished before this release had their notifications queued (or lost) already: the sweep is for
    # what ends from now on, not a replay of the past.
    op.execute(f"UPDATE tasks SET notified_at = finished_at WHERE {where}")
    op.create_index(
        "ix_tasks_unnotified",
        "tasks",
        ["finished_at"],
        postgresql_where=sa.text(f"{UNNOTIFIED}::jsonb"),
        sqlite_where=sa.text(UNNOTIFIED),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_unnotified", table_name="tasks")
    op.drop_column("tasks", "notified_at")
