"""fine-tuning method: supervised or dpo

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 08:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every job before this one was supervised.
    op.add_column("fine_tuning_jobs", sa.Column("method", sa.String(20), nullable=False,
                                                server_default="supervised"))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:  # SQLite rebuilds the table
        batch.drop_column("method")
