"""tasks.held_by: the host whose traffic control put a task back, so relaxing its limits pulls the task forward

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 09:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

HELD = "held_by IS NOT NULL AND status IN ('pending', 'retrying')"


def upgrade() -> None:
    op.add_column("tasks", sa.Column("held_by", sa.String(length=300), nullable=True))
    op.create_index(
        "ix_tasks_held",
        "tasks",
        ["held_by", "next_attempt_at"],
        postgresql_where=sa.text(HELD),
        sqlite_where=sa.text(HELD),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_held", table_name="tasks")
    op.drop_column("tasks", "held_by")
