"""eval watches: evals run on a schedule, compared with a threshold and an accepted run

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "eval_watches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("eval_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=48), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("data_source", sa.JSON(), nullable=False),
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("min_pass_rate", sa.Float(), nullable=True),
        sa.Column("tolerance", sa.Float(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("enabled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_run_id", sa.String(length=40), nullable=True),
        sa.Column("last_completed_run_id", sa.String(length=40), nullable=True),
        sa.Column("accepted_run_id", sa.String(length=40), nullable=True),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("skipped_runs", sa.Integer(), nullable=False),
        sa.Column("last_skip_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_skip_reason", sa.String(length=256), nullable=True),
        sa.Column("last_error", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        # A deleted eval takes its watches along; a deleted run leaves an empty reference.
        sa.ForeignKeyConstraint(["eval_id"], ["evals.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["last_run_id"], ["eval_runs.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["last_completed_run_id"], ["eval_runs.id"],
                                ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["accepted_run_id"], ["eval_runs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_evalwatches_tenant_name"),
    )
    op.create_index("ix_evalwatches_due", "eval_watches", ["enabled", "next_run_at"])
    op.create_index("ix_evalwatches_eval", "eval_watches", ["eval_id"])


def downgrade() -> None:
    op.drop_index("ix_evalwatches_eval", table_name="eval_watches")
    op.drop_index("ix_evalwatches_due", table_name="eval_watches")
    op.drop_table("eval_watches")
