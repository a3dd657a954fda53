"""cached prompt tokens: counted in the usage ledger, priced per model

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 05:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant server default: records written before this revision count no cached
    # tokens, and PostgreSQL adds the column without rewriting the ledger.
    op.add_column("usage_records", sa.Column("cached_tokens", sa.Integer(), nullable=False,
                                             server_default="0"))
    # Null: cached prompt tokens cost what other prompt tokens cost.
    op.add_column("model_prices", sa.Column("cached_input_per_mtok",
                                            sa.Numeric(precision=20, scale=10),
                                            nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_prices") as batch:
        batch.drop_column("cached_input_per_mtok")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("cached_tokens")
