"""vector store file batches; the key that attached each vector store file

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 02:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vector_store_file_batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("store_id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        # A deleted vector store takes its batches along.
        sa.ForeignKeyConstraint(["store_id"], ["vector_stores.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_vsbatches_store_time", "vector_store_file_batches",
                    ["store_id", "created_at"])
    # Nullable: files attached before this revision have no recorded key, and ingestion
    # falls back to a usable key of the store's tenant for them.
    op.add_column("vector_store_files", sa.Column("key_id", sa.String(length=40),
                                                  nullable=True))
    op.add_column("vector_store_files", sa.Column("batch_id", sa.String(length=40),
                                                  nullable=True))
    op.create_index("ix_vector_store_files_batch_id", "vector_store_files", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_vector_store_files_batch_id", table_name="vector_store_files")
    with op.batch_alter_table("vector_store_files") as batch:
        batch.drop_column("batch_id")
        batch.drop_column("key_id")
    op.drop_index("ix_vsbatches_store_time", table_name="vector_store_file_batches")
    op.drop_table("vector_store_file_batches")
