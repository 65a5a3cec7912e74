"""chunk leases, failures, job idempotency keys

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("chunk", sa.Column("claimed_by", sa.Text(), nullable=True))
    op.add_column("chunk", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("chunk", sa.Column("failures", sa.Integer(), nullable=False, server_default="0"))
    op.alter_column("chunk", "failures", server_default=None)
    op.create_index(
        "ix_chunk_pending",
        "chunk",
        ["job_id", "index"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.add_column("job", sa.Column("idempotency_key", sa.Text(), nullable=True))
    op.create_unique_constraint("uq_job_idempotency_key", "job", ["idempotency_key"])


def downgrade() -> None:
    op.drop_constraint("uq_job_idempotency_key", "job")
    op.drop_column("job", "idempotency_key")
    op.drop_index("ix_chunk_pending", table_name="chunk")
    op.drop_column("chunk", "failures")
    op.drop_column("chunk", "lease_expires_at")
    op.drop_column("chunk", "claimed_by")
