"""guardrails policies and events

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 08:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Policies on tenants and keys; what guardrails did, on each usage record.
_TABLES = ("tenants", "api_keys", "usage_records")


def upgrade() -> None:
    for table in _TABLES:
        op.add_column(table, sa.Column("guardrails", sa.JSON(), nullable=True))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:  # SQLite rebuilds the table
            batch.drop_column("guardrails")
