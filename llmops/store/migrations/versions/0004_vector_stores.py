"""vector stores and their files

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 02:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vector_stores",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_active_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_vstores_tenant_time", "vector_stores", ["tenant_id", "created_at"])
    op.create_table(
        "vector_store_files",
        sa.Column("store_id", sa.String(length=40), nullable=False),
        sa.Column("file_id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("last_error", sa.JSON(), nullable=True),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("chunking", sa.JSON(), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("usage_bytes", sa.BigInteger(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["store_id"], ["vector_stores.id"]),
        sa.PrimaryKeyConstraint("store_id", "file_id"),
    )
    op.create_index("ix_vsfiles_store_time", "vector_store_files", ["store_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_vsfiles_store_time", table_name="vector_store_files")
    op.drop_table("vector_store_files")
    op.drop_index("ix_vstores_tenant_time", table_name="vector_stores")
    op.drop_table("vector_stores")
