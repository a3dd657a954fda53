"""tenant weights: each tenant's share of busy replicas

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 05:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("weight", sa.Integer(), nullable=False,
                                       server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:  # SQLite rebuilds the table
        batch.drop_column("weight")
