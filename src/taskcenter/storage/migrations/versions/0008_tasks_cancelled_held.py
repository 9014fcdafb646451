"""ix_tasks_cancelled_held: a worker finds the tasks it holds that were cancelled, to drop those not sent yet

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 11:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CANCELLED_HELD = "status = 'cancelled' AND lease_owner IS NOT NULL"


def upgrade() -> None:
    op.create_index(
        "ix_tasks_cancelled_held",
        "tasks",
        ["lease_owner"],
        postgresql_where=sa.text(CANCELLED_HELD),
        sqlite_where=sa.text(CANCELLED_HELD),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_cancelled_held", table_name="tasks")
