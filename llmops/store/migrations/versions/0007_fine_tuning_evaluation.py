"""fine-tuning jobs: the evaluation that gates an adapter's promotion

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22 08:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("fine_tuning_jobs", sa.Column("evaluation", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("fine_tuning_jobs", "evaluation")
