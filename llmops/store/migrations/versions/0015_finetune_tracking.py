"""fine-tuning tracking and billing: a job's integrations and MLflow run, training prices,
trained tokens in the ledger

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 08:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("fine_tuning_jobs", sa.Column("integrations", sa.JSON(), nullable=True))
    op.add_column("fine_tuning_jobs", sa.Column("tracking", sa.JSON(), nullable=True))
    op.add_column("model_prices", sa.Column("training_per_mtok",
                                            sa.Numeric(precision=20, scale=10), nullable=True))
    # A constant server default: PostgreSQL adds the column without rewriting the ledger.
    op.add_column("usage_records", sa.Column("trained_tokens", sa.Integer(), nullable=False,
                                             server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("trained_tokens")
    with op.batch_alter_table("model_prices") as batch:  # SQLite rebuilds the table
        batch.drop_column("training_per_mtok")
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("tracking")
        batch.drop_column("integrations")
