"""traffic control: shared limiter and breaker state, fair-claim and in-flight indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DUE = "status IN ('pending', 'retrying')"
PROCESSING = "status = 'processing'"


def upgrade() -> None:
    op.create_table(
        "host_state",
        sa.Column("host", sa.String(length=300), nullable=False),
        sa.Column("tokens", sa.Float(), server_default="0", nullable=False),
        sa.Column("refilled_at", sa.Float(), server_default="0", nullable=False),
        sa.Column("breaker", sa.String(length=10), server_default="closed", nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("window", sa.String(length=100), server_default="", nullable=False),
        sa.Column("open_until", sa.Float(), server_default="0", nullable=False),
        sa.Column("probe_until", sa.Float(), server_default="0", nullable=False),
        sa.Column("paused_until", sa.Float(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("host", name=op.f("pk_host_state")),
    )
    op.create_table(
        "business_state",
        sa.Column("business_pk", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Float(), server_default="0", nullable=False),
        sa.Column("refilled_at", sa.Float(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("business_pk", name=op.f("pk_business_state")),
    )
    op.create_index(
        "ix_tasks_due_business",
        "tasks",
        ["business_pk", sa.text("priority DESC"), "next_attempt_at"],
        postgresql_where=sa.text(DUE),
        sqlite_where=sa.text(DUE),
    )
    op.create_index(
        "ix_tasks_processing_host",
        "tasks",
        ["host"],
        postgresql_where=sa.text(PROCESSING),
        sqlite_where=sa.text(PROCESSING),
    )
    op.create_index(
        "ix_tasks_processing_business",
        "tasks",
        ["business_pk"],
        postgresql_where=sa.text(PROCESSING),
        sqlite_where=sa.text(PROCESSING),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_processing_business", table_name="tasks")
    op.drop_index("ix_tasks_processing_host", table_name="tasks")
    op.drop_index("ix_tasks_due_business", table_name="tasks")
    op.drop_table("business_state")
    op.drop_table("host_state")
